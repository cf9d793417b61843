"""``manifest.json`` of an index directory: what was built, from what, with which embedder.

The manifest is written last, inside the temporary build directory, so an index directory
with a complete manifest is a complete index. Loading validates every field, then compares every
index file with its recorded size and sampled sha256 (``check_at_load``: about 1 MiB read per file
whatever its size); ``prag index verify`` compares full sha256s (``check_files(full=True)``).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prag import __version__
from prag.errors import PragError
from prag.io import atomic_write_json, read_json, sampled_sha256, sha256_file

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
INDEX_TYPES = ("flat", "hnsw", "ivf", "ivfpq")


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
    # every index file (relative path) -> {"size", "sha256", "sampled_sha256"}; empty for indexes built
    # before checksums existed, which still load but cannot be verified
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
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
    files = data.get("files", {})
    if not isinstance(files, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("size"), int) and isinstance(v.get("sha256"), str)
            and isinstance(v.get("sampled_sha256"), str) for v in files.values()):
        raise PragError(f"{path}: field 'files' should map file names to {{size, sha256, sampled_sha256}}; "
                        "rebuild the index")
    known = set(Manifest.__dataclass_fields__)
    return Manifest(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------------------------------------
# File checksums: recorded at build time, checked cheaply at load, fully by `prag index verify`


def record_files(index_dir: str | Path, exclude: tuple[str, ...] = (MANIFEST_FILE,)) -> dict[str, dict[str, Any]]:
    """Size, full sha256 and sampled sha256 of every file under ``index_dir`` (relative POSIX paths)."""
    index_dir = Path(index_dir)
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(index_dir.rglob("*")):
        rel = p.relative_to(index_dir).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = {"size": p.stat().st_size, "sha256": sha256_file(p), "sampled_sha256": sampled_sha256(p)}
    return out


@dataclass(frozen=True)
class FileCheck:
    """One index file against its manifest record; ``problem`` is None when it matches."""

    name: str
    size: int
    problem: str | None = None


def check_files(index_dir: str | Path, manifest: Manifest, full: bool = False) -> list[FileCheck]:
    """Compare every recorded file with the manifest: its size, and its sampled sha256 (cheap: about
    1 MiB read per file, whatever its size) or, with ``full``, its whole sha256."""
    index_dir = Path(index_dir)
    results = []
    for name, rec in sorted(manifest.files.items()):
        path = index_dir / name
        if not path.is_file():
            results.append(FileCheck(name, 0, "missing"))
            continue
        size = path.stat().st_size
        if size != rec["size"]:
            problem = f"size {size:,} bytes, the manifest records {rec['size']:,}"
        elif full and sha256_file(path) != rec["sha256"]:
            problem = "sha256 differs from the manifest"
        elif not full and sampled_sha256(path) != rec["sampled_sha256"]:
            problem = "sampled sha256 differs from the manifest"
        else:
            problem = None
        results.append(FileCheck(name, size, problem))
    return results


def corruption_error(index_dir: str | Path, bad: list[FileCheck]) -> PragError:
    first = bad[0]
    more = f" (and {len(bad) - 1} more file(s): {', '.join(b.name for b in bad[1:4])})" if len(bad) > 1 else ""
    return PragError(f"index file {Path(index_dir) / first.name} is corrupted ({first.problem}){more}; the index "
                     "cannot be trusted: rebuild it with 'prag index build'")


def check_at_load(index_dir: str | Path, manifest: Manifest) -> None:
    """The load-time check: sizes plus sampled checksums; a one-line note for an unverifiable old index."""
    if not manifest.files:
        print(f"note: index {index_dir} was built before file checksums were recorded, so it cannot be verified "
              "(rebuild it to enable verification)", file=sys.stderr)
        return
    bad = [c for c in check_files(index_dir, manifest, full=False) if c.problem]
    if bad:
        raise corruption_error(index_dir, bad)
