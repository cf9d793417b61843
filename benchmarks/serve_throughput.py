"""Serving throughput: none / rag / prag / combine on one vLLM engine vs the paper's PEFT loop.

Setup (all local, no network):

* questions: the first ``--n`` NQ-open questions of ``../shared/data/nq_open_oracle.jsonl.gz``;
* corpus: the real gold Wikipedia passages of the first ``--corpus-size`` questions (about 78
  words each), indexed with the default dense retriever; each question's top-k documents are
  retrieved once up front (timed and reported separately) and then passed to every mode as
  explicit doc ids, so the modes differ only in what the engine does;
* adapters: random-but-seeded rank-2 adapters per document in a real adapter store (throughput
  does not depend on adapter values);
* model: the ``--size`` fixture model (tokenizer trained on the corpus) in ``--dtype`` for both the
  engine and the reference: bf16 where the CPU computes it natively (AMX / AVX512-BF16), else fp32;
* k = 3, 20 new tokens, greedy.

Each mode runs once on separate warm-up questions, then on the ``--n`` timed questions with a
cold merged-adapter cache (new vLLM adapter ids too). ``prag (warm cache)`` reruns ``prag`` on the
same questions, where every merged adapter is already on tmpfs and loaded in vLLM. The reference
is the paper's loop, one question at a time: load the 3 per-document PEFT adapters from disk,
``add_weighted_adapter(..., "cat")``, HF ``generate``, unload.

This host's speed drifts (the same build measured 21-31 questions/s within an hour), so the timed
part is repeated ``--repeats`` times, each repeat timing the reference loop and every mode back to
back. Rows show the median run; every "vs" column and ratio is the median of the ratios of runs made
in the same repeat.

Writes ``results.json``, ``results.md`` and ``throughput.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NQ_FILE = REPO.parent / "shared" / "data" / "nq_open_oracle.jsonl.gz"


def _env() -> None:
    for k, v in {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "TOKENIZERS_PARALLELISM": "false",
                 "VLLM_CPU_KVCACHE_SPACE": "2"}.items():
        os.environ.setdefault(k, v)


def load_nq(n_questions: int, corpus_size: int) -> tuple[list[dict], list[dict]]:
    """(questions, corpus) from the NQ oracle file: gold passages of the first ``corpus_size`` questions."""
    from prag.errors import PragError
    from prag.io import iter_jsonl

    if not NQ_FILE.exists():
        raise PragError(f"{NQ_FILE} not found: the serving benchmark reads its NQ-open questions from ../shared/data")
    questions, corpus, seen = [], [], {}
    for lineno, rec in iter_jsonl(NQ_FILE, "NQ oracle file"):
        if len(questions) >= max(n_questions, corpus_size):
            break
        ctx = rec["ctxs"][0]
        text = ctx["text"].strip()
        if text not in seen:
            seen[text] = f"nq-doc-{len(corpus)}"
            corpus.append({"id": seen[text], "title": ctx.get("title", ""), "text": text})
        questions.append({"id": f"nq-{lineno}", "question": rec["question"], "answers": rec["answers"]})
    return questions, corpus


def _prepare(work: Path, size: str, corpus: list[dict]) -> tuple[Path, Path]:
    """Fixture model (tokenizer trained on the corpus) and dense index; reused across runs."""
    from prag.fixture_model import build_fixture_model
    from prag.io import atomic_write_jsonl
    from retrieval.index import build_index

    corpus_file = work / "corpus.jsonl"
    atomic_write_jsonl(corpus_file, corpus)
    model = work / f"model-{size}"
    if not (model / "config.json").exists():
        build_fixture_model(model, size=size, corpus=corpus_file)
    index = work / "index"
    stamp = work / "index.stamp"
    want = f"{len(corpus)}:{corpus[-1]['id']}"
    if not index.exists() or not stamp.exists() or stamp.read_text() != want:
        import shutil

        shutil.rmtree(index, ignore_errors=True)
        build_index(corpus_file, index, progress=False)
        stamp.write_text(want)
    return model, index


def _run_mode(engine, questions: list[str], mode: str, doc_ids, cold: bool) -> dict:
    if cold:
        engine.cache.clear(forget_identities=True)
    # repeats send the same prompts again: without this, vLLM's prefix cache would skip their prefill
    # (rag went 2-4x faster from the second repeat on). "warm cache" means warm adapters, not warm KV.
    if not engine.reset_prefix_cache():
        raise RuntimeError("vLLM did not reset its prefix cache")
    t0 = time.perf_counter()
    answers = engine.generate(questions, mode=mode, doc_ids=doc_ids if mode != "none" else None)
    secs = time.perf_counter() - t0
    errors = [a.error for a in answers if a.error]
    if errors:
        raise RuntimeError(f"{mode}: {len(errors)} questions failed, e.g. {errors[0]}")
    s = engine.last_stats
    tokens = sum(len(a.output_token_ids) for a in answers)
    # adapter work: store read and merge (and the dir write) on the adapter thread, overlapping the model;
    # vLLM's LoRAModel build (dir: reading it back) and slot fill inside its steps; model = the rest of them
    breakdown = {"prompt": s.prompt_s, "adapter_wait": s.adapter_wait_s, "generate": s.generate_s,
                 "store_read": s.store_read_s, "merge": s.merge_s, "dir_write": s.write_s,
                 "vllm_load": s.vllm_load_s, "slot_fill": s.slot_fill_s,
                 "model": s.generate_s - s.vllm_load_s - s.slot_fill_s}
    return {"seconds": secs, "questions": len(questions), "generated_tokens": tokens,
            "prompt_tokens": sum(len(a.prompt_token_ids) for a in answers),
            "questions_per_s": len(questions) / secs, "tokens_per_s": tokens / secs,
            "breakdown_s": breakdown, "handover": getattr(engine, "handover", None),
            "adapters_built": s.adapters_built, "answers": answers}


def default_dtype() -> str:
    """bf16 where the CPU has native bf16 matmuls (what vLLM-CPU would pick there), else fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("amx_bf16" in flags or "avx512_bf16" in flags) else "float32"


class _ReferenceLoop:
    """The paper's loop on the benchmark's questions, kept loaded so it can be timed between the engine's runs."""

    def __init__(self, model: Path, store, prompts: list[list[int]], doc_ids: list[list[str]], max_new_tokens: int,
                 dtype: str):
        import torch

        from tests.helpers.peft_reference import PeftReference

        self.prompts, self.doc_ids, self.max_new_tokens = prompts, doc_ids, max_new_tokens
        self.ref = PeftReference(model, store, dtype=getattr(torch, dtype))
        self.ref.export([d for ids in doc_ids for d in ids])  # the per-document PEFT dirs exist before timing
        self.ref.generate(prompts[0], doc_ids[0], max_new_tokens)  # warm-up

    def run(self) -> dict:
        import torch

        tokens, outputs = 0, []
        t0 = time.perf_counter()
        for p, ids in zip(self.prompts, self.doc_ids):
            out = self.ref.generate(p, ids, self.max_new_tokens)
            tokens += len(out)
            outputs.append(out)
        secs = time.perf_counter() - t0
        return {"seconds": secs, "questions": len(self.prompts), "generated_tokens": tokens,
                "questions_per_s": len(self.prompts) / secs, "tokens_per_s": tokens / secs,
                "torch_threads": torch.get_num_threads(), "outputs": outputs}

    def close(self) -> None:
        self.ref.close()


def _median_row(runs: list[dict]) -> dict:
    """The run with the median questions/s (the lower middle one for an even count; its seconds, tokens,
    breakdown), plus every run's questions/s."""
    ordered = sorted(runs, key=lambda r: r["questions_per_s"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["runs_questions_per_s"] = [round(r["questions_per_s"], 3) for r in runs]
    row["answers"], row["outputs"] = runs[0].get("answers"), runs[0].get("outputs")
    return row


def _markdown(rows: dict, meta: dict) -> str:
    lines = [f"Serving throughput, {meta['size']} fixture model ({meta['params']:,} parameters), CPU "
             f"({meta['cpus']} cores), {meta['dtype']}, {meta['n']} NQ questions with real gold passages, "
             f"k={meta['top_k']}, "
             f"{meta['max_new_tokens']} new tokens, greedy, max_loras={meta['max_loras']}. "
             f"Retrieval (done once, shared by all modes): {meta['retrieval_questions_per_s']:.1f} questions/s.",
             "", "| mode | questions/s | generated tokens/s | mean prompt tokens | seconds | vs reference | vs rag "
                 "| vs none |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        vs_ref = f"{r['vs_reference']:.1f}x" if r.get("vs_reference") else "-"
        vs_rag = f"{r['vs_rag']:.2f}x" if r.get("vs_rag") else "-"
        vs_none = f"{r['vs_none']:.2f}x" if r.get("vs_none") else "-"
        mean_prompt = f"{r['prompt_tokens'] / r['questions']:.0f}" if r.get("prompt_tokens") else "-"
        lines.append(f"| {name} | {r['questions_per_s']:.2f} | {r['tokens_per_s']:.1f} | {mean_prompt} | "
                     f"{r['seconds']:.2f} | {vs_ref} | {vs_rag} | {vs_none} |")
    cold = [n for n in rows if n.startswith("prag") and "warm" not in n and rows[n].get("breakdown_s")]
    if cold:
        lines += ["", "Where a cold prag batch's time goes (seconds, median run; store read and merge run on the "
                  "adapter thread beside the model; vLLM load and slot fill inside its steps; model = the rest of "
                  "vLLM's steps):", "",
                  "| hand-over | store read | merge | dir write | vLLM load | slot fill | model | batch total |",
                  "|---|---|---|---|---|---|---|---|"]
        for n in cold:
            b = rows[n]["breakdown_s"]
            lines.append(f"| {rows[n].get('handover') or n} | {b['store_read']:.3f} | {b['merge']:.3f} | "
                         f"{b['dir_write']:.3f} | {b['vllm_load']:.3f} | {b['slot_fill']:.3f} | {b['model']:.3f} | "
                         f"{rows[n]['seconds']:.3f} |")
    return "\n".join(lines) + "\n"


def _chart(rows: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    values = [rows[n]["questions_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(range(len(names)), values, color=["#999", "#4a90d9", "#e07b39", "#8e5ea2", "#e0a979", "#555"][:len(names)])
    ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_ylabel("questions / s")
    ax.set_title(title, fontsize=9)
    for b, v in zip(bars, values):
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    import statistics

    _env()
    from engine.engine import Engine, EngineConfig
    from tests.helpers.random_store import build_random_store
    from prag.store import StoreMismatchError
    from prag.errors import PragError
    from prag.fixture_model import parameter_count
    from prag.io import atomic_write_json, atomic_write_text
    from retrieval.retriever import Retriever

    out = Path(args.out)
    work = Path(args.work) if args.work else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    n_warm = 8
    questions, corpus = load_nq(args.n + n_warm, max(args.corpus_size, args.n + n_warm))
    model, index = _prepare(work, args.size, corpus)
    timed, warm = questions[:args.n], questions[args.n:args.n + n_warm]

    retriever = Retriever.load(index)
    retriever.search([questions[0]["question"]], args.top_k)  # loads the embedder: not part of the timing
    t0 = time.perf_counter()
    hits = retriever.search([q["question"] for q in questions], args.top_k)
    retrieval_qps = len(questions) / (time.perf_counter() - t0)
    doc_ids = [[d for d, _ in h] for h in hits]
    store_dir, needed = work / f"store-{args.size}", sorted({d for ids in doc_ids for d in ids})
    try:
        store = build_random_store(store_dir, model, needed)
    except StoreMismatchError:  # a cached store from an older model or store format: rebuild it
        import shutil

        shutil.rmtree(store_dir)
        store = build_random_store(store_dir, model, needed)
    docs = {d["id"]: d["text"] for d in corpus}

    tq, td = [q["question"] for q in timed], doc_ids[:args.n]
    ref_n = min(args.reference_n, args.n)
    ref = None
    if ref_n > 0:
        from transformers import AutoTokenizer

        from engine.prompts import build_prompt
        from prag.prompt import PromptConfig

        tok = AutoTokenizer.from_pretrained(model)
        prompts = [build_prompt(tok, q, None, PromptConfig(), 10**9).ids for q in tq[:ref_n]]
        ref = _ReferenceLoop(model, store, prompts, [sorted(d) for d in td[:ref_n]], args.max_new_tokens, args.dtype)

    cfg = EngineConfig(top_k=args.top_k, max_new_tokens=args.max_new_tokens, dtype=args.dtype,
                       max_model_len=args.max_model_len, max_loras=args.max_loras,
                       max_cpu_loras=args.max_cpu_loras, prepare_threads=args.prepare_threads,
                       adapter_handover=args.adapter_handover)
    engine = Engine(model, store=store, config=cfg, documents=docs)
    # the other hand-over on the same vLLM engine, timed in the same repeats: memory vs directory side by side
    other = None
    if args.compare_handover and engine.handover is not None:
        import dataclasses

        other_way = "dir" if engine.handover == "memory" else "memory"
        try:
            other = Engine(model, store=store, llm=engine.llm, documents=docs,
                           config=dataclasses.replace(cfg, adapter_handover=other_way))
        except PragError as exc:
            print(f"no {other_way} hand-over to compare with: {exc}", flush=True)
    other_name = f"prag ({other.handover} hand-over)" if other is not None else None
    # the same questions through vLLM's AsyncLLM (engine core in its own process, dir hand-over), timed in
    # the same repeats: is the in-process driver still the faster one for batch work on this machine?
    async_engine = None
    if args.compare_driver:
        import dataclasses

        async_engine = Engine(model, store=store, documents=docs,
                              config=dataclasses.replace(cfg, driver="async", adapter_handover="auto"))
    async_names = ["none (AsyncLLM driver)", "prag (AsyncLLM driver)"] if async_engine is not None else []
    names = ["none", "rag", "prag", "combine", "prag (warm cache)"] + ([other_name] if other else []) \
        + async_names + (["reference (PEFT, batch 1)"] if ref else [])
    runs: dict[str, list[dict]] = {name: [] for name in names}
    verify_off: list[dict] = []  # cold prag with the store's row checks off, right after the checked run
    try:
        wq, wd = [q["question"] for q in warm], doc_ids[args.n:args.n + n_warm]
        for mode in ("none", "rag", "prag", "combine"):
            _run_mode(engine, wq, mode, wd, cold=True)
        if other is not None:
            _run_mode(other, wq, "prag", wd, cold=True)
        if async_engine is not None:
            for mode in ("none", "prag"):
                _run_mode(async_engine, wq, mode, wd, cold=True)
        # every repeat times all modes and the reference loop back to back, so each ratio compares runs
        # made under the same machine conditions (this host's speed drifts by ~1.5x over an hour)
        for rep in range(args.repeats):
            this: dict[str, dict] = {}
            if ref is not None:
                this["reference (PEFT, batch 1)"] = ref.run()
            for mode in ("none", "rag", "prag", "combine"):
                this[mode] = _run_mode(engine, tq, mode, td, cold=True)
                if mode == "prag" and args.compare_verify:
                    engine.config.verify_rows = False
                    try:
                        verify_off.append(_run_mode(engine, tq, "prag", td, cold=True))
                    finally:
                        engine.config.verify_rows = True
            this["prag (warm cache)"] = _run_mode(engine, tq, "prag", td, cold=False)
            if other is not None:
                this[other_name] = _run_mode(other, tq, "prag", td, cold=True)
            if async_engine is not None:
                for mode, name in zip(("none", "prag"), async_names):
                    this[name] = _run_mode(async_engine, tq, mode, td, cold=True)
            for name, row in this.items():
                runs[name].append(row)
            print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(
                f"{name} {row['questions_per_s']:.2f}" for name, row in this.items()) + " questions/s", flush=True)
    finally:
        if other is not None:
            other.close()
        if async_engine is not None:
            async_engine.close()
        engine.close()
        if ref is not None:
            ref.close()
    rows = {name: _median_row(runs[name]) for name in names}
    ratio_runs: dict[str, list[float]] = {}
    for name, row in rows.items():
        for base, label in (("reference (PEFT, batch 1)", "vs_reference"), ("rag", "vs_rag"), ("none", "vs_none")):
            if base in runs:
                paired = [a["questions_per_s"] / b["questions_per_s"] for a, b in zip(runs[name], runs[base])]
                row[label] = statistics.median(paired)
                if name == "prag" or (label == "vs_none" and name.startswith("prag")):
                    ratio_runs[f"{name}_{label}".replace(" ", "_")] = paired
    for mode, name in zip(("none", "prag"), async_names):  # in-process driver vs AsyncLLM, same repeats
        ratio_runs[f"{mode}_llm_driver_vs_asyncllm_driver"] = [
            a["questions_per_s"] / b["questions_per_s"] for a, b in zip(runs[mode], runs[name])]
    if verify_off:  # what checking every adapter row read costs (checksum + finite values)
        ratio_runs["prag_rows_checked_vs_unchecked"] = [
            a["questions_per_s"] / b["questions_per_s"] for a, b in zip(runs["prag"], verify_off)]
    if ref is not None:
        same = sum(a.output_token_ids == o for a, o in
                   zip(rows["prag"]["answers"], rows["reference (PEFT, batch 1)"]["outputs"]))
        rows["reference (PEFT, batch 1)"]["identical_to_engine"] = f"{same}/{ref_n}"
    for r in rows.values():
        r.pop("answers", None)
        r.pop("outputs", None)
    meta = {"size": args.size, "params": parameter_count(model), "cpus": os.cpu_count(), "n": args.n,
            "dtype": args.dtype, "repeats": args.repeats,
            "top_k": args.top_k, "max_new_tokens": args.max_new_tokens, "max_loras": engine_max_loras(cfg),
            "retrieval_questions_per_s": retrieval_qps, "reference_questions": ref_n,
            "corpus_docs": len(corpus)}
    ratios = {name: statistics.median(values) for name, values in ratio_runs.items()}
    result = {"meta": meta, "modes": rows, "ratios": ratios,
              "ratio_runs": {name: [round(v, 3) for v in values] for name, values in ratio_runs.items() if values}}
    if verify_off:
        result["row_checks"] = {"on_questions_per_s": rows["prag"]["questions_per_s"],
                                "off_questions_per_s": _median_row(verify_off)["questions_per_s"],
                                "on_runs": [round(r["questions_per_s"], 3) for r in runs["prag"]],
                                "off_runs": [round(r["questions_per_s"], 3) for r in verify_off],
                                "ratio": ratios["prag_rows_checked_vs_unchecked"]}
    atomic_write_json(out / "results.json", result)
    md = _markdown(rows, meta)
    md += "\n" + ", ".join(f"{k}: {v:.2f}x (median of {args.repeats}; runs: "
                           f"{', '.join(f'{x:.1f}' for x in ratio_runs[k])})" for k, v in ratios.items()) + "\n"
    if verify_off:
        c = result["row_checks"]
        md += (f"\nprag (cold cache) with every adapter row read checked (checksum + finite values) vs unchecked, "
               f"same repeats: {c['on_questions_per_s']:.2f} vs {c['off_questions_per_s']:.2f} questions/s, "
               f"ratio {c['ratio']:.3f} (median of the per-repeat ratios)\n")
    atomic_write_text(out / "results.md", md)
    _chart(rows, out / "throughput.png", f"PRAG serving, {args.size} model, {args.n} questions, k={args.top_k}")
    print(md)
    return result


def engine_max_loras(cfg) -> int:
    from engine.vllm_backend.llm import LLMConfig

    return LLMConfig(model="", max_loras=cfg.max_loras).resolved_max_loras()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, throughput.png)")
    p.add_argument("--size", choices=["tiny", "small"], default="small", help="fixture model size (default small)")
    p.add_argument("--n", type=int, default=96, help="timed questions (default 96)")
    p.add_argument("--corpus-size", type=int, default=500, help="NQ gold passages in the corpus (default 500)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=default_dtype(),
                   help="model dtype for the engine and the reference (default: bfloat16 if the CPU has "
                        "native bf16, else float32; here: %(default)s)")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-loras", type=int, default=96, help="distinct adapters per batch step (default 96)")
    p.add_argument("--max-cpu-loras", type=int, help="vLLM's CPU adapter cache (default 4 x max-loras)")
    p.add_argument("--prepare-threads", type=int,
                   help="threads merging adapters beside the model (default: the engine's, 1 on a CPU)")
    p.add_argument("--reference-n", type=int, default=16, help="questions timed for the PEFT loop (default 16)")
    p.add_argument("--repeats", type=int, default=5,
                   help="times every mode and the reference are timed, back to back; tables show the median "
                        "run, ratios the median of the per-repeat ratios (default 5)")
    p.add_argument("--work", help="cache folder for the model/index/store (default OUT/work)")
    p.add_argument("--compare-verify", action=argparse.BooleanOptionalAction, default=True,
                   help="also time cold prag with the store's row checks off, right after the checked run in "
                        "every repeat (default on)")
    p.add_argument("--adapter-handover", choices=["auto", "memory", "dir"], default="auto",
                   help="how merged adapters reach vLLM for the main rows: from memory, or through a tmpfs PEFT "
                        "directory (default auto: memory where vLLM's worker is in this process)")
    p.add_argument("--compare-handover", action=argparse.BooleanOptionalAction, default=True,
                   help="also time cold prag with the other hand-over on the same vLLM engine (default on)")
    p.add_argument("--compare-driver", action=argparse.BooleanOptionalAction, default=True,
                   help="also time none and cold prag through vLLM's AsyncLLM (engine core in its own process) "
                        "beside the in-process driver, in the same repeats (default on)")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.n <= 0:
        raise SystemExit("--n must be positive")
    if args.repeats <= 0:
        raise SystemExit("--repeats must be positive")
    return run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
