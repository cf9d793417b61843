"""Build an index directory: doc store, FAISS inner-product index, optional BM25, manifest.

Layout of ``INDEX_DIR``::

    manifest.json   what was built, with every file's size, sha256 and sampled sha256 (written last)
    index.faiss     FAISS index; row i is document row i
    docs.sqlite     row <-> doc id, title, text
    bm25/           optional bm25s index (``--bm25``)

Two passes, memory bounded by one chunk: (1) parse the corpus into the doc store, which
validates every line and catches duplicate ids *before* any slow embedding; (2) stream the
store back in shards of rows, embed, add. IVF and IVF-PQ train on a random sample of rows first.
Who embeds is a parameter (``EmbedShards``): this process (``build_index``) or a Ray Data actor
pool (``retrieval.build_ray.build_index_ray``); the rest is one function, ``write_index_dir``, for
both. The whole directory is built under a temporary name and renamed into place only when
complete (``prag.io.atomic_dir``), so a crash never leaves a usable-looking index; leftovers of a
killed build are removed by the next build of the same output. ``--out`` must be new, empty, or a previous index (replaced only with
``overwrite``): ``prag.io.atomic_output_dir`` refuses anything else. ``Retriever.load`` checks file
sizes and sampled checksums (cheap); ``verify_index`` checks the full sha256 of every file.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generator, Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from prag.errors import PragError
from prag.io import OutputKind, atomic_output_dir, check_output_dir, check_readable, json_marker, sha256_file
from retrieval.corpus import CorpusStats, corpus_format, iter_corpus
from retrieval.docstore import DOCSTORE_FILE, DocStore, write_docstore
from retrieval.embed import Embedder, canonical_embedder_name, passage_text
from retrieval.manifest import (INDEX_TYPES, MANIFEST_FILE, FileCheck, Manifest, check_files, corruption_error,
                                read_manifest, record_files, write_manifest)

log = logging.getLogger(__name__)

FAISS_FILE = "index.faiss"
BUILDING_FILE = "BUILDING"
MIN_POINTS_PER_CENTROID = 39  # below this FAISS k-means warns and clusters badly
MAX_PQ_BITS = 16  # FAISS's IVF-PQ scanners handle up to 16-bit codes
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
    nlist: int | None = None           # ivf, ivfpq: None = 4*sqrt(n), capped at train_size/39
    nprobe: int | None = None          # ivf, ivfpq: lists probed per query; None = max(32, nlist/16) (stored, overridable)
    train_size: int = 100_000          # ivf, ivfpq: passages sampled to train the lists (and the PQ codebooks)
    pq_m: int | None = None            # ivfpq: sub-quantizers = code bytes per vector at 8 bits; must divide the
                                       #   embedding dim; None = dim/8 (48 for all-MiniLM-L6-v2's 384)
    pq_bits: int | None = None         # ivfpq: bits per sub-quantizer code (1..16); None = 8, lowered for a
                                       #   training sample under 256 passages (2**bits centroids need that many)
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
        for name in ("nlist", "nprobe", "pq_m"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise PragError(f"{name} (--{name.replace('_', '-')}) must be a positive integer, got {value!r}")
        if self.pq_bits is not None and (not isinstance(self.pq_bits, int) or isinstance(self.pq_bits, bool)
                                         or not 1 <= self.pq_bits <= MAX_PQ_BITS):
            raise PragError(f"pq_bits (--pq-bits) must be an integer from 1 to {MAX_PQ_BITS}, got {self.pq_bits!r}")


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


def pq_m(dim: int, requested: int | None) -> int:
    """IVF-PQ sub-quantizers: each codes ``dim / m`` dimensions, so ``m`` must divide ``dim``."""
    if requested is not None:
        if dim % requested:
            divisors = [d for d in range(1, dim + 1) if dim % d == 0 and 4 <= d <= dim // 2]
            raise PragError(f"--pq-m {requested} must divide the embedding dimension {dim} "
                            f"(e.g. {', '.join(map(str, divisors[:10]))})")
        return requested
    return max(d for d in range(1, max(1, dim // 8) + 1) if dim % d == 0)


def pq_bits(n_train: int, requested: int | None) -> int:
    """Bits per PQ code: 8 by default; k-means needs at least ``2**bits`` training vectors."""
    if requested is not None:
        if 2 ** requested > n_train:
            raise PragError(f"--pq-bits {requested} means {2 ** requested:,} centroids per sub-quantizer, which "
                            f"needs at least that many training passages; only {n_train:,} are available "
                            f"(lower --pq-bits to {max(1, int(math.log2(n_train)))} or less, or raise --train-size)")
        return requested
    return max(1, min(8, int(math.log2(max(n_train, 2)))))


def _ivf_lists(cfg: IndexConfig, n_train: int) -> tuple[int, int]:
    """(nlist, nprobe) for ivf / ivfpq, saying when the default number of lists was cut to the data."""
    nlist = ivf_nlist(n_train, cfg.nlist)
    wanted = int(round(4 * math.sqrt(n_train)))
    if cfg.nlist is None and nlist < wanted:
        log.info("%s: %d lists (not 4*sqrt(N) = %d: %s training passages give at least %d per list)",
                 cfg.index_type, nlist, wanted, f"{n_train:,}", MIN_POINTS_PER_CENTROID)
    return nlist, ivf_nprobe(nlist, cfg.nprobe)


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
    n_train = min(n, cfg.train_size)
    if cfg.index_type == "ivf":
        nlist, nprobe = _ivf_lists(cfg, n_train)
        index = faiss.index_factory(dim, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)
        index.nprobe = nprobe
        return index, {"nlist": nlist, "nprobe": nprobe, "train_size": n_train}
    # ivfpq: residuals to the list centroid, product-quantised into m codes of `bits` bits each
    m, bits = pq_m(dim, cfg.pq_m), pq_bits(n_train, cfg.pq_bits)
    nlist, nprobe = _ivf_lists(cfg, n_train)
    if cfg.pq_bits is None and bits < 8:
        log.info("ivfpq: %d-bit codes (not 8: %s training passages cannot train 256 centroids per sub-quantizer)",
                 bits, f"{n_train:,}")
    factory = f"IVF{nlist},PQ{m}x{bits}"
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    index.nprobe = nprobe
    index.do_polysemous_training = False  # the factory turns it on; it serves Hamming filtering we never use, slowly
    if n_train < MIN_POINTS_PER_CENTROID * 2 ** bits:
        # FAISS would print its "please provide at least N training points" warning once per sub-quantizer
        log.info("ivfpq: %s training passages for %d centroids per sub-quantizer (FAISS advises %s); codes "
                 "are coarser on a corpus this small", f"{n_train:,}", 2 ** bits, f"{MIN_POINTS_PER_CENTROID * 2 ** bits:,}")
        index.pq.cp.min_points_per_centroid = 1
    return index, {"nlist": nlist, "nprobe": nprobe, "train_size": n_train, "pq_m": m, "pq_bits": bits,
                   "factory": factory}


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


EmbedShards = Callable[[DocStore, Iterator[np.ndarray]], Generator[np.ndarray, None, None]]
"""Who embeds: given the doc store and shards of its row numbers, yield float32 blocks of unit vectors for
those rows, in the shards' order (a block may cover part of a shard or several shards; the rows never reorder)."""


def embed_shards_locally(embedder: Embedder, step: int = 512) -> EmbedShards:
    """Embed in this process, ``step`` passages per block (the progress bar moves once per block)."""
    def embed(store: DocStore, shards: Iterator[np.ndarray]) -> Generator[np.ndarray, None, None]:
        for rows in shards:
            for i in range(0, len(rows), step):
                docs = store.get_by_rows(rows[i:i + step])
                yield embedder.encode([passage_text(d.title, d.text) for d in docs])
    return embed


def row_shards(rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Consecutive pieces of ``rows`` of ``size`` rows (the last may be shorter)."""
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


def _take_rows(blocks: Iterator[np.ndarray], count: int, bar) -> tuple[np.ndarray, list[np.ndarray]]:
    """The next ``count`` rows of ``blocks`` as one array, and what the last block held beyond them."""
    parts, have = [], 0
    while have < count:
        block = next(blocks, None)
        if block is None:
            raise PragError(f"internal error: the embedder returned {have} vectors for a sample of {count}")
        parts.append(block)
        have += len(block)
        bar.update(len(block))
    vecs = np.concatenate(parts)
    return vecs[:count], ([vecs[count:]] if have > count else [])


def _counted(blocks: Iterable[np.ndarray], bar) -> Iterator[np.ndarray]:
    for block in blocks:
        bar.update(len(block))
        yield block


def prepare_build(corpus: str | Path, out: str | Path, cfg: IndexConfig, overwrite: bool = False) -> tuple[Path, Path]:
    """The checks that run before any model loads: config, corpus readable and of a known format, ``out`` usable."""
    cfg.validate()
    corpus = check_readable(corpus, "corpus file")
    corpus_format(corpus)
    out = Path(out)
    check_output_dir(out, INDEX_OUTPUT, overwrite=overwrite, inputs=(corpus,))
    remove_stale_builds(out)
    return corpus, out


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
    """Index ``corpus`` (JSONL / DPR TSV, optionally .gz) into the directory ``out``, embedding in this process.

    ``out`` must be absent, empty, or (with ``overwrite``) a previous index; a failed build leaves
    nothing behind, and a previous index stays untouched until the new one is complete.
    """
    cfg = cfg or IndexConfig()
    corpus, out = prepare_build(corpus, out, cfg, overwrite)  # before the slow embedder load
    if embedder is None:
        embedder = Embedder(cfg.embedder, device=cfg.device, batch_size=cfg.batch_size,
                            allow_download=cfg.allow_download)
    elif cfg.embedder is not None and canonical_embedder_name(cfg.embedder) != embedder.name:
        raise PragError(f"embedder {embedder.name!r} does not match the configured {cfg.embedder!r}")
    return write_index_dir(corpus, out, cfg, embedder.name, embedder.dim, embed_shards_locally(embedder),
                           progress=progress, overwrite=overwrite)


def write_index_dir(corpus: Path, out: Path, cfg: IndexConfig, embedder_name: str, dim: int,
                    embed_shards: EmbedShards, progress: bool = True, overwrite: bool = False) -> BuildResult:
    """The build once an embedder is at hand (here or on Ray): doc store, FAISS index, BM25, manifest.

    Row i of the doc store is FAISS id i: ``embed_shards`` must return the vectors in row order.
    Call ``prepare_build`` first.
    """
    import faiss

    if cfg.index_type == "ivfpq":
        pq_m(dim, cfg.pq_m)  # a bad --pq-m fails before the corpus is read
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
            index, params = make_faiss_index(cfg, dim, n)
            n_train = min(n, cfg.train_size)
            sample = None
            if not index.is_trained and n > n_train:  # train on a sample; smaller corpora train on everything
                sample = np.sort(np.random.default_rng(cfg.seed).choice(n, size=n_train, replace=False))
            shards = row_shards(np.arange(n, dtype=np.int64), cfg.chunk_size)
            if sample is not None:
                shards = itertools.chain(row_shards(sample, cfg.chunk_size), shards)
            # pass 2: embed (sample first), train, add
            with contextlib.closing(embed_shards(store, shards)) as blocks:
                leftover: list[np.ndarray] = []
                if sample is not None:
                    with tqdm(total=n_train, desc="embedding IVF training sample", unit="passage",
                              disable=not progress or n_train <= cfg.chunk_size) as bar:
                        train, leftover = _take_rows(blocks, n_train, bar)
                    index.train(train)
                    del train
                with tqdm(total=n, desc=f"embedding ({cfg.index_type})", unit="passage", disable=not progress) as bar:
                    add_vectors(index, _counted(itertools.chain(leftover, blocks), bar))
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
            embedder=embedder_name, dim=dim, index_type=cfg.index_type, count=n,
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
