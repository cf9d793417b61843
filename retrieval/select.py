"""``prag select``: the documents that a set of questions needs, as a corpus of its own.

The paper encodes only what its evaluated questions retrieve (top 3 of the first 300 questions per
dataset), not the 21M-passage dump. This writes the union of the questions' top-k documents, each once,
in the corpus format (so ``prag augment`` / ``prag encode`` take it as it is), plus the hits per
question in ``prag index search``'s format. Documents are fetched by id from the index's doc store in
chunks, so the corpus itself is never loaded.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from prag.errors import PragError
from prag.io import OutputKind, atomic_output_dir, atomic_write_json, json_marker
from retrieval.retriever import METHODS, Retriever, check_k
from retrieval.search_file import dataset_queries

CORPUS_FILE = "corpus.jsonl"
HITS_FILE = "hits.jsonl"
MANIFEST_FILE = "select.json"
SELECTION = OutputKind("a document selection", "prag select", json_marker(MANIFEST_FILE, "command", command="select"))


@dataclass
class SelectConfig:
    dataset: str
    data: str
    index: str
    out: str
    top_k: int = 3                   # the paper's
    limit: int | None = None         # the first N questions (the paper: 300)
    method: str = "dense"            # dense | bm25 | hybrid
    overwrite: bool = False
    search_batch: int = 1024         # questions per retrieval call
    fetch_batch: int = 512           # documents per doc-store read
    allow_download: bool = False


@dataclass(frozen=True)
class SelectResult:
    out: Path
    questions: int
    documents: int
    seconds: float

    def summary(self) -> str:
        return (f"selected {self.documents:,} document(s) for {self.questions:,} question(s) in {self.seconds:.1f} s "
                f"-> {self.out / CORPUS_FILE}, {self.out / HITS_FILE}")


def select_documents(cfg: SelectConfig) -> SelectResult:
    """Write ``out/corpus.jsonl`` (union of the top-k, first-retrieved first) and ``out/hits.jsonl``."""
    start = time.perf_counter()
    check_k(cfg.top_k)
    if cfg.method not in METHODS:
        raise PragError(f"--retrieval-method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    queries = dataset_queries(cfg.dataset, cfg.data, cfg.limit)
    if not queries:
        raise PragError(f"{cfg.data}: no questions to select documents for")
    with Retriever.load(cfg.index, allow_download=cfg.allow_download) as retriever, \
            atomic_output_dir(cfg.out, SELECTION, overwrite=cfg.overwrite, inputs=(cfg.data, cfg.index)) as tmp:
        order: dict[str, None] = {}  # the union, in first-retrieved order
        with open(tmp / HITS_FILE, "w", encoding="utf-8") as hits_out:
            for lo in range(0, len(queries), cfg.search_batch):
                chunk = queries[lo:lo + cfg.search_batch]
                for q, hits in zip(chunk, retriever.search([q.question for q in chunk], cfg.top_k, method=cfg.method)):
                    hits_out.write(json.dumps({"id": q.id, "doc_ids": [d for d, _ in hits],
                                               "scores": [round(s, 6) for _, s in hits]}) + "\n")
                    order.update(dict.fromkeys(d for d, _ in hits))
        ids = list(order)
        with open(tmp / CORPUS_FILE, "w", encoding="utf-8") as corpus_out:
            for lo in range(0, len(ids), cfg.fetch_batch):
                for doc in retriever.fetch(ids[lo:lo + cfg.fetch_batch]):
                    corpus_out.write(json.dumps({"id": doc.id, "title": doc.title, "text": doc.text},
                                                ensure_ascii=False) + "\n")
        atomic_write_json(tmp / MANIFEST_FILE, {
            "command": "select", "dataset": cfg.dataset, "data": str(cfg.data), "index": str(cfg.index),
            "index_corpus_sha256": retriever.manifest.corpus_sha256, "top_k": cfg.top_k, "limit": cfg.limit,
            "retrieval_method": cfg.method, "questions": len(queries), "documents": len(ids)})
    return SelectResult(Path(cfg.out), len(queries), len(ids), time.perf_counter() - start)
