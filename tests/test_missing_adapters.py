"""``--on-missing-adapter``: what a retrieved document without an adapter does, on the real engine."""

from __future__ import annotations

import json

import pytest

from prag.errors import PragError

MISSING = ("doc1", "doc5")


def _text(i: int) -> str:
    return f"Document {i}: the river Varn{i} flows north past the mill of Olm{i}, founded in {1850 + i}."


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, shared_llm):
    from engine.engine import Engine, EngineConfig
    from tests.helpers.random_store import build_random_store
    from retrieval.index import build_index

    root = tmp_path_factory.mktemp("missing")
    ids = [f"doc{i}" for i in range(8)]
    store = build_random_store(root / "store", tiny_model_dir, [d for d in ids if d not in MISSING], seed=3)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d, "text": _text(i)}) + "\n" for i, d in enumerate(ids)))
    build_index(corpus, root / "index", progress=False)
    engine = Engine(tiny_model_dir, index=root / "index", store=store, llm=shared_llm, config=EngineConfig())
    yield {"engine": engine, "root": root, "store": store}
    engine.close()


def _with_policy(engine, policy: str):
    engine.config.on_missing_adapter = policy
    return engine


def test_skip_doc_merges_only_the_documents_that_have_adapters(setup):
    engine = _with_policy(setup["engine"], "skip-doc")
    try:
        got = engine.generate(["Where does the river flow?"] * 2, mode="prag",
                              doc_ids=[["doc0", "doc1", "doc2"], ["doc1", "doc5"]])
        engine.config.on_missing_adapter = "error"
        want = engine.generate(["Where does the river flow?"], mode="prag", doc_ids=[["doc0", "doc2"]])[0]
        none = engine.generate(["Where does the river flow?"], mode="none")[0]
        failed = engine.generate(["Where does the river flow?"], mode="prag", doc_ids=[["doc0", "doc1"]])[0]
    finally:
        engine.config.on_missing_adapter = "error"
    assert got[0].error is None and got[0].output_token_ids == want.output_token_ids
    assert (got[0].missing_doc_ids, got[0].on_missing_adapter) == (["doc1"], "skip-doc")
    assert got[0].doc_ids == ["doc0", "doc1", "doc2"] and got[0].lora_name == want.lora_name
    # no document has an adapter: the base model answers, and the answer says why
    assert got[1].error is None and got[1].lora_name is None and got[1].output_token_ids == none.output_token_ids
    assert got[1].missing_doc_ids == ["doc1", "doc5"]
    # the default fails that question, naming the document
    assert failed.error is not None and "doc1" in failed.error


def test_fallback_rag_puts_the_adapterless_documents_in_the_prompt(setup):
    engine = _with_policy(setup["engine"], "fallback-rag")
    try:
        got = engine.generate(["Where does the river flow?"], mode="prag", doc_ids=[["doc0", "doc1", "doc2"]])[0]
        skip = _with_policy(engine, "skip-doc").generate(["Where does the river flow?"], mode="prag",
                                                         doc_ids=[["doc0", "doc1", "doc2"]])[0]
    finally:
        engine.config.on_missing_adapter = "error"
    assert got.error is None and got.on_missing_adapter == "fallback-rag" and got.missing_doc_ids == ["doc1"]
    assert _text(1) in got.prompt and "Passage 1:" in got.prompt and "Passage 2:" not in got.prompt
    assert _text(0) not in got.prompt and got.lora_name == skip.lora_name  # the adapter of doc0 + doc2
    assert "Passage" not in skip.prompt and got.output_token_ids != skip.output_token_ids


def test_eval_fails_before_generating_by_default_and_counts_what_the_policies_touched(setup, tmp_path):
    from engine.eval.harness import EvalConfig, evaluate

    engine = setup["engine"]
    data = tmp_path / "q.jsonl"  # each question is its document's text: dense top-1 retrieves it
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": _text(i), "answer": "x"}) + "\n"
                            for i in range(6)))
    engine.config.top_k = 1
    try:
        cfg = EvalConfig(dataset="generic", data=str(data), out=str(tmp_path / "err"), modes=["prag"],
                         index=str(setup["root"] / "index"), store=str(setup["root"] / "store"), progress=False)
        with pytest.raises(PragError) as exc:
            evaluate(cfg, engine=engine)
        msg = str(exc.value)
        assert msg.startswith("2 of the 6 documents retrieved for 2 question(s) have no adapter")
        assert "doc1, doc5" in msg and "prag select --dataset generic" in msg and "--append" in msg
        assert not (tmp_path / "err" / "predictions.jsonl").exists() or \
            (tmp_path / "err" / "predictions.jsonl").read_text() == ""
        for policy in ("skip-doc", "fallback-rag"):
            engine.config.on_missing_adapter = policy
            res = evaluate(EvalConfig(dataset="generic", data=str(data), out=str(tmp_path / policy), modes=["prag"],
                                      index=cfg.index, store=cfg.store, progress=False), engine=engine)
            assert res["prag"]["n"] == 6 and res["prag"]["errors"] == 0
            assert res["prag"]["missing_adapter"] == {"policy": policy, "questions": 2, "documents": 2}
            recs = [json.loads(x) for x in (tmp_path / policy / "predictions.jsonl").read_text().splitlines()]
            assert sorted(r["id"] for r in recs if r.get("on_missing_adapter") == policy) == ["q1", "q5"]
    finally:
        engine.config.on_missing_adapter, engine.config.top_k = "error", 3
