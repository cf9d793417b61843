"""Load an index directory and answer ``search`` / ``fetch`` calls (dense, BM25 or hybrid)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from prag.errors import PragError
from retrieval.corpus import Document
from retrieval.docstore import DOCSTORE_FILE, DocStore
from retrieval.embed import Embedder, canonical_embedder_name
from retrieval.fusion import RRF_K, reciprocal_rank_fusion
from retrieval.index import FAISS_FILE
from retrieval.manifest import Manifest, check_at_load, read_manifest

METHODS = ("dense", "bm25", "hybrid")
HYBRID_DEPTH = 100  # candidates taken from each retriever before fusion

Hits = list[tuple[int, float]]  # (row, score), best first


def check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise PragError(f"{name} must be a positive integer, got {name}={value!r}")
    return int(value)


def check_k(k) -> int:
    return check_positive("k", k)


class _BM25:
    """The optional bm25s index stored under ``INDEX_DIR/bm25``, opened on its first search.

    Why lazily: importing bm25s imports numba and llvmlite, and a vLLM engine built after that in the
    same process dies at start-up (its kernel dispatcher scans every module and trips over llvmlite's
    ``ffi.lib``). Loading an index must not decide whether an engine can start; by the first search,
    the engine is up.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.model = None

    def _open(self) -> None:
        with self._lock:
            if self.model is not None:
                return
            import bm25s
            from bm25s.tokenization import Tokenizer

            tokenizer = Tokenizer(stopwords="en")
            tokenizer.load_vocab(str(self.path))
            tokenizer.load_stopwords(str(self.path))
            self.tokenizer, self.empty_id = tokenizer, tokenizer.get_vocab_dict().get("")
            self.model = bm25s.BM25.load(str(self.path), mmap=True)

    def search(self, questions: Sequence[str], k: int) -> list[Hits]:
        if self.model is None:
            self._open()
        queries = self.tokenizer.tokenize(list(questions), update_vocab=False, return_as="ids", show_progress=False)
        out: list[Hits] = [[] for _ in queries]
        # words the corpus never saw map to the empty token; they must not match anything
        live = [(i, [t for t in q if t != self.empty_id]) for i, q in enumerate(queries)]
        live = [(i, q) for i, q in live if q]
        if not live:
            return out
        rows, scores = self.model.retrieve([q for _, q in live], k=k, show_progress=False, n_threads=1)
        for (i, _), r, s in zip(live, rows, scores):
            # a zero BM25 score means no query word occurs in the passage: not a hit
            out[i] = [(int(a), float(b)) for a, b in zip(r, s) if b > 0]
        return out


class Retriever:
    """Top-k passages for questions, over one index directory built by ``build_index``."""

    def __init__(self, index_dir: Path, manifest: Manifest, index, store: DocStore, embedder: Embedder | None,
                 device: str | None, batch_size: int, bm25: _BM25 | None, allow_download: bool = False) -> None:
        self.index_dir = index_dir
        self.manifest = manifest
        self.index = index
        self.store = store
        self._embedder = embedder
        self._device = device
        self._batch_size = batch_size
        self._bm25 = bm25
        self._allow_download = allow_download
        self._lock = threading.Lock()

    @classmethod
    def load(cls, index_dir: str | Path, embedder: str | Embedder | None = None, device: str | None = None,
             batch_size: int = 64, nprobe: int | None = None, ef_search: int | None = None,
             allow_download: bool = False) -> "Retriever":
        """Open ``index_dir``. An explicit ``embedder`` must be the one the index was built with.

        Every index file is checked against the manifest first (sizes and sampled checksums, about
        1 MiB read per file): a damaged index is refused naming the file, before FAISS parses it.
        """
        import faiss

        index_dir = Path(index_dir)
        manifest = read_manifest(index_dir)
        if embedder is not None:
            name = embedder.name if isinstance(embedder, Embedder) else canonical_embedder_name(embedder)
            if name != manifest.embedder:
                raise PragError(f"index {index_dir} was built with embedder {manifest.embedder!r}, but embedder "
                                f"{name!r} was requested; query vectors would not match the index. Drop --embedder "
                                "or rebuild the index with this embedder")
        for name in (FAISS_FILE, DOCSTORE_FILE):
            if not (index_dir / name).exists():
                raise PragError(f"{index_dir} is not a complete index: {name} is missing; rebuild it")
        check_at_load(index_dir, manifest)
        try:
            index = faiss.read_index(str(index_dir / FAISS_FILE))
        except RuntimeError as exc:
            raise PragError(f"{index_dir / FAISS_FILE} is unreadable ({str(exc).splitlines()[0]}); rebuild it") from None
        store = DocStore(index_dir / DOCSTORE_FILE)
        if not (index.ntotal == len(store) == manifest.count) or index.d != manifest.dim:
            store.close()
            raise PragError(f"{index_dir} is inconsistent (manifest: {manifest.count} x {manifest.dim}, FAISS: "
                            f"{index.ntotal} x {index.d}, doc store: {len(store)}); rebuild it")
        if manifest.index_type in ("ivf", "ivfpq"):
            index.nprobe = check_positive('nprobe', nprobe) if nprobe is not None else int(manifest.index_params.get("nprobe", index.nprobe))
        if manifest.index_type == "hnsw":
            index.hnsw.efSearch = check_positive('ef_search', ef_search) if ef_search is not None \
                else int(manifest.index_params.get("ef_search", index.hnsw.efSearch))
        bm25 = None
        if manifest.bm25:
            if not (index_dir / "bm25").is_dir():
                store.close()
                raise PragError(f"{index_dir} is not a complete index: bm25/ is missing; rebuild it")
            bm25 = _BM25(index_dir / "bm25")
        return cls(index_dir, manifest, index, store, embedder if isinstance(embedder, Embedder) else None,
                   device, batch_size, bm25, allow_download=allow_download)

    # -- lookups -------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.manifest.count

    @property
    def embedder(self) -> Embedder:
        """Loaded on first dense query, so BM25-only use never pays for the model."""
        with self._lock:
            if self._embedder is None:
                emb = Embedder(self.manifest.embedder, device=self._device, batch_size=self._batch_size,
                               allow_download=self._allow_download)
                if emb.dim != self.manifest.dim:
                    raise PragError(f"embedder {emb.name!r} gives dimension {emb.dim}, the index has "
                                    f"{self.manifest.dim}; rebuild the index")
                self._embedder = emb
            return self._embedder

    def fetch(self, doc_ids: Sequence[str]) -> list[Document]:
        """Documents by id, in the order given; an unknown id is a PragError naming it."""
        return self.store.get_by_ids(list(doc_ids))

    def fetch_rows(self, rows: Sequence[int]) -> list[Document]:
        return self.store.get_by_rows(list(rows))

    # -- search --------------------------------------------------------------------------

    def encode_questions(self, questions: Sequence[str]) -> np.ndarray:
        return self.embedder.encode(list(questions), progress=len(questions) >= 2048)

    def search_vectors(self, vectors: np.ndarray, k: int) -> list[Hits]:
        """Dense top-k by inner product for already-encoded, normalised query vectors."""
        k = min(check_k(k), len(self))
        scores, rows = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        return [[(int(r), float(s)) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, scores)]

    def search_rows(self, questions: Sequence[str], k: int, method: str = "dense") -> list[Hits]:
        """Like ``search`` but with FAISS/doc-store rows instead of doc ids."""
        k = min(check_k(k), len(self))
        if method not in METHODS:
            raise PragError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if isinstance(questions, str) or not all(isinstance(q, str) for q in questions):
            raise PragError("questions must be a list of strings")
        if not questions:
            return []
        if method != "dense" and self._bm25 is None:
            raise PragError(f"index {self.index_dir} has no BM25 index; rebuild it with --bm25 to use method={method!r}")
        if method == "dense":
            return self.search_vectors(self.encode_questions(questions), k)
        if method == "bm25":
            return self._bm25.search(questions, k)
        depth = min(len(self), max(k, HYBRID_DEPTH))
        dense = self.search_vectors(self.encode_questions(questions), depth)
        sparse = self._bm25.search(questions, depth)
        return [reciprocal_rank_fusion([[r for r, _ in d], [r for r, _ in s]], k, RRF_K)
                for d, s in zip(dense, sparse)]

    def search(self, questions: Sequence[str], k: int, method: str = "dense") -> list[list[tuple[str, float]]]:
        """Top-k ``(doc_id, score)`` per question, best first.

        ``k`` larger than the corpus returns every document. Scores are cosine similarities
        (dense), BM25 scores (bm25) or reciprocal-rank-fusion scores (hybrid).
        """
        hits = self.search_rows(questions, k, method)
        rows = sorted({r for h in hits for r, _ in h})
        ids = dict(zip(rows, self.store.ids_of_rows(rows))) if rows else {}
        return [[(ids[r], s) for r, s in h] for h in hits]

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "Retriever":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
