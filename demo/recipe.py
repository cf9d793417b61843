"""``make demo``: the whole PRAG pipeline on a bundled fictional corpus, offline, on a CPU.

Stages (each prints what it does and how long it took; a stage whose output exists is skipped,
so an interrupted demo resumes):

1. fixture   build a local Llama-architecture model + tokenizer (``prag.fixture_model``)
2. pretrain  short full-weight *format* pre-training on fictional documents disjoint from the
             demo's (``demo.pretrain``): a random tiny model cannot use rank-2 adapters
3. data      copy the demo corpus and its questions (``demo/data``) into the output folder
4. index     dense index of the corpus (``retrieval.index.build_index``)
5. augment   rule augmenter (``offline_encode.augment``)
6. encode    one LoRA per document (``offline_encode.encode.encode_corpus``), with the demo's
             recipe: more epochs and a higher learning rate than the paper's defaults
7. eval      none / rag / prag / combine with the eval harness (``engine.eval.harness``)

The demo proves that knowledge travels document -> augmentation -> LoRA -> merge -> vLLM: the
model cannot know these invented facts, so ``prag`` beating ``none`` can only come from the adapters.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from demo.data.generate import DEMO_CORPUS, DEMO_QUESTIONS, PRETRAIN
from demo.pretrain import PretrainConfig
from offline_encode.config import EncodeConfig
from prag.errors import PragError
from prag.io import atomic_write_json, atomic_write_jsonl, iter_jsonl

MODES = ("none", "rag", "prag", "combine")
RESULT_KEYS = ("em", "f1", "n", "questions_per_s", "by_type")


def demo_encode_config() -> EncodeConfig:
    """The demo's adapter recipe: the paper's LoRA shape (r=2, alpha=32, FFN targets) but 10 epochs
    at lr 3e-3 instead of 1 epoch at 3e-4, because a tiny model needs many more steps to store facts."""
    return EncodeConfig(learning_rate=3e-3, epochs=10, docs_per_step=64)


@dataclass
class DemoConfig:
    """What the demo runs. The defaults are ``make demo``; :func:`reduced_config` is the test's size."""

    model_size: str = "tiny"
    # A Hugging Face model (name or path) to use instead of the pre-trained fixture model; the
    # fixture and pre-training stages are then skipped, e.g. on a GPU:
    #   python -m demo.recipe --model meta-llama/Llama-3.2-1B-Instruct --top-k 3
    base_model: str | None = None
    dtype: str = "float32"  # vLLM dtype in the eval stage ("auto" for a real model on a GPU)
    seed: int = 0
    n_docs: int | None = None  # first N documents of demo/data/corpus.jsonl (None: all)
    n_questions: int | None = None  # first N questions about those documents (None: all)
    n_qa: int = 7  # rule augmenter QA pairs per document (the paper's default is 3)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    encode: EncodeConfig = field(default_factory=demo_encode_config)
    modes: tuple[str, ...] = MODES
    # Top-1, not the paper's top-3: on a 128-wide, 2-layer model the sum of three rank-2 adapters
    # (each trained 10 epochs) swamps the base weights and the output turns to noise (measured:
    # prag@3 EM 0.03 while the gold adapter alone reaches 0.81); see the README's demo section.
    top_k: int = 1
    max_model_len: int = 1024
    kv_cache_gib: int | None = 1  # VLLM_CPU_KVCACHE_SPACE must be an integer number of GiB
    # torch threads for the in-process stages (pre-training, encoding). The tiny model's matrices are
    # too small to gain from a second thread, and on a busy machine two threads are several times slower.
    torch_threads: int | None = 1
    corpus: str = str(DEMO_CORPUS)
    questions: str = str(DEMO_QUESTIONS)
    pretrain_data: str = str(PRETRAIN)
    progress: bool = True


def reduced_config(**overrides: Any) -> DemoConfig:
    """A smaller demo for the test suite: fewer documents and questions, shorter pre-training."""
    # Measured on 2 cores: 151 s in all, prag EM 0.52 vs none 0.00 (600 steps: 0.60).
    cfg = DemoConfig(n_docs=20, n_questions=60, pretrain=PretrainConfig(steps=400), progress=False)
    return replace(cfg, **overrides)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _stage(name: str, done: bool, what: str, fn: Callable[[], Any], timings: dict) -> Any:
    """Run one stage (or skip it when its output exists), printing what it does and its time."""
    if done:
        _log(f"[{name}] skip: {what} (output exists)")
        timings[name] = 0.0
        return None
    _log(f"[{name}] {what} ...")
    t0 = time.perf_counter()
    result = fn()
    timings[name] = round(time.perf_counter() - t0, 2)
    _log(f"[{name}] done in {timings[name]:.1f} s")
    return result


def _tokenizer_texts(cfg: DemoConfig) -> list[str]:
    """Pre-training text (documents, rewrites, questions, answers) for the tokenizer; the demo
    corpus itself is passed to the fixture builder as its corpus."""
    texts = []
    for _, rec in iter_jsonl(cfg.pretrain_data):
        texts.append(rec["text"])
        if rec.get("rewrite"):
            texts.append(rec["rewrite"])
        texts += [f"{qa['question']} {qa['answer']}" for qa in rec.get("qa", [])]
    return texts


def select_data(cfg: DemoConfig) -> tuple[list[dict], list[dict]]:
    """The demo documents and the generic-format questions about them (``n_docs``/``n_questions``)."""
    docs = [rec for _, rec in iter_jsonl(cfg.corpus)][: cfg.n_docs]
    if not docs:
        raise PragError(f"{cfg.corpus}: no documents")
    ids = {d["id"] for d in docs}
    questions = []
    for _, rec in iter_jsonl(cfg.questions):
        if rec.get("doc_id") in ids:
            questions.append({"id": rec["id"], "question": rec["question"], "answer": rec["answer"],
                              **({"type": rec["type"]} if rec.get("type") else {})})
    if cfg.n_questions is not None:
        questions = questions[: cfg.n_questions]
    if not questions:
        raise PragError(f"{cfg.questions}: no questions about the selected documents")
    return docs, questions


def demo_results(eval_results: dict, modes: tuple[str, ...]) -> dict:
    """The documented ``results.json`` shape: ``{mode: {em, f1, n, questions_per_s, by_type}}``."""
    return {m: {k: eval_results[m][k] for k in RESULT_KEYS if k in eval_results[m]} for m in modes}


def format_table(results: dict) -> str:
    lines = ["| mode | EM | F1 | n | questions/s |", "|---|---:|---:|---:|---:|"]
    for mode, r in results.items():
        lines.append(f"| {mode} | {r['em']:.3f} | {r['f1']:.3f} | {r['n']} | {r.get('questions_per_s', 0):.1f} |")
    return "\n".join(lines)


def _complete_eval(eval_dir: Path, modes: tuple[str, ...], n_questions: int) -> dict | None:
    """The eval harness's results.json when it already covers every mode and question, else None."""
    from engine.eval.harness import RESULTS_JSON

    path = eval_dir / RESULTS_JSON
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    if all(m in results and results[m].get("n") == n_questions for m in modes):
        return results
    return None


def run_demo(out_dir: str | Path, cfg: DemoConfig | None = None) -> dict:
    """Run (or resume) every stage into ``out_dir``; returns the ``results.json`` content."""
    from engine.eval.harness import EvalConfig, evaluate
    from engine.engine import EngineConfig
    from demo.pretrain import pretrain
    from offline_encode.augment.rule import RuleAugmenter, RuleAugmenterConfig
    from offline_encode.augment.run import augment_corpus
    from offline_encode.encode import encode_corpus
    from prag.store import AdapterStore
    from prag.fixture_model import build_fixture_model
    from retrieval.index import build_index
    from retrieval.manifest import MANIFEST_FILE

    cfg = cfg or DemoConfig()
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fixture, model = out / "fixture", out / "model"
    corpus, questions = out / "corpus.jsonl", out / "questions.jsonl"
    index, augmented, store, eval_dir = out / "index", out / "augmented.jsonl", out / "store", out / "eval"
    timings: dict[str, float] = {}
    started = time.perf_counter()

    if cfg.base_model:
        model = cfg.base_model  # a hub name or a local path
        _log(f"[fixture] skip: using the model {model}")
        _log("[pretrain] skip: a real model needs no format pre-training")
    else:
        _stage("fixture", (fixture / "config.json").exists(),
               f"build the {cfg.model_size} fixture model, tokenizer trained on the demo + pre-training text "
               f"-> {fixture}",
               lambda: build_fixture_model(fixture, size=cfg.model_size, corpus=cfg.corpus, seed=cfg.seed,
                                           extra_texts=_tokenizer_texts(cfg)), timings)
        p = cfg.pretrain
        summary = _stage(
            "pretrain", (model / "pretrain.json").exists(),
            f"format pre-training: {p.steps} steps x {p.batch_size}, lr {p.learning_rate}, on {cfg.pretrain_data} "
            f"(disjoint fictional people) -> {model}",
            lambda: pretrain(fixture, cfg.pretrain_data, model, p, progress=cfg.progress), timings)
        if summary:
            _log(f"[pretrain] loss {summary['first_loss']:.2f} -> {summary['last_loss']:.2f}")

    def write_data() -> None:
        docs, qs = select_data(cfg)
        atomic_write_jsonl(questions, qs)
        atomic_write_jsonl(corpus, [{"id": d["id"], "title": d.get("title", ""), "text": d["text"]} for d in docs])
        _log(f"[data] {len(docs)} documents, {len(qs)} questions")

    _stage("data", corpus.exists() and questions.exists(), f"copy the demo corpus and questions -> {out}",
           write_data, timings)
    _stage("index", (index / MANIFEST_FILE).exists(), f"dense index (all-MiniLM-L6-v2, exact) -> {index}",
           lambda: build_index(corpus, index, progress=cfg.progress), timings)
    n_docs = sum(1 for _ in iter_jsonl(corpus))
    n_aug = sum(1 for _ in iter_jsonl(augmented)) if augmented.exists() else 0
    _stage("augment", n_aug >= n_docs, f"rule augmenter, {cfg.n_qa} QA pairs + 1 rewrite per document -> {augmented}",
           lambda: augment_corpus(corpus, augmented, RuleAugmenter(RuleAugmenterConfig(n_qa=cfg.n_qa)),
                                  progress=cfg.progress), timings)
    e = cfg.encode
    n_store = 0
    if AdapterStore.exists(store):
        with AdapterStore.open(store) as s:
            n_store = len(s)
    enc = _stage("encode", n_store >= n_docs,
                 f"one LoRA per document: r={e.rank}, alpha={e.alpha}, lr {e.learning_rate}, {e.epochs} epochs "
                 f"-> {store}", lambda: encode_corpus(augmented, model, store, e, progress=cfg.progress), timings)
    if enc is not None:
        _log(f"[encode] {enc.format()}")

    def run_eval() -> dict:
        engine_cfg = EngineConfig(top_k=cfg.top_k, dtype=cfg.dtype, max_model_len=cfg.max_model_len,
                                  kv_cache_gib=cfg.kv_cache_gib, seed=cfg.seed)
        return evaluate(EvalConfig(dataset="generic", data=str(questions), out=str(eval_dir), model=str(model),
                                   index=str(index), store=str(store), modes=list(cfg.modes), engine=engine_cfg,
                                   progress=cfg.progress))

    n_questions = sum(1 for _ in iter_jsonl(questions))
    previous = _complete_eval(eval_dir, cfg.modes, n_questions)
    # evaluate() also resumes by itself, but only after starting a vLLM engine (~40 s)
    eval_results = _stage("eval", previous is not None,
                          f"evaluate {', '.join(cfg.modes)} on {n_questions} questions -> {eval_dir}",
                          run_eval, timings) or previous
    results = demo_results(eval_results, cfg.modes)
    atomic_write_json(out / "results.json", results)
    atomic_write_json(out / "timings.json", {**timings, "total": round(time.perf_counter() - started, 2)})
    _log("\n" + format_table(results))
    if "prag" in results and "none" in results:
        gain = results["prag"]["em"] - results["none"]["em"]
        _log(f"\nprag EM - none EM = {gain:+.3f} (knowledge carried by the adapters alone)")
    _log(f"results: {out / 'results.json'}; predictions and results.md: {eval_dir}; "
         f"total {time.perf_counter() - started:.0f} s")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.recipe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    parser.add_argument("--reduced", action="store_true", help="the test suite's smaller configuration")
    parser.add_argument("--top-k", type=int, default=None, help="documents merged per question (default 1)")
    parser.add_argument("--model", default=None,
                        help="use this Hugging Face model instead of the pre-trained fixture model (e.g. on a GPU)")
    args = parser.parse_args(argv)
    cfg = reduced_config(progress=True) if args.reduced else DemoConfig()
    if args.model:
        cfg = replace(cfg, base_model=args.model, dtype="auto")
    if args.top_k is not None:
        cfg = replace(cfg, top_k=args.top_k)
    try:
        run_demo(args.out, cfg)
    except PragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
