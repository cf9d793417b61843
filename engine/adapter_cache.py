"""Merged-adapter cache: one merged adapter per (document set, store version), in memory or on tmpfs.

vLLM caches adapters by ``lora_int_id``, and its prefix cache keys on ``lora_name`` (a reused name
for other weights would serve stale KV, vLLM #42125). So each entry's name is derived from its
content, the sorted doc ids plus the store version (:func:`adapter_name`), and its id is stable for
as long as the process lives: a repeated set skips merging and hits vLLM's own adapter cache.
Entries are either PEFT directories (``write`` given: the directory hand-over, the fallback) or
in-memory adapters handed to vLLM without a file (``write=None``: ``on_insert``/``on_evict`` register
and unregister them, see :mod:`engine.vllm_backend.memory_lora`). The LRU is bounded by bytes; entries
used by a running batch are pinned so they cannot be evicted under vLLM's feet.

Thread-safe: the engine prepares adapters from a thread pool, and two threads asking for the
same key at once build it only once.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from prag.errors import PragError

CacheKey = tuple[tuple[str, ...], str]
DEFAULT_MAX_BYTES = 1 << 30
# vLLM identifies a loaded adapter by lora_int_id. Several caches (engines) may share one vLLM
# engine in a process, so ids come from one process-wide counter and can never collide.
_NEXT_ID = itertools.count(1)
_NEXT_NAMESPACE = itertools.count(1)


def default_root() -> Path:
    """tmpfs (``/dev/shm``) when the machine has it, else the system temp dir."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix=f"prag-adapters-{os.getpid()}-", dir=base))


def make_key(doc_ids: Iterable[str], store_version: str) -> CacheKey:
    """Order of retrieval does not change the merged delta (a sum), so the key is the sorted set."""
    return tuple(sorted(set(doc_ids))), str(store_version)


def adapter_name(key: CacheKey, namespace: str = "") -> str:
    """The vLLM ``lora_name`` of a merged adapter: a digest of its sorted doc ids and store version
    (and the cache's ``namespace``), so a changed store (new version) never reuses a name and vLLM's
    prefix cache, keyed on the name, cannot serve KV computed with other weights."""
    doc_ids, version = key
    digest = hashlib.sha256(json.dumps([namespace, list(doc_ids), version]).encode()).hexdigest()[:20]
    return f"prag-{digest}"


@dataclass(frozen=True)
class CachedAdapter:
    key: CacheKey
    lora_name: str
    lora_int_id: int
    path: Path | None  # the PEFT directory; None for an in-memory entry
    rank: int
    nbytes: int
    payload: Any = None  # the in-memory adapter (memory hand-over)

    @property
    def lora_path(self) -> str:
        """What goes into ``LoRARequest.lora_path``: the directory, or ``prag-mem://<name>``."""
        if self.path is not None:
            return str(self.path)
        from engine.vllm_backend.memory_lora import lora_path

        return lora_path(self.lora_name)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


class MergedAdapterCache:
    """LRU of merged adapters: PEFT directories under ``root``, or in-memory adapters (``write=None``)."""

    def __init__(self, write: Callable[[Any, Path], None] | None, root: str | os.PathLike | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, on_insert: Callable[[CachedAdapter], None] | None = None,
                 on_evict: Callable[[CachedAdapter], None] | None = None):
        """``write(merged, out_dir)`` writes one PEFT directory (the engine binds targets/dtype); None keeps
        what ``build()`` returns in memory (it needs ``.rank`` and ``.nbytes``). ``on_insert``/``on_evict``
        see every entry that enters or leaves the cache."""
        if max_bytes <= 0:
            raise PragError(f"adapter cache max_bytes must be > 0, got {max_bytes}")
        self._write = write
        self._on_insert, self._on_evict = on_insert, on_evict
        # two caches (engines over different stores) sharing one vLLM never share a name, even for
        # equal keys; within a cache the name follows the key alone, across clear() too
        self.namespace = f"{os.getpid()}-{next(_NEXT_NAMESPACE)}"
        self._own_root = root is None and write is not None
        self.root = (default_root() if root is None else Path(root)) if write is not None else None
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._lock = threading.Lock()
        self._entries: OrderedDict[CacheKey, CachedAdapter] = OrderedDict()
        self._ids: dict[CacheKey, int] = {}  # kept after eviction: a key comes back with the same id
        self._pins: dict[CacheKey, int] = {}
        self._building: dict[CacheKey, threading.Event] = {}
        self.stats = CacheStats()
        atexit.register(self.close)

    # -- lookup ---------------------------------------------------------------------------
    def _identity(self, key: CacheKey) -> tuple[str, int]:
        if key not in self._ids:
            self._ids[key] = next(_NEXT_ID)  # >= 1, as vLLM requires
        return adapter_name(key, self.namespace), self._ids[key]

    def get_or_build(self, key: CacheKey, build: Callable[[], Any], pin: bool = False) -> CachedAdapter:
        """The cached adapter for ``key``, merging and writing it with ``build()`` on a miss."""
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self.stats.hits += 1
                    if pin:
                        self._pins[key] = self._pins.get(key, 0) + 1
                    return entry
                waiter = self._building.get(key)
                if waiter is None:
                    self._building[key] = threading.Event()
                    name, int_id = self._identity(key)
                    self.stats.misses += 1
                    break
            waiter.wait()  # another thread is building this key; then look again
        try:
            merged = build()
            if self._write is not None:
                path = self.root / name
                self._write(merged, path)
                entry = CachedAdapter(key=key, lora_name=name, lora_int_id=int_id, path=path,
                                      rank=merged.rank, nbytes=_dir_bytes(path))
            else:
                entry = CachedAdapter(key=key, lora_name=name, lora_int_id=int_id, path=None,
                                      rank=merged.rank, nbytes=merged.nbytes, payload=merged)
            if self._on_insert is not None:
                self._on_insert(entry)
            with self._lock:
                self._entries[key] = entry
                self.stats.bytes += entry.nbytes
                if pin:
                    self._pins[key] = self._pins.get(key, 0) + 1
                self._evict_locked()
            return entry
        finally:
            with self._lock:
                self._building.pop(key).set()

    def unpin(self, keys: Sequence[CacheKey]) -> None:
        with self._lock:
            for key in keys:
                n = self._pins.get(key, 0) - 1
                if n > 0:
                    self._pins[key] = n
                else:
                    self._pins.pop(key, None)
            self._evict_locked()

    def __contains__(self, key: CacheKey) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    # -- eviction ---------------------------------------------------------------------------
    def _evict_locked(self) -> None:
        if self.stats.bytes <= self.max_bytes:
            self.stats.entries = len(self._entries)
            return
        for key in list(self._entries):
            if self.stats.bytes <= self.max_bytes:
                break
            if self._pins.get(key):
                continue  # in use by a running batch; evicted once released
            entry = self._entries.pop(key)
            self.stats.bytes -= entry.nbytes
            self.stats.evictions += 1
            self._drop(entry)
        self.stats.entries = len(self._entries)

    def _drop(self, entry: CachedAdapter) -> None:
        if entry.path is not None:
            shutil.rmtree(entry.path, ignore_errors=True)
        if self._on_evict is not None:
            self._on_evict(entry)

    def clear(self, forget_identities: bool = False) -> None:
        """Delete every cached directory; ``forget_identities`` also gives future entries new vLLM
        ids, so vLLM's own adapter cache cannot serve them either (cold-cache benchmarks)."""
        with self._lock:
            if forget_identities:
                self._ids.clear()
            for entry in self._entries.values():
                self._drop(entry)
            self._entries.clear()
            self._pins.clear()
            self.stats.bytes = 0
            self.stats.entries = 0

    def close(self) -> None:
        """Delete every directory (and the root if this cache created it)."""
        self.clear()
        if self._own_root and self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
