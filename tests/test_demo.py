"""The demo pipeline at reduced size, with every real component (fixture model, pre-training,
FAISS index, rule augmenter, batched trainer + store, vLLM engine, eval harness).

It needs its own vLLM engine (the demo pre-trains its own model, unlike the session ``shared_llm``),
so the whole pipeline runs once in a module fixture and the assertions share it.
"""

from __future__ import annotations

import json

import pytest

from demo.data.generate import DEMO_CORPUS, DEMO_QUESTIONS, PRETRAIN, generate
from demo.recipe import MODES, RESULT_KEYS, reduced_config, run_demo, select_data


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo-output"
    cfg = reduced_config()
    results = run_demo(out, cfg)
    return out, cfg, results


def test_bundled_data_is_generated_and_fictional():
    """The committed files are exactly what the seeded generator writes, and the demo's people never
    appear in the pre-training data (pre-training teaches the format, not the demo's facts)."""
    corpus, questions, pretrain = generate()
    read = lambda p: [json.loads(line) for line in p.read_text().splitlines()]
    assert read(DEMO_CORPUS) == corpus
    assert read(DEMO_QUESTIONS) == questions
    assert read(PRETRAIN) == pretrain
    assert 30 <= len(corpus) <= 100
    demo_names = {d["title"] for d in corpus}
    pre_text = " ".join(r["text"] for r in pretrain)
    assert not [n for n in demo_names if n in pre_text]
    by_id = {d["id"]: d["text"] for d in corpus}
    for q in questions:  # every answer is stated in its document
        assert q["answer"] in by_id[q["doc_id"]], q


def test_select_data_reduced():
    docs, qs = select_data(reduced_config())
    assert len(docs) == 20 and len(qs) == 60
    assert all(set(q) >= {"id", "question", "answer"} for q in qs)


def test_demo_artifacts_and_results_shape(demo_run):
    out, cfg, results = demo_run
    for name in ("model/config.json", "model/pretrain.json", "corpus.jsonl", "questions.jsonl",
                 "index/manifest.json", "store", "eval/predictions.jsonl", "eval/results.md", "results.json"):
        assert (out / name).exists(), name
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == results
    assert set(on_disk) == set(MODES)
    n_questions = sum(1 for _ in open(out / "questions.jsonl"))
    for mode, r in on_disk.items():
        assert set(r) == set(RESULT_KEYS), mode
        assert r["n"] == n_questions
        assert 0.0 <= r["em"] <= r["f1"] + 1e-9 <= 1.0 + 1e-9
        assert r["questions_per_s"] > 0
        assert isinstance(r["by_type"], dict) and r["by_type"]
    preds = [json.loads(line) for line in open(out / "eval/predictions.jsonl")]
    assert len(preds) == n_questions * len(MODES)


def test_knowledge_travels(demo_run):
    """The model cannot know the invented facts: prag beating none can only come from the adapters."""
    _, _, results = demo_run
    assert results["prag"]["em"] - results["none"]["em"] >= 0.3, results


def test_rerun_resumes(demo_run, capsys):
    out, cfg, results = demo_run
    again = run_demo(out, cfg)
    printed = capsys.readouterr().out
    for stage in ("fixture", "pretrain", "data", "index", "augment", "encode"):
        assert f"[{stage}] skip" in printed, stage
    assert again == results
