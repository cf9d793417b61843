"""Batch search of a queries file: ``{id, question}`` JSONL in, ``{id, doc_ids, scores}`` JSONL out."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from prag.errors import PragError
from prag.io import (atomic_write_jsonl, check_output_file, check_readable, ensure_writable_dir, iter_jsonl,
                     open_text)
from retrieval.retriever import METHODS, Retriever, check_k


@dataclass(frozen=True)
class Query:
    id: str
    question: str


@dataclass
class SearchConfig:
    index: str
    queries: str | None
    out: str
    k: int
    dataset: str | None = None     # instead of queries: a QA dataset file read as `prag eval` reads it
    data: str | None = None
    limit: int | None = None       # with dataset: its first N questions
    method: str = "dense"          # dense | bm25 | hybrid
    embedder: str | None = None    # must match the index's embedder when given
    batch_size: int = 64
    nprobe: int | None = None      # ivf override
    ef_search: int | None = None   # hnsw override
    device: str | None = None
    allow_download: bool = False   # fetch the index's embedder if it is not in the HF cache


@dataclass(frozen=True)
class SearchResult:
    out: Path
    queries: int
    seconds: float

    def summary(self) -> str:
        qps = self.queries / self.seconds if self.seconds > 0 else float("inf")
        return f"searched {self.queries:,} queries in {self.seconds:.1f} s ({qps:,.1f} q/s); wrote {self.out}"


def read_queries(path: str | Path) -> list[Query]:
    """Parse a queries file; bad lines and repeated ids fail naming the file and line."""
    with open_text(check_readable(path, "queries file")) as fh:
        head = fh.read(1024).lstrip()
    if head.startswith("["):
        raise PragError(f"{path} is a JSON list, but --queries expects JSONL: one {{\"id\", \"question\"}} object "
                        f"per line. For a QA dataset file use --dataset NAME --data {path}")
    queries: list[Query] = []
    seen: dict[str, int] = {}
    for lineno, rec in iter_jsonl(path, "queries file"):
        for key in ("id", "question"):
            if key not in rec:
                raise PragError(f"{path}:{lineno}: missing field {key!r}")
        if not isinstance(rec["question"], str) or not rec["question"].strip():
            raise PragError(f"{path}:{lineno}: field 'question' must be a non-empty string")
        qid = str(rec["id"])
        if qid in seen:
            raise PragError(f"{path}:{lineno}: duplicate query id {qid!r} (first on line {seen[qid]})")
        seen[qid] = lineno
        queries.append(Query(qid, rec["question"]))
    return queries


def dataset_queries(name: str, path: str | Path, limit: int | None = None) -> list[Query]:
    """The questions of a QA dataset file, read by the same loaders as ``prag eval``."""
    from engine.eval.datasets import load_dataset  # the QA loaders live with evaluation

    return [Query(ex["id"], ex["question"]) for ex in load_dataset(name, path, limit=limit)]


def search_file(cfg: SearchConfig) -> SearchResult:
    """Answer every query in ``cfg.queries`` (or dataset) and write the results atomically to ``cfg.out``."""
    check_k(cfg.k)
    if cfg.method not in METHODS:
        raise PragError(f"--method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    if (cfg.queries is None) == (cfg.dataset is None):
        raise PragError("give either --queries FILE or --dataset NAME --data FILE")
    if cfg.dataset is not None:
        if cfg.data is None:
            raise PragError("--dataset needs --data FILE")
        queries = dataset_queries(cfg.dataset, cfg.data, cfg.limit)
    else:
        queries = read_queries(cfg.queries)
    out = check_output_file(cfg.out, inputs=tuple(p for p in (cfg.queries, cfg.data, cfg.index) if p))
    ensure_writable_dir(out.parent, "output directory")
    with Retriever.load(cfg.index, embedder=cfg.embedder, device=cfg.device, batch_size=cfg.batch_size,
                        nprobe=cfg.nprobe, ef_search=cfg.ef_search, allow_download=cfg.allow_download) as retriever:
        if cfg.method != "bm25":
            retriever.embedder  # load the model before the clock starts: the summary reports search speed
        start = time.perf_counter()
        hits = retriever.search([q.question for q in queries], cfg.k, method=cfg.method)
        seconds = time.perf_counter() - start
    atomic_write_jsonl(out, [{"id": q.id, "doc_ids": [d for d, _ in h], "scores": [round(s, 6) for _, s in h]}
                             for q, h in zip(queries, hits)])
    return SearchResult(out=out, queries=len(queries), seconds=seconds)
