"""Streaming corpus readers: JSONL ``{id, title?, text}`` and DPR TSV (``id\\ttext\\ttitle``).

Readers yield one ``Document`` at a time so a 21M-passage file is never held in memory.
Bad input fails with the file and line number; empty texts are skipped and counted.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from prag.errors import PragError
from prag.io import check_readable, iter_jsonl, open_text


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str = ""
    line: int = field(default=0, compare=False, repr=False)  # corpus line, for error messages (0: unknown)


@dataclass
class CorpusStats:
    """What a pass over the corpus saw; filled in while iterating."""

    read: int = 0
    skipped_empty: int = 0
    skipped_ids: list[str] = field(default_factory=list)


def corpus_format(path: str | Path) -> str:
    name = Path(path).name.lower().removesuffix(".gz")
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith(".jsonl") or name.endswith(".json"):
        return "jsonl"
    raise PragError(f"cannot tell the corpus format of {path}: use a .jsonl or .tsv (DPR) file")


def _iter_jsonl_docs(path: Path) -> Iterator[tuple[int, str, str, str]]:
    for lineno, rec in iter_jsonl(path, "corpus file"):
        for key in ("id", "text"):
            if key not in rec:
                raise PragError(f"{path}:{lineno}: missing field {key!r}")
        title = rec.get("title") or ""
        if not isinstance(rec["text"], str) or not isinstance(title, str):
            raise PragError(f"{path}:{lineno}: fields 'text' and 'title' must be strings")
        yield lineno, str(rec["id"]), rec["text"], title


def _iter_tsv_docs(path: Path) -> Iterator[tuple[int, str, str, str]]:
    csv.field_size_limit(sys.maxsize)
    with open_text(path) as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
        header = next(reader, None)
        if header is None:
            return
        if [h.strip().lower() for h in header[:3]] != ["id", "text", "title"]:
            raise PragError(f"{path}:1: expected a DPR header 'id\\ttext\\ttitle', got {header!r}")
        for row in reader:
            lineno = reader.line_num
            if not row:
                continue
            if len(row) != 3:
                raise PragError(f"{path}:{lineno}: expected 3 tab-separated fields (id, text, title), got {len(row)}")
            yield lineno, row[0], row[1], row[2]


def iter_corpus(path: str | Path, stats: CorpusStats | None = None,
                check_duplicates: bool = True) -> Iterator[Document]:
    """Yield documents in file order, skipping empty texts and rejecting duplicate ids."""
    path = check_readable(path, "corpus file")
    stats = stats if stats is not None else CorpusStats()
    rows = _iter_tsv_docs(path) if corpus_format(path) == "tsv" else _iter_jsonl_docs(path)
    seen: set[str] = set()
    for lineno, doc_id, text, title in _guard_decoding(rows, path):
        doc_id = doc_id.strip()
        if not doc_id:
            raise PragError(f"{path}:{lineno}: empty document id")
        if check_duplicates:
            if doc_id in seen:
                raise PragError(f"{path}:{lineno}: duplicate document id {doc_id!r}")
            seen.add(doc_id)
        if not text.strip():
            stats.skipped_empty += 1
            if len(stats.skipped_ids) < 20:
                stats.skipped_ids.append(doc_id)
            continue
        stats.read += 1
        yield Document(id=doc_id, text=text.strip(), title=title.strip(), line=lineno)


def _guard_decoding(rows: Iterator[tuple[int, str, str, str]], path: Path) -> Iterator[tuple[int, str, str, str]]:
    """Turn a corrupt gzip stream or non-UTF-8 bytes into an error that names the file."""
    try:
        yield from rows
    except UnicodeDecodeError as exc:
        raise PragError(f"{path}: not valid UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except (OSError, EOFError) as exc:
        raise PragError(f"{path}: cannot read corpus ({exc})") from None
