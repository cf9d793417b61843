"""SQLite doc store: FAISS row <-> stable string doc id, plus title and text.

``row`` is the SQLite rowid (0-based, equal to the FAISS row), so lookups by row and by id are
single B-tree probes and nothing is held in memory. Duplicate ids are caught by the UNIQUE
constraint, which keeps memory bounded even for a 21M-passage corpus.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from prag.errors import PragError
from retrieval.corpus import Document

DOCSTORE_FILE = "docs.sqlite"
_SQLITE_MAX_VARS = 900  # stay under SQLite's bound-parameter limit on old builds


class DocStoreWriter:
    """Append documents in corpus order; each gets the next row number."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._con = sqlite3.connect(self.path)
        # The store is built inside a temporary directory that is discarded on a crash, so
        # durability during the build buys nothing; the final close makes it durable.
        self._con.execute("PRAGMA journal_mode=OFF")
        self._con.execute("PRAGMA synchronous=OFF")
        self._con.execute(
            "CREATE TABLE docs (row INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, title TEXT NOT NULL, text TEXT NOT NULL)")
        self.count = 0

    def add(self, docs: Sequence[Document], source: str | Path = "corpus") -> None:
        """Insert one chunk; a duplicate id fails naming the corpus file and line."""
        rows = [(self.count + i, d.id, d.title, d.text) for i, d in enumerate(docs)]
        try:
            with self._con:
                self._con.executemany("INSERT INTO docs (row, id, title, text) VALUES (?, ?, ?, ?)", rows)
        except sqlite3.IntegrityError:
            raise self._duplicate_error(docs, source) from None
        self.count += len(rows)

    def _duplicate_error(self, docs: Sequence[Document], source: str | Path) -> PragError:
        seen: set[str] = set()
        for d in docs:
            hit = d.id in seen or self._con.execute("SELECT 1 FROM docs WHERE id = ?", (d.id,)).fetchone()
            if hit:
                where = f"{source}:{d.line}" if d.line else str(source)
                return PragError(f"{where}: duplicate document id {d.id!r}")
            seen.add(d.id)
        return PragError(f"{source}: duplicate document id")

    def close(self) -> None:
        self._con.commit()
        self._con.close()


class DocStore:
    """Read-only view of a finished store; safe to share between threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise PragError(f"doc store not found: {self.path}")
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        try:
            self._con = sqlite3.connect(uri, uri=True, check_same_thread=False)
            self.count = int(self._con.execute("SELECT COUNT(*) FROM docs").fetchone()[0])
        except sqlite3.DatabaseError as exc:
            raise PragError(f"doc store {self.path} is unreadable ({exc})") from None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.count

    def _query(self, column: str, keys: Sequence) -> dict:
        found: dict = {}
        with self._lock:
            for start in range(0, len(keys), _SQLITE_MAX_VARS):
                part = list(keys[start:start + _SQLITE_MAX_VARS])
                marks = ",".join("?" * len(part))
                for row, doc_id, title, text in self._con.execute(
                        f"SELECT row, id, title, text FROM docs WHERE {column} IN ({marks})", part):
                    doc = Document(id=doc_id, text=text, title=title)
                    found[row if column == "row" else doc_id] = (row, doc)
        return found

    def get_by_ids(self, doc_ids: Sequence[str]) -> list[Document]:
        """Documents in the order asked; an unknown id is an error naming it."""
        found = self._query("id", list(dict.fromkeys(doc_ids)))
        missing = [i for i in doc_ids if i not in found]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5])
            raise PragError(f"unknown document id(s) in {self.path.parent}: {shown}"
                            + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        return [found[i][1] for i in doc_ids]

    def rows_of(self, doc_ids: Sequence[str]) -> list[int]:
        found = self._query("id", list(dict.fromkeys(doc_ids)))
        missing = [i for i in doc_ids if i not in found]
        if missing:
            raise PragError(f"unknown document id(s) in {self.path.parent}: {', '.join(map(repr, missing[:5]))}")
        return [found[i][0] for i in doc_ids]

    def get_by_rows(self, rows: Sequence[int]) -> list[Document]:
        rows = [int(r) for r in rows]
        found = self._query("row", list(dict.fromkeys(rows)))
        missing = [r for r in rows if r not in found]
        if missing:
            raise PragError(f"row(s) out of range for the doc store of {self.count} documents: {missing[:5]}")
        return [found[r][1] for r in rows]

    def ids_of_rows(self, rows: Sequence[int]) -> list[str]:
        return [d.id for d in self.get_by_rows(rows)]

    def iter_rows(self, start: int = 0, chunk: int = 4096) -> Iterator[list[Document]]:
        """Stream documents in row order, ``chunk`` at a time (used to embed after the scan pass)."""
        row = start
        while True:
            with self._lock:
                batch = self._con.execute(
                    "SELECT id, title, text FROM docs WHERE row >= ? ORDER BY row LIMIT ?", (row, chunk)).fetchall()
            if not batch:
                return
            yield [Document(id=i, text=x, title=t) for i, t, x in batch]
            row += len(batch)

    def close(self) -> None:
        with self._lock:
            self._con.close()


def write_docstore(path: str | Path, docs: Iterable[Document], source: str | Path, chunk: int = 4096) -> int:
    """Store ``docs`` in order; returns the count. Memory stays at one chunk."""
    writer = DocStoreWriter(path)
    try:
        buf: list[Document] = []
        for doc in docs:
            buf.append(doc)
            if len(buf) >= chunk:
                writer.add(buf, source)
                buf = []
        if buf:
            writer.add(buf, source)
    finally:
        writer.close()
    return writer.count
