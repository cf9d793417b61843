"""`prag eval --ray-address`: questions sharded over 2 engine actors on a local 2-CPU Ray cluster (issue 11, part 1).

Real vLLM everywhere: the reference is the single-process harness on the session's ``shared_llm`` (float32),
the sharded runs use two ``EngineActor``s (tiny fixture model, 1 GiB KV cache, one CPU each), started once
for the module. The first test checks the outputs are the single-process ones; the second kills both actors
mid-run, one with SIGKILL (Ray restarts it and retries its batches), the other for good (its batches go to
the restarted one), and checks the run still completes with the same outputs.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from engine.cluster.eval import EnginePool, RayEvalConfig, evaluate_on_ray, plan_engines
from prag.errors import PragError

MODES = ["none", "rag", "prag", "combine"]
N_QUESTIONS = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    from engine.engine import EngineConfig
    from retrieval.index import build_index
    from tests.helpers.random_store import build_random_store

    root = tmp_path_factory.mktemp("ray-eval")
    doc_ids = [f"doc{i}" for i in range(12)]
    build_random_store(root / "store", tiny_model_dir, doc_ids, seed=5).close()
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": d, "text": f"Document {i}: the river Varn{i} flows past Olm{i}."})
                              + "\n" for i, d in enumerate(doc_ids)))
    build_index(corpus, root / "index", progress=False)
    data = root / "q.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"Where does the river Varn{i % 12} flow?",
                                        "answer": f"Olm{i % 12}", "type": "river" if i % 2 else "place"}) + "\n"
                            for i in range(N_QUESTIONS)))
    # the actors' engines: what shared_llm runs (float32, 1024 tokens), with a 1 GiB KV cache
    engine_cfg = EngineConfig(dtype="float32", max_model_len=1024, kv_cache_gib=1, max_loras=8)
    return {"root": root, "model": tiny_model_dir, "data": data, "engine_cfg": engine_cfg}


def _cfg(setup, out, batch_size=2):
    from engine.eval.harness import EvalConfig

    root = setup["root"]
    return EvalConfig(dataset="generic", data=str(setup["data"]), out=str(out), model=str(setup["model"]),
                      index=str(root / "index"), store=str(root / "store"), modes=MODES, batch_size=batch_size,
                      engine=setup["engine_cfg"], progress=False)


@pytest.fixture(scope="module")
def reference(setup, shared_llm):
    """The single-process run on the session engine."""
    from engine.engine import Engine
    from engine.eval.harness import evaluate

    out = setup["root"] / "single"
    cfg = _cfg(setup, out)
    engine = Engine(cfg.model, index=cfg.index, store=cfg.store, config=cfg.engine, llm=shared_llm)
    try:
        evaluate(cfg, engine=engine)
    finally:
        engine.close()
    return out


@pytest.fixture(scope="module")
def pool(setup):
    """A local 2-CPU Ray cluster with two engine actors, for the whole module."""
    from offline_encode.ray_jobs import LOCAL, RayOptions, ray_session

    rc = RayEvalConfig(address=LOCAL, num_engines=2, num_cpus=2)
    with ray_session(RayOptions(address=LOCAL, num_cpus=2)):
        p = EnginePool(_cfg(setup, setup["root"] / "unused"), rc)
        try:
            yield p, rc
        finally:
            p.close()


def _lines(out) -> list[str]:
    path = out / "predictions.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def _identity(out) -> dict:
    from engine.eval.harness import RECORD_ONLY

    rec = json.loads((out / "config.json").read_text())
    return {k: v for k, v in rec.items() if k not in RECORD_ONLY}


def _results(out) -> tuple[dict, dict]:
    """(per-mode metrics without the throughput figures, settings without date and ray block)."""
    res = json.loads((out / "results.json").read_text())
    settings = res.pop("settings")
    for entry in res.values():
        entry.pop("questions_per_s"), entry.pop("tokens_per_s")
    return res, {k: v for k, v in settings.items() if k not in ("date", "ray")}


def _records(out) -> list[dict]:
    """Prediction records without ``lora_name``: vLLM's name for a merged adapter is unique per engine process
    (its cache namespace), so it differs between any two processes, not only between these runs."""
    recs = [json.loads(x) for x in _lines(out)]
    assert all(("lora_name" in r) == (r["mode"] in ("prag", "combine")) for r in recs)
    return [{k: v for k, v in r.items() if k != "lora_name"} for r in recs]


def _assert_same_outputs(out, reference) -> dict:
    ref = _records(reference)
    assert len(ref) == N_QUESTIONS * len(MODES)
    assert _records(out) == ref  # the same records (prompt and output token ids included), in the same order
    assert _identity(out) == _identity(reference)
    assert _results(out) == _results(reference)
    return json.loads((out / "results.json").read_text())


def test_two_engine_actors_give_the_single_process_outputs(setup, reference, pool):
    engines, rc = pool
    out = setup["root"] / "ray"
    results = evaluate_on_ray(_cfg(setup, out), rc, pool=engines)
    assert _assert_same_outputs(out, reference) == json.loads((out / "results.json").read_text()) == results
    ray_block = results["settings"]["ray"]
    assert ray_block["num_engines"] == 2 and ray_block["engine_restarts"] == 0 and ray_block["engines_lost"] == 0
    assert min(ray_block["batches_per_engine"]) > 0 and sum(ray_block["batches_per_engine"]) == N_QUESTIONS * 2
    recs = [json.loads(x) for x in _lines(out)]
    assert [r["id"] for r in recs] == [f"q{i}" for i in range(N_QUESTIONS)] * len(MODES)  # input order
    by = {(r["id"], r["mode"]): r["output_token_ids"] for r in recs}
    # the adapters act, so identical prag tokens are not trivially the base model's
    assert sum(by[(f"q{i}", "prag")] != by[(f"q{i}", "none")] for i in range(N_QUESTIONS)) >= N_QUESTIONS // 2
    assert all(results[m]["questions_per_s"] > 0 and results[m]["n"] == N_QUESTIONS for m in MODES)


def test_killed_engine_actors_mid_run_still_give_the_single_process_outputs(setup, reference, pool):
    """Actor 0 is SIGKILLed (Ray restarts it, its batches are retried there); actor 1 is killed for good
    (its batches go to actor 0). Both hold batches when they die (2 in flight each, 32 in all)."""
    import ray

    engines, rc = pool
    out = setup["root"] / "ray-killed"
    total = N_QUESTIONS * len(MODES)
    killed: dict = {}

    def killer():
        deadline = time.monotonic() + 120
        while len(_lines(out)) < 4 and time.monotonic() < deadline:  # batches 0 (actor 0) and 1 (actor 1) written
            time.sleep(0.005)
        killed["lines"] = len(_lines(out))
        _, pid = engines.processes[0]
        os.kill(pid, signal.SIGKILL)  # the actor process this test's pool started
        ray.kill(engines.actors[1], no_restart=True)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    results = evaluate_on_ray(_cfg(setup, out), rc, pool=engines)
    thread.join(timeout=5)
    assert 4 <= killed["lines"] < total - 4, f"the kill did not land mid-run: {killed}"
    _assert_same_outputs(out, reference)
    ray_block = results["settings"]["ray"]
    assert ray_block["engine_restarts"] == 1 and ray_block["engines_lost"] == 1, ray_block
    assert ray_block["batches_per_engine"][0] > ray_block["batches_per_engine"][1] > 0  # actor 0 finished the run
    assert sum(ray_block["batches_per_engine"]) == total // 2


def test_plan_and_bad_settings():
    assert plan_engines(RayEvalConfig("local", num_engines=3), {"CPU": 2}) == (3, 1.0, 0.0)
    assert plan_engines(RayEvalConfig("auto"), {"CPU": 64, "GPU": 8}) == (8, 1.0, 1.0)
    assert plan_engines(RayEvalConfig("auto", gpus_per_engine=2), {"CPU": 64, "GPU": 8}) == (4, 1.0, 2.0)
    assert plan_engines(RayEvalConfig("auto", cpus_per_engine=4), {"CPU": 16}) == (4, 4.0, 0.0)
    for rc, message in ((RayEvalConfig("local", num_engines=0), "--num-engines must be at least 1"),
                        (RayEvalConfig("local", gpus_per_engine=-1), "--gpus-per-engine must not be negative"),
                        (RayEvalConfig("auto", num_cpus=2), "--ray-num-cpus needs --ray-address local")):
        with pytest.raises(PragError, match=message):
            rc.check()


@pytest.mark.parametrize("extra, message", [
    (["--num-engines", "2"], "--num-engines, --gpus-per-engine, --cpus-per-engine and --ray-num-cpus need "
                             "--ray-address"),
    (["--ray-address", "local", "--num-engines", "0"], "--num-engines must be at least 1"),
])
def test_cli_ray_flags_are_checked_before_anything_starts(tmp_path, capsys, extra, message):
    from prag.cli import main

    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "q?", "answer": "a"}) + "\n")
    rc = main(["eval", "--model", str(tmp_path / "no-model"), "--dataset", "generic", "--data", str(data),
               "--modes", "none", "--out", str(tmp_path / "out"), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err
