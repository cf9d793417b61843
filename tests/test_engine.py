"""The engine on the real vLLM (session ``shared_llm``): equivalence with the paper's PEFT inference,
bad input, truncation and adapter reuse."""

from __future__ import annotations

import json
import shutil

import pytest

from prag.errors import PragError

N_Q = 8
QUESTIONS = [
    "Where does the river Varn flow?", "Who founded the school of landscape art?",
    "When was the bridge over the Olm completed?", "What is the capital of the province of Hest?",
    "Who succeeded the mayor of Brenna?", "Which company did the two brothers found?",
    "In which year did the painter move to the coast?", "What did the engineer invent?",
]


def _doc_text(i: int) -> str:
    return (f"Document {i}: the river Varn{i} flows north through the valley of Olm{i}, and in {1850 + i} "
            f"the painter Ilse{i} founded a school there.")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, shared_llm):
    from engine.engine import Engine, EngineConfig
    from tests.helpers.random_store import build_random_store
    from retrieval.index import build_index

    root = tmp_path_factory.mktemp("engine")
    doc_ids = [f"doc{i}" for i in range(3 * N_Q + 3)]
    store = build_random_store(root / "store", tiny_model_dir, doc_ids, seed=7)
    docs = {d: _doc_text(i) for i, d in enumerate(doc_ids)}
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d, "text": t}) + "\n" for d, t in docs.items()))
    build_index(corpus, root / "index", progress=False)
    engine = Engine(tiny_model_dir, index=root / "index", store=store, llm=shared_llm,
                    config=EngineConfig(prepare_threads=4))
    # question i gets its own 3 documents, in a scrambled order for odd i
    sets = [[f"doc{3 * i}", f"doc{3 * i + 1}", f"doc{3 * i + 2}"] for i in range(N_Q)]
    sets = [s[::-1] if i % 2 else s for i, s in enumerate(sets)]
    yield {"engine": engine, "store": store, "docs": docs, "sets": sets, "root": root}
    engine.close()


@pytest.fixture(scope="module")
def reference(setup, tiny_model_dir):
    from tests.helpers.peft_reference import PeftReference

    ref = PeftReference(tiny_model_dir, setup["store"])
    yield ref
    ref.close()


@pytest.mark.parametrize("mode", ["prag", "combine"])
def test_token_identical_to_peft_cat_merge_reference(setup, reference, mode):
    """The required equivalence: engine output == PeftModel + add_weighted_adapter('cat') + HF generate."""
    engine, sets = setup["engine"], setup["sets"]
    answers = engine.generate(QUESTIONS, mode=mode, doc_ids=sets)
    base = engine.generate(QUESTIONS, mode="none" if mode == "prag" else "rag", doc_ids=sets)
    assert len({tuple(sorted(s)) for s in sets}) == N_Q
    changed = 0
    for a, b, docs in zip(answers, base, sets):
        assert a.error is None, a.error
        assert a.doc_ids == docs and len(a.output_token_ids) > 0
        if mode == "combine":
            assert "Passage 3:" in a.prompt and setup["docs"][docs[0]] in a.prompt
        else:
            assert "Passage" not in a.prompt
        # the reference starts from the exact ids the engine fed to vLLM; the engine merges in
        # sorted doc-id order (its cache key), so the reference loads the adapters in that order
        want = reference.generate(a.prompt_token_ids, sorted(docs), max_new_tokens=20)
        assert a.output_token_ids == want, f"{mode}: {a.question!r} differs from the PEFT reference"
        assert b.prompt_token_ids == a.prompt_token_ids
        changed += a.output_token_ids != b.output_token_ids
    # the adapters must act, or this test could not fail
    assert changed >= N_Q - 2, f"adapters changed only {changed}/{N_Q} outputs"


def test_base_mode_matches_hf_generate(setup, reference):
    engine = setup["engine"]
    answers = engine.generate(QUESTIONS[:3], mode="none")
    for a in answers:
        assert a.doc_ids == [] and a.lora_name is None
        assert a.output_token_ids == reference.generate_base(a.prompt_token_ids, 20)


def test_repeated_document_sets_reuse_the_merged_adapter(setup):
    engine, sets = setup["engine"], setup["sets"]
    first = engine.generate(QUESTIONS[:2], mode="prag", doc_ids=sets[:2])
    # same sets, another order, in one batch twice: no new adapter, same lora names
    again = engine.generate(QUESTIONS[:2] * 2, mode="prag", doc_ids=[s[::-1] for s in sets[:2]] * 2)
    assert engine.last_stats.adapters_built == 0 and engine.last_stats.adapters_reused == 2
    assert [a.lora_name for a in again] == [a.lora_name for a in first] * 2
    assert [a.output_token_ids for a in again[:2]] == [a.output_token_ids for a in first]
    assert first[0].lora_name != first[1].lora_name


def test_bad_input_per_question_and_per_call(setup):
    engine, sets = setup["engine"], setup["sets"]
    qs = ["Who founded the school?", "", "   ", "Where does the river flow?"]
    ids = [sets[0], sets[1], sets[2], [sets[3][0], "no-such-doc", sets[3][1]]]
    for mode in ("prag", "combine"):
        out = engine.generate(qs, mode=mode, doc_ids=ids)
        assert out[0].error is None and out[0].output_token_ids
        assert out[1].error == "empty question" and out[2].error == "empty question"
        assert "no-such-doc" in out[3].error and out[3].output_token_ids == []
    with pytest.raises(PragError, match="valid modes: none, rag, prag, combine"):
        engine.generate(qs, mode="icl")
    with pytest.raises(PragError, match="top_k must be a positive integer"):
        engine.generate(qs[:1], mode="prag", top_k=0, doc_ids=ids[:1])
    with pytest.raises(PragError, match="largest max_lora_rank 512"):
        engine.generate(qs[:1], mode="prag", top_k=300, doc_ids=ids[:1])
    with pytest.raises(PragError, match="exceeds the engine's max_lora_rank 8"):
        engine.generate(qs[:1], mode="prag", top_k=5, doc_ids=ids[:1])
    from engine.engine import Engine

    no_index = Engine(engine.model, store=setup["store"], llm=engine.llm, tokenizer=engine.tokenizer)
    with pytest.raises(PragError, match="needs an index"):
        no_index.generate(qs[:1], mode="rag")
    no_index.close()
    with pytest.raises(PragError, match="doc_ids has 1 entries for 4 questions"):
        engine.generate(qs, mode="prag", doc_ids=ids[:1])
    too_many = engine.generate(qs[:1], mode="prag", doc_ids=[sets[0] + sets[1]])  # 6 docs x r2 > 8
    assert "exceed the engine's max_lora_rank 8" in too_many[0].error


def test_long_passages_are_truncated_and_recorded(setup):
    from engine.engine import Engine, EngineConfig

    long_docs = dict(setup["docs"])
    long_docs["doc0"] = " ".join(["the river Varn flows north through the old valley"] * 150)  # ~1500 tokens
    eng = Engine(setup["engine"].model, store=setup["store"], llm=setup["engine"].llm, documents=long_docs,
                 tokenizer=setup["engine"].tokenizer)
    try:
        out = eng.generate([QUESTIONS[0]], mode="combine", doc_ids=[["doc0", "doc1", "doc2"]])[0]
    finally:
        eng.close()
    assert out.error is None and out.truncated
    t = out.truncation
    assert len(out.prompt_token_ids) <= t["budget"] == eng.max_model_len - 20
    assert t["passage_tokens_after"][0] < t["passage_tokens_before"][0]
    assert t["passage_tokens_after"][1:] == t["passage_tokens_before"][1:]  # short passages kept whole
    assert out.prompt.rstrip().endswith(f"Question: {QUESTIONS[0]}<|end|>\n<|assistant|>\nThe answer is")
    assert long_docs["doc1"] in out.prompt and out.output_token_ids


def test_store_for_another_base_model_is_refused(setup, tmp_path):
    from engine.engine import Engine
    from prag.store import StoreMismatchError

    other = tmp_path / "other-model"
    shutil.copytree(setup["engine"].model, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5 if cfg.get("rms_norm_eps") != 1e-5 else 1e-6
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StoreMismatchError, match="different model"):
        Engine(other, store=setup["store"], llm=setup["engine"].llm)


def test_evaluate_writes_results_and_resumes(setup, tmp_path):
    from engine.eval.harness import PREDICTIONS, EvalConfig, evaluate
    from engine.eval.scoring import extract_answer, score

    engine = setup["engine"]
    data = tmp_path / "q.jsonl"
    rows = [{"id": f"q{i}", "question": q, "answer": ["Varn", f"Olm{i}"], "type": "even" if i % 2 == 0 else "odd"}
            for i, q in enumerate(QUESTIONS[:4])]
    rows.append({"id": "q-empty", "question": "", "answer": "x", "type": "odd"})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"

    try:
        cfg = EvalConfig(dataset="generic", data=str(data), out=str(out), modes=["none", "prag"],
                         index=str(setup["root"] / "index"), store=str(setup["root"] / "store"), batch_size=2,
                         progress=False)
        res = evaluate(cfg, engine=engine)
        lines = (out / PREDICTIONS).read_text().splitlines()
        assert len(lines) == 10
        recs = [json.loads(x) for x in lines]
        first = recs[0]
        for key in ("id", "question", "mode", "doc_ids", "scores", "prompt", "prompt_token_ids", "output_token_ids",
                    "text", "prediction", "em", "f1"):
            assert key in first
        assert [r["error"] for r in recs if r["id"] == "q-empty"] == ["empty question"] * 2
        for r in recs:
            if r["mode"] == "prag" and r["id"] != "q-empty":  # real dense retrieval: top-3, best first
                assert len(r["doc_ids"]) == 3 and set(r["doc_ids"]) <= set(setup["docs"])
                assert r["scores"] == sorted(r["scores"], reverse=True) and r["lora_name"]
                assert r["prompt"].endswith("<|assistant|>\nThe answer is") and "Passage" not in r["prompt"]
            if r["mode"] == "none":
                assert r["doc_ids"] == [] and "lora_name" not in r
            if "error" not in r:
                assert r["prediction"] == extract_answer(r["text"])
                assert (r["em"], r["f1"]) == (score(r["prediction"], r["answers"]).em,
                                              score(r["prediction"], r["answers"]).f1)
        assert set(res) == {"none", "prag", "settings"} and res["prag"]["n"] == 5 and res["prag"]["errors"] == 1
        settings = res["settings"]  # what produced the numbers
        assert settings["model"]["fingerprint"] and settings["store"]["version"] == engine.store.version
        assert settings["store"]["rank"] == engine.store.rank and settings["modes"] == ["none", "prag"]
        assert (settings["top_k"], settings["dtype"], settings["limit"]) == (engine.config.top_k, "float32", cfg.limit)
        assert settings["versions"]["prag"] and settings["date"][:2] == "20"
        assert set(res["prag"]["by_type"]) == {"even", "odd"} and res["prag"]["by_type"]["odd"]["n"] == 3
        assert res["none"]["questions_per_s"] > 0 and res["none"]["tokens_per_s"] > 0
        md = (out / "results.md").read_text()
        assert "| mode | EM | F1 |" in md and "| prag |" in md and "- top_k: " in md
        assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))

        # resume: lose the last 3 records and tear the one before, then rerun the same config
        torn = "\n".join(lines[:6]) + "\n" + lines[6][:25]
        (out / PREDICTIONS).write_text(torn)
        evaluate(cfg, engine=engine)
        recs2 = [json.loads(x) for x in (out / PREDICTIONS).read_text().splitlines()]
        assert len(recs2) == 10 and {(r["id"], r["mode"]) for r in recs2} == {(r["id"], r["mode"]) for r in recs}
        assert recs2[:6] == recs[:6]
        same = {(r["id"], r["mode"]): r["output_token_ids"] for r in recs}
        assert all(same[(r["id"], r["mode"])] == r["output_token_ids"] for r in recs2)

        # settings that change answers must match the earlier run
        engine.config.top_k = 2
        with pytest.raises(PragError, match="other settings.*top_k"):
            evaluate(cfg, engine=engine)
    finally:
        engine.config.top_k = 3
