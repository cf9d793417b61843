"""Rule augmenter, record format and resumable writer (no model needed; runs in seconds)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from offline_encode.augment import (RuleAugmenter, RuleAugmenterConfig, augment_corpus, iter_augmented, passage_of,
                                    record_problem)
from offline_encode.augment.rule import find_spans, known_capitals, split_sentences
from prag.errors import PragError
from retrieval.corpus import Document
from tests.conftest import shared_data_file

DOCS = [
    {"id": "p1", "title": "Mirela Dovanko",
     "text": "Mirela Dovanko was born in 1874 in the town of Esterhalm. She founded the Dovanko Glassworks in 1902. "
             "The glassworks employed 340 workers by 1910. She died on March 3, 1931."},
    {"id": "p2", "title": "Esterhalm",
     "text": "Esterhalm is the capital of Varnesia. The town was founded in 1630 by Oskar Pell. "
             "It has a population of 12,000."},
    {"id": "p3", "title": "Tovrik Bridge",
     "text": "The Tovrik Bridge was completed in 1921. It spans the river Ulna near Kessin. "
             "The bridge is 412 metres long."},
    {"id": "p4", "title": "",
     "text": "Anselm Krovetz was a painter from Valdora. He won the Orlan Prize in 1899. "
             "His largest canvas hangs in the Museum of Tessaly."},
    {"id": "p5", "title": "", "text": "the cat sat on the mat. it was happy all day long."},
    {"id": "p6", "title": "Lake Moranne",
     "text": "Lake Moranne covers 58 square kilometres. Fishermen from Ostrava Minor settled its shore in 1407."},
]


def _write_corpus(path: Path, docs=DOCS) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return path


def _records(path: Path) -> list[dict]:
    return [rec for _, rec in iter_augmented(path)]


def test_rule_output_is_deterministic_and_well_formed(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus.jsonl")
    s1 = augment_corpus(corpus, tmp_path / "a.jsonl", RuleAugmenter(), progress=False)
    s2 = augment_corpus(corpus, tmp_path / "b.jsonl", RuleAugmenter(), progress=False)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert (s1.done, s1.failed, s1.failure_reasons) == (5, 1, {"no_extractable_facts": 1})
    assert (s2.done, s2.failed) == (5, 1)
    recs = _records(tmp_path / "a.jsonl")
    assert [r["doc_id"] for r in recs] == [d["id"] for d in DOCS]
    for rec in recs:
        assert set(rec) >= {"doc_id", "passage", "rewrites", "qa", "augmenter", "model"}
        assert rec["augmenter"] == "rule" and rec["model"] is None
        if rec["doc_id"] == "p5":
            assert rec["qa"] == [] and rec["error"].startswith("no_extractable_facts")
            assert record_problem(rec).startswith("augmentation failed")
            continue
        assert record_problem(rec) is None
        assert len(rec["qa"]) == 3 and len(rec["rewrites"]) == 1
        for pair in rec["qa"]:
            assert pair["answer"] in rec["passage"], pair  # answers are spans of the passage
            assert pair["question"].endswith("?") and pair["full_answer"].endswith(".")
        assert len({p["question"] for p in rec["qa"]}) == 3


def test_rule_questions_on_an_encyclopedic_passage():
    rec = RuleAugmenter().augment_documents([Document(**DOCS[0])])[0]
    assert rec["qa"][0] == {"question": "When was Mirela Dovanko born?", "answer": "1874",
                            "full_answer": "Mirela Dovanko was born in 1874 in the town of Esterhalm."}
    assert {"question": "Who founded the Dovanko Glassworks in 1902?", "answer": "Mirela Dovanko",
            "full_answer": "Mirela Dovanko founded the Dovanko Glassworks in 1902."} in rec["qa"]
    cap = RuleAugmenter().augment_documents([Document(**DOCS[1])])[0]
    assert cap["qa"][0] == {"question": "What is the capital of Varnesia?", "answer": "Esterhalm",
                            "full_answer": "Esterhalm is the capital of Varnesia."}
    bio = Document("b", "Samaix Trouneand was born in 1854 in the town of Caxbury. Samaix Trouneand was a potter in "
                        "the city of Breandmoor. Samaix Trouneand established the Jadirk Brewery in 1880. "
                        "Samaix Trouneand married Jakrym Piliojam.", "Samaix Trouneand")
    qa = RuleAugmenter(RuleAugmenterConfig(n_qa=6)).augment_documents([bio])[0]["qa"]
    assert [(p["question"], p["answer"]) for p in qa] == [
        ("When was Samaix Trouneand born?", "1854"),
        ("Who was a potter in the city of Breandmoor?", "Samaix Trouneand"),
        ("In what year did Samaix Trouneand establish the Jadirk Brewery?", "1880"),
        ("Who did Samaix Trouneand marry?", "Jakrym Piliojam"),
        ("Where was Samaix Trouneand born?", "Caxbury"),
        ("In which city was Samaix Trouneand a potter?", "Breandmoor")]
    more = RuleAugmenter(RuleAugmenterConfig(n_qa=6, n_rewrites=2)).augment_documents([Document(**DOCS[0])])[0]
    answers = [p["answer"] for p in more["qa"]]
    assert len(more["rewrites"]) == 2 and more["rewrites"][0] != more["rewrites"][1]
    assert {"1874", "Mirela Dovanko", "340", "March 3, 1931", "Esterhalm"} <= set(answers)


def test_rule_rewrite_keeps_entities_and_numbers_and_differs(tmp_path):
    aug = RuleAugmenter()
    for doc in DOCS:
        doc = Document(**doc)
        rec = aug.augment_documents([doc])[0]
        rewrite = rec["rewrites"][0]
        assert " ".join(rewrite.split()) != " ".join(rec["passage"].split())
        sentences = split_sentences(rec["passage"])
        known = known_capitals(sentences)
        spans = [sp.text for s in sentences for sp in find_spans(s, known)]
        for text in spans:
            assert text in rewrite, (doc.id, text, rewrite)
        # same words up to the synonym table: no fact-bearing token (capitalised or digit) lost
        tokens = [t.strip(".,;:") for t in rec["passage"].split() if t[:1].isupper() or t[:1].isdigit()]
        for tok in tokens:
            if tok in ("She", "He", "His", "It", "The", "Her"):
                continue
            assert tok in rewrite, (doc.id, tok)


def test_passage_includes_title_only_when_the_text_lacks_it():
    assert passage_of(Document("a", "Paris is big.", "Paris")) == "Paris is big."
    assert passage_of(Document("a", "It is big.", "Paris")) == "Paris. It is big."
    assert passage_of(Document("a", "It is big.", "Paris"), "never") == "It is big."
    assert passage_of(Document("a", "Paris is big.", "Paris"), "always") == "Paris. Paris is big."
    with pytest.raises(PragError, match="include_title"):
        passage_of(Document("a", "x", "y"), "sometimes")


def test_resume_after_a_crash_gives_the_same_file(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus.jsonl")
    full = tmp_path / "full.jsonl"
    augment_corpus(corpus, full, RuleAugmenter(), progress=False)
    lines = full.read_bytes().splitlines(keepends=True)
    part = tmp_path / "part.jsonl"
    # half the records, then a torn line as a crash mid-write leaves it
    part.write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    s = augment_corpus(corpus, part, RuleAugmenter(RuleAugmenterConfig(batch_size=2)), progress=False)
    assert part.read_bytes() == full.read_bytes()
    assert (s.skipped_done, s.done + s.failed, s.truncated_bytes) == (3, 3, len(lines[3]) // 2)
    # a third run does nothing
    s = augment_corpus(corpus, part, RuleAugmenter(), progress=False)
    assert (s.skipped_done, s.done, s.failed, s.previously_failed) == (6, 0, 0, 1)
    assert part.read_bytes() == full.read_bytes()
    assert "1 earlier failure" in s.format()


def test_resume_drops_a_newline_terminated_garbage_line(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus.jsonl")
    full = tmp_path / "full.jsonl"
    augment_corpus(corpus, full, RuleAugmenter(), progress=False)
    lines = full.read_bytes().splitlines(keepends=True)
    part = tmp_path / "part.jsonl"
    part.write_bytes(b"".join(lines[:2]) + b"\0" * 40 + b"\n")  # zero-filled block after power loss
    augment_corpus(corpus, part, RuleAugmenter(), progress=False)
    assert part.read_bytes() == full.read_bytes()
    ids = [r["doc_id"] for r in _records(part)]
    assert len(ids) == len(set(ids)) == len(DOCS)


def test_limit_retry_failed_and_mixed_augmenter_errors(tmp_path):
    corpus = _write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "out.jsonl"
    s = augment_corpus(corpus, out, RuleAugmenter(), limit=2, progress=False)
    assert (s.done, len(_records(out))) == (2, 2)
    augment_corpus(corpus, out, RuleAugmenter(), progress=False)
    assert [r["doc_id"] for r in _records(out)] == [d["id"] for d in DOCS]
    s = augment_corpus(corpus, out, RuleAugmenter(), retry_failed=True, progress=False)
    assert (s.skipped_done, s.failed, s.done) == (5, 1, 0)
    assert [r["doc_id"] for r in _records(out)][-1] == "p5" and len(_records(out)) == 6

    class Other(RuleAugmenter):
        name = "other"

    with pytest.raises(PragError, match="existing records come from augmenter 'rule'"):
        augment_corpus(corpus, out, Other(), progress=False)
    with pytest.raises(PragError, match="--limit"):
        augment_corpus(corpus, out, RuleAugmenter(), limit=0, progress=False)


def test_bad_corpus_and_output_errors(tmp_path):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text(json.dumps(DOCS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(PragError, match=r"bad\.jsonl:2: malformed JSON"):
        augment_corpus(corpus, tmp_path / "o.jsonl", RuleAugmenter(), progress=False)
    with pytest.raises(PragError, match="corpus file not found"):
        augment_corpus(tmp_path / "missing.jsonl", tmp_path / "o2.jsonl", RuleAugmenter(), progress=False)
    good = _write_corpus(tmp_path / "corpus.jsonl")
    with pytest.raises(PragError, match="output is a directory"):
        augment_corpus(good, tmp_path, RuleAugmenter(), progress=False)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"id": 1}\n', encoding="utf-8")
    with pytest.raises(PragError, match="not an augmented record"):
        augment_corpus(good, foreign, RuleAugmenter(), progress=False)


def test_cli_augment(tmp_path, capsys):
    from prag.cli import main

    corpus = _write_corpus(tmp_path / "corpus.jsonl")
    out = tmp_path / "aug.jsonl"
    assert main(["augment", "--corpus", str(corpus), "--augmenter", "rule", "--out", str(out),
                 "--n-qa", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "augmented 5 document(s), 1 failed, 0 skipped" in printed and "1 x no_extractable_facts" in printed
    assert all(len(r["qa"]) == 2 for r in _records(out) if not r.get("error"))
    assert main(["augment", "--corpus", str(corpus), "--augmenter", "llm", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "--augmenter llm needs --model" in capsys.readouterr().err


def test_rule_on_real_nq_passages(tmp_path):
    """Real Wikipedia passages: nearly all get QA, answers are always passage spans."""
    path = shared_data_file("nq_open_oracle.jsonl.gz")
    docs, seen = [], set()
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            ctx = json.loads(line)["ctxs"][0]
            if ctx["text"] not in seen:
                seen.add(ctx["text"])
                docs.append(Document(f"nq{len(docs)}", ctx["text"], ctx["title"]))
            if len(docs) == 300:
                break
    recs = RuleAugmenter().augment_documents(docs)
    ok = [r for r in recs if not r.get("error")]
    assert len(ok) >= 0.95 * len(recs)
    assert all(not r.get("error", "").startswith("internal_error") for r in recs)
    for rec in ok:
        assert rec["qa"] and all(p["answer"] in rec["passage"] for p in rec["qa"])
        assert rec["rewrites"][0] != rec["passage"]


def test_ray_local_cluster_gives_the_same_records(tmp_path):
    """Batches on 2 Ray actors (local 2-CPU cluster): same records as one process, any order."""
    from offline_encode.ray_jobs import LOCAL, RayOptions

    docs = [dict(d, id=f"{d['id']}-{k}") for k in range(4) for d in DOCS]
    corpus = _write_corpus(tmp_path / "corpus.jsonl", docs)
    single = tmp_path / "single.jsonl"
    augment_corpus(corpus, single, RuleAugmenter(), progress=False)
    out = tmp_path / "ray.jsonl"
    aug = RuleAugmenter(RuleAugmenterConfig(batch_size=5))
    s = augment_corpus(corpus, out, aug, progress=False,
                       ray_opts=RayOptions(address=LOCAL, num_cpus=2, cpus_per_actor=1))
    assert (s.done, s.failed, s.workers) == (20, 4, 2)
    by_id = lambda path: sorted(_records(path), key=lambda r: r["doc_id"])  # noqa: E731
    assert by_id(out) == by_id(single)
    s = augment_corpus(corpus, out, aug, progress=False)  # resumes in-process: nothing left
    assert (s.skipped_done, s.done) == (24, 0)


def test_iter_augmented_ignores_a_torn_tail_only(tmp_path):
    path = tmp_path / "aug.jsonl"
    rec = {"doc_id": "a", "passage": "p", "rewrites": [], "qa": [], "augmenter": "rule", "model": None}
    path.write_text(json.dumps(rec) + "\n" + '{"doc_id": "b", "pass', encoding="utf-8")
    assert [r["doc_id"] for _, r in iter_augmented(path)] == ["a"]
    path.write_text('{"doc_id": "b", "pass\n' + json.dumps(rec) + "\n", encoding="utf-8")
    with pytest.raises(PragError, match=r"aug\.jsonl:1: malformed JSON"):
        list(iter_augmented(path))
    assert record_problem(rec) == "no QA pairs ('qa' missing or empty)"
    assert record_problem(dict(rec, qa=[{"question": "q", "answer": "a", "full_answer": "f"}], passage=" ")) \
        == "missing or empty 'passage'"


def test_rule_questions_never_keep_a_fronted_time_phrase_in_the_subject():
    """'In 1715, X was born in Y.' once gave 'Where was In 1715, X born?'."""
    from offline_encode.augment.rule import unfront_adverbial

    assert unfront_adverbial("In 1715, Johann Bergmann was born in Leipzig.") == \
        "Johann Bergmann was born in Leipzig in 1715."
    assert unfront_adverbial("On May 3, 1901, she died.") == "She died on May 3, 1901."
    assert unfront_adverbial("Johann Bergmann was born in Leipzig.") == "Johann Bergmann was born in Leipzig."
    doc = Document("b", "In 1715, Johann Bergmann was born in Leipzig. During the war, he died in Paris in 1780.",
                   "Johann Bergmann")
    rec = RuleAugmenter(RuleAugmenterConfig(n_qa=7)).augment_one(doc)
    qa = {q["question"]: q["answer"] for q in rec["qa"]}
    assert qa["When was Johann Bergmann born?"] == "1715"
    assert qa["Where was Johann Bergmann born?"] == "Leipzig"
    assert qa["When did Johann Bergmann die?"] == "1780"
    for q in qa:  # no question carries a fronted phrase or a comma-spliced clause
        assert not any(f" {w} " in q for w in ("In", "On", "During")) and ", " not in q, q
