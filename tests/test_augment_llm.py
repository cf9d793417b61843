"""The vLLM augmenter on the session's tiny random model: structured output must always parse."""

from __future__ import annotations

import json

import jsonschema
import pytest

from offline_encode.augment import LLMAugmenter, LLMAugmenterConfig, augment_corpus, iter_augmented, qa_schema
from prag.errors import PragError
from retrieval.corpus import Document

# A random model fills every string to its maxLength at ~2 tokens per char: with these bounds a QA
# list took 185-224 tokens over 40 documents, so 384 leaves a wide margin and the test stays short.
CFG = LLMAugmenterConfig(max_tokens=384, max_question_chars=30, max_answer_chars=15, max_full_answer_chars=40)


def _docs(n: int = 6) -> list[dict]:
    return [{"id": f"g{i}", "title": f"Place {i}",
             "text": f"Person {i} Dovanko was born in 18{i}4 in the town of Esterhalm. "
                     f"She founded the glassworks in 19{i}2 with {i + 3} partners."} for i in range(n)]


def test_llm_augmenter_gives_schema_valid_qa_for_every_document(shared_llm, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in _docs()), encoding="utf-8")
    out = tmp_path / "aug.jsonl"
    aug = LLMAugmenter(CFG, llm=shared_llm)
    summary = augment_corpus(corpus, out, aug, progress=False)
    assert (summary.done, summary.failed) == (6, 0), summary.format()
    schema = qa_schema(CFG.n_qa, CFG.max_question_chars, CFG.max_answer_chars, CFG.max_full_answer_chars)
    recs = [r for _, r in iter_augmented(out)]
    assert [r["doc_id"] for r in recs] == [f"g{i}" for i in range(6)]
    for rec, doc in zip(recs, _docs()):
        assert "error" not in rec
        jsonschema.validate(rec["qa"], schema)
        assert len(rec["qa"]) == 3
        assert len(rec["rewrites"]) == 1 and rec["rewrites"][0]
        assert rec["augmenter"] == "llm" and rec["model"]
        assert rec["passage"] == f"{doc['title']}. {doc['text']}"  # title absent from text: prefixed
    # per-document seeds: a doc's output does not depend on its batch
    docs = [Document(**d) for d in _docs()]
    halves = aug.augment_documents(docs[:2]) + aug.augment_documents(docs[2:4])
    assert [h["qa"] for h in halves] == [r["qa"] for r in recs[:4]]
    assert [h["rewrites"] for h in halves] == [r["rewrites"] for r in recs[:4]]


def test_llm_augmenter_records_too_long_passages_and_needs_a_model(shared_llm):
    aug = LLMAugmenter(LLMAugmenterConfig(max_tokens=160, n_rewrites=0, max_question_chars=5, max_answer_chars=5,
                                          max_full_answer_chars=5), llm=shared_llm)
    long_doc = Document("long", "word " * 3000)
    recs = aug.augment_documents([long_doc, Document("short", "Esterhalm lies on the Ulna.")])
    assert recs[0]["error"].startswith("passage_too_long") and recs[0]["qa"] == []
    assert "error" not in recs[1] and len(recs[1]["qa"]) == 3 and recs[1]["rewrites"] == []
    with pytest.raises(PragError, match="needs a model"):
        LLMAugmenter(LLMAugmenterConfig())
    with pytest.raises(PragError, match="placeholder"):
        LLMAugmenter(LLMAugmenterConfig(model="x", qa_prompt="no slot"))


def test_llm_augmenter_builds_its_own_engine_and_survives_a_step_over_the_token_budget(tiny_model_dir, tmp_path):
    """On a CPU, a chunked prefill rewinds each request's seeded generator, which CPU generators
    cannot do ("CPU Generator does not use offset"): 0 records were written with the defaults.
    24 prompts of ~240 tokens are ~3x the 2,048-token step budget, so vLLM must split them over steps."""
    from engine.vllm_backend.llm import shutdown_llm

    text = ("Person {i} Dovanko was born in 18{i}4 in the town of Esterhalm. She founded the glassworks "
            "in 19{i}2 with {j} partners. ") * 3
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": text.format(i=i % 10, j=i + 3)}) + "\n"
                              for i in range(12)), encoding="utf-8")
    cfg = LLMAugmenterConfig(model=str(tiny_model_dir), max_model_len=1024, max_tokens=320, max_question_chars=10,
                             max_answer_chars=5, max_full_answer_chars=10)
    aug = LLMAugmenter(cfg)
    try:
        tokenizer = aug.llm.get_tokenizer()
        prompt_tokens = len(aug._prompt_ids(tokenizer, cfg.qa_prompt.format(passage=text, n_qa=3)))
        assert 24 * prompt_tokens > 2 * aug.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
        summary = augment_corpus(corpus, tmp_path / "aug.jsonl", aug, progress=False)
    finally:
        if aug._llm is not None:
            shutdown_llm(aug._llm)
    assert (summary.done, summary.failed) == (12, 0), summary.format()
    # (no maxLength check here: the random model emits partial UTF-8 byte tokens, which decode to
    # U+FFFD characters that the grammar counted as bytes, so a 10-char bound can read as 11)
    recs = [rec for _, rec in iter_augmented(tmp_path / "aug.jsonl")]
    assert sorted(r["doc_id"] for r in recs) == sorted(f"d{i}" for i in range(12))
    for rec in recs:
        assert len(rec["qa"]) == 3 and all(set(qa) == {"question", "answer", "full_answer"} for qa in rec["qa"])
        assert len(rec["rewrites"]) == 1
