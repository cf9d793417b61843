"""The adapter store: millions of per-document LoRA adapters, O(1) by doc id, one read per adapter.

Layout of a store directory::

    manifest.json          base model fingerprint, encode config (+ hash), rank, alpha, targets,
                           storage dtype, augmentation sources, the flat layout of one adapter
    init.safetensors       the one shared initial adapter (float32, config key convention)
    index.sqlite           doc_id -> (shard, row, checksum of the stored row); shard names and sizes;
                           store version
    shards/shard-*.safetensors
                           one tensor "adapters" [n_docs, P] per file: row i is document i's
                           adapter flattened in manifest layout order, in the storage dtype

Why this shape: one file per document does not scale to millions (inodes, open/close per
question); a row per document in a large safetensors file is one seek away. The
index is SQLite so lookups stay O(1) (B-tree) without loading millions of ids in memory. A row is read
with one ``pread`` at a fixed offset straight into the output tensor (shard files stay open, and the
page cache serves popular documents); on our VM that beat touching an ``mmap`` of the shard 10x.

Crash safety: a shard file is written under a temporary name and renamed into place, and only
then are its rows committed to the index in one SQLite transaction. A crash before the commit
leaves an orphan file that no reader can reach (the next writer deletes it), so a document is
either completely present or absent. One writer at a time is enforced with ``flock``; trainer
processes (Ray actors) may write shard *files* concurrently, but only the writer commits them.

Integrity: every row read is checked against its checksum (crc32 for format version 2; sha256 in
version-1 stores, which keep it) and for non-finite values before it leaves the store, so a damaged
row can never reach vLLM, where one NaN adapter in a batch step changes other requests' answers.
A bad row, a missing or resized shard file or an unreadable shard header raises
``CorruptAdapterError`` for the documents that were asked for, and nothing else. Opening a store
checks ``index.sqlite`` is whole and stats every shard file (one ``stat`` per shard); ``verify_store``
(``prag store verify``) checks everything.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from safetensors import safe_open

from offline_encode.peft_format import save_safetensors
from prag.errors import PragError
from prag.hub import resolve_local_model
from prag.io import atomic_path, atomic_write_json, read_json, sha256_file, sha256_json
from prag.io import sampled_sha256 as _sampled_sha256  # the shared sampler; the old name stays importable
from prag.model_files import read_safetensors_header

STORE_FORMAT = "prag-adapter-store"
STORE_FORMAT_VERSION = 2  # 2: row checksums are crc32 (1: sha256, still read and verified)
READABLE_FORMAT_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
INIT = "init.safetensors"
INDEX = "index.sqlite"
SHARDS = "shards"
LOCK = ".writer.lock"
TENSOR = "adapters"
STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Encode-config fields that determine the trained values; the config hash covers only these (and the
# prompt), so a store can be resumed with other runtime settings (docs_per_step, device, chunking:
# batching is exact, see the trainer) and by code whose EncodeConfig gained runtime-only fields.
TRAINING_FIELDS = ("rank", "alpha", "target_modules", "learning_rate", "epochs", "weight_decay", "init_seed",
                   "with_cot", "storage_dtype")
_MAX_OPEN_SHARDS = 256
log = logging.getLogger(__name__)


class MissingAdapterError(PragError, KeyError):
    """Some requested doc ids have no adapter in the store."""

    def __init__(self, store: Path, missing: Sequence[str]):
        self.missing = list(missing)
        shown = ", ".join(repr(d) for d in self.missing[:10])
        more = f" (and {len(self.missing) - 10} more)" if len(self.missing) > 10 else ""
        super().__init__(f"adapter store {store} has no adapter for doc id(s) {shown}{more}")

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class StoreMismatchError(PragError):
    """The store was built for another base model, rank, targets or encode config."""


class CorruptAdapterError(PragError):
    """Some requested adapters cannot be served: a row fails its checksum or holds NaN/inf, or its shard
    file is missing, resized or unreadable. ``doc_ids`` are the affected requested documents,
    ``problems`` maps each to what is wrong, ``shards`` names the shard files involved."""

    def __init__(self, store: Path, problems: Mapping[str, str], shards: Iterable[str] = (), remedy: str = ""):
        self.store = Path(store)
        self.problems = dict(problems)
        self.doc_ids = list(self.problems)
        self.shards = sorted(set(shards))
        self._remedy = remedy
        by_reason: dict[str, list[str]] = {}
        for doc_id, reason in self.problems.items():
            by_reason.setdefault(reason, []).append(doc_id)
        parts = []
        for reason, ids in list(by_reason.items())[:5]:
            shown = ", ".join(repr(d) for d in ids[:5]) + (f" (and {len(ids) - 5} more)" if len(ids) > 5 else "")
            parts.append(f"{reason} for doc id {shown}" if len(ids) == 1 else f"{reason} for doc ids {shown}")
        more = f"; and {len(by_reason) - 5} more problems" if len(by_reason) > 5 else ""
        unnamed = [f for f in self.shards if not any(f in r for r in self.problems.values())]
        where = f" (shard file(s): {', '.join(unnamed)})" if unnamed else ""
        super().__init__(f"adapter store {self.store}: corrupt adapter(s): {'; '.join(parts)}{more}{where}. "
                         f"{remedy}".rstrip())

    def __reduce__(self):  # picklable across processes (Ray workers) despite the custom signature
        return self.__class__, (self.store, self.problems, self.shards, self._remedy)


# --------------------------------------------------------------------------------------------
# Model fingerprint


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def resolve_model_dir(model_name_or_path: str | os.PathLike) -> Path:
    """A local model directory, or the Hugging Face cache snapshot of a hub id (never a download)."""
    return resolve_local_model(model_name_or_path, what="model", flag=None)


def model_fingerprint(model_name_or_path: str | os.PathLike) -> dict:
    """Cheap identity of a base model: sha256 of config.json, the names and sizes of its weight files,
    and a hash of evenly spaced samples of each weight file.

    Hashing whole weight files would take minutes for large models; sampled bytes still tell two
    checkpoints of the same architecture apart. ``hash`` ignores the name, so a moved or renamed
    model directory still matches.
    """
    model_dir = resolve_model_dir(model_name_or_path)
    config = model_dir / "config.json"
    if not config.is_file():
        raise PragError(f"model directory has no config.json: {model_dir}")
    files = [p for p in sorted(model_dir.iterdir())
             if p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json")]
    if not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in files):
        raise PragError(f"model directory has no weight files (*.safetensors): {model_dir}")
    weights = {p.name: p.stat().st_size for p in files}
    samples = {p.name: _sampled_sha256(p) for p in files}
    ident = {"config_sha256": sha256_file(config), "weights": weights, "weights_sampled_sha256": samples}
    return {"name": str(model_name_or_path), **ident, "hash": sha256_json(ident)}


# --------------------------------------------------------------------------------------------
# Flat layout of one adapter


@dataclass(frozen=True)
class Layout:
    """Where each adapter tensor lives inside one flat row of ``params_per_doc`` values."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_adapter(cls, adapter: Mapping[str, torch.Tensor]) -> "Layout":
        return cls(tuple(adapter), tuple(tuple(int(s) for s in t.shape) for t in adapter.values()))

    @classmethod
    def from_json(cls, entries: list[dict]) -> "Layout":
        return cls(tuple(e["key"] for e in entries), tuple(tuple(e["shape"]) for e in entries))

    def to_json(self) -> list[dict]:
        return [{"key": k, "shape": list(s), "offset": o, "numel": n}
                for k, s, o, n in zip(self.keys, self.shapes, self.offsets, self.numels)]

    @property
    def numels(self) -> tuple[int, ...]:
        out = []
        for shape in self.shapes:
            n = 1
            for s in shape:
                n *= s
            out.append(n)
        return tuple(out)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, acc = [], 0
        for n in self.numels:
            out.append(acc)
            acc += n
        return tuple(out)

    @property
    def params_per_doc(self) -> int:
        return sum(self.numels)

    @property
    def modules(self) -> list[str]:
        seen: dict[str, None] = {}
        for key in self.keys:
            seen[key.rpartition(".lora_")[0]] = None
        return list(seen)

    def flatten(self, adapters: Sequence[Mapping[str, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
        """Stack adapters into ``[n, P]`` rows of ``dtype``; keys and shapes must match the layout."""
        keys = set(self.keys)
        for i, adapter in enumerate(adapters):
            if set(adapter) != keys:
                extra, missing = sorted(set(adapter) - keys), sorted(keys - set(adapter))
                raise PragError(f"adapter {i} does not match the store layout (missing keys {missing[:5]}, "
                                f"unexpected keys {extra[:5]})")
            for key, shape in zip(self.keys, self.shapes):
                if tuple(adapter[key].shape) != shape:
                    raise PragError(f"adapter {i}: {key} has shape {tuple(adapter[key].shape)}, the store "
                                    f"expects {shape}")
        rows = torch.empty((len(adapters), self.params_per_doc), dtype=dtype)
        for key, off, n in zip(self.keys, self.offsets, self.numels):  # one copy per key, not per key and doc
            rows[:, off:off + n] = torch.stack([a[key].detach().reshape(-1) for a in adapters]).to(
                device="cpu", dtype=dtype)
        return rows

    def unflatten(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """One flat row -> float32 adapter dict (config key convention)."""
        row = row.reshape(-1).to(torch.float32)
        return {k: row[o:o + n].view(s) for k, s, o, n in zip(self.keys, self.shapes, self.offsets, self.numels)}


def _row_bytes(row: torch.Tensor) -> memoryview:
    return memoryview(row.contiguous().view(torch.uint8).numpy()).cast("B")  # no copy


# Row checksum algorithms. crc32 (zlib, hardware-assisted) costs 0.78 ms on a 2 MB row here against
# 1.29 ms for the sha256 + bytes copy that format version 1 used; it detects accidental damage (bit rot,
# torn or overwritten writes), which is what the check is for. Stores record theirs in the manifest.
CHECKSUMS: dict[str, Callable[[torch.Tensor], str]] = {
    "crc32": lambda row: f"{zlib.crc32(_row_bytes(row)):08x}",
    "sha256": lambda row: hashlib.sha256(_row_bytes(row)).hexdigest(),
}
DEFAULT_CHECKSUM = "crc32"


def row_checksum(row: torch.Tensor, algorithm: str = DEFAULT_CHECKSUM) -> str:
    """Checksum of a stored row's bytes (in the storage dtype) with ``algorithm`` (see ``CHECKSUMS``)."""
    try:
        fn = CHECKSUMS[algorithm]
    except KeyError:
        raise PragError(f"unknown row checksum algorithm {algorithm!r}; known: {sorted(CHECKSUMS)}") from None
    return fn(row)


def manifest_checksum(manifest: Mapping) -> str:
    """The row checksum algorithm of a store: recorded in the manifest since format version 2."""
    return manifest.get("checksum_algorithm") or "sha256"


def nonfinite_rows(rows: torch.Tensor) -> list[int]:
    """Indices of the rows of ``[k, P]`` (storage dtype) that hold NaN or inf.

    Single-threaded numpy on purpose: torch's reductions use the intra-op thread pool, and on a busy
    2-core host (vLLM running beside) ``rows.sum(dim=1)`` on 3 rows of 2 MB took 15 ms against 0.12 ms
    per row for ``np.add.reduce``. float32: a row sum is finite only if every value is (NaN and inf
    propagate); a non-finite sum may be an overflow, so those rows alone get the exact check.
    16-bit: a value is NaN/inf exactly when its exponent bits are all set."""
    if rows.numel() == 0:
        return []
    if rows.dtype == torch.float32:
        a = rows.numpy()
        with np.errstate(over="ignore", invalid="ignore"):
            suspect = [i for i in range(a.shape[0]) if not math.isfinite(float(np.add.reduce(a[i])))]
        return [i for i in suspect if not bool(np.isfinite(a[i]).all())]
    mask = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}[rows.dtype]
    bits = rows.view(torch.int16).numpy()
    return [i for i in range(bits.shape[0]) if int(np.bitwise_and(bits[i], mask).max()) == mask]


# --------------------------------------------------------------------------------------------
# Shard files (written by any trainer process, committed by the store's single writer)


class ShardError(PragError):
    """A shard file is missing, has the wrong size or is not a valid adapter shard (``path``)."""

    def __init__(self, path: Path, message: str):
        super().__init__(message)
        self.path = Path(path)

    def __reduce__(self):
        return self.__class__, (self.path, self.args[0])


def _tensor_data_offset(fd: int, path: Path, storage_dtype: str, params_per_doc: int,
                        n_rows: int | None = None) -> int:
    """Byte offset of row 0 of a shard's ``adapters`` tensor, from the safetensors header
    (8-byte little-endian header length, JSON header, then the data). The header length is bounded
    by the file size before anything is allocated: another file (e.g. a ``torch.save`` zip) in a
    shard's place would otherwise ask for petabytes."""
    try:
        header, data_start, size = read_safetensors_header(fd)
    except ValueError as exc:
        raise ShardError(path, f"shard file {path} is not a safetensors adapter shard ({exc})") from None
    try:
        info = header[TENSOR]
        dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (ValueError, KeyError, TypeError):
        raise ShardError(path, f"shard file {path} is not a valid adapter shard (bad safetensors header)") from None
    want = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[storage_dtype]
    if dtype != want or len(shape) != 2 or shape[1] != params_per_doc or \
            (n_rows is not None and shape[0] != n_rows):
        rows = "" if n_rows is None else f"{n_rows} "
        raise ShardError(path, f"shard file {path} holds {dtype} {shape}, expected {want} {rows}rows of "
                         f"{params_per_doc}")
    if data_start + end > size:
        raise ShardError(path, f"shard file {path} is truncated ({size} bytes, its header needs {data_start + end})")
    return data_start + start


@dataclass
class ShardMeta:
    """What a trainer process reports after writing one shard file."""

    name: str
    doc_ids: list[str]
    checksums: list[str]
    nbytes: int


def _disk_error(exc: OSError, what: Path) -> PragError:
    if exc.errno == errno.ENOSPC:
        reason = "disk full"
    elif exc.errno == errno.EFBIG:
        reason = "file size limit reached"
    else:
        reason = exc.strerror or str(exc)
    return PragError(f"could not write {what}: {reason}. The adapter store is unchanged (writes are atomic); "
                     f"free space and rerun the same command to resume")


def write_shard_file(store_dir: str | os.PathLike, layout: Layout, storage_dtype: str, doc_ids: Sequence[str],
                     adapters: Sequence[Mapping[str, torch.Tensor]], checksum: str | None = None) -> ShardMeta:
    """Write one shard file atomically under a unique name; the caller commits it with the writer store.

    ``checksum``: the row checksum algorithm; None reads it from the store's manifest (trainer
    processes only know the store directory), so resumed version-1 stores keep sha256."""
    if len(doc_ids) != len(adapters):
        raise PragError(f"{len(doc_ids)} doc ids but {len(adapters)} adapters")
    if not doc_ids:
        raise PragError("refusing to write an empty shard")
    if storage_dtype not in STORAGE_DTYPES:
        raise PragError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}")
    if checksum is None:
        manifest_path = Path(store_dir) / MANIFEST
        checksum = manifest_checksum(read_json(manifest_path, "adapter store manifest")) \
            if manifest_path.is_file() else DEFAULT_CHECKSUM
    rows = layout.flatten(adapters, STORAGE_DTYPES[storage_dtype])
    checksums = [row_checksum(r, checksum) for r in rows]
    name = f"shard-{uuid.uuid4().hex}.safetensors"
    path = Path(store_dir) / SHARDS / name
    try:
        with atomic_path(path) as tmp:
            save_safetensors({TENSOR: rows}, tmp, metadata={"format": "pt", "doc_ids": json.dumps(list(doc_ids))})
    except OSError as exc:
        raise _disk_error(exc, path) from None
    return ShardMeta(name, [str(d) for d in doc_ids], checksums, path.stat().st_size)


# --------------------------------------------------------------------------------------------
# The store


@dataclass
class StoreSpec:
    """What an encode run would write; compared against an existing store's manifest."""

    base_model: str
    model_fingerprint: dict
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    storage_dtype: str = "float32"
    encode_config: dict = field(default_factory=dict)
    prompt_config: dict = field(default_factory=dict)
    augmentation: dict | None = None

    def config_hash(self) -> str:
        return sha256_json({"encode": {k: self.encode_config.get(k) for k in TRAINING_FIELDS},
                            "prompt": self.prompt_config})


def _check_index_header(path: Path) -> None:
    """Refuse an ``index.sqlite`` that is not SQLite or is shorter than its header says (a truncated copy
    can otherwise answer some queries and fail others later, mid-request). Called under a read lock."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(100)
    except OSError as exc:
        raise PragError(f"cannot read adapter store index {path}: {exc.strerror or exc}") from None
    if len(head) < 100 or not head.startswith(b"SQLite format 3\x00"):
        raise PragError(f"adapter store index {path} is damaged: not an SQLite database ({size} bytes)")
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(head[28:32], "big")
    if head[24:28] == head[92:96] and pages * page_size > size:  # the in-header size is valid
        raise PragError(f"adapter store index {path} is truncated: {size} bytes, its header says "
                        f"{pages * page_size}")


def _connect(path: Path, readonly: bool) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")
    return conn


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS shards (id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL,
                                   n_docs INTEGER NOT NULL, nbytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS docs (doc_id TEXT PRIMARY KEY, shard_id INTEGER NOT NULL, row INTEGER NOT NULL,
                                 checksum TEXT NOT NULL) WITHOUT ROWID;
"""


class AdapterStore:
    """Per-document adapters by doc id. ``open`` is read-only; ``create_or_open`` gives the single writer."""

    def __init__(self, path: Path, manifest: dict, writable: bool, lock_fd: int | None = None,
                 verify_rows: bool = True):
        """``verify_rows``: check every row read (checksum + finite values); reads can also say per call."""
        self.path = Path(path)
        self.manifest = manifest
        self.writable = writable
        self.verify_rows = verify_rows
        self._lock_fd = lock_fd
        try:
            self.layout = Layout.from_json(manifest["layout"])
            self.storage_dtype = manifest["storage_dtype"]
            STORAGE_DTYPES[self.storage_dtype]
            int(manifest["rank"]), manifest["alpha"], list(manifest["target_modules"])
        except (KeyError, TypeError, ValueError) as exc:
            raise PragError(f"{self.path / MANIFEST} is damaged: missing or invalid field {exc}") from None
        self.checksum = manifest_checksum(manifest)
        if self.checksum not in CHECKSUMS:
            raise PragError(f"{self.path / MANIFEST}: unknown checksum_algorithm {self.checksum!r} (this code "
                            f"knows {sorted(CHECKSUMS)})")
        self._mutex = threading.RLock()
        self._handles: OrderedDict[int, tuple[int, int, Path]] = OrderedDict()
        self._conn = _connect(self.path / INDEX, readonly=not writable)
        try:
            self.shard_problems = self._open_checks()
        except BaseException:
            self._conn.close()
            raise
        if self.shard_problems:
            log.warning("adapter store %s: %d damaged shard file(s); requests for their documents will fail: %s",
                        self.path, len(self.shard_problems), "; ".join(list(self.shard_problems.values())[:5]))

    def _index_error(self, exc: sqlite3.DatabaseError) -> PragError:
        return PragError(f"adapter store index {self.path / INDEX} is damaged or unreadable ({exc}); restore "
                         f"it from a backup, or re-encode into a new store directory")

    def _query(self, sql: str, params: Sequence = ()) -> list[tuple]:
        """One read query; a damaged index becomes a PragError naming the file, not a traceback."""
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._index_error(exc) from None

    def _open_checks(self) -> dict[str, str]:
        """The cheap checks at open: ``index.sqlite`` is whole, and every shard file exists with the size
        the index recorded (one ``stat`` per shard). Returns shard name -> problem; reads of documents in
        those shards fail, the others are served."""
        try:
            if self.writable:
                _check_index_header(self.path / INDEX)
                rows = self._conn.execute("SELECT name, nbytes FROM shards").fetchall()
            else:
                self._conn.execute("BEGIN")  # a read lock: no writer commits between the header check and the query
                try:
                    self._conn.execute("SELECT COUNT(*) FROM meta").fetchone()
                    _check_index_header(self.path / INDEX)
                    rows = self._conn.execute("SELECT name, nbytes FROM shards").fetchall()
                finally:
                    self._conn.rollback()
        except sqlite3.DatabaseError as exc:
            _check_index_header(self.path / INDEX)  # the more precise message, where it applies
            raise self._index_error(exc) from None
        problems = {}
        for name, nbytes in rows:
            path = self.path / SHARDS / name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                problems[name] = f"shard file {path} is missing"
                continue
            except OSError as exc:
                problems[name] = f"shard file {path} cannot be read ({exc.strerror or exc})"
                continue
            if size != nbytes:
                problems[name] = f"shard file {path} has {size} bytes, the index records {nbytes}"
        return problems

    # ---- opening ------------------------------------------------------------------------

    @staticmethod
    def exists(path: str | os.PathLike) -> bool:
        return (Path(path) / MANIFEST).is_file()

    @classmethod
    def open(cls, path: str | os.PathLike, verify_rows: bool = True) -> "AdapterStore":
        """Open an existing store read-only (what the engine and export use); see ``get_rows`` for
        ``verify_rows``."""
        path = Path(path)
        if not path.is_dir():
            raise PragError(f"adapter store not found: {path}")
        if not cls.exists(path):
            raise PragError(f"not an adapter store (no {MANIFEST}): {path}")
        manifest = read_json(path / MANIFEST, "adapter store manifest")
        if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
            raise PragError(f"{path / MANIFEST}: not a {STORE_FORMAT} manifest")
        if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
            raise PragError(f"{path / MANIFEST}: store format version {manifest.get('format_version')} is not "
                            f"supported (this code reads versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))})")
        if not (path / INDEX).is_file():
            raise PragError(f"adapter store {path} has no {INDEX}")
        return cls(path, manifest, writable=False, verify_rows=verify_rows)

    @classmethod
    def open_for_repair(cls, path: str | os.PathLike) -> "AdapterStore":
        """Open an existing store as its single writer without an encode spec (``remove``)."""
        with cls.open(path) as ro:
            manifest = ro.manifest
        lock_fd = cls._acquire_lock(Path(path))
        try:
            return cls(Path(path), manifest, writable=True, lock_fd=lock_fd)
        except BaseException:
            os.close(lock_fd)
            raise


    @classmethod
    def create_or_open(cls, path: str | os.PathLike, spec: StoreSpec,
                       init_adapter: Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]] | None
                       = None) -> "AdapterStore":
        """Open ``path`` for writing (checking it matches ``spec``), or create it.

        ``init_adapter`` (a dict, or a callable so the model is only loaded when needed) is
        required to create a store. Only one writer may hold a store at a time.
        """
        path = Path(path)
        if spec.storage_dtype not in STORAGE_DTYPES:
            raise PragError(f"storage dtype must be one of {sorted(STORAGE_DTYPES)}, got {spec.storage_dtype!r}")
        path.mkdir(parents=True, exist_ok=True)
        lock_fd = cls._acquire_lock(path)
        try:
            if cls.exists(path):
                store = cls.open(path)
                store._conn.close()
                store = cls(path, store.manifest, writable=True, lock_fd=lock_fd)
                store.check_compatible(spec)
                store.record_augmentation(spec.augmentation)
            else:
                if init_adapter is None:
                    raise PragError(f"adapter store {path} does not exist and no initial adapter was given")
                init = init_adapter() if callable(init_adapter) else init_adapter
                store = cls._create(path, spec, init, lock_fd)
            store._remove_orphans()
            return store
        except BaseException:
            os.close(lock_fd)
            raise

    @staticmethod
    def _acquire_lock(path: Path) -> int:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise PragError(f"adapter store {path} is being written by another process; "
                            f"wait for it to finish (only one encode run per store)") from None
        return fd

    @classmethod
    def _create(cls, path: Path, spec: StoreSpec, init: Mapping[str, torch.Tensor], lock_fd: int) -> "AdapterStore":
        unknown = [p.name for p in path.iterdir() if p.name not in (INIT, INDEX, SHARDS, LOCK)
                   and not p.name.startswith(".")]
        if unknown:
            raise PragError(f"{path} is not empty and not an adapter store (found {sorted(unknown)[:5]}); "
                            f"choose a new or empty --out directory")
        if not init:
            raise PragError("the initial adapter is empty (no target modules?)")
        layout = Layout.from_adapter(init)
        init32 = {k: v.detach().to(device="cpu", dtype=torch.float32).contiguous() for k, v in init.items()}
        try:
            (path / SHARDS).mkdir(exist_ok=True)
            with atomic_path(path / INIT) as tmp:
                save_safetensors(init32, tmp, metadata={"format": "pt"})
            with atomic_path(path / INDEX) as tmp:
                conn = sqlite3.connect(tmp)
                conn.executescript(_SCHEMA)
                with conn:
                    conn.execute("INSERT INTO meta VALUES ('version', ?)", ("0-" + sha256_json(
                        {"init": sha256_file(path / INIT), "config": spec.config_hash()})[:16],))
                conn.close()
            itemsize = torch.empty((), dtype=STORAGE_DTYPES[spec.storage_dtype]).element_size()
            manifest = {
                "format": STORE_FORMAT,
                "format_version": STORE_FORMAT_VERSION,
                "base_model": {"name_or_path": spec.base_model, "fingerprint": spec.model_fingerprint},
                "rank": spec.rank,
                "alpha": spec.alpha,
                "target_modules": list(spec.target_modules),
                "storage_dtype": spec.storage_dtype,
                "encode_config": spec.encode_config,
                "prompt_config": spec.prompt_config,
                "config_hash": spec.config_hash(),
                "augmentation": [spec.augmentation] if spec.augmentation else [],
                "init": {"file": INIT, "dtype": "float32", "sha256": sha256_file(path / INIT)},
                "layout": layout.to_json(),
                "modules": layout.modules,
                "params_per_doc": layout.params_per_doc,
                "bytes_per_doc": layout.params_per_doc * itemsize,
                "index": {"file": INDEX, "tables": "docs(doc_id, shard_id, row, checksum), shards(id, name, "
                          "n_docs, nbytes), meta(version)",
                          "checksum": f"{DEFAULT_CHECKSUM} (hex) of the document's stored row bytes (storage "
                                      f"dtype), per doc"},
                "checksum_algorithm": DEFAULT_CHECKSUM,
                "shards": {"dir": SHARDS, "tensor": TENSOR, "row_shape": [layout.params_per_doc]},
            }
            atomic_write_json(path / MANIFEST, manifest)  # last: its presence marks a complete store
        except OSError as exc:
            raise _disk_error(exc, path) from None
        return cls(path, manifest, writable=True, lock_fd=lock_fd)

    def record_augmentation(self, augmentation: dict | None) -> None:
        """Add an augmented file (path, sha256, augmenter) to the manifest's sources, once."""
        if augmentation and augmentation not in self.manifest["augmentation"]:
            self.manifest["augmentation"].append(augmentation)
            atomic_write_json(self.path / MANIFEST, self.manifest)

    def _remove_orphans(self) -> None:
        """Delete shard files (and temp files) a crashed run wrote but never committed."""
        committed = {name for (name,) in self._conn.execute("SELECT name FROM shards")}
        for p in (self.path / SHARDS).iterdir():
            if p.name not in committed:
                p.unlink(missing_ok=True)

    def close(self) -> None:
        with self._mutex:
            for fd, _, _ in self._handles.values():
                os.close(fd)
            self._handles.clear()
            self._conn.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def __enter__(self) -> "AdapterStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- compatibility --------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return int(self.manifest["rank"])

    @property
    def alpha(self) -> float:
        return self.manifest["alpha"]

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(self.manifest["target_modules"])

    @property
    def base_model(self) -> str:
        return self.manifest["base_model"]["name_or_path"]

    @property
    def bytes_per_doc(self) -> int:
        return int(self.manifest["bytes_per_doc"])

    def check_compatible(self, spec: StoreSpec | None = None, *, model_fingerprint: dict | None = None,
                         rank: int | None = None, target_modules: Sequence[str] | None = None) -> None:
        """Raise ``StoreMismatchError`` if the store was built for another model / rank / targets / config."""
        if spec is not None:
            model_fingerprint = spec.model_fingerprint
            rank, target_modules = spec.rank, spec.target_modules
        base = self.manifest["base_model"]
        if model_fingerprint is not None and model_fingerprint.get("hash") != base["fingerprint"].get("hash"):
            raise StoreMismatchError(
                f"adapter store {self.path} was built for base model {base['name_or_path']!r}, but "
                f"{model_fingerprint.get('name')!r} is a different model (config.json or weight files differ); "
                f"use the store's base model or a new store directory")
        if rank is not None and int(rank) != self.rank:
            raise StoreMismatchError(f"adapter store {self.path} has LoRA rank {self.rank}, but rank {rank} "
                                     f"was requested; use a new store directory")
        if target_modules is not None and sorted(target_modules) != sorted(self.target_modules):
            raise StoreMismatchError(f"adapter store {self.path} targets {list(self.target_modules)}, but "
                                     f"{list(target_modules)} was requested; use a new store directory")
        if spec is not None:
            if spec.storage_dtype != self.storage_dtype:
                raise StoreMismatchError(f"adapter store {self.path} stores {self.storage_dtype}, but "
                                         f"{spec.storage_dtype} was requested")
            if spec.config_hash() != self.manifest["config_hash"]:
                old = {**self.manifest["encode_config"], **{"prompt": self.manifest["prompt_config"]}}
                new = {**spec.encode_config, **{"prompt": spec.prompt_config}}
                diff = sorted(k for k in (*TRAINING_FIELDS, "prompt") if old.get(k) != new.get(k))
                detail = ", ".join(f"{k}: store {old.get(k)!r} vs requested {new.get(k)!r}" for k in diff[:6])
                raise StoreMismatchError(f"adapter store {self.path} was encoded with other settings ({detail}); "
                                         f"rerun with the same settings or use a new store directory")

    # ---- reading --------------------------------------------------------------------------

    @property
    def version(self) -> str:
        """Changes whenever documents are added; caches of merged adapters key on it."""
        with self._mutex:
            return self._query("SELECT value FROM meta WHERE key='version'")[0][0]

    def __len__(self) -> int:
        with self._mutex:
            return self._query("SELECT COUNT(*) FROM docs")[0][0]

    def __contains__(self, doc_id: object) -> bool:
        with self._mutex:
            return bool(self._query("SELECT 1 FROM docs WHERE doc_id=?", (str(doc_id),)))

    def doc_ids(self) -> list[str]:
        with self._mutex:
            return [d for (d,) in self._query("SELECT doc_id FROM docs ORDER BY shard_id, row")]

    def missing(self, doc_ids: Iterable[str]) -> list[str]:
        """The ids among ``doc_ids`` that have no adapter (in the given order)."""
        return [d for d in doc_ids if d not in self]

    def init_adapter(self) -> dict[str, torch.Tensor]:
        """The shared initial adapter (float32) every document started from."""
        out: dict[str, torch.Tensor] = {}
        with safe_open(str(self.path / INIT), framework="pt") as fh:
            for key in self.layout.keys:
                out[key] = fh.get_tensor(key)
        return out

    def _handle(self, shard_id: int) -> tuple[int, int, Path]:
        """(file descriptor, byte offset of row 0, path) of a shard, kept open in a small LRU.

        Opening checks the file is there, has the size the index recorded and a valid header with the
        recorded row count; any failure is a ``ShardError`` for this shard only (retried on the next
        read, so a restored file is served again)."""
        handle = self._handles.get(shard_id)
        if handle is not None:
            self._handles.move_to_end(shard_id)
            return handle
        name, n_docs, nbytes = self._query("SELECT name, n_docs, nbytes FROM shards WHERE id=?", (shard_id,))[0]
        path = self.path / SHARDS / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ShardError(path, f"shard file {path} is missing") from None
        except OSError as exc:
            raise ShardError(path, f"shard file {path} cannot be opened ({exc.strerror or exc})") from None
        try:
            size = os.fstat(fd).st_size
            if size != nbytes:
                raise ShardError(path, f"shard file {path} has {size} bytes, the index records {nbytes}")
            handle = (fd, _tensor_data_offset(fd, path, self.storage_dtype, self.layout.params_per_doc, n_docs), path)
        except OSError as exc:
            os.close(fd)
            raise ShardError(path, f"shard file {path} cannot be read ({exc.strerror or exc})") from None
        except BaseException:
            os.close(fd)
            raise
        self._handles[shard_id] = handle
        if len(self._handles) > _MAX_OPEN_SHARDS:
            os.close(self._handles.popitem(last=False)[1][0])
        return handle

    def _read_row(self, shard_id: int, row: int, out: torch.Tensor) -> Path:
        """One pread straight into ``out`` (a contiguous row of the storage dtype); returns the shard path.

        Measured on a loaded 2-core VM, for 2 MB rows: 2 ms with pread vs ~20 ms touching an mmap
        (page faults), so rows are read, not mapped; the page cache still serves repeats.
        """
        fd, base, path = self._handle(shard_id)
        view = _row_bytes(out)
        try:
            n = os.preadv(fd, [view], base + row * view.nbytes)
        except OSError as exc:
            raise ShardError(path, f"shard file {path} cannot be read at row {row} ({exc.strerror or exc})") from None
        if n != view.nbytes:
            raise ShardError(path, f"shard file {path} is truncated (row {row})")
        return path

    def _locate(self, doc_ids: Sequence[str]) -> list[tuple[int, int, str]]:
        found: dict[str, tuple[int, int, str]] = {}
        unique = list(dict.fromkeys(str(d) for d in doc_ids))
        for start in range(0, len(unique), 900):  # SQLite's default bound-variable limit is 999
            chunk = unique[start:start + 900]
            marks = ",".join("?" * len(chunk))
            for doc_id, shard_id, row, checksum in self._query(
                    f"SELECT doc_id, shard_id, row, checksum FROM docs WHERE doc_id IN ({marks})", chunk):
                found[doc_id] = (shard_id, row, checksum)
        missing = [d for d in unique if d not in found]
        if missing:
            raise MissingAdapterError(self.path, missing)
        return [found[str(d)] for d in doc_ids]

    def repair_hint(self) -> str:
        """What to run to re-encode damaged documents (true for this codebase: encode skips only the
        doc ids present in the index, so dropped ones are trained again)."""
        sources = [a.get("path") for a in self.manifest.get("augmentation") or []
                   if isinstance(a, dict) and a.get("path")]
        augmented = sources[-1] if sources else "AUGMENTED.jsonl"
        return (f"To repair, run `prag store verify --store {self.path} --drop-bad` (drops the bad documents from "
                f"the index), then rerun the encode command with the store's settings, e.g. `prag encode "
                f"--augmented {augmented} --model {self.base_model} --out {self.path}`, which re-encodes only "
                f"the dropped documents")

    def get_rows(self, doc_ids: Sequence[str], verify: bool | None = None) -> torch.Tensor:
        """``[k, P]`` stored rows (storage dtype) for ``doc_ids``, each read with one ``pread``.

        ``verify`` (default: the store's ``verify_rows``, on unless turned off) checks each row against
        its checksum and for NaN/inf. A bad row, or a shard file that is missing, resized or unreadable,
        raises ``CorruptAdapterError`` naming the affected documents among ``doc_ids``; unknown ids
        raise ``MissingAdapterError``."""
        verify = self.verify_rows if verify is None else verify
        doc_ids = [str(d) for d in doc_ids]
        out = torch.empty((len(doc_ids), self.layout.params_per_doc), dtype=STORAGE_DTYPES[self.storage_dtype])
        problems: dict[str, str] = {}
        paths: list[Path | None] = [None] * len(doc_ids)
        # the lock covers the index and the open shard handles only: the checks below run outside it, so
        # a server's event loop asking for ``version`` never waits for another request's row checks
        with self._mutex:
            where = self._locate(doc_ids)
            for i, (shard_id, row, _) in enumerate(where):
                try:
                    paths[i] = self._read_row(shard_id, row, out[i])
                except ShardError as exc:
                    problems[doc_ids[i]], paths[i] = str(exc), exc.path
        if verify:
            for i, (_, _, checksum) in enumerate(where):
                if doc_ids[i] not in problems and row_checksum(out[i], self.checksum) != checksum:
                    problems[doc_ids[i]] = "checksum mismatch"
            for i in nonfinite_rows(out):
                problems.setdefault(doc_ids[i], "NaN/inf values in the stored adapter")
        if problems:
            shards = {str(p) for d, p in zip(doc_ids, paths) if d in problems and p is not None}
            raise CorruptAdapterError(self.path, problems, shards, self.repair_hint())
        return out

    def get_many(self, doc_ids: Sequence[str], verify: bool | None = None) -> list[dict[str, torch.Tensor]]:
        """float32 adapters (config key convention) for ``doc_ids``; unknown ids raise ``MissingAdapterError``,
        damaged ones ``CorruptAdapterError``."""
        rows = self.get_rows(doc_ids, verify=verify).to(torch.float32)
        return [self.layout.unflatten(r) for r in rows]

    def get(self, doc_id: str, verify: bool | None = None) -> dict[str, torch.Tensor]:
        return self.get_many([doc_id], verify=verify)[0]

    def check_all(self) -> tuple[dict[str, str], dict[str, str]]:
        """Read and check every row and every shard file (reads the whole store).

        Returns (doc id -> problem, shard file name -> problem); both empty for a sound store."""
        bad_docs: dict[str, str] = {}
        bad_shards: dict[str, str] = {}
        with self._mutex:
            names = dict(self._query("SELECT id, name FROM shards"))
            docs = self._query("SELECT doc_id, shard_id, row, checksum FROM docs ORDER BY shard_id, row")
            buf = torch.empty((1, self.layout.params_per_doc), dtype=STORAGE_DTYPES[self.storage_dtype])
            for doc_id, shard_id, row, checksum in docs:
                name = names.get(shard_id)
                if name is None:
                    bad_docs[doc_id] = f"the index points to shard id {shard_id}, which it does not list"
                    continue
                if name in bad_shards:
                    bad_docs[doc_id] = bad_shards[name]
                    continue
                try:
                    self._handle(shard_id)
                except ShardError as exc:
                    bad_shards[name] = bad_docs[doc_id] = str(exc)
                    continue
                try:
                    self._read_row(shard_id, row, buf[0])
                except ShardError as exc:
                    bad_docs[doc_id] = str(exc)
                    continue
                if row_checksum(buf[0], self.checksum) != checksum:
                    bad_docs[doc_id] = f"checksum mismatch (row {row} of shard file {self.path / SHARDS / name})"
                elif nonfinite_rows(buf):
                    bad_docs[doc_id] = f"NaN/inf values (row {row} of shard file {self.path / SHARDS / name})"
        return bad_docs, bad_shards

    def verify(self) -> list[str]:
        """Doc ids whose stored row is damaged (checksum, NaN/inf, or an unreadable shard); reads the whole store."""
        return list(self.check_all()[0])

    def stats(self) -> dict:
        with self._mutex:
            n_shards, nbytes = self._query("SELECT COUNT(*), COALESCE(SUM(nbytes), 0) FROM shards")[0]
        return {"docs": len(self), "shards": n_shards, "shard_bytes": nbytes, "bytes_per_doc": self.bytes_per_doc,
                "storage_dtype": self.storage_dtype, "version": self.version}

    # ---- writing (single writer) ---------------------------------------------------------------

    def _require_writer(self) -> None:
        if not self.writable or self._lock_fd is None:
            raise PragError(f"adapter store {self.path} is open read-only")

    def write_shard(self, doc_ids: Sequence[str], adapters: Sequence[Mapping[str, torch.Tensor]]) -> ShardMeta:
        """Write (not commit) one shard file; see ``commit_shard``."""
        return write_shard_file(self.path, self.layout, self.storage_dtype, doc_ids, adapters)

    def commit_shard(self, meta: ShardMeta) -> None:
        """Make a written shard's documents visible, all at once (one SQLite transaction)."""
        self._require_writer()
        path = self.path / SHARDS / meta.name
        if not path.is_file() or path.stat().st_size != meta.nbytes:
            raise PragError(f"shard file {path} is missing or has the wrong size; is the store directory on a "
                            f"filesystem shared by all Ray workers?")
        with safe_open(str(path), framework="pt") as fh:
            shape = fh.get_slice(TENSOR).get_shape()
        if list(shape) != [len(meta.doc_ids), self.layout.params_per_doc]:
            raise PragError(f"shard file {path} has shape {shape}, expected "
                            f"{[len(meta.doc_ids), self.layout.params_per_doc]}")
        with self._mutex:
            old = self.version
            digest = hashlib.sha256((old + meta.name + "".join(meta.checksums)).encode()).hexdigest()[:16]
            try:
                with self._conn:  # one transaction: all rows of the shard, or none
                    cur = self._conn.execute("INSERT INTO shards (name, n_docs, nbytes) VALUES (?, ?, ?)",
                                             (meta.name, len(meta.doc_ids), meta.nbytes))
                    shard_id = cur.lastrowid
                    self._conn.executemany("INSERT INTO docs VALUES (?, ?, ?, ?)",
                                           [(d, shard_id, i, c) for i, (d, c) in
                                            enumerate(zip(meta.doc_ids, meta.checksums))])
                    n = self._conn.execute("SELECT COUNT(*) FROM docs").fetchone()[0]
                    self._conn.execute("UPDATE meta SET value=? WHERE key='version'", (f"{n}-{digest}",))
            except sqlite3.IntegrityError:
                path.unlink(missing_ok=True)
                dup = [d for d in meta.doc_ids if d in self]
                raise PragError(f"adapter store {self.path} already has doc id(s) {dup[:5]}") from None
            except sqlite3.OperationalError as exc:
                path.unlink(missing_ok=True)
                raise PragError(f"could not update {self.path / INDEX}: {exc}. The adapter store is unchanged; "
                                f"free space and rerun the same command to resume") from None

    def add_batch(self, doc_ids: Sequence[str], adapters: Sequence[Mapping[str, torch.Tensor]]) -> ShardMeta:
        """Store adapters for new doc ids as one shard: write the file, then commit its rows atomically."""
        self._require_writer()
        doc_ids = [str(d) for d in doc_ids]
        if len(set(doc_ids)) != len(doc_ids):
            raise PragError("duplicate doc ids in one batch")
        dup = [d for d in doc_ids if d in self]
        if dup:
            raise PragError(f"adapter store {self.path} already has doc id(s) {dup[:5]}")
        meta = self.write_shard(doc_ids, adapters)
        self.commit_shard(meta)
        return meta

    def remove(self, doc_ids: Iterable[str]) -> int:
        """Drop documents from the index in one transaction, so the next encode run trains them again
        (it skips only ids in the index). Their bytes stay in the shard file, unreachable; a shard file
        left with no documents is deleted. Returns how many documents were dropped."""
        self._require_writer()
        ids = list(dict.fromkeys(str(d) for d in doc_ids))
        if not ids:
            return 0
        with self._mutex:
            old = self.version
            digest = hashlib.sha256("\0".join([old, "remove", *ids]).encode()).hexdigest()[:16]
            dropped, empty = 0, []
            try:
                with self._conn:
                    for start in range(0, len(ids), 900):
                        chunk = ids[start:start + 900]
                        dropped += self._conn.execute(
                            f"DELETE FROM docs WHERE doc_id IN ({','.join('?' * len(chunk))})", chunk).rowcount
                    unused = "FROM shards WHERE id NOT IN (SELECT DISTINCT shard_id FROM docs)"
                    empty = self._conn.execute(f"SELECT id, name {unused}").fetchall()
                    self._conn.execute(f"DELETE {unused}")
                    n = self._conn.execute("SELECT COUNT(*) FROM docs").fetchone()[0]
                    self._conn.execute("UPDATE meta SET value=? WHERE key='version'", (f"{n}-{digest}",))
            except sqlite3.DatabaseError as exc:
                raise PragError(f"could not update {self.path / INDEX}: {exc}. The adapter store is unchanged") from None
            for shard_id, name in empty:
                handle = self._handles.pop(shard_id, None)
                if handle is not None:
                    os.close(handle[0])
                (self.path / SHARDS / name).unlink(missing_ok=True)
                self.shard_problems.pop(name, None)
        return dropped


def store_summary(path: str | os.PathLike) -> dict:
    """Manifest essentials + counts, for ``prag`` commands that report on a store."""
    with contextlib.closing(AdapterStore.open(path)) as store:
        m = store.manifest
        return {"path": str(store.path), "base_model": m["base_model"]["name_or_path"], "rank": m["rank"],
                "alpha": m["alpha"], "target_modules": m["target_modules"], **store.stats()}


@dataclass
class StoreReport:
    """What ``verify_store`` found; ``ok`` when nothing is wrong."""

    path: str
    docs: int = 0
    shards: int = 0
    checksum: str = ""
    format_version: int | None = None
    bad_docs: dict[str, str] = field(default_factory=dict)
    bad_shards: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # manifest, init adapter, index
    orphan_files: list[str] = field(default_factory=list)  # uncommitted shard files (removed by the next writer)
    dropped: int = 0
    repair_hint: str = ""

    @property
    def ok(self) -> bool:
        return not (self.bad_docs or self.bad_shards or self.problems)

    def format(self) -> str:
        lines = [f"adapter store {self.path}: {self.docs} document(s) in {self.shards} shard file(s), format version "
                 f"{self.format_version}, {self.checksum} row checksums"]
        lines += [f"  problem: {p}" for p in self.problems]
        lines += [f"  bad shard {name}: {why}" for name, why in self.bad_shards.items()]
        shown = list(self.bad_docs.items())
        lines += [f"  bad document {d!r}: {why}" for d, why in shown[:50]]
        if len(shown) > 50:
            lines.append(f"  ... and {len(shown) - 50} more bad documents")
        if self.orphan_files:
            lines.append(f"  note: {len(self.orphan_files)} uncommitted shard file(s) (left by an interrupted encode; "
                         f"the next encode run removes them)")
        if self.ok:
            lines.append("OK: every row matches its checksum and is finite; every shard file is whole")
        else:
            lines.append(f"FAILED: {len(self.bad_docs)} bad document(s), {len(self.bad_shards)} bad shard file(s), "
                         f"{len(self.problems)} other problem(s)")
            if self.dropped:
                lines.append(f"dropped {self.dropped} bad document(s) from the index; rerun the encode command with "
                             f"the store's settings to re-encode them")
            elif self.bad_docs and self.repair_hint:
                lines.append(self.repair_hint)
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "docs": self.docs, "shards": self.shards, "checksum": self.checksum,
                "format_version": self.format_version, "bad_docs": self.bad_docs, "bad_shards": self.bad_shards,
                "problems": self.problems, "orphan_files": self.orphan_files, "dropped": self.dropped}


def _check_manifest(store: AdapterStore) -> list[str]:
    """Manifest fields agree with each other and with init.safetensors."""
    m, problems = store.manifest, []
    itemsize = torch.empty((), dtype=STORAGE_DTYPES[store.storage_dtype]).element_size()
    if m.get("params_per_doc") != store.layout.params_per_doc:
        problems.append(f"{store.path / MANIFEST}: params_per_doc {m.get('params_per_doc')} does not match its layout "
                        f"({store.layout.params_per_doc})")
    if m.get("bytes_per_doc") != store.layout.params_per_doc * itemsize:
        problems.append(f"{store.path / MANIFEST}: bytes_per_doc {m.get('bytes_per_doc')} does not match its layout "
                        f"({store.layout.params_per_doc * itemsize})")
    init = store.path / INIT
    want = (m.get("init") or {}).get("sha256")
    if not init.is_file():
        problems.append(f"{init} is missing")
    elif want and sha256_file(init) != want:
        problems.append(f"{init} does not match the sha256 recorded in the manifest")
    else:
        try:
            adapter = store.init_adapter()
            bad = [k for k, shape in zip(store.layout.keys, store.layout.shapes) if tuple(adapter[k].shape) != shape]
            if bad:
                problems.append(f"{init}: tensor(s) {bad[:3]} do not have the layout's shapes")
        except Exception as exc:  # safetensors raises its own error types for damaged files
            problems.append(f"{init} cannot be read ({type(exc).__name__}: {exc})")
    return problems


def verify_store(path: str | os.PathLike, drop_bad: bool = False) -> StoreReport:
    """Full check of a store: manifest and init adapter, SQLite integrity, every shard file, every row
    (checksum + finite). ``drop_bad`` then drops the bad documents from the index (``AdapterStore.remove``)
    so the next encode run re-encodes them. Problems are reported, not raised; a store that cannot be
    opened at all raises ``PragError``."""
    with AdapterStore.open(path) as store:
        report = StoreReport(path=str(store.path), checksum=store.checksum,
                             format_version=store.manifest.get("format_version"), repair_hint=store.repair_hint())
        report.problems += _check_manifest(store)
        try:
            result = store._conn.execute("PRAGMA integrity_check").fetchall()
        except sqlite3.DatabaseError as exc:
            result = [(str(exc),)]
        if result != [("ok",)]:
            report.problems.append(f"{store.path / INDEX} fails SQLite's integrity check: "
                                   f"{'; '.join(str(r[0]) for r in result[:3])}")
        report.docs, report.shards = len(store), store.stats()["shards"]
        report.bad_docs, report.bad_shards = store.check_all()
        committed = {name for (name,) in store._query("SELECT name FROM shards")}
        report.orphan_files = sorted(p.name for p in (store.path / SHARDS).iterdir() if p.name not in committed) \
            if (store.path / SHARDS).is_dir() else []
    if drop_bad and report.bad_docs:
        with AdapterStore.open_for_repair(path) as writer:
            report.dropped = writer.remove(report.bad_docs)
    return report


__all__ = ["AdapterStore", "CorruptAdapterError", "Layout", "MissingAdapterError", "ShardError", "ShardMeta",
           "StoreMismatchError", "StoreReport", "StoreSpec", "model_fingerprint", "resolve_model_dir", "row_checksum",
           "verify_store", "write_shard_file", "STORAGE_DTYPES"]
