"""Merged-adapter cache: one PEFT directory on tmpfs per (document set, store version).

vLLM loads LoRA adapters only from a directory, and caches them by ``lora_int_id``/``lora_name``.
So each distinct document set gets a *stable* name and id for as long as the process lives: a
repeated set skips merging, skips writing, and hits vLLM's own adapter cache. Directories are
kept in an LRU bounded by bytes and deleted on eviction; entries used by a running batch are
pinned so they cannot be evicted under vLLM's feet.

Thread-safe: the engine prepares adapters from a thread pool, and two threads asking for the
same key at once build it only once.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from engine.merge import MergedAdapter
from prag.errors import PragError

CacheKey = tuple[tuple[str, ...], str]
DEFAULT_MAX_BYTES = 1 << 30
# vLLM identifies a loaded adapter by lora_int_id. Several caches (engines) may share one vLLM
# engine in a process, so ids come from one process-wide counter and can never collide.
_NEXT_ID = itertools.count(1)


def default_root() -> Path:
    """tmpfs (``/dev/shm``) when the machine has it, else the system temp dir."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return Path(tempfile.mkdtemp(prefix=f"prag-adapters-{os.getpid()}-", dir=base))


def make_key(doc_ids: Iterable[str], store_version: str) -> CacheKey:
    """Order of retrieval does not change the merged delta (a sum), so the key is the sorted set."""
    return tuple(sorted(set(doc_ids))), str(store_version)


@dataclass(frozen=True)
class CachedAdapter:
    key: CacheKey
    lora_name: str
    lora_int_id: int
    path: Path
    rank: int
    nbytes: int


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0
    entries: int = 0


class MergedAdapterCache:
    """LRU of merged adapters written as PEFT directories under ``root``."""

    def __init__(self, write: Callable[[MergedAdapter, Path], None], root: str | os.PathLike | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        """``write(merged, out_dir)`` writes one PEFT directory (the engine binds targets/dtype)."""
        if max_bytes <= 0:
            raise PragError(f"adapter cache max_bytes must be > 0, got {max_bytes}")
        self._write = write
        self._own_root = root is None
        self.root = default_root() if root is None else Path(root)
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
        digest = hashlib.sha1(repr(key).encode()).hexdigest()[:12]
        return f"prag-{self._ids[key]}-{digest}", self._ids[key]

    def get_or_build(self, key: CacheKey, build: Callable[[], MergedAdapter], pin: bool = False) -> CachedAdapter:
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
            path = self.root / name
            self._write(merged, path)
            entry = CachedAdapter(key=key, lora_name=name, lora_int_id=int_id, path=path,
                                  rank=merged.rank, nbytes=_dir_bytes(path))
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
            shutil.rmtree(entry.path, ignore_errors=True)
        self.stats.entries = len(self._entries)

    def clear(self, forget_identities: bool = False) -> None:
        """Delete every cached directory; ``forget_identities`` also gives future entries new vLLM
        ids, so vLLM's own adapter cache cannot serve them either (cold-cache benchmarks)."""
        with self._lock:
            if forget_identities:
                self._ids.clear()
            for entry in self._entries.values():
                shutil.rmtree(entry.path, ignore_errors=True)
            self._entries.clear()
            self._pins.clear()
            self.stats.bytes = 0
            self.stats.entries = 0

    def close(self) -> None:
        """Delete every directory (and the root if this cache created it)."""
        self.clear()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
