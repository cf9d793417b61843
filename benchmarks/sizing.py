"""Sizing a Wikipedia-scale deployment (DPR's 21M passages) from the project's own code and measurements.

    python -m benchmarks.sizing --out DIR [--retrieval-json FILE] [--serve-json FILE] [--models llama-1b,llama-8b]

What is measured, and how (nothing below is typed in by hand except the cited H200 encode rate):
- adapter bytes per document: the real store (``prag.store``) is created for a Llama-3.2-1B and a
  Llama-3.1-8B shape (``LlamaConfig`` on the meta device, no weights; the init adapter comes from the
  trainer's ``make_init_adapter``, as ``prag encode`` makes it), rank 2 on gate/up/down, bf16 storage;
  a shard of documents is written through ``AdapterStore.add_batch`` and the files are measured:
  row bytes, the shard's safetensors header, the store index. The per-document header and index costs at
  the default 256-document shards are measured on a store of ``--index-docs`` documents with 8-digit ids
  (DPR's ids go to 21,015,324) in a tiny layout: the header holds the ids, not the values.
- index bytes per passage per index type: from ``benchmarks/retrieval.py``'s JSON (``--retrieval-json``),
  else measured here by building every index type over the NQ gold passages at full and half size
  (the marginal bytes per passage is what scales to 21M).
- embedding rate: from that JSON, else all-MiniLM-L6-v2 timed on this machine's CPU. No GPU was available.
- encode rate: 0.18 s/document, the batched prototype on an H200 (1B shape, bf16), measured on
  2026-11-28 with the GPU script. The 8B encode rate was not measured.
- serving: per-replica questions/s from ``benchmarks/serve_throughput.py``'s JSON (``--serve-json``), else
  the README's last measured figures (2-core CPU, ``small`` fixture model): CPU fixture figures, not GPUs.

Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import save_results

from prag.errors import PragError
from prag.io import read_json

DPR_PASSAGES = 21_015_324  # psgs_w100.tsv
SHARED_NQ = Path(__file__).resolve().parents[2] / "shared" / "data" / "nq_open_oracle.jsonl.gz"

# Model shapes (LlamaConfig fields): only the projections' shapes matter for the adapters.
MODELS: dict[str, dict] = {
    "llama-1b": {"label": "Llama-3.2-1B shape", "hidden_size": 2048, "num_hidden_layers": 16,
                 "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "vocab_size": 128256},
    "llama-8b": {"label": "Llama-3.1-8B shape", "hidden_size": 4096, "num_hidden_layers": 32,
                 "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "vocab_size": 128256},
}

ENCODE_MEASURED = {"seconds_per_doc": 0.18, "model": "llama-1b", "device": "H200",
                   "source": "batched prototype (32 documents per step, bf16), Llama-3.2-1B shape, H200, measured "
                             "2026-11-28 with the GPU script"}
SERVE_README = {"source": "README (benchmarks/serve_throughput.py, 2-core CPU, small fixture model, 96 NQ questions, "
                          "k=3, 20 tokens, bf16, 2026-12-02)",
                "prag_cold_qps": 36.05, "prag_warm_qps": 43.02, "none_qps": 47.47, "cpus": 2, "size": "small"}
PAPER_QUESTIONS, PAPER_TOP_K, PAPER_DATASETS = 300, 3, 4
QPS_TARGETS = (10, 100, 1000)


# --------------------------------------------------------------------------------------------
# Adapters and the store


def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**{k: v for k, v in shape.items() if k != "label"})


def init_adapter(config, cfg) -> dict:
    """The store's initial adapter for a model config, as ``prag encode`` makes it (``make_init_adapter``),
    without weights: the model is built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    from offline_encode.trainer import make_init_adapter

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return make_init_adapter(model, cfg)


@dataclass
class StoreMeasurement:
    """Sizes of a real adapter store written by ``AdapterStore.add_batch``."""

    params_per_doc: int
    row_bytes: int              # the manifest's bytes_per_doc: one document's row in the storage dtype
    modules: int
    docs: int
    shard_docs: list[int]
    shard_bytes: list[int]      # file sizes on disk
    header_bytes: list[int]     # 8 + the safetensors header (JSON with the doc ids) of each shard
    index_bytes: int            # index.sqlite
    fixed_bytes: int            # init.safetensors + manifest.json

    @property
    def header_bytes_per_doc(self) -> float:
        return sum(self.header_bytes) / self.docs

    @property
    def index_bytes_per_doc(self) -> float:
        return self.index_bytes / self.docs

    def to_dict(self) -> dict:
        return {**self.__dict__, "header_bytes_per_doc": self.header_bytes_per_doc,
                "index_bytes_per_doc": self.index_bytes_per_doc}


def doc_ids(n: int, width: int = 8) -> list[str]:
    """Ids as long as DPR's largest (8 digits), so header and index costs are not understated."""
    return [str(10 ** (width - 1) + i) for i in range(n)]


def measure_store(path: Path, init: dict, cfg, docs: int, docs_per_shard: int, name: str = "sizing") -> StoreMeasurement:
    """Create a store at ``path`` for ``init``'s layout, add ``docs`` documents in shards of ``docs_per_shard``
    and measure its files. Every row holds the init adapter: safetensors is uncompressed, so sizes do not
    depend on the values."""
    from prag.model_files import read_safetensors_header
    from prag.store import INDEX, INIT, MANIFEST, SHARDS, AdapterStore, StoreSpec
    from prag.io import sha256_json

    spec = StoreSpec(base_model=name, model_fingerprint={"name": name, "hash": sha256_json(
                         {k: list(v.shape) for k, v in init.items()})},
                     rank=cfg.rank, alpha=cfg.alpha, target_modules=tuple(cfg.target_modules),
                     storage_dtype=cfg.storage_dtype, encode_config=cfg.to_dict())
    ids = doc_ids(docs)
    shard_docs, shard_bytes, header_bytes = [], [], []
    with AdapterStore.create_or_open(path, spec, init_adapter=init) as store:
        row_bytes, params = store.bytes_per_doc, store.layout.params_per_doc
        modules = len(store.layout.modules)
        for start in range(0, docs, docs_per_shard):
            chunk = ids[start:start + docs_per_shard]
            meta = store.add_batch(chunk, [init] * len(chunk))
            fd = os.open(path / SHARDS / meta.name, os.O_RDONLY)
            try:
                _, data_start, size = read_safetensors_header(fd)
            finally:
                os.close(fd)
            if size != meta.nbytes or size != data_start + len(chunk) * row_bytes:
                raise PragError(f"shard {meta.name}: {size} bytes, expected header {data_start} + "
                                f"{len(chunk)} x {row_bytes}: the store's shard format changed")
            shard_docs.append(len(chunk))
            shard_bytes.append(size)
            header_bytes.append(data_start)
    return StoreMeasurement(params_per_doc=params, row_bytes=row_bytes, modules=modules, docs=docs,
                            shard_docs=shard_docs, shard_bytes=shard_bytes, header_bytes=header_bytes,
                            index_bytes=(path / INDEX).stat().st_size,
                            fixed_bytes=(path / INIT).stat().st_size + (path / MANIFEST).stat().st_size)


def store_plan(row_bytes: int, overhead: dict, n_docs: int, docs_per_shard: int, fixed_bytes: int) -> dict:
    """Bytes and shard files of a store of ``n_docs`` documents: rows + per-document header and index costs
    (measured) + the fixed files."""
    per_doc = row_bytes + overhead["header_bytes_per_doc"] + overhead["index_bytes_per_doc"]
    return {"docs": n_docs, "bytes_per_doc": per_doc, "bytes": n_docs * per_doc + fixed_bytes,
            "shard_files": math.ceil(n_docs / docs_per_shard),
            "shard_file_bytes": docs_per_shard * row_bytes + overhead["header_bytes_per_doc"] * docs_per_shard,
            "index_bytes": n_docs * overhead["index_bytes_per_doc"]}


def measure_adapters(models: list[str], workdir: Path, sample_docs: int, index_docs: int, docs_per_shard: int,
                     passages: int) -> dict:
    from offline_encode.config import EncodeConfig

    cfg = EncodeConfig(rank=2, storage_dtype="bfloat16")  # paper's rank, alpha 32, gate/up/down
    # per-document overhead at the default shard size, on a tiny layout (the header holds ids, not values)
    tiny = llama_config({"hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 128,
                         "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 256})
    t0 = time.perf_counter()
    over = measure_store(workdir / "store-overhead", init_adapter(tiny, cfg), cfg, index_docs, docs_per_shard)
    overhead = {"docs": over.docs, "docs_per_shard": docs_per_shard,
                "header_bytes_per_doc": over.header_bytes_per_doc, "index_bytes_per_doc": over.index_bytes_per_doc,
                "seconds": round(time.perf_counter() - t0, 2)}
    out: dict = {"encode_config": {"rank": cfg.rank, "alpha": cfg.alpha, "targets": list(cfg.target_modules),
                                   "storage_dtype": cfg.storage_dtype},
                 "overhead": overhead, "models": {}}
    for name in models:
        shape = MODELS[name]
        m = measure_store(workdir / f"store-{name}", init_adapter(llama_config(shape), cfg), cfg, sample_docs,
                          max(1, sample_docs // 2), name)
        paper_docs = PAPER_QUESTIONS * PAPER_TOP_K
        out["models"][name] = {
            "shape": {k: v for k, v in shape.items()}, "measured": m.to_dict(),
            "dpr": store_plan(m.row_bytes, overhead, passages, docs_per_shard, m.fixed_bytes),
            "paper_dataset": store_plan(m.row_bytes, overhead, paper_docs, docs_per_shard, m.fixed_bytes),
            "paper_all_datasets": store_plan(m.row_bytes, overhead, paper_docs * PAPER_DATASETS, docs_per_shard,
                                             m.fixed_bytes),
        }
    return out


# --------------------------------------------------------------------------------------------
# Index and embedding


def _need(data: dict, path: Path, *keys: str):
    cur = data
    for i, key in enumerate(keys):
        if not isinstance(cur, dict) or key not in cur:
            raise PragError(f"{path}: missing field {'.'.join(keys[:i + 1])} (expected the results.json of "
                            f"the benchmark named in --help)")
        cur = cur[key]
    return cur


def index_from_json(path: Path) -> dict:
    """Bytes per passage per index type and the embedding rate from ``benchmarks/retrieval.py``'s results.json."""
    res = read_json(path, "retrieval benchmark results")
    indexes = _need(res, path, "indexes")
    types = {t: {"bytes_per_passage": float(row["index_bytes_per_passage"]), "params": row.get("index_params", {})}
             for t, row in indexes.items() if isinstance(row, dict) and "index_bytes_per_passage" in row}
    if not types:
        raise PragError(f"{path}: no index type has index_bytes_per_passage (rerun benchmarks/retrieval.py)")
    bm25 = indexes.get("bm25", {})
    return {"source": f"{path} (benchmarks/retrieval.py)", "passages": _need(res, path, "corpus", "passages"),
            "types": types, "bm25_bytes_per_passage": bm25.get("bytes_per_passage"),
            "docstore_bytes_per_passage": bm25.get("docstore_bytes_per_passage"),
            "embedding": {"passages_per_s": float(_need(res, path, "embedding", "passages_per_s")),
                          "device": res.get("device", "?"), "cpus": res.get("machine", {}).get("cpus")}}


def measure_index(data: Path, workdir: Path, limit: int | None) -> dict:
    """Build every index type over the NQ gold passages at full and half size; time the embedding once."""
    from prag.io import atomic_write_jsonl
    from retrieval.docstore import DOCSTORE_FILE
    from retrieval.embed import CachedEmbedder, Embedder, passage_text
    from retrieval.evaluate import pool_oracle_passages
    from retrieval.index import FAISS_FILE, IndexConfig, build_index
    from retrieval.manifest import INDEX_TYPES

    docs, _ = pool_oracle_passages(data)
    docs = docs[:limit] if limit else docs
    half = docs[:len(docs) // 2]
    base = Embedder()
    base.encode(["warm up"])
    cached = CachedEmbedder(base)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    cached.encode([passage_text(d.get("title", ""), d["text"]) for d in docs])
    embed_s = time.perf_counter() - t0
    load = max(load, os.getloadavg()[0])  # other work on the host slows the CPU rate: say how much there was
    corpora = {}
    for label, part in (("full", docs), ("half", half)):
        corpora[label] = workdir / f"corpus-{label}.jsonl"
        atomic_write_jsonl(corpora[label], part)
    types: dict[str, dict] = {}
    docstore: dict[str, int] = {}
    bm25: dict[str, int] = {}
    for t in INDEX_TYPES:
        sizes, params = {}, {}
        try:
            for label, corpus in corpora.items():  # full first: the half build reuses its parameters, so the
                out = workdir / f"index-{t}-{label}"  # difference is per-passage bytes, not fewer IVF lists
                same = {k: params["full"][k] for k in ("nlist", "pq_m", "pq_bits") if k in params.get("full", {})}
                built = build_index(corpus, out, IndexConfig(index_type=t, bm25=(t == "flat"), **same),
                                    embedder=cached, progress=False)
                params[label] = {k: v for k, v in built.manifest.index_params.items() if not k.startswith("bm25")}
                sizes[label] = (out / FAISS_FILE).stat().st_size
                if t == "flat":
                    docstore[label] = (out / DOCSTORE_FILE).stat().st_size
                    bm25[label] = sum(f.stat().st_size for f in (out / "bm25").iterdir())
        except PragError as exc:  # e.g. a quantiser that needs more training vectors than this corpus has
            types[t] = {"skipped": str(exc)}
            continue
        n, m = len(docs), len(half)
        types[t] = {"bytes_per_passage": sizes["full"] / n,
                    "marginal_bytes_per_passage": (sizes["full"] - sizes["half"]) / (n - m),
                    "params": params["full"], "params_half": params["half"]}

    def marginal(d: dict) -> float:
        return (d["full"] - d["half"]) / (len(docs) - len(half))

    return {"source": f"measured here: build_index over {len(docs):,} NQ gold passages ({data.name}) and its "
                      f"first {len(half):,}", "passages": len(docs), "types": types,
            "bm25_bytes_per_passage": bm25["full"] / len(docs), "bm25_marginal_bytes_per_passage": marginal(bm25),
            "docstore_bytes_per_passage": docstore["full"] / len(docs),
            "docstore_marginal_bytes_per_passage": marginal(docstore),
            "embedding": {"passages_per_s": len(docs) / embed_s, "device": base.device, "cpus": os.cpu_count(),
                          "model": base.name, "dim": base.dim, "load_average_1min": round(load, 2)}}


def index_plan(index: dict, passages: int) -> dict:
    """Bytes for ``passages`` per index type (marginal bytes per passage where measured), and the doc store."""
    per_type = {}
    for t, row in index["types"].items():
        if "skipped" in row:
            continue
        per = row.get("marginal_bytes_per_passage", row["bytes_per_passage"])
        per_type[t] = {"bytes_per_passage": per, "bytes": per * passages}
    extra = {}
    for key in ("docstore", "bm25"):
        per = index.get(f"{key}_marginal_bytes_per_passage") or index.get(f"{key}_bytes_per_passage")
        if per:
            extra[key] = {"bytes_per_passage": per, "bytes": per * passages}
    return {"passages": passages, "index": per_type, **extra}


# --------------------------------------------------------------------------------------------
# Compute and serving


def gpu_hours(passages: int, index: dict | None) -> dict:
    enc = ENCODE_MEASURED
    out = {"encode": {**enc, "passages": passages, "gpu_hours": passages * enc["seconds_per_doc"] / 3600,
                      "paper_dataset_minutes": PAPER_QUESTIONS * PAPER_TOP_K * enc["seconds_per_doc"] / 60,
                      "llama-8b": "not measured"}}
    if index is not None:
        e = index["embedding"]
        out["embed"] = {"measured_passages_per_s": e["passages_per_s"], "device": e["device"], "cpus": e["cpus"],
                        "source": index["source"], "load_average_1min": e.get("load_average_1min"),
                        "machine_hours": passages / e["passages_per_s"] / 3600,
                        "gpu": "not measured (no GPU in this session)"}
    return out


def serve_from_json(path: Path) -> dict:
    res = read_json(path, "serving benchmark results")
    modes = _need(res, path, "modes")
    meta = res.get("meta", {})
    return {"source": f"{path} (benchmarks/serve_throughput.py)",
            "prag_cold_qps": float(_need(modes, path, "prag", "questions_per_s")),
            "prag_warm_qps": float(modes.get("prag (warm cache)", {}).get("questions_per_s", float("nan"))),
            "none_qps": float(modes.get("none", {}).get("questions_per_s", float("nan"))),
            "cpus": meta.get("cpus"), "size": meta.get("size")}


def replicas_for(target_qps: float, per_replica_qps: float) -> int:
    """Replicas to serve ``target_qps`` when each sustains ``per_replica_qps`` (Serve's routing assumed even)."""
    if per_replica_qps <= 0 or not math.isfinite(per_replica_qps):
        raise PragError(f"per-replica questions/s must be a positive number, got {per_replica_qps}")
    return math.ceil(target_qps / per_replica_qps)


def serve_plan(serve: dict, targets=QPS_TARGETS) -> dict:
    rows = []
    for t in targets:
        row = {"target_qps": t, "replicas_cold": replicas_for(t, serve["prag_cold_qps"])}
        if math.isfinite(serve.get("prag_warm_qps", float("nan"))):
            row["replicas_warm"] = replicas_for(t, serve["prag_warm_qps"])
        rows.append(row)
    return {**serve, "rows": rows}


# --------------------------------------------------------------------------------------------
# Report


def _b(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def markdown(res: dict) -> str:
    a, p = res["adapters"], res["passages"]
    ov = a["overhead"]
    lines = [f"Adapters: rank {a['encode_config']['rank']} on {'/'.join(a['encode_config']['targets'])}, "
             f"{a['encode_config']['storage_dtype']} rows, written through `AdapterStore.add_batch`.", "",
             "| model | modules | params / doc | row bytes | shard header / doc | store index / doc | on disk / doc "
             f"| {p:,} passages | {PAPER_QUESTIONS} q x top-{PAPER_TOP_K} (1 dataset) | {PAPER_DATASETS} datasets |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in a["models"].items():
        meas = m["measured"]
        lines.append(f"| {m['shape']['label']} | {meas['modules']} | {meas['params_per_doc']:,} | "
                     f"{meas['row_bytes']:,} | {ov['header_bytes_per_doc']:.1f} | {ov['index_bytes_per_doc']:.1f} | "
                     f"{m['dpr']['bytes_per_doc']:,.0f} | {_b(m['dpr']['bytes'])} | "
                     f"{_b(m['paper_dataset']['bytes'])} | {_b(m['paper_all_datasets']['bytes'])} |")
    lines += ["", f"Header and index bytes per document measured on a {ov['docs']:,}-document store in "
              f"{ov['docs_per_shard']}-document shards (8-digit ids); the paper's workflow encodes at most "
              f"{PAPER_QUESTIONS} x {PAPER_TOP_K} = {PAPER_QUESTIONS * PAPER_TOP_K} documents per dataset "
              f"(fewer when questions share documents)."]
    for name, m in a["models"].items():
        d = m["dpr"]
        lines.append(f"- {m['shape']['label']}, {p:,} passages: {d['shard_files']:,} shard files of "
                     f"{_b(d['shard_file_bytes'])} ({ov['docs_per_shard']} documents each) + index.sqlite "
                     f"{_b(d['index_bytes'])}.")
    if res.get("index"):
        ix, plan = res["index"], res["index_plan"]
        lines += ["", f"Index ({ix['source']}):", "",
                  f"| index | bytes / passage (measured) | used for {p:,} | {p:,} passages |", "|---|---:|---:|---:|"]
        for t, row in ix["types"].items():
            if "skipped" in row:
                lines.append(f"| {t} | skipped: {row['skipped']} | | |")
                continue
            q = plan["index"][t]
            shown = ", ".join(f"{k}={v}" for k, v in row.get("params", {}).items() if k in ("M", "nlist", "pq_m",
                                                                                             "pq_bits"))
            lines.append(f"| {t}{f' ({shown})' if shown else ''} | {row['bytes_per_passage']:,.1f} | "
                         f"{q['bytes_per_passage']:,.1f} | {_b(q['bytes'])} |")
        for key, label in (("docstore", "doc store (docs.sqlite, every type)"), ("bm25", "BM25 (bm25s)")):
            if key in plan:
                lines.append(f"| {label} | {ix.get(f'{key}_bytes_per_passage') or 0:,.1f} | "
                             f"{plan[key]['bytes_per_passage']:,.1f} | {_b(plan[key]['bytes'])} |")
        if any("marginal_bytes_per_passage" in r for r in ix["types"].values()):
            lines.append("\n'used' = marginal bytes per passage between the full build and a half build with the "
                         "same parameters (fixed parts such as IVF centroids and PQ codebooks cancel out).")
    g = res["gpu_hours"]
    e = g["encode"]
    lines += ["", f"Compute for {p:,} passages:",
              f"- encode (1B shape): {e['seconds_per_doc']} s/document ({e['source']}) -> "
              f"**{e['gpu_hours']:,.0f} H200-hours**; one paper dataset ({PAPER_QUESTIONS * PAPER_TOP_K} documents) "
              f"{e['paper_dataset_minutes']:.1f} minutes. 8B: not measured."]
    if "embed" in g:
        m = g["embed"]
        load = f", load average {m['load_average_1min']}" if m.get("load_average_1min") is not None else ""
        lines.append(f"- embed (all-MiniLM-L6-v2): {m['measured_passages_per_s']:,.1f} passages/s on "
                     f"{m['device']} ({m['cpus']} cores{load}) -> {m['machine_hours']:,.0f} hours of such a machine; "
                     f"GPU rate {m['gpu']}.")
    s = res["serve"]
    lines += ["", f"Serving ({s['source']}; **CPU fixture figures**: per-replica rates for a real model on a GPU "
                  f"were not measured): per replica prag {s['prag_cold_qps']:.2f} q/s with a cold adapter cache"
                  + (f", {s['prag_warm_qps']:.2f} warm" if math.isfinite(s.get('prag_warm_qps', float('nan')))
                     else "") + ". replicas = ceil(target / per-replica q/s):", "",
              "| target q/s | replicas (cold) | replicas (warm) |", "|---:|---:|---:|"]
    for row in s["rows"]:
        lines.append(f"| {row['target_qps']:,} | {row['replicas_cold']} | {row.get('replicas_warm', '')} |")
    lines += ["", f"Command: `python -m benchmarks.sizing {res['argv']}` ({res['seconds']:.0f} s)", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace, workdir: Path) -> dict:
    t0 = time.perf_counter()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise PragError(f"--models: unknown model shape(s) {unknown or models}; known: {', '.join(MODELS)}")
    res: dict = {"passages": args.passages}
    res["adapters"] = measure_adapters(models, workdir, args.sample_docs, args.index_docs, args.docs_per_shard,
                                       args.passages)
    index = None
    if args.retrieval_json:
        index = index_from_json(Path(args.retrieval_json))
    elif Path(args.data).exists():
        index = measure_index(Path(args.data), workdir, args.index_limit)
    else:
        res["index_note"] = f"not measured: {args.data} is absent (pass --retrieval-json)"
    if index is not None:
        res["index"], res["index_plan"] = index, index_plan(index, args.passages)
    res["gpu_hours"] = gpu_hours(args.passages, index)
    res["serve"] = serve_plan(serve_from_json(Path(args.serve_json)) if args.serve_json else dict(SERVE_README))
    res["seconds"] = time.perf_counter() - t0
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sizing", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder for results.json and results.md")
    p.add_argument("--retrieval-json", help="results.json of benchmarks/retrieval.py (default: OUT/../retrieval/"
                                            "results.json where `make bench` wrote one, else measured here)")
    p.add_argument("--serve-json", help="results.json of benchmarks/serve_throughput.py (default: "
                                        "OUT/../serve_throughput/results.json if present, else the README's figures)")
    p.add_argument("--models", default="llama-1b,llama-8b", help=f"model shapes ({', '.join(MODELS)})")
    p.add_argument("--passages", type=int, default=DPR_PASSAGES, help=f"corpus size (default {DPR_PASSAGES:,}, DPR)")
    p.add_argument("--docs-per-shard", type=int, default=None, help="store shard size (default: prag encode's)")
    p.add_argument("--sample-docs", type=int, default=8, help="documents written per model shape (default 8)")
    p.add_argument("--index-docs", type=int, default=20_000,
                   help="documents of the store that measures header and index bytes per document (default 20,000)")
    p.add_argument("--data", default=str(SHARED_NQ), help=f"NQ-open oracle file for the index measurement "
                                                          f"(default {SHARED_NQ})")
    p.add_argument("--index-limit", type=int, default=None, help="use only the first N NQ passages")
    return p


def main(argv: list[str] | None = None) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.docs_per_shard is None:
        from offline_encode.encode import DEFAULT_SHARD_DOCS

        args.docs_per_shard = DEFAULT_SHARD_DOCS
    for name in ("passages", "docs_per_shard", "sample_docs", "index_docs"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    out = Path(args.out)
    for attr, folder in (("retrieval_json", "retrieval"), ("serve_json", "serve_throughput")):
        beside = out.parent / folder / "results.json"  # a `make bench` run: the figures of this same run
        if getattr(args, attr) is None and beside.is_file():
            setattr(args, attr, str(beside))
    with tempfile.TemporaryDirectory(prefix="prag-sizing-") as tmp:
        res = run(args, Path(tmp))
    res["argv"] = " ".join(argv)
    table = markdown(res)
    return save_results(out, res, table)


if __name__ == "__main__":
    try:
        main()
    except PragError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
