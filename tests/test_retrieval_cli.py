"""``prag index build`` / ``prag index search`` through the real CLI entry point (in-process)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from prag.cli import main

DOCS = [
    {"id": "p1", "title": "Paris", "text": "Paris is the capital and largest city of France."},
    {"id": "p2", "title": "Berlin", "text": "Berlin is the capital of Germany and its largest city."},
    {"id": "p3", "title": "Photosynthesis", "text": "Plants turn sunlight, water and carbon dioxide into sugar."},
    {"id": "p4", "title": "Empty", "text": ""},
    {"id": "p5", "title": "Volcano", "text": "A volcano is a rupture in the crust through which lava erupts."},
]
QUERIES = [
    {"id": "q1", "question": "what is the capital of france"},
    {"id": "q2", "question": "how do plants make sugar from sunlight"},
    {"id": "q3", "question": "where does lava come out"},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    tsv = root / "corpus.tsv.gz"  # DPR layout, gzipped
    with gzip.open(tsv, "wt", encoding="utf-8") as fh:
        fh.write("id\ttext\ttitle\n" + "".join(f"{d['id']}\t{d['text']}\t{d['title']}\n" for d in DOCS))
    queries = root / "queries.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in QUERIES))
    return {"root": root, "corpus": tsv, "queries": queries}


@pytest.fixture(scope="module")
def built(files) -> Path:
    out = files["root"] / "index"
    assert main(["index", "build", "--corpus", str(files["corpus"]), "--out", str(out), "--bm25", "--quiet"]) == 0
    return out


def test_build_prints_summary(files, capsys):
    out = files["root"] / "index-summary"
    assert main(["index", "build", "--corpus", str(files["corpus"]), "--out", str(out), "--index-type", "hnsw",
                 "--embedder", "all-MiniLM-L6-v2", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "indexed 4 passages (1 empty skipped)" in text and "[hnsw, sentence-transformers/all-MiniLM-L6-v2" in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["count"], manifest["skipped_empty"], manifest["index_type"]) == (4, 1, "hnsw")


@pytest.mark.parametrize("method", ["dense", "bm25", "hybrid"])
def test_search_writes_jsonl(files, built, method, capsys):
    out = files["root"] / f"results-{method}.jsonl"
    assert main(["index", "search", "--index", str(built), "--queries", str(files["queries"]), "--k", "2",
                 "--out", str(out), "--method", method]) == 0
    assert "searched 3 queries" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["q1", "q2", "q3"]
    for r in rows:
        assert set(r) == {"id", "doc_ids", "scores"} and len(r["doc_ids"]) == len(r["scores"]) <= 2
        assert r["scores"] == sorted(r["scores"], reverse=True)
    if method != "bm25":
        assert [r["doc_ids"][0] for r in rows] == ["p1", "p3", "p5"]
    else:
        assert rows[0]["doc_ids"][0] == "p1"


def test_search_k_larger_than_corpus(files, built):
    out = files["root"] / "all.jsonl"
    assert main(["index", "search", "--index", str(built), "--queries", str(files["queries"]), "--k", "100",
                 "--out", str(out)]) == 0
    for line in out.read_text().splitlines():
        assert sorted(json.loads(line)["doc_ids"]) == ["p1", "p2", "p3", "p5"]


def _run_fails(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_cli_bad_input(files, built, capsys, tmp_path):
    q = str(files["queries"])
    err = _run_fails(["index", "search", "--index", str(built), "--queries", q, "--k", "0", "--out",
                      str(tmp_path / "o.jsonl")], capsys)
    assert "k must be a positive integer, got k=0" in err
    err = _run_fails(["index", "search", "--index", str(built), "--queries", q, "--k", "1", "--out",
                      str(tmp_path / "o.jsonl"), "--embedder", "sentence-transformers/all-mpnet-base-v2"], capsys)
    assert "was built with embedder 'sentence-transformers/all-MiniLM-L6-v2'" in err
    err = _run_fails(["index", "search", "--index", str(tmp_path / "nothing"), "--queries", q, "--k", "1", "--out",
                      str(tmp_path / "o.jsonl")], capsys)
    assert "index directory not found" in err
    bad_q = tmp_path / "bad.jsonl"
    bad_q.write_text('{"id": "a", "question": "ok"}\n{"id": "b"}\n')
    err = _run_fails(["index", "search", "--index", str(built), "--queries", str(bad_q), "--k", "1", "--out",
                      str(tmp_path / "o.jsonl")], capsys)
    assert "bad.jsonl:2: missing field 'question'" in err
    assert not (tmp_path / "o.jsonl").exists()  # nothing half-written

    err = _run_fails(["index", "build", "--corpus", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "i")], capsys)
    assert "corpus file not found" in err and "none.jsonl" in err
    bad = tmp_path / "bad.tsv"
    bad.write_text("id\ttext\ttitle\n1\tfine\tT\n2\tbroken\n")
    err = _run_fails(["index", "build", "--corpus", str(bad), "--out", str(tmp_path / "i")], capsys)
    assert "bad.tsv:3: expected 3 tab-separated fields" in err
    assert not (tmp_path / "i").exists()


def test_help_lists_the_contract(capsys):
    with pytest.raises(SystemExit):
        main(["index", "build", "--help"])
    text = capsys.readouterr().out
    for flag in ("--corpus", "--embedder", "--index-type", "--out", "{flat,hnsw,ivf,ivfpq}", "--bm25", "--nlist",
                 "--pq-m", "--pq-bits", "--ray-address", "--ray-embed-actors", "--ray-gpus-per-actor"):
        assert flag in text
    with pytest.raises(SystemExit):
        main(["index", "search", "--help"])
    text = capsys.readouterr().out
    for flag in ("--index", "--queries", "--k", "--out", "--method"):
        assert flag in text


def test_search_reads_a_qa_dataset_file_like_eval(files, built, capsys):
    """A PopQA-style JSON list was rejected as 'malformed JSON' on line 1."""
    data = files["root"] / "popqa.json"
    data.write_text(json.dumps([{"id": q["id"], "question": q["question"], "possible_answers": ["x"]}
                                for q in QUERIES]))
    out = files["root"] / "from-dataset.jsonl"
    assert main(["index", "search", "--index", str(built), "--dataset", "popqa", "--data", str(data), "--limit", "2",
                 "--k", "2", "--out", str(out)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    ref = files["root"] / "results-ref.jsonl"
    assert main(["index", "search", "--index", str(built), "--queries", str(files["queries"]), "--k", "2",
                 "--out", str(ref)]) == 0
    assert got == [json.loads(line) for line in ref.read_text().splitlines()][:2]
    capsys.readouterr()
    # the same list given as --queries: the error says which format was expected and how to pass a dataset
    assert main(["index", "search", "--index", str(built), "--queries", str(data), "--k", "2",
                 "--out", str(files["root"] / "x.jsonl")]) != 0
    err = capsys.readouterr().err
    assert "expects JSONL" in err and "--dataset NAME --data" in err and str(data) in err


@pytest.mark.parametrize("method", ["dense", "bm25"])
def test_select_writes_the_union_of_the_top_k_as_a_corpus(files, built, method, capsys):
    data = files["root"] / f"select-{method}.jsonl"
    data.write_text("".join(json.dumps({**q, "answer": "x"}) + "\n" for q in QUERIES))
    out = files["root"] / f"selection-{method}"
    assert main(["select", "--dataset", "generic", "--data", str(data), "--index", str(built), "--top-k", "2",
                 "--limit", "2", "--retrieval-method", method, "--out", str(out)]) == 0
    assert "for 2 question(s)" in capsys.readouterr().out
    ref = files["root"] / f"select-ref-{method}.jsonl"
    assert main(["index", "search", "--index", str(built), "--queries", str(files["queries"]), "--k", "2",
                 "--method", method, "--out", str(ref)]) == 0
    expected = [json.loads(line) for line in ref.read_text().splitlines()][:2]
    assert [json.loads(line) for line in (out / "hits.jsonl").read_text().splitlines()] == expected
    union = list(dict.fromkeys(d for h in expected for d in h["doc_ids"]))
    corpus = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    by_id = {d["id"]: d for d in DOCS}
    assert [d["id"] for d in corpus] == union and len(union) >= 3
    assert all(d["text"] == by_id[d["id"]]["text"] and d["title"] == by_id[d["id"]]["title"] for d in corpus)
    # a second run refuses to replace it without --overwrite; with it, same files
    capsys.readouterr()
    args = ["select", "--dataset", "generic", "--data", str(data), "--index", str(built), "--top-k", "2",
            "--limit", "2", "--retrieval-method", method, "--out", str(out)]
    assert main(args) == 2 and "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()] == corpus
