"""The augmented-record format and its crash-safe, resumable JSONL writer.

One JSONL line per document::

    {"doc_id", "passage", "rewrites": [str], "qa": [{"question", "answer", "full_answer"}],
     "augmenter", "model"}            # plus "error": "<reason>" (and empty qa) when it failed

Why append instead of an atomic rewrite: augmenting millions of documents takes hours, so the
output must grow in place and survive a kill. Each batch is written as whole lines, flushed and
fsynced; a torn last line (the only damage a crash can do) is detected and cut off on reopen.

Passage decision: ``passage`` is the document text, prefixed with ``"{title}. "`` when the
document has a title that the text does not mention. The paper uses the bare text, but a
Wikipedia-style passage often never names its own subject ("He was born in ..."), and both the
QA pairs and the training prompt are more useful with it. Encoding uses ``passage`` as-is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from prag.errors import PragError
from retrieval.corpus import Document

QA_KEYS = ("question", "answer", "full_answer")


def passage_of(doc: Document, include_title: str = "auto") -> str:
    """The passage text the augmenters (and encoder) see; ``include_title``: auto | always | never."""
    if include_title not in ("auto", "always", "never"):
        raise PragError(f"include_title must be auto, always or never, got {include_title!r}")
    title, text = doc.title.strip(), doc.text.strip()
    if not title or include_title == "never":
        return text
    if include_title == "auto" and title.lower() in text.lower():
        return text
    sep = " " if title[-1] in ".!?:" else ". "
    return f"{title}{sep}{text}"


def make_record(doc_id: str, passage: str, rewrites: list[str], qa: list[dict], augmenter: str,
                model: str | None, error: str | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {"doc_id": doc_id, "passage": passage, "rewrites": list(rewrites),
                           "qa": [] if error else [{k: str(p[k]) for k in QA_KEYS} for p in qa],
                           "augmenter": augmenter, "model": model}
    if error:
        rec["error"] = error
    return rec


def error_kind(reason: str) -> str:
    """The counted part of an error reason: text before the first ':' (details follow it)."""
    return reason.split(":", 1)[0].strip()


def record_doc_id(rec: dict) -> str | None:
    """The record's document id as a string (``id`` is accepted for ``doc_id``); None if absent or empty."""
    doc_id = rec.get("doc_id", rec.get("id"))
    if isinstance(doc_id, bool) or not isinstance(doc_id, (str, int)) or str(doc_id).strip() == "":
        return None
    return str(doc_id)


def record_problem(rec: dict) -> str | None:
    """Why an augmented record cannot be trained on (None if it can).

    The one validator of the record format: encoding skips and counts records by this reason, and
    the trainer refuses a record with it.
    """
    if not isinstance(rec, dict):
        return "record is not a JSON object"
    if record_doc_id(rec) is None:
        return "missing or empty 'doc_id'"
    if rec.get("error"):  # the augmenters' reasons are short categories (no_extractable_facts, ...)
        return f"augmentation failed ({str(rec['error'])[:60]})"
    passage = rec.get("passage")
    if not isinstance(passage, str) or not passage.strip():
        return "missing or empty 'passage'"
    qa = rec.get("qa")
    if not isinstance(qa, list) or not qa:
        return "no QA pairs ('qa' missing or empty)"
    for i, pair in enumerate(qa):
        if not isinstance(pair, dict):
            return f"qa[{i}] is not an object"
        for key in ("question", "answer"):
            if not str(pair.get(key) or "").strip():
                return f"qa[{i}] has no '{key}'"
    rewrites = rec.get("rewrites", [])
    if rewrites is not None and (not isinstance(rewrites, list) or any(not isinstance(r, str) for r in rewrites)):
        return "'rewrites' is not a list of strings"
    return None


def iter_augmented(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Stream ``(line_number, record)`` from an augmented file.

    A torn last line (no trailing newline: a run still writing, or killed) is ignored; any other
    malformed line is an error naming file and line.
    """
    from prag.io import iter_jsonl

    for lineno, rec in iter_jsonl(path, "augmented file", allow_torn_tail=True):
        if "doc_id" not in rec:
            raise PragError(f"{path}:{lineno}: not an augmented record (no 'doc_id')")
        yield lineno, rec


def _repair_tail(path: Path, window: int = 1 << 22) -> int:
    """Cut a torn final line left by a crash (no trailing newline, or unparsable); return bytes cut."""
    size = path.stat().st_size
    with open(path, "rb+") as fh:
        start = max(0, size - window)
        fh.seek(start)
        tail = fh.read()
        end = len(tail)  # end of the last good line, relative to ``start``
        if not tail.endswith(b"\n"):
            cut = tail.rfind(b"\n")
            if cut < 0 and start > 0:
                raise PragError(f"{path}: last line is over {window} bytes without a newline; "
                                "not an augmented file?")
            end = cut + 1
        if end > 0:
            # A crash can also leave a newline-terminated garbage line (e.g. zero-filled blocks).
            prev = tail.rfind(b"\n", 0, end - 1)
            if prev >= 0 or start == 0:
                try:
                    json.loads(tail[prev + 1:end])
                except (json.JSONDecodeError, UnicodeDecodeError):
                    end = prev + 1
        keep = start + end
        if keep != size:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
    return size - keep


class ResumableJsonlWriter:
    """Append-only record file that knows which doc ids it already holds.

    On open: repairs a torn tail, loads the done ids, and refuses to mix records of another
    augmenter/model into the same file (a clear error beats a silently inconsistent dataset).
    ``retry_failed`` drops earlier error records (atomically) so those documents run again.
    """

    def __init__(self, path: str | os.PathLike, augmenter: str, model: str | None,
                 retry_failed: bool = False):
        self.path = Path(path)
        self.done_ids: set[str] = set()
        self.dropped_bytes = 0
        self.previously_failed = 0
        if self.path.is_dir():
            raise PragError(f"output is a directory, expected a JSONL file: {self.path}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PragError(f"cannot create the output directory {self.path.parent}: {exc.strerror or exc}") from None
        if self.path.exists() and self.path.stat().st_size:
            self.dropped_bytes = _repair_tail(self.path)
            self._load(augmenter, model, retry_failed)
        try:
            self._fh = open(self.path, "a", encoding="utf-8")
        except OSError as exc:
            raise PragError(f"output file is not writable: {self.path} ({exc.strerror or exc})") from None

    def _load(self, augmenter: str, model: str | None, retry_failed: bool) -> None:
        kept: list[str] = []
        failed = 0
        with open(self.path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    doc_id = rec["doc_id"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise PragError(f"{self.path}:{lineno}: not an augmented record; "
                                    "use another --out or remove the file") from None
                if rec.get("augmenter") != augmenter or rec.get("model") != model:
                    raise PragError(
                        f"{self.path}:{lineno}: existing records come from augmenter "
                        f"{rec.get('augmenter')!r} (model {rec.get('model')!r}), not {augmenter!r} "
                        f"(model {model!r}); use another --out or remove the file")
                if rec.get("error"):
                    failed += 1
                    if retry_failed:
                        continue
                if retry_failed:
                    kept.append(line if line.endswith("\n") else line + "\n")
                self.done_ids.add(doc_id)
        self.previously_failed = failed
        if retry_failed and failed:
            from prag.io import atomic_write_text

            atomic_write_text(self.path, "".join(kept))

    def write(self, records: Iterable[dict]) -> None:
        """Append whole lines, then flush and fsync, so a crash tears at most the last batch's tail."""
        lines = []
        for rec in records:
            lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
            self.done_ids.add(rec["doc_id"])
        if not lines:
            return
        try:
            self._fh.write("".join(lines))
            self._fh.flush()
            os.fsync(self._fh.fileno())
        except OSError as exc:
            raise PragError(f"writing {self.path} failed ({exc.strerror or exc}); "
                            "free space and rerun the same command to resume") from None

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "ResumableJsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
