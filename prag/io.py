"""Atomic file writes and line-numbered JSONL reading.

Every artifact the project writes goes through here, so a crash can never leave a
half-written file behind: we write to a temporary sibling, fsync, then ``os.replace``.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from prag.errors import PragError


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o644)  # mkstemp's 0600 would surprise whoever reads our artifacts
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under a temporary name and move it into place only when complete.

    An existing directory at ``path`` is replaced; readers never see a partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_readable(path: str | os.PathLike, what: str = "file") -> Path:
    """Fail early, with the path in the message, if ``path`` cannot be read."""
    path = Path(path)
    if not path.exists():
        raise PragError(f"{what} not found: {path}")
    if path.is_dir():
        raise PragError(f"{what} is a directory, expected a file: {path}")
    if not os.access(path, os.R_OK):
        raise PragError(f"{what} is not readable: {path}")
    return path


def open_text(path: str | os.PathLike):
    """Open a text file, transparently gunzipping ``*.gz``."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_jsonl(path: str | os.PathLike, what: str = "JSONL file",
               allow_torn_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """Stream ``(line_number, record)`` pairs; a malformed line raises naming file and line.

    ``allow_torn_tail``: a malformed *last* line without its newline (a writer still appending, or
    killed mid-line) ends the stream instead of raising; files we append to are read this way.
    """
    path = check_readable(path, what)
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                if allow_torn_tail and not line.endswith("\n"):
                    return
                raise PragError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise PragError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = check_readable(path, what)
    try:
        with open_text(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise PragError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def ensure_writable_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Create ``path`` if needed and prove we can write there, before any long work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise PragError(f"{what} is not writable: {path} ({exc.strerror or exc})") from None
    return path
