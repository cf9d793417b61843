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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

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


def iter_jsonl(path: str | os.PathLike, what: str = "JSONL file", allow_torn_tail: bool = False,
               on_torn_tail: Callable[[int], None] | None = None) -> Iterator[tuple[int, dict]]:
    """Stream ``(line_number, record)`` pairs; a malformed or non-UTF-8 line raises naming file and line.

    ``allow_torn_tail``: a malformed *last* line without its newline (a writer still appending, or
    killed mid-line, maybe inside a multi-byte character) ends the stream instead of raising; files we
    append to are read this way. ``on_torn_tail(line_number)`` is called then, so callers can warn.
    """
    path = check_readable(path, what)
    # Bytes, decoded line by line: a text stream decodes in blocks and cannot say which line is bad
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                if allow_torn_tail and not raw.endswith(b"\n"):
                    if on_torn_tail is not None:
                        on_torn_tail(lineno)
                    return
                if isinstance(exc, UnicodeDecodeError):
                    raise PragError(f"{path}:{lineno}: not UTF-8 text (byte {raw[exc.start]:#04x} at column "
                                    f"{exc.start + 1}); save the file as UTF-8") from None
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


# ---------------------------------------------------------------------------------------------
# Sampled checksums: a cheap identity of a large file


SAMPLE_COUNT = 16
SAMPLE_BYTES = 1 << 16


def sampled_blocks(size: int, samples: int = SAMPLE_COUNT, chunk: int = SAMPLE_BYTES) -> list[tuple[int, int]]:
    """The ``(offset, length)`` pieces ``sampled_sha256`` reads from a file of ``size`` bytes: the whole
    file when it is small, else ``samples`` evenly spaced ``chunk``-byte blocks (the first at 0, the
    last at the end), so the cost is bounded whatever the size."""
    if size <= samples * chunk:
        return [(0, size)]
    return [((size - chunk) * i // (samples - 1), chunk) for i in range(samples)]


def sampled_sha256(path: str | os.PathLike, samples: int = SAMPLE_COUNT, chunk: int = SAMPLE_BYTES) -> str:
    """sha256 of the ``sampled_blocks`` of ``path`` (about 1 MiB read, whatever the size).

    It tells two files of equal size apart (e.g. fine-tunes of one architecture) and catches
    corruption inside a sampled block; a full ``sha256_file`` catches everything.
    """
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for offset, length in sampled_blocks(os.fstat(fh.fileno()).st_size, samples, chunk):
            fh.seek(offset)
            h.update(fh.read(length))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# --out directories: never delete what this command did not create


@dataclass(frozen=True)
class OutputKind:
    """What a command writes to its ``--out`` directory, and how a previous output of it is recognised.

    ``what`` names it with its article ("an index"); ``is_previous(path)`` is true only for a
    directory this command wrote before (its manifest / marker file), never for a user's folder.
    """

    what: str
    command: str
    is_previous: Callable[[Path], bool]


def json_marker(name: str, *keys: str, **equals: Any) -> Callable[[Path], bool]:
    """A predicate: ``dir/name`` is a JSON object holding ``keys`` and the ``equals`` values."""

    def check(directory: Path) -> bool:
        try:
            data = json.loads((Path(directory) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and all(k in data for k in keys) and \
            all(data.get(k) == v for k, v in equals.items())

    return check


def _overlap(out: Path, inp: Path) -> str | None:
    if out == inp:
        return "is"
    if inp.is_relative_to(out):
        return "contains"
    if out.is_relative_to(inp):
        return "is inside"
    return None


def check_output_dir(path: str | os.PathLike, kind: OutputKind, *, overwrite: bool = False, resume: bool = False,
                     inputs: Sequence[str | os.PathLike | None] = (), flag: str = "--out") -> str:
    """Decide whether ``path`` may receive ``kind``'s output, before any work starts.

    Returns ``"new"`` (absent), ``"empty"`` (an empty directory) or ``"previous"`` (a previous output
    of the same command: resumed when ``resume``, replaced only with ``overwrite``). Everything else
    is refused naming the path: a file, a folder of other files (even with ``overwrite``), and a path
    that is, contains or lies inside one of ``inputs`` (the store, the model, the corpus ...).
    """
    path = Path(path)
    resolved = path.expanduser().resolve()
    for inp in inputs:
        if inp is None or not Path(inp).expanduser().exists():
            continue
        relation = _overlap(resolved, Path(inp).expanduser().resolve())
        if relation is not None:
            raise PragError(f"{flag} {path} {relation} the input {inp}; writing there could destroy it. "
                            f"Choose an {flag} outside every input")
    if not path.exists():
        return "new"
    if not path.is_dir():
        raise PragError(f"{flag} {path} exists and is not a directory; refusing to replace it with {kind.what}. "
                        f"Choose another {flag}")
    if not any(path.iterdir()):
        return "empty"
    if kind.is_previous(path):
        if resume or overwrite:
            return "previous"
        raise PragError(f"{flag} {path} already holds {kind.what} from a previous '{kind.command}'; pass "
                        f"--overwrite to replace it, or choose another {flag}")
    shown = ", ".join(sorted(p.name for p in path.iterdir())[:3])
    raise PragError(f"{flag} {path} is a non-empty directory that is not {kind.what}; refusing to overwrite it "
                    f"(it holds {shown} ...; --overwrite only replaces a previous output of '{kind.command}'). "
                    f"Choose another {flag}")


def check_output_file(path: str | os.PathLike, inputs: Sequence[str | os.PathLike | None],
                      flag: str = "--out") -> Path:
    """An output *file* must not be, or lie inside, an input (the queries file, the corpus, an index)."""
    path = Path(path)
    resolved = path.expanduser().resolve()
    for inp in inputs:
        if inp is not None and Path(inp).expanduser().exists() and \
                _overlap(resolved, Path(inp).expanduser().resolve()) in ("is", "is inside"):
            raise PragError(f"{flag} {path} {_overlap(resolved, Path(inp).expanduser().resolve())} the input {inp}; "
                            f"writing there would destroy it. Choose another {flag}")
    return path


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first: what creating it would add."""
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.append(p)
    return missing


def _remove_created(created: list[Path], keep: Callable[[Path], bool] = lambda p: False) -> None:
    """Undo directory creation: the deepest (``created[0]``) with its contents unless ``keep`` says it is
    worth resuming, then its ancestors only while they are empty."""
    if not created:
        return
    first = created[0]
    if first.is_dir() and not keep(first):
        shutil.rmtree(first, ignore_errors=True)
    for p in created[1:]:
        with contextlib.suppress(OSError):
            p.rmdir()  # fails (and is kept) when not empty


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, kind: OutputKind, *, overwrite: bool = False,
                      inputs: Sequence[str | os.PathLike | None] = (), flag: str = "--out") -> Iterator[Path]:
    """``check_output_dir`` + ``atomic_dir``: build ``kind``'s output under a temporary name; it replaces
    ``path`` only if the block succeeds. A failure leaves no trace, not even parent folders it created."""
    path = Path(path)
    check_output_dir(path, kind, overwrite=overwrite, inputs=inputs, flag=flag)
    created = _missing_dirs(path.parent)
    try:
        ensure_writable_dir(path.parent, f"parent directory of {flag}")
        with atomic_dir(path) as tmp:
            yield tmp
    except BaseException:
        _remove_created(created)
        raise


@contextlib.contextmanager
def resumable_output_dir(path: str | os.PathLike, kind: OutputKind, *,
                         inputs: Sequence[str | os.PathLike | None] = (), flag: str = "--out",
                         what: str = "output directory") -> Iterator[Path]:
    """For commands that write *into* ``path`` and resume (encode, eval): a previous output is reused,
    anything foreign refused. On failure, folders this call created are removed unless they hold a
    resumable output (``kind.is_previous``); a folder that existed before is never removed."""
    path = Path(path)
    check_output_dir(path, kind, resume=True, inputs=inputs, flag=flag)
    created = _missing_dirs(path)
    try:
        yield ensure_writable_dir(path, what)
    except BaseException:
        _remove_created(created, keep=kind.is_previous)
        raise
