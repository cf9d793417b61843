"""Retrieval benchmark on the NQ pool: build and query throughput, recall and size for flat / hnsw / ivf / ivfpq.

    python -m benchmarks.retrieval --out DIR [--data NQ_ORACLE.jsonl.gz] [--limit N] [--k 10]

Corpus: the unique gold passages (``ctxs[0]``) of ``../shared/data/nq_open_oracle.jsonl.gz``
(2,600 passages, 2,655 questions), embedded with the default all-MiniLM-L6-v2.

What is measured (all through the library's real code paths):
- build: ``build_index`` end to end for flat (read, doc store, embed, FAISS, manifest). For hnsw
  and ivf the same corpus is rebuilt with a cached embedder, which gives the time spent outside
  embedding; their end-to-end figure is that plus the flat build's embedding time.
- query: questions are embedded once (a batch); each index then answers the batch
  (``search_vectors``) and, for latency, one question at a time.
- quality: recall@k of each index relative to flat (the fraction of flat's top-k it returns),
  recall@1/@5/@k of each question's own gold passage, and answer recall@k (a top-k passage contains
  one of the question's answers, SQuAD-normalised, as DPR's top-k accuracy counts). BM25 and hybrid
  (reciprocal-rank fusion) are reported for comparison.
- size: bytes per passage of ``index.faiss`` on this pool, and split into what every added passage
  costs (the file minus the same index emptied, over N) and what is fixed (centroids, PQ codebooks,
  the emptied index): the marginal figure is what scales to a 21M-passage corpus. ivfpq is also built
  with other ``pq_m`` values (code bytes per passage) to show the size / recall trade.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import save_results

from prag.io import atomic_write_text

SHARED_NQ = Path(__file__).resolve().parents[2] / "shared" / "data" / "nq_open_oracle.jsonl.gz"
TYPES = ("flat", "hnsw", "ivf", "ivfpq")
PQ_M_SWEEP = (24, 48, 96)  # ivfpq code bytes per passage at 8 bits (all divide 384); 48 is the default
DPR_PASSAGES = 21_015_324


def index_bytes(path: Path, n: int) -> dict:
    """``index.faiss`` bytes per passage, and split into the marginal bytes per passage and the fixed part."""
    import faiss

    size = path.stat().st_size
    index = faiss.read_index(str(path))
    index.reset()  # drops the vectors (and ids, graph links), keeps what training made
    fixed = len(faiss.serialize_index(index))
    return {"index_bytes_per_passage": round(size / n, 1), "index_marginal_bytes_per_passage": round((size - fixed) / n, 1),
            "index_fixed_bytes": fixed}


def answer_recall(texts: list[list[str]], answers: list[tuple[str, ...]], k: int) -> float:
    """Share of questions with an answer in one of their first ``k`` passages (SQuAD-normalised, whole words)."""
    from engine.eval.scoring import normalize_answer

    hit = 0
    for passages, golds in zip(texts, answers):
        norm = [f" {normalize_answer(g)} " for g in golds if normalize_answer(g)]
        hit += any(g in f" {normalize_answer(t)} " for t in passages[:k] for g in norm)
    return hit / max(1, len(texts))


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def run(data: Path, workdir: Path, k: int = 10, limit: int | None = None, latency_queries: int = 200) -> dict:
    import faiss
    import numpy as np
    import torch

    from prag.io import atomic_write_jsonl
    from retrieval.embed import CachedEmbedder, Embedder
    from retrieval.evaluate import overlap_at_k, pool_oracle_passages, recall_at_k
    from retrieval.index import IndexConfig, build_index
    from retrieval.retriever import Retriever

    docs, qas = pool_oracle_passages(data)
    if limit:
        docs = docs[:limit]
        keep = {d["id"] for d in docs}
        qas = [qa for qa in qas if qa.gold_id in keep]
    corpus = workdir / "pool.jsonl"
    atomic_write_jsonl(corpus, docs)
    questions = [qa.question for qa in qas]
    gold = [qa.gold_id for qa in qas]
    answers = [qa.answers for qa in qas]
    text_of = {d["id"]: f"{d['title']} {d['text']}" for d in docs}
    n = len(docs)

    base = Embedder()
    cached = CachedEmbedder(base)
    print(f"building flat over {n} passages (embedding on {base.device}) ...", flush=True)
    flat_e2e = build_index(corpus, workdir / "flat-e2e", IndexConfig(), embedder=cached, progress=True).seconds

    rows: dict[str, dict] = {}
    no_embed: dict[str, float] = {}
    for t in TYPES:
        res = build_index(corpus, workdir / t, IndexConfig(index_type=t), embedder=cached, progress=False)
        no_embed[t] = res.seconds
        rows[t] = {"index_params": res.manifest.index_params}
    embed_seconds = max(0.0, flat_e2e - no_embed["flat"])
    bm25_build = build_index(corpus, workdir / "bm25", IndexConfig(bm25=True), embedder=cached, progress=False)
    bm25_seconds = max(0.0, bm25_build.seconds - no_embed["flat"])

    # query embedding: a fresh (uncached) pass over all questions
    t0 = time.perf_counter()
    qvecs = base.encode(questions)
    q_embed = time.perf_counter() - t0

    results: dict[str, list[list[str]]] = {}
    for t in TYPES:
        with Retriever.load(workdir / t, embedder=cached) as r:
            r.search_vectors(qvecs[:8], k)  # warm up
            t0 = time.perf_counter()
            hits = r.search_vectors(qvecs, k)
            batch_s = time.perf_counter() - t0
            if t == "flat":
                flat_rows = hits
            m = min(latency_queries, len(qvecs))
            t0 = time.perf_counter()
            for i in range(m):
                r.search_vectors(qvecs[i:i + 1], k)
            single_s = (time.perf_counter() - t0) / m
            all_rows = sorted({x for h in hits for x, _ in h})
            by_row = dict(zip(all_rows, r.store.ids_of_rows(all_rows)))
            results[t] = [[by_row[x] for x, _ in h] for h in hits]
        rows[t].update({
            "build_s_without_embedding": round(no_embed[t], 3),
            "build_passages_per_s": round(_rate(n, embed_seconds + no_embed[t]), 1),
            "index_only_passages_per_s": round(_rate(n, no_embed[t]), 1),
            "search_batch_qps": round(_rate(len(qvecs), batch_s), 1),
            "search_single_ms": round(single_s * 1000, 3),
            "end_to_end_qps": round(_rate(len(qvecs), q_embed + batch_s), 1),
        })
    for t in TYPES:
        rows[t].update({f"recall@{j}_vs_flat": round(overlap_at_k(results[t], results["flat"], j), 4)
                        for j in sorted({1, 5, k})})
        rows[t].update({"gold_recall@1": round(recall_at_k(results[t], gold, 1), 4),
                        "gold_recall@5": round(recall_at_k(results[t], gold, 5), 4),
                        f"gold_recall@{k}": round(recall_at_k(results[t], gold, k), 4),
                        f"answer_recall@{k}": round(answer_recall([[text_of[d] for d in r] for r in results[t]],
                                                                  answers, k), 4)})

    # the speed / recall dial of each approximate index
    sweeps: dict[str, list[dict]] = {"ivf": [], "hnsw": [], "ivfpq": []}
    nlist = rows["ivf"]["index_params"]["nlist"]
    dials = {"ivf": ("nprobe", [p for p in (1, 2, 4, 8, 16, 32, 64) if p <= nlist]),
             "hnsw": ("ef_search", [16, 32, 64, 128, 256]),
             "ivfpq": ("nprobe", [p for p in (1, 2, 4, 8, 16, 32, 64) if p <= rows["ivfpq"]["index_params"]["nlist"]])}
    for t, (knob, values) in dials.items():
        for v in values:
            with Retriever.load(workdir / t, embedder=cached, **{knob: v}) as r:
                t0 = time.perf_counter()
                hits = r.search_vectors(qvecs, k)
                seconds = time.perf_counter() - t0
            approx = [[x for x, _ in h] for h in hits]
            exact_rows = [[x for x, _ in h] for h in flat_rows]
            sweeps[t].append({knob: v, f"recall@{k}_vs_flat": round(overlap_at_k(approx, exact_rows, k), 4),
                              "search_batch_qps": round(_rate(len(qvecs), seconds), 1)})

    with Retriever.load(workdir / "bm25", embedder=cached) as r:
        for method in ("bm25", "hybrid"):
            t0 = time.perf_counter()
            hits = r.search(questions, k, method=method)
            seconds = time.perf_counter() - t0
            ids = [[d for d, _ in h] for h in hits]
            rows[method] = {
                "end_to_end_qps": round(_rate(len(questions), seconds), 1),
                "gold_recall@1": round(recall_at_k(ids, gold, 1), 4),
                "gold_recall@5": round(recall_at_k(ids, gold, 5), 4),
            }
    rows["bm25"]["build_s_without_embedding"] = round(bm25_seconds, 3)
    # sizes on disk: what a corpus of N passages costs per index type (the doc store is extra, for all)
    for t in TYPES:
        rows[t].update(index_bytes(workdir / t / "index.faiss", n))
        rows[t]["index_gib_at_21m"] = round((rows[t]["index_fixed_bytes"] + DPR_PASSAGES
                                             * rows[t]["index_marginal_bytes_per_passage"]) / 2 ** 30, 2)
    # ivfpq's size / recall dial: code bytes per passage (pq_m at 8 bits)
    exact_rows = [[x for x, _ in h] for h in flat_rows]
    for m in PQ_M_SWEEP:
        out = workdir / f"ivfpq-m{m}"
        res = build_index(corpus, out, IndexConfig(index_type="ivfpq", pq_m=m), embedder=cached, progress=False)
        with Retriever.load(out, embedder=cached) as r:
            hits = r.search_vectors(qvecs, k)
            all_rows = sorted({x for h in hits for x, _ in h})
            by_row = dict(zip(all_rows, r.store.ids_of_rows(all_rows)))
        ids = [[by_row[x] for x, _ in h] for h in hits]
        sweeps.setdefault("ivfpq_pq_m", []).append({
            "pq_m": m, "index_params": res.manifest.index_params, "build_s_without_embedding": round(res.seconds, 2),
            f"recall@{k}_vs_flat": round(overlap_at_k([[x for x, _ in h] for h in hits], exact_rows, k), 4),
            f"answer_recall@{k}": round(answer_recall([[text_of[d] for d in r] for r in ids], answers, k), 4),
            **index_bytes(out / "index.faiss", n)})
    bm25_dir = workdir / "bm25" / "bm25"
    rows["bm25"]["bytes_per_passage"] = round(sum(f.stat().st_size for f in bm25_dir.iterdir()) / n, 1)
    rows["bm25"]["docstore_bytes_per_passage"] = round((workdir / "bm25" / "docs.sqlite").stat().st_size / n, 1)
    with Retriever.load(workdir / "bm25", embedder=cached) as r:
        r.search(questions[:1], 1, method="bm25")
        rows["bm25"]["matrix_memory_mapped"] = all(isinstance(v, np.memmap) for v in r._bm25.model.scores.values()
                                                   if hasattr(v, "shape"))

    return {
        "corpus": {"source": str(data), "passages": n, "questions": len(questions)},
        "embedder": base.name, "device": base.device, "k": k,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "faiss_threads": faiss.omp_get_max_threads()},
        "embedding": {"passages_per_s": round(_rate(n, embed_seconds), 1), "passage_seconds": round(embed_seconds, 2),
                      "flat_build_seconds": round(flat_e2e, 2), "questions_per_s": round(_rate(len(qvecs), q_embed), 1)},
        "indexes": rows,
        "sweeps": sweeps,
    }


def markdown(res: dict) -> str:
    k = res["k"]
    c = res["corpus"]
    lines = [
        f"Corpus: NQ-open gold passages pooled ({c['passages']:,} passages, {c['questions']:,} questions); "
        f"embedder {res['embedder']} on {res['device']} ({res['machine']['cpus']} CPUs). "
        f"Embedding: {res['embedding']['passages_per_s']:,.0f} passages/s, "
        f"{res['embedding']['questions_per_s']:,.0f} questions/s.",
        "",
        f"| index | build (passages/s) | index only (passages/s) | search batch (q/s) | search 1 query (ms) "
        f"| end-to-end (q/s) | recall@1 vs flat | recall@{k} vs flat | gold recall@1 | gold recall@5 "
        f"| answer recall@{k} |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in TYPES:
        r = res["indexes"][t]
        params = ", ".join(f"{a}={b}" for a, b in r["index_params"].items() if a not in ("train_size", "factory"))
        name = f"{t} ({params})" if params else t
        lines.append(f"| {name} | {r['build_passages_per_s']:,.0f} | {r['index_only_passages_per_s']:,.0f} "
                     f"| {r['search_batch_qps']:,.0f} | {r['search_single_ms']:.3f} | {r['end_to_end_qps']:,.0f} "
                     f"| {r['recall@1_vs_flat']:.3f} | {r[f'recall@{k}_vs_flat']:.3f} "
                     f"| {r['gold_recall@1']:.3f} | {r['gold_recall@5']:.3f} | {r.get(f'answer_recall@{k}', 0):.3f} |")
    for t in ("bm25", "hybrid"):
        r = res["indexes"][t]
        name = "bm25 (bm25s, k1=1.2, b=0.75)" if t == "bm25" else "hybrid (flat + bm25, RRF)"
        lines.append(f"| {name} | | | | | {r['end_to_end_qps']:,.0f} | | | {r['gold_recall@1']:.3f} "
                     f"| {r['gold_recall@5']:.3f} | |")
    lines += ["", "| index | bytes per passage (this pool) | bytes per added passage | fixed bytes | "
              f"index at {DPR_PASSAGES:,} passages |", "|---|---|---|---|---|"]
    for t in TYPES:
        r = res["indexes"][t]
        if "index_marginal_bytes_per_passage" in r:
            lines.append(f"| {t} | {r['index_bytes_per_passage']:,.0f} | {r['index_marginal_bytes_per_passage']:,.0f} "
                         f"| {r['index_fixed_bytes']:,} | {r['index_gib_at_21m']:.1f} GiB |")
    b = res["indexes"]["bm25"]
    if "bytes_per_passage" in b:
        lines += ["", "Bytes per passage on disk: " + ", ".join(
            f"{t} {res['indexes'][t]['index_bytes_per_passage']:,.0f}" for t in TYPES)
            + f", bm25 {b['bytes_per_passage']:,.0f} (matrix memory-mapped at load: {b['matrix_memory_mapped']}); "
            f"the doc store adds {b['docstore_bytes_per_passage']:,.0f} for every type. BM25 build (tokenise + "
            f"index, no embedding): {b['build_s_without_embedding']:.2f} s."]
    pq = res["sweeps"].get("ivfpq_pq_m", [])
    if pq:
        lines += ["", "ivfpq pq_m sweep (default nlist/nprobe): " + ", ".join(
            f"m={row['pq_m']}: {row['index_marginal_bytes_per_passage']:,.0f} B/passage, recall@{k} vs flat "
            f"{row[f'recall@{k}_vs_flat']:.3f}, answer recall@{k} {row[f'answer_recall@{k}']:.3f}" for row in pq)]
    for t, knob in (("ivf", "nprobe"), ("hnsw", "ef_search"), ("ivfpq", "nprobe")):
        sweep = res["sweeps"].get(t, [])
        if not sweep:
            continue
        lines += ["", f"{t} {knob} sweep: " + ", ".join(
            f"{row[knob]}: recall@{k} {row[f'recall@{k}_vs_flat']:.3f} at {row['search_batch_qps']:,.0f} q/s"
            for row in sweep)]
    lines += ["", "build = whole `build_index` (read, doc store, embed, FAISS, manifest); index only = the same "
              "without embedding time; search = FAISS on pre-embedded questions; end-to-end = embed the "
              "questions + search (bm25/hybrid: `Retriever.search`). recall vs flat = share of the exact top-k "
              "returned; gold recall = the question's own passage in the top 1 / 5; answer recall = an answer "
              "string in one of the top-k passages. Bytes per added passage = (file - the same index emptied) / N, "
              "the part that grows with the corpus; fixed = the emptied index (ivf centroids, PQ codebooks).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.retrieval", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder for results.json and results.md")
    parser.add_argument("--data", default=str(SHARED_NQ), help=f"NQ-open oracle file (default {SHARED_NQ})")
    parser.add_argument("--k", type=int, default=10, help="top-k for search and recall vs flat (default 10)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N pooled passages (quick runs)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    data = Path(args.data)
    if not data.exists():
        msg = f"retrieval benchmark skipped: {data} not found (../shared/data is absent on this machine)\n"
        print(msg, end="")
        atomic_write_text(out / "results.md", msg)
        return {}
    with tempfile.TemporaryDirectory(prefix="prag-bench-retrieval-") as tmp:
        res = run(data, Path(tmp), k=args.k, limit=args.limit)
    table = markdown(res)
    return save_results(out, res, table)


if __name__ == "__main__":
    main()
    sys.exit(0)
