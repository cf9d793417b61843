"""Dataset loaders on small hand-written files in each public format, plus the real NQ/PopQA files."""

from __future__ import annotations

import gzip
import json

import pytest

from engine.eval.datasets import dataset_names, load_dataset
from prag.errors import PragError
from tests.conftest import shared_data_file


def _write(path, obj) -> str:
    path.write_text(json.dumps(obj))
    return str(path)


def test_2wikimultihopqa_uses_answer_id_aliases(tmp_path):
    dev = [
        {"_id": "a1", "type": "compositional", "question": "Who is the father of X?", "answer": "John Smith",
         "answer_id": "Q1", "context": [["X", ["X is a person."]]], "supporting_facts": [["X", 0]]},
        {"_id": "a2", "type": "comparison", "question": "Are A and B both films?", "answer": "yes",
         "answer_id": "", "context": [], "supporting_facts": []},
        {"_id": "a3", "type": "inference", "question": "Who?", "answer": "Ann", "answer_id": "Q404"},
    ]
    _write(tmp_path / "dev.json", dev)
    (tmp_path / "id_aliases.json").write_text(
        json.dumps({"Q_id": "Q1", "aliases": ["John Smith", "J. Smith"], "demonyms": []}) + "\n")
    rows = load_dataset("2wikimultihopqa", tmp_path)  # the folder works as well as dev.json
    assert rows == [
        {"id": "a1", "question": "Who is the father of X?", "answers": ["John Smith", "J. Smith"],
         "type": "compositional"},
        {"id": "a2", "question": "Are A and B both films?", "answers": ["yes"], "type": "comparison"},
        {"id": "a3", "question": "Who?", "answers": ["Ann"], "type": "inference"},  # unknown Q id: answer text
    ]
    assert load_dataset("2wiki", tmp_path / "dev.json", limit=1)[0]["id"] == "a1"


def test_hotpotqa_distractor_subtype(tmp_path):
    data = [{"_id": "h1", "answer": "Paris", "question": "Capital of France?", "type": "bridge", "level": "easy",
             "supporting_facts": [["France", 0]], "context": [["France", ["France's capital is Paris."]]]},
            {"_id": "h2", "answer": "no", "question": "Same country?", "type": "comparison", "level": "hard",
             "supporting_facts": [], "context": []}]
    rows = load_dataset("hotpotqa", _write(tmp_path / "hotpot_dev_distractor_v1.json", data))
    assert [(r["id"], r["answers"], r["type"]) for r in rows] == [("h1", ["Paris"], "bridge"),
                                                                  ("h2", ["no"], "comparison")]


def test_popqa_tsv_and_json(tmp_path):
    tsv = tmp_path / "popQA.tsv"
    tsv.write_text("id\tsubj\tprop\tobj\to_aliases\tquestion\n"
                   "7\tGeorge Rankin\toccupation\tpolitician\t[\"political leader\", \"pol\"]\t"
                   "What is George Rankin's occupation?\n"
                   "8\tX\tgenre\tjazz\t[]\tWhat genre is X?\n")
    rows = load_dataset("popqa", tsv)
    assert rows[0] == {"id": "7", "question": "What is George Rankin's occupation?",
                       "answers": ["politician", "political leader", "pol"], "type": "occupation"}
    assert rows[1]["answers"] == ["jazz"] and rows[1]["type"] == "genre"
    js = [{"id": 1, "question": "Q1?", "possible_answers": "[\"a\", \"b\"]"},
          {"id": 2, "question": "Q2?", "possible_answers": ["c"]}]
    rows = load_dataset("popqa", _write(tmp_path / "popqa.json", js))
    assert [r["answers"] for r in rows] == [["a", "b"], ["c"]]


def test_complexwebquestions_answers_with_aliases(tmp_path):
    data = [{"ID": "WebQTrn-1", "question": "What country borders X?", "compositionality_type": "conjunction",
             "answers": [{"answer_id": "m.1", "answer": "France", "aliases": ["French Republic"]},
                         {"answer_id": "m.2", "answer": "Spain", "aliases": []}]}]
    rows = load_dataset("complexwebquestions", _write(tmp_path / "ComplexWebQuestions_dev.json", data))
    assert rows == [{"id": "WebQTrn-1", "question": "What country borders X?",
                     "answers": ["France", "French Republic", "Spain"], "type": "conjunction"}]
    assert load_dataset("cwq", tmp_path)[0]["id"] == "WebQTrn-1"


def test_nq_open_jsonl_plain_and_gz(tmp_path):
    lines = [{"question": "who wrote hamlet", "answer": ["William Shakespeare", "Shakespeare"]},
             {"question": "when did ww2 end", "answers": ["1945"], "id": "x"}]
    p = tmp_path / "nq.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    rows = load_dataset("nq", p)
    assert rows == [{"id": "nq-0", "question": "who wrote hamlet", "answers": ["William Shakespeare", "Shakespeare"]},
                    {"id": "x", "question": "when did ww2 end", "answers": ["1945"]}]
    gz = tmp_path / "nq.jsonl.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write(p.read_text())
    assert load_dataset("nq-open", gz) == rows


def test_generic_json_and_jsonl(tmp_path):
    rows = load_dataset("generic", _write(tmp_path / "q.json", [
        {"question": "Q0?", "answer": "A"}, {"id": "k", "question": "Q1?", "answers": ["B", "b2"], "type": "t"}]))
    assert rows == [{"id": "0", "question": "Q0?", "answers": ["A"]},
                    {"id": "k", "question": "Q1?", "answers": ["B", "b2"], "type": "t"}]
    p = tmp_path / "q.jsonl"
    p.write_text('{"id": "a", "question": "Q?", "answer": ["x", "y"]}\n\n{"id": "b", "question": "", "answer": "z"}\n')
    rows = load_dataset("generic", p)
    assert [r["answers"] for r in rows] == [["x", "y"], ["z"]]
    assert rows[1]["question"] == ""  # kept: the engine rejects it per question and the run goes on


def test_bad_input_errors_name_the_problem(tmp_path):
    with pytest.raises(PragError) as exc:
        load_dataset("squad", tmp_path / "x.json")
    for name in dataset_names():
        assert name in str(exc.value)
    with pytest.raises(PragError, match="not found"):
        load_dataset("generic", tmp_path / "missing.json")
    p = tmp_path / "bad.jsonl"
    p.write_text('{"question": "Q?", "answer": "a"}\n{"question": "Q2?"}\n')
    with pytest.raises(PragError, match=r"bad.jsonl:2: missing field 'answer'"):
        load_dataset("generic", p)
    p.write_text('{"question": "Q?", "answer": []}\n')
    with pytest.raises(PragError, match=r"bad.jsonl:1: answers must be a non-empty list"):
        load_dataset("generic", p)
    p.write_text('{"id": 1, "question": "Q?", "answer": "a"}\n{"id": 1, "question": "Q?", "answer": "a"}\n')
    with pytest.raises(PragError, match="duplicate question id '1'"):
        load_dataset("generic", p)
    p.write_text('{"question": "Q?", "answer": "a"}\nnot json\n')
    with pytest.raises(PragError, match=r"bad.jsonl:2: malformed JSON"):
        load_dataset("generic", p)
    with pytest.raises(PragError, match="--limit must be >= 0"):
        load_dataset("generic", tmp_path / "q.json", limit=-1)


def test_real_nq_open_oracle_file():
    path = shared_data_file("nq_open_oracle.jsonl.gz")
    rows = load_dataset("nq", path)
    assert len(rows) == 2655
    assert rows[0]["question"] == "who got the first nobel prize in physics"
    assert "Wilhelm Conrad Röntgen" in rows[0]["answers"]
    assert all(r["answers"] and r["question"] for r in rows)
    assert len({r["id"] for r in rows}) == 2655


def test_real_popqa_file():
    path = shared_data_file("popqa_1000.json")
    rows = load_dataset("popqa", path)
    assert len(rows) == 1000
    assert rows[0] == {"id": "0", "question": "What is George Rankin's occupation?",
                       "answers": ["politician", "political leader", "political figure", "polit.", "pol"],
                       "type": "occupation"}  # PopQA's relation, so results.json's by_type is filled
    assert {r["type"] for r in rows} == {"occupation", "place of birth"}
    assert load_dataset("popqa", path, limit=10)[-1]["id"] == rows[9]["id"]
