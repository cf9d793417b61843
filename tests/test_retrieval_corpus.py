"""Corpus readers (JSONL, DPR TSV, gz) and their bad-input errors. No model needed."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from prag.errors import PragError
from retrieval.corpus import CorpusStats, Document, iter_corpus

DOCS = [
    {"id": "1", "title": "Aaron", "text": "Aaron is a prophet, high priest, and the brother of Moses."},
    {"id": "2", "title": "Zurich", "text": "Zurich is the largest city in Switzerland."},
    {"id": "3", "title": "Tabs", "text": 'A "quoted" text, with commas.'},
]


def write_jsonl(path: Path, records: list[dict], gz: bool = False) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def write_tsv(path: Path, records: list[dict], gz: bool = False) -> Path:
    def q(s: str) -> str:  # DPR's psgs_w100.tsv quotes fields csv-style
        return '"' + s.replace('"', '""') + '"' if any(c in s for c in '"\t\n') else s

    data = "id\ttext\ttitle\n" + "".join(f"{r['id']}\t{q(r['text'])}\t{q(r['title'])}\n" for r in records)
    opener = gzip.open(path, "wt", encoding="utf-8") if gz else open(path, "w", encoding="utf-8")
    with opener as fh:
        fh.write(data)
    return path


EXPECTED = [Document(id=r["id"], text=r["text"], title=r["title"]) for r in DOCS]


@pytest.mark.parametrize("gz", [False, True])
def test_jsonl_reader(tmp_path, gz):
    path = write_jsonl(tmp_path / ("c.jsonl.gz" if gz else "c.jsonl"), DOCS, gz)
    docs = list(iter_corpus(path))
    assert docs == EXPECTED
    assert [d.line for d in docs] == [1, 2, 3]


def test_jsonl_title_optional_and_int_ids(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": 7, "text": "no title here"}])
    assert list(iter_corpus(path)) == [Document(id="7", text="no title here", title="")]


@pytest.mark.parametrize("gz", [False, True])
def test_dpr_tsv_reader(tmp_path, gz):
    path = write_tsv(tmp_path / ("psgs.tsv.gz" if gz else "psgs.tsv"), DOCS, gz)
    docs = list(iter_corpus(path))
    assert docs == EXPECTED
    assert docs[2].text == 'A "quoted" text, with commas.'


def test_reader_streams(tmp_path):
    """The reader is a generator: it yields the first document before reading the rest."""
    path = write_jsonl(tmp_path / "c.jsonl", DOCS + [{"id": "x"}])  # line 4 is bad
    it = iter_corpus(path)
    assert next(it).id == "1"
    with pytest.raises(PragError, match=r"c\.jsonl:4: missing field 'text'"):
        list(it)


def test_missing_corpus(tmp_path):
    with pytest.raises(PragError, match=r"corpus file not found: .*nope\.jsonl"):
        list(iter_corpus(tmp_path / "nope.jsonl"))


def test_unreadable_corpus(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(PragError, match=r"corpus file is a directory"):
        list(iter_corpus(tmp_path / "dir.jsonl"))
    bad_gz = tmp_path / "broken.jsonl.gz"
    bad_gz.write_bytes(b"this is not gzip data")
    with pytest.raises(PragError, match=r"broken\.jsonl\.gz: cannot read corpus"):
        list(iter_corpus(bad_gz))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"id": "1", "text": "caf\xe9"}\n')
    with pytest.raises(PragError, match=r"latin\.jsonl:1: not UTF-8 text \(byte 0xe9"):
        list(iter_corpus(latin))


def test_unknown_format(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text("id,text\n")
    with pytest.raises(PragError, match=r"cannot tell the corpus format of .*corpus\.csv"):
        list(iter_corpus(path))


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(DOCS[0]) + "\n" + json.dumps(DOCS[1]) + "\n{not json\n")
    with pytest.raises(PragError, match=r"c\.jsonl:3: malformed JSON"):
        list(iter_corpus(path))


def test_malformed_tsv_line(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("id\ttext\ttitle\n1\tsome text\tT\n2\tonly two fields\n")
    with pytest.raises(PragError, match=r"c\.tsv:3: expected 3 tab-separated fields"):
        list(iter_corpus(path))
    nohead = tmp_path / "nohead.tsv"
    nohead.write_text("1\tsome text\tT\n")
    with pytest.raises(PragError, match=r"nohead\.tsv:1: expected a DPR header"):
        list(iter_corpus(nohead))


def test_duplicate_ids(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", DOCS + [{"id": "2", "text": "again"}])
    with pytest.raises(PragError, match=r"c\.jsonl:4: duplicate document id '2'"):
        list(iter_corpus(path))


def test_empty_texts_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [DOCS[0], {"id": "e1", "text": ""}, {"id": "e2", "text": "  \n"}, DOCS[1]])
    stats = CorpusStats()
    docs = list(iter_corpus(path, stats))
    assert [d.id for d in docs] == ["1", "2"]
    assert (stats.read, stats.skipped_empty, stats.skipped_ids) == (2, 2, ["e1", "e2"])
