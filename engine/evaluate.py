"""Batch evaluation: EM/F1 per mode and per sub-type, throughput, resumable predictions.

Layout of ``--out``::

    config.json         what was evaluated (model, index, store + version, dataset, top_k, prompt)
    predictions.jsonl   one record per (question id, mode), appended batch by batch
    timing.json         seconds / questions / tokens per mode, summed over resumed runs
    results.json        {"<mode>": {"em", "f1", "precision", "recall", "n", "errors",
                                    "questions_per_s", "tokens_per_s", "by_type": {...}}}
    results.md          the paper-style table (one row per mode) and the per-sub-type table

Resuming: a rerun with the same settings skips every (id, mode) already in predictions.jsonl (a
torn last line from a crash is dropped). Settings that change answers (model, store, top_k,
prompt, ...) must match config.json, otherwise the run stops and asks for a new ``--out``.

Scale-out: ``answer_shard`` is a pure function from (engine, examples, mode) to records, with no
file I/O, so a Ray job can give each engine replica a shard and merge the records afterwards
with ``summarize``.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from engine.datasets import Example, load_dataset, resolve_dataset_name
from engine.engine import ADAPTER_MODES, Answer, Engine, EngineConfig, parse_modes
from engine.scoring import Score, mean_scores, score
from prag.errors import PragError
from prag.io import (OutputKind, atomic_write_json, atomic_write_text, check_output_dir, ensure_writable_dir,
                     json_marker, read_json)

PREDICTIONS = "predictions.jsonl"
TIMING = "timing.json"
CONFIG = "config.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
# --out: a previous evaluation (its config.json) is resumed; any other non-empty folder is refused
EVAL_OUTPUT = OutputKind("an evaluation run", "prag eval", json_marker(CONFIG, "dataset", "top_k", "prompt"))


@dataclass
class EvalConfig:
    """``prag eval`` settings; engine settings (top_k, prompt, vLLM) live in ``engine``."""

    dataset: str
    data: str
    out: str
    model: str = ""
    index: str | None = None
    store: str | None = None
    modes: list[str] = field(default_factory=lambda: ["none", "rag", "prag", "combine"])
    limit: int | None = None
    batch_size: int = 256  # questions per engine call; also the checkpoint granularity
    engine: EngineConfig = field(default_factory=EngineConfig)
    progress: bool = True


# -- pure parts (no I/O): usable per shard on any worker ------------------------------------------------

def make_record(example: Example, answer: Answer) -> dict:
    """One predictions.jsonl line: the answer, the exact ids fed to vLLM, and its scores."""
    s = score(answer.prediction, example["answers"]) if answer.ok else Score(0.0, 0.0, 0.0, 0.0)
    rec = {
        "id": example["id"], "question": example["question"], "mode": answer.mode,
        "answers": example["answers"], "doc_ids": answer.doc_ids, "scores": answer.scores,
        "prompt": answer.prompt, "prompt_token_ids": answer.prompt_token_ids,
        "output_token_ids": answer.output_token_ids, "text": answer.text, "prediction": answer.prediction,
        "em": s.em, "f1": s.f1, "precision": s.precision, "recall": s.recall,
    }
    if "type" in example:
        rec["type"] = example["type"]
    if answer.lora_name:
        rec["lora_name"] = answer.lora_name
    if answer.truncated:
        rec["truncated"], rec["truncation"] = True, answer.truncation
    if answer.error is not None:
        rec["error"] = answer.error
    return rec


def answer_shard(engine: Engine, examples: Sequence[Example], mode: str, top_k: int | None = None,
                 doc_ids: Sequence[Sequence[str] | None] | None = None) -> list[dict]:
    """Answer and score one shard of questions in one engine call (pure: no files touched)."""
    answers = engine.generate([ex["question"] for ex in examples], mode=mode, top_k=top_k, doc_ids=doc_ids)
    return [make_record(ex, a) for ex, a in zip(examples, answers)]


def _metrics(records: Sequence[dict]) -> dict:
    scores = [Score(r["em"], r["f1"], r.get("precision", 0.0), r.get("recall", 0.0)) for r in records]
    return {**mean_scores(scores), "n": len(records)}


def summarize(records: Sequence[dict], modes: Sequence[str], timing: dict | None = None) -> dict:
    """Per-mode (and per-sub-type) means from prediction records, plus throughput from ``timing``."""
    timing = timing or {}
    by_mode: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_mode[r["mode"]].append(r)
    out: dict[str, Any] = {}
    for mode in modes:
        recs = by_mode.get(mode, [])
        types: dict[str, list[dict]] = defaultdict(list)
        for r in recs:
            if r.get("type"):
                types[r["type"]].append(r)
        t = timing.get(mode, {})
        secs = t.get("seconds", 0.0)
        out[mode] = {
            **_metrics(recs),
            "errors": sum(1 for r in recs if r.get("error")),
            "truncated": sum(1 for r in recs if r.get("truncated")),
            "questions_per_s": t.get("questions", 0) / secs if secs > 0 else 0.0,
            "tokens_per_s": t.get("generated_tokens", 0) / secs if secs > 0 else 0.0,
            "by_type": {k: _metrics(v) for k, v in sorted(types.items())},
        }
    return out


def results_markdown(results: dict, title: str = "") -> str:
    lines = [f"# {title}\n" if title else "",
             "| mode | EM | F1 | precision | recall | n | errors | questions/s | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        lines.append(f"| {mode} | {r['em']:.4f} | {r['f1']:.4f} | {r['precision']:.4f} | {r['recall']:.4f} | "
                     f"{r['n']} | {r['errors']} | {r['questions_per_s']:.2f} | {r['tokens_per_s']:.1f} |")
    types = sorted({t for r in results.values() for t in r["by_type"]})
    if types:
        lines += ["", "EM / F1 by sub-type:", "",
                  "| mode | " + " | ".join(f"{t} (n)" for t in types) + " |",
                  "|---|" + "---|" * len(types)]
        for mode, r in results.items():
            cells = []
            for t in types:
                m = r["by_type"].get(t)
                cells.append(f"{m['em']:.3f} / {m['f1']:.3f} ({m['n']})" if m else "-")
            lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line is not None).lstrip("\n") + "\n"


# -- files -------------------------------------------------------------------------------------

def read_predictions(path: Path) -> list[dict]:
    """Records already written; a torn final line (crash mid-write) is cut from the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1  # bytes up to the last newline; the rest is a torn write
    records = []
    for n, raw in enumerate(data[:complete].split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(raw))
        except json.JSONDecodeError:
            raise PragError(f"{path}:{n}: malformed JSON; the predictions file is damaged "
                            f"(delete it, or choose a new --out)") from None
    if complete < len(data):
        with open(path, "rb+") as fh:
            fh.truncate(complete)
    return records


def _append(path: Path, records: Sequence[dict]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        fh.flush()
        os.fsync(fh.fileno())


def _run_identity(cfg: EvalConfig, engine: Engine) -> dict:
    """Settings that change answers: a resumed run must match them."""
    ec = engine.config

    def where(p) -> str | None:  # relative and absolute spellings of one path must match on resume
        return str(Path(p).resolve()) if p else None

    model = cfg.model or engine.model
    return {
        "model": where(model) if Path(model).exists() else str(model), "index": where(cfg.index),
        "store": where(cfg.store), "store_version": engine.store.version if engine.store is not None else None,
        "dataset": resolve_dataset_name(cfg.dataset), "data": where(cfg.data), "top_k": ec.top_k,
        "max_new_tokens": engine.max_new_tokens, "chain_of_thought": engine.prompt_cfg.chain_of_thought,
        "prompt": {"user_template": engine.prompt_cfg.user_template,
                   "assistant_prefix": engine.prompt_cfg.assistant_prefix,
                   "fewshot": engine.prompt_cfg.fewshot if engine.prompt_cfg.chain_of_thought else "",
                   "passage_format": engine.prompt_cfg.passage_format},
        "retrieval_method": ec.retrieval_method, "max_model_len": engine.max_model_len,
    }


def _check_identity(out: Path, ident: dict) -> None:
    path = out / CONFIG
    if path.exists():
        old = read_json(path, "evaluation config")
        diff = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
        if diff:
            detail = "; ".join(f"{k}: before {old.get(k)!r}, now {ident.get(k)!r}" for k in diff[:4])
            raise PragError(f"{out} holds predictions made with other settings ({detail}); "
                            f"use a new --out directory (or delete {out / PREDICTIONS})")
    else:
        atomic_write_json(path, ident)


def check_inputs(cfg: EvalConfig) -> list[str]:
    """Fail fast (before the engine's slow start-up) on bad modes, paths or options."""
    modes = parse_modes(cfg.modes)
    resolve_dataset_name(cfg.dataset)
    if cfg.batch_size <= 0:
        raise PragError(f"--batch-size must be positive, got {cfg.batch_size}")
    if any(m != "none" for m in modes) and not cfg.index:
        needs = [m for m in modes if m != "none"]
        raise PragError(f"modes {needs} need --index (retrieval); run only --modes none without one")
    if any(m in ADAPTER_MODES for m in modes) and not cfg.store:
        raise PragError(f"modes {[m for m in modes if m in ADAPTER_MODES]} need --store (the adapter store)")
    for what, p in (("--index", cfg.index), ("--store", cfg.store)):
        if p and not Path(p).is_dir():
            raise PragError(f"{what} directory not found: {p}")
    check_output_dir(cfg.out, EVAL_OUTPUT, resume=True, inputs=(cfg.model or None, cfg.index, cfg.store, cfg.data))
    ensure_writable_dir(cfg.out)
    return modes


def evaluate(cfg: EvalConfig, engine: Engine | None = None) -> dict:
    """Run (or resume) the evaluation described by ``cfg``; returns the results.json content.

    ``engine`` lets a caller reuse a running engine (tests, the demo); otherwise one is built.
    """
    modes = check_inputs(cfg)
    examples = load_dataset(cfg.dataset, cfg.data, limit=cfg.limit)
    if not examples:
        raise PragError(f"{cfg.data}: no questions to evaluate")
    own = engine is None
    if engine is None:
        engine = Engine(cfg.model, index=cfg.index, store=cfg.store, config=cfg.engine)
    try:
        return _evaluate(cfg, engine, modes, examples)
    finally:
        if own:
            engine.close()


def _evaluate(cfg: EvalConfig, engine: Engine, modes: list[str], examples: list[Example]) -> dict:
    from tqdm import tqdm

    out = Path(cfg.out)
    _check_identity(out, _run_identity(cfg, engine))
    pred_path = out / PREDICTIONS
    records = read_predictions(pred_path)
    done = {(r["id"], r["mode"]) for r in records}
    timing: dict = read_json(out / TIMING, "timing file") if (out / TIMING).exists() else {}
    pending = any((ex["id"], m) not in done for m in modes if m != "none" for ex in examples)
    if pending and engine.retriever is not None and hasattr(engine.retriever, "search"):
        # load the query embedder now, so its start-up is not billed to the first mode's questions/s
        engine.retriever.search([examples[0]["question"] or "warm-up"], 1, method=engine.config.retrieval_method)
    for mode in modes:
        todo = [ex for ex in examples if (ex["id"], mode) not in done]
        if not todo:
            continue
        bar = tqdm(total=len(todo), desc=f"eval {mode}", unit="q", disable=not cfg.progress)
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start:start + cfg.batch_size]
            t0 = time.perf_counter()
            new = answer_shard(engine, batch, mode)
            secs = time.perf_counter() - t0
            stats = engine.last_stats
            _append(pred_path, new)
            records += new
            t = timing.setdefault(mode, {"seconds": 0.0, "questions": 0, "generated_tokens": 0, "prompt_tokens": 0})
            t["seconds"] += secs
            t["questions"] += len(batch)
            t["generated_tokens"] += stats.generated_tokens
            t["prompt_tokens"] += stats.prompt_tokens
            atomic_write_json(out / TIMING, timing)
            bar.update(len(batch))
        bar.close()
    wanted = {ex["id"] for ex in examples}
    results = summarize([r for r in records if r["id"] in wanted], modes, timing)
    atomic_write_json(out / RESULTS_JSON, results)
    title = f"{cfg.dataset}: {len(examples)} questions, top-{engine.config.top_k}, model {Path(str(engine.model)).name}"
    atomic_write_text(out / RESULTS_MD, results_markdown(results, title))
    return results
