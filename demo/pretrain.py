"""Format pre-training of the demo's fixture model: full-weight, short, on fictional documents.

Why: a randomly initialised tiny model cannot use rank-2 FFN adapters (they barely move its loss),
so the demo first teaches it the *format* of the task on documents disjoint from the demo corpus:

- ``augmented``: the very sequences the per-document adapters are later trained on (rule-augmented
  QA with the passage, with the rewrite, and closed-book; ``offline_encode.training_data``), so the
  adapters start from a model that already "reads" this format;
- ``passage``: natural questions with the document (or its rewrite) in the prompt (reading);
- ``closed``: the same questions with no passage, so the model learns to answer from facts stored
  in its weights, which is where an adapter writes them.

Every example is built with ``prag.prompt.build_prompt_ids``, the format used at inference.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from prag.errors import PragError
from prag.io import atomic_dir, atomic_write_json, iter_jsonl
from prag.prompt import build_prompt_ids


@dataclass(frozen=True)
class PretrainConfig:
    # The demo's recipe, sized to run in about 2 minutes on 2 CPU cores (0.6M-parameter model).
    steps: int = 600
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.05  # cosine decay to this fraction of the peak
    mix_augmented: float = 0.4  # fraction of examples that are adapter-style training sequences
    mix_passage: float = 0.35  # fraction of natural questions with the passage; the rest is closed-book
    n_qa: int = 7  # rule augmenter QA pairs per document (as in the demo's encode step)
    max_docs: int | None = None  # use only the first N pre-training documents
    seed: int = 0
    threads: int | None = None  # torch CPU threads; None leaves torch's default

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise PragError(f"pre-training steps and batch_size must be >= 1 (got {self.steps}, {self.batch_size})")
        if not (0 <= self.mix_augmented and 0 <= self.mix_passage and self.mix_augmented + self.mix_passage <= 1):
            raise PragError("mix_augmented and mix_passage must be >= 0 and sum to at most 1")


Triple = tuple[str, "list[str] | None", str]  # (question, passages or None, answer)


@dataclass
class PretrainExamples:
    """(question, passages, answer) pools the sampler draws from, one list per document.

    Examples are tokenised lazily (and memoised) because chat-templating every possible example
    up front costs more than the few thousand a short pre-training actually draws.
    """

    augmented: list[list[Triple]]
    passage: list[list[Triple]]
    closed: list[list[Triple]]

def read_pretrain_records(path: str | Path, max_docs: int | None = None) -> list[dict]:
    """Records ``{id, title, text, rewrite?, qa: [{question, answer}]}`` (demo/data/pretrain.jsonl)."""
    out = []
    for lineno, rec in iter_jsonl(path):
        for field in ("id", "text", "qa"):
            if field not in rec:
                raise PragError(f"{path}:{lineno}: pre-training record lacks field {field!r}")
        out.append(rec)
        if max_docs is not None and len(out) >= max_docs:
            break
    if not out:
        raise PragError(f"{path}: no pre-training records")
    return out


def build_examples(records: Sequence[dict], n_qa: int = 7) -> PretrainExamples:
    """The three example pools, built with the project's own augmenter and training-data recipe."""
    from offline_encode.augment.rule import RuleAugmenter, RuleAugmenterConfig
    from offline_encode.training_data import skip_reason, training_texts
    from retrieval.corpus import Document

    augmenter = RuleAugmenter(RuleAugmenterConfig(n_qa=n_qa))
    docs = [Document(id=r["id"], text=r["text"], title=r.get("title") or "") for r in records]
    augmented = [[] if skip_reason(rec) else training_texts(rec) for rec in augmenter.augment_documents(docs)]
    passage, closed = [], []
    for r in records:
        contexts = [r["text"]] + ([r["rewrite"]] if r.get("rewrite") else [])
        passage.append([(qa["question"], [c], qa["answer"]) for qa in r["qa"] for c in contexts])
        closed.append([(qa["question"], None, qa["answer"]) for qa in r["qa"]])
    return PretrainExamples(augmented, passage, closed)


class Tokenised:
    """Memoised ``build_prompt_ids`` (the inference prompt format) for triples."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[tuple, list[int]] = {}

    def __call__(self, triple: Triple) -> list[int]:
        question, passages, answer = triple
        key = (question, tuple(passages) if passages else None, answer)
        ids = self.cache.get(key)
        if ids is None:
            ids = self.cache[key] = build_prompt_ids(self.tokenizer, question, passages, answer)
        return ids


def sample_batch(pools: PretrainExamples, cfg: PretrainConfig, rng: random.Random) -> list[Triple]:
    """``batch_size`` examples: a random document, then a pool chosen by the mix."""
    batch = []
    n = len(pools.closed)
    while len(batch) < cfg.batch_size:
        i = rng.randrange(n)
        u = rng.random()
        pool = (pools.augmented if u < cfg.mix_augmented
                else pools.passage if u < cfg.mix_augmented + cfg.mix_passage else pools.closed)[i]
        if pool:
            batch.append(rng.choice(pool))
    return batch


def lr_factor(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio``."""
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    cos = 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
    return warm * max(cfg.min_lr_ratio, cos)


def pretrain(model_dir: str | Path, data: str | Path, out_dir: str | Path, cfg: PretrainConfig = PretrainConfig(),
             progress: bool = True) -> dict:
    """Full-weight pre-training of ``model_dir`` on ``data``; writes the model + tokenizer to ``out_dir``.

    The output is written atomically, so an interrupted run leaves no half-written model.
    Returns a summary (steps, seconds, first and last loss).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    records = read_pretrain_records(data, cfg.max_docs)
    t0 = time.perf_counter()
    pools = build_examples(records, cfg.n_qa)
    tokenise = Tokenised(tokenizer)
    prep_s = time.perf_counter() - t0
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    pad = tokenizer.pad_token_id
    model.train()
    losses: list[float] = []
    from tqdm import tqdm

    bar = tqdm(range(cfg.steps), desc="pre-train", unit="step", disable=not progress, dynamic_ncols=True)
    t1 = time.perf_counter()
    for _ in bar:
        batch = [tokenise(t) for t in sample_batch(pools, cfg, rng)]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, seq in enumerate(batch):
            ids[j, :len(seq)] = labels[j, :len(seq)] = torch.tensor(seq)
            mask[j, :len(seq)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    summary = {"config": asdict(cfg), "documents": len(records), "prepare_s": round(prep_s, 2),
               "train_s": round(time.perf_counter() - t1, 2), "first_loss": losses[0],
               "last_loss": sum(losses[-20:]) / len(losses[-20:])}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "pretrain.json", summary)
        src = Path(model_dir) / "fixture.json"
        if src.exists():  # keep the fixture description next to the weights
            (tmp / "fixture.json").write_bytes(src.read_bytes())
    return summary
