"""``manifest.json`` of an index directory: what was built, from what, with which embedder.

The manifest is written last, inside the temporary build directory, so an index directory
with a complete manifest is a complete index. Loading validates every field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prag import __version__
from prag.errors import PragError
from prag.io import atomic_write_json, read_json

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
INDEX_TYPES = ("flat", "hnsw", "ivf")


@dataclass(frozen=True)
class Manifest:
    embedder: str
    dim: int
    index_type: str
    count: int
    corpus_sha256: str
    corpus_path: str = ""
    skipped_empty: int = 0
    metric: str = "inner_product"
    normalized: bool = True
    index_params: dict[str, Any] = field(default_factory=dict)
    bm25: bool = False
    text_fields: str = "title+text"
    build_seconds: float = 0.0
    version: int = FORMAT_VERSION
    prag_version: str = __version__


_REQUIRED = {"embedder": str, "dim": int, "index_type": str, "count": int, "corpus_sha256": str,
             "metric": str, "version": int}


def write_manifest(index_dir: str | Path, manifest: Manifest) -> None:
    atomic_write_json(Path(index_dir) / MANIFEST_FILE, asdict(manifest))


def read_manifest(index_dir: str | Path) -> Manifest:
    """Load and validate; a missing or incomplete manifest means the directory is not a usable index."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise PragError(f"index directory not found: {index_dir}")
    path = index_dir / MANIFEST_FILE
    if not path.exists():
        raise PragError(f"{index_dir} is not a complete index: {MANIFEST_FILE} is missing "
                        "(an interrupted build never leaves one; rebuild with 'prag index build')")
    data = read_json(path, "index manifest")
    if not isinstance(data, dict):
        raise PragError(f"{path}: expected a JSON object")
    for key, typ in _REQUIRED.items():
        if key not in data:
            raise PragError(f"{path}: incomplete manifest, missing field {key!r}; rebuild the index")
        if not isinstance(data[key], typ) or isinstance(data[key], bool):
            raise PragError(f"{path}: field {key!r} should be {typ.__name__}, got {data[key]!r}")
    if data["version"] > FORMAT_VERSION:
        raise PragError(f"{path}: index format version {data['version']} is newer than this prag "
                        f"(supports {FORMAT_VERSION}); upgrade prag")
    if data["index_type"] not in INDEX_TYPES:
        raise PragError(f"{path}: unknown index_type {data['index_type']!r} (expected one of {', '.join(INDEX_TYPES)})")
    if data["metric"] != "inner_product":
        raise PragError(f"{path}: unsupported metric {data['metric']!r}")
    known = set(Manifest.__dataclass_fields__)
    return Manifest(**{k: v for k, v in data.items() if k in known})
