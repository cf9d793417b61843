"""BM25 and hybrid retrieval in front of a real vLLM engine, in a fresh interpreter.

Importing bm25s pulls in numba and llvmlite; a vLLM engine built after that in the same process died
at start-up (vLLM's kernel dispatcher scans every module and trips over llvmlite's ``ffi.lib``). The
test suite's own process already has an engine, so the check needs a new process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from retrieval.index import IndexConfig, build_index
from tests.conftest import REPO

SCRIPT = r"""
import json, sys
from retrieval.retriever import Retriever
retriever = Retriever.load(sys.argv[2])
assert "bm25s" not in sys.modules and "numba" not in sys.modules, "loading an index imported bm25s"
from engine.engine import Engine, EngineConfig
questions = ["Where was Mirela Dovanko born?", "Who founded the Tarvel Mill?"]
out = {}
llm = None
for method in ("bm25", "hybrid"):
    engine = Engine(sys.argv[1], index=retriever, llm=llm,
                    config=EngineConfig(retrieval_method=method, dtype="float32", max_model_len=512, top_k=2))
    llm = engine.llm
    answers = engine.generate(questions, mode="rag")
    out[method] = [{"doc_ids": a.doc_ids, "tokens": a.output_token_ids, "error": a.error} for a in answers]
    out[method + "_search"] = [[d for d, _ in hits] for hits in retriever.search(questions, 2, method=method)]
print("RESULT " + json.dumps(out))
"""


def test_eval_with_bm25_and_hybrid_retrieval_starts_the_engine(tiny_model_dir, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    docs = [{"id": "a", "text": "Mirela Dovanko was born in the town of Esterhalm in 1874."},
            {"id": "b", "text": "The Tarvel Mill was founded by Oskar Brenn in 1920."},
            {"id": "c", "text": "Esterhalm lies on the river Ulna, north of Tarvel."}]
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    index = build_index(corpus, tmp_path / "idx", IndexConfig(bm25=True), progress=False).out
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(index)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for method in ("bm25", "hybrid"):
        answers = result[method]
        assert [a["error"] for a in answers] == [None, None]
        assert [a["doc_ids"] for a in answers] == result[method + "_search"]
        assert all(len(a["tokens"]) > 0 for a in answers)
    assert result["bm25"][0]["doc_ids"][0] == "a" and result["bm25"][1]["doc_ids"][0] == "b"
