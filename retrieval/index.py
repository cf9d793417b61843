"""Build an index directory: doc store, FAISS inner-product index, optional BM25, manifest.

Layout of ``INDEX_DIR``::

    manifest.json   what was built, with every file's size, sha256 and sampled sha256 (written last)
    index.faiss     FAISS index; row i is document row i
    docs.sqlite     row <-> doc id, title, text
    bm25/           optional bm25s index (``--bm25``)

Two passes, memory bounded by one chunk: (1) parse the corpus into the doc store, which
validates every line and catches duplicate ids *before* any slow embedding; (2) stream the
store back in chunks, embed, add. IVF trains on a random sample of rows. The whole directory is
built under a temporary name and renamed into place only when complete (``prag.io.atomic_dir``),
so a crash never leaves a usable-looking index; leftovers of a killed build are removed by the
next build of the same output. ``--out`` must be new, empty, or a previous index (replaced only with
``overwrite``): ``prag.io.atomic_output_dir`` refuses anything else. ``Retriever.load`` checks file
sizes and sampled checksums (cheap); ``verify_index`` checks the full sha256 of every file.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm.auto import tqdm

from prag.errors import PragError
from prag.io import OutputKind, atomic_output_dir, check_output_dir, check_readable, json_marker, sha256_file
from retrieval.corpus import CorpusStats, corpus_format, iter_corpus
from retrieval.docstore import DOCSTORE_FILE, DocStore, write_docstore
from retrieval.embed import Embedder, canonical_embedder_name, passage_text
from retrieval.manifest import (INDEX_TYPES, MANIFEST_FILE, FileCheck, Manifest, check_files, corruption_error,
                                read_manifest, record_files, write_manifest)

FAISS_FILE = "index.faiss"
BUILDING_FILE = "BUILDING"
MIN_POINTS_PER_CENTROID = 39  # below this FAISS k-means warns and clusters badly
# a previous index (its manifest) may be replaced with --overwrite; any other non-empty folder never
INDEX_OUTPUT = OutputKind("an index", "prag index build", json_marker(MANIFEST_FILE, "embedder", "index_type", "count"))


@dataclass
class IndexConfig:
    """How to build an index. Defaults: exact search with the packaged all-MiniLM-L6-v2."""

    index_type: str = "flat"
    embedder: str | None = None        # sentence-transformers name or path; None = all-MiniLM-L6-v2
    device: str | None = None          # None = cuda when available, else cpu
    batch_size: int = 64               # texts per forward pass of the embedder
    chunk_size: int = 4096             # passages embedded and added per step (bounds memory)
    nlist: int | None = None           # ivf: None = 4*sqrt(n), capped at train_size/39
    nprobe: int | None = None          # ivf: lists probed per query; None = max(32, nlist/16) (stored, overridable)
    train_size: int = 100_000          # ivf: passages sampled to train the coarse quantizer
    hnsw_m: int = 32                   # hnsw: graph degree
    ef_construction: int = 200         # hnsw: build-time beam
    ef_search: int = 128               # hnsw: query-time beam (stored, overridable at load)
    bm25: bool = False                 # also build a bm25s index for --method bm25|hybrid
    bm25_k1: float = 1.2               # Elasticsearch's defaults, which the paper used through Elasticsearch
    bm25_b: float = 0.75
    allow_download: bool = False       # fetch an embedder missing from the HF cache (else fail at once)
    seed: int = 0                      # ivf training sample

    def validate(self) -> None:
        if self.index_type not in INDEX_TYPES:
            raise PragError(f"index_type must be one of {', '.join(INDEX_TYPES)}, got {self.index_type!r}")
        for name in ("batch_size", "chunk_size", "train_size", "hnsw_m", "ef_construction", "ef_search"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise PragError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.bm25_k1, (int, float)) and math.isfinite(self.bm25_k1) and self.bm25_k1 >= 0):
            raise PragError(f"bm25_k1 (--bm25-k1) must be a finite number >= 0, got {self.bm25_k1!r}")
        if not (isinstance(self.bm25_b, (int, float)) and 0 <= self.bm25_b <= 1):
            raise PragError(f"bm25_b (--bm25-b) must be between 0 and 1, got {self.bm25_b!r}")
        for name in ("nlist", "nprobe"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise PragError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class BuildResult:
    out: Path
    manifest: Manifest
    seconds: float

    @property
    def passages_per_s(self) -> float:
        return self.manifest.count / self.seconds if self.seconds > 0 else float("inf")

    def summary(self) -> str:
        m = self.manifest
        return (f"indexed {m.count:,} passages ({m.skipped_empty:,} empty skipped) into {self.out} "
                f"[{m.index_type}, {m.embedder}, dim {m.dim}{', +bm25' if m.bm25 else ''}] "
                f"in {self.seconds:.1f} s ({self.passages_per_s:,.0f} passages/s)")


def ivf_nlist(n_train: int, requested: int | None) -> int:
    """Number of IVF lists: ~4*sqrt(n), never more than the sample can train well."""
    if requested is not None:
        if requested > n_train:
            raise PragError(f"nlist={requested} needs at least {requested} training passages; "
                            f"only {n_train} are available (lower --nlist)")
        return requested
    return max(1, min(int(round(4 * math.sqrt(n_train))), n_train // MIN_POINTS_PER_CENTROID))


def ivf_nprobe(nlist: int, requested: int | None) -> int:
    """Lists probed per query. The default keeps recall@10 vs exact >= 0.95 on the NQ pool
    (nprobe 16 of 66 lists gave 0.93 there; see benchmarks/retrieval.py for the sweep)."""
    return min(nlist, requested if requested is not None else max(32, nlist // 16))


def make_faiss_index(cfg: IndexConfig, dim: int, n: int):
    """An empty FAISS inner-product index of ``cfg.index_type`` for ``n`` vectors, and its parameters."""
    import faiss

    if cfg.index_type == "flat":
        return faiss.IndexFlatIP(dim), {}
    if cfg.index_type == "hnsw":
        index = faiss.index_factory(dim, f"HNSW{cfg.hnsw_m}", faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = cfg.ef_construction
        index.hnsw.efSearch = cfg.ef_search
        return index, {"M": cfg.hnsw_m, "ef_construction": cfg.ef_construction, "ef_search": cfg.ef_search}
    nlist = ivf_nlist(min(n, cfg.train_size), cfg.nlist)
    index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
    nprobe = ivf_nprobe(nlist, cfg.nprobe)
    index.nprobe = nprobe
    return index, {"nlist": nlist, "nprobe": nprobe, "train_size": min(n, cfg.train_size)}


def add_vectors(index, chunks: Iterable[np.ndarray]) -> None:
    """Add streamed vector chunks. An untrained index (IVF whose sample is the whole corpus)
    buffers them, trains on all of them, then adds them."""
    pending: list[np.ndarray] = []
    for vecs in chunks:
        if index.is_trained:
            index.add(vecs)
        else:
            pending.append(vecs)
    if pending:
        allvecs = np.concatenate(pending)
        index.train(allvecs)
        index.add(allvecs)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_builds(out: Path) -> list[Path]:
    """Delete temporary dirs left by killed builds of ``out`` (their owner process is gone)."""
    removed = []
    for tmp in list(out.parent.glob(f".{out.name}.*.tmp")):
        marker = tmp / BUILDING_FILE
        try:
            host, pid = marker.read_text().split()
            stale = host == socket.gethostname() and not _pid_alive(int(pid))
        except (OSError, ValueError):
            # no marker: killed before writing it, or not ours; only remove when clearly old
            stale = tmp.is_dir() and time.time() - tmp.stat().st_mtime > 3600
        if stale:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def _embed_rows(store: DocStore, rows: np.ndarray, embedder: Embedder, chunk: int) -> np.ndarray:
    parts = []
    for start in tqdm(range(0, len(rows), chunk), desc="embedding IVF training sample", unit="chunk",
                      disable=len(rows) <= chunk):
        docs = store.get_by_rows(rows[start:start + chunk].tolist())
        parts.append(embedder.encode([passage_text(d.title, d.text) for d in docs]))
    return np.concatenate(parts)


def _embed_chunk(embedder: Embedder, docs: list, bar, step: int = 512) -> np.ndarray:
    """Embed one chunk, moving the progress bar every ``step`` passages."""
    parts = []
    for i in range(0, len(docs), step):
        part = docs[i:i + step]
        parts.append(embedder.encode([passage_text(d.title, d.text) for d in part]))
        bar.update(len(part))
    return np.concatenate(parts)


def _build_bm25(store: DocStore, out: Path, chunk: int, progress: bool = True, k1: float = 1.2,
                b: float = 0.75) -> None:
    """bm25s keeps the token ids of the whole corpus in memory; it is an option for that reason.

    Lucene's BM25 (the scoring Elasticsearch runs): idf = ln(1 + (N - df + 0.5) / (df + 0.5)), term part
    tf / (tf + k1 (1 - b + b |d| / avgdl)); k1 and b are saved with the index and restored on load."""
    import bm25s
    from bm25s.tokenization import Tokenized, Tokenizer

    tokenizer = Tokenizer(stopwords="en")
    ids: list[list[int]] = []
    for docs in tqdm(store.iter_rows(chunk=chunk), total=math.ceil(len(store) / chunk), desc="bm25 tokenize",
                     unit="chunk", disable=not progress):
        ids += tokenizer.tokenize([passage_text(d.title, d.text) for d in docs], update_vocab=True,
                                  return_as="ids", show_progress=False)
    model = bm25s.BM25(k1=k1, b=b, method="lucene")
    model.index(Tokenized(ids=ids, vocab=tokenizer.get_vocab_dict()), show_progress=False)
    out.mkdir()
    model.save(str(out))
    tokenizer.save_vocab(str(out))
    tokenizer.save_stopwords(str(out))


def build_index(corpus: str | Path, out: str | Path, cfg: IndexConfig | None = None,
                embedder: Embedder | None = None, progress: bool = True, overwrite: bool = False) -> BuildResult:
    """Index ``corpus`` (JSONL / DPR TSV, optionally .gz) into the directory ``out``.

    ``out`` must be absent, empty, or (with ``overwrite``) a previous index; a failed build leaves
    nothing behind, and a previous index stays untouched until the new one is complete.
    """
    import faiss

    cfg = cfg or IndexConfig()
    cfg.validate()
    corpus = check_readable(corpus, "corpus file")
    corpus_format(corpus)
    out = Path(out)
    check_output_dir(out, INDEX_OUTPUT, overwrite=overwrite, inputs=(corpus,))  # before the slow embedder load
    remove_stale_builds(out)
    if embedder is None:
        embedder = Embedder(cfg.embedder, device=cfg.device, batch_size=cfg.batch_size,
                            allow_download=cfg.allow_download)
    elif cfg.embedder is not None and canonical_embedder_name(cfg.embedder) != embedder.name:
        raise PragError(f"embedder {embedder.name!r} does not match the configured {cfg.embedder!r}")

    start = time.perf_counter()
    with atomic_output_dir(out, INDEX_OUTPUT, overwrite=overwrite, inputs=(corpus,)) as tmp:
        (tmp / BUILDING_FILE).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        stats = CorpusStats()
        # pass 1: parse + validate + store (duplicate ids fail here, before any embedding)
        docs = iter_corpus(corpus, stats, check_duplicates=False)
        if progress:
            docs = tqdm(docs, desc="reading corpus", unit="doc", mininterval=1.0)
        n = write_docstore(tmp / DOCSTORE_FILE, docs, corpus, chunk=cfg.chunk_size)
        if n == 0:
            raise PragError(f"{corpus}: no non-empty documents to index ({stats.skipped_empty} empty texts skipped)")
        store = DocStore(tmp / DOCSTORE_FILE)
        try:
            index, params = make_faiss_index(cfg, embedder.dim, n)
            n_train = min(n, cfg.train_size)
            if not index.is_trained and n > n_train:
                rows = np.sort(np.random.default_rng(cfg.seed).choice(n, size=n_train, replace=False))
                index.train(_embed_rows(store, rows, embedder, cfg.chunk_size))
            # pass 2: stream, embed, add
            bar = tqdm(total=n, desc=f"embedding ({cfg.index_type})", unit="passage", disable=not progress)
            add_vectors(index, (_embed_chunk(embedder, chunk, bar) for chunk in store.iter_rows(chunk=cfg.chunk_size)))
            bar.close()
            if index.ntotal != n:
                raise PragError(f"internal error: FAISS holds {index.ntotal} vectors for {n} documents")
            faiss.write_index(index, str(tmp / FAISS_FILE))
            if cfg.bm25:
                _build_bm25(store, tmp / "bm25", cfg.chunk_size, progress, cfg.bm25_k1, cfg.bm25_b)
                params = {**params, "bm25_k1": cfg.bm25_k1, "bm25_b": cfg.bm25_b}
        finally:
            store.close()
        (tmp / BUILDING_FILE).unlink()
        manifest = Manifest(
            embedder=embedder.name, dim=embedder.dim, index_type=cfg.index_type, count=n,
            corpus_sha256=sha256_file(corpus), corpus_path=str(corpus.resolve()),
            skipped_empty=stats.skipped_empty, index_params=params, bm25=cfg.bm25,
            build_seconds=round(time.perf_counter() - start, 3), files=record_files(tmp))
        write_manifest(tmp, manifest)
    return BuildResult(out=out, manifest=manifest, seconds=time.perf_counter() - start)


@dataclass(frozen=True)
class VerifyReport:
    """``prag index verify``: every recorded file against its full sha256."""

    index_dir: Path
    checks: list[FileCheck]

    @property
    def bad(self) -> list[FileCheck]:
        return [c for c in self.checks if c.problem]

    def summary(self) -> str:
        lines = [f"  {'BAD ' if c.problem else 'ok  '} {c.name} ({c.size:,} bytes)" + (f": {c.problem}" if c.problem else "")
                 for c in self.checks]
        total = sum(c.size for c in self.checks)
        verdict = (f"index {self.index_dir}: {len(self.bad)} of {len(self.checks)} file(s) damaged" if self.bad else
                   f"index {self.index_dir} verified: {len(self.checks)} file(s), {total:,} bytes, all sha256 match")
        return "\n".join([verdict, *lines])


def verify_index(index_dir: str | Path) -> VerifyReport:
    """Full check: the sha256 of every index file against the manifest (reads every byte)."""
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    if not manifest.files:
        raise PragError(f"index {index_dir} was built before file checksums were recorded, so it cannot be "
                        "verified; rebuild it with 'prag index build' to make it verifiable")
    return VerifyReport(index_dir, check_files(index_dir, manifest, full=True))


def check_verified(report: VerifyReport) -> None:
    """Raise the error naming the first damaged file, if any."""
    if report.bad:
        raise corruption_error(report.index_dir, report.bad)
