"""``prag serve --ray-address local --replicas 2``: the replicated endpoint on a local Ray cluster, driven
by the official ``openai`` client over loopback.

One server for the module (two vLLM replicas start in about a minute on 2 cores): the same answers as
batch evaluation (streaming too), affinity by document set, and a replica killed under load.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import time

import pytest

from tests.helpers.server import build_site, questions, start_server

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_model_dir):
    return build_site(tmp_path_factory.mktemp("ray-serve"), tiny_model_dir)


@pytest.fixture(scope="module")
def server(site, tmp_path_factory):
    log = tmp_path_factory.mktemp("ray-serve-log") / "serve.log"
    srv = start_server(site, log, "--ray-address", "local", "--ray-num-cpus", "2", "--replicas", "2",
                       "--kv-cache-gib", "1", timeout=400)
    yield srv
    srv.stop(timeout=90)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=server.api_key, max_retries=6, timeout=120)


@pytest.fixture(scope="module")
def batch_answers(site, shared_llm):
    """The single-process answers (fp32) for the questions the tests send, per mode."""
    from engine.engine import Engine, EngineConfig

    qs = questions(6)
    eng = Engine(site["model"], index=site["index"], store=site["store"], llm=shared_llm,
                 config=EngineConfig(dtype="float32", max_model_len=1024))
    try:
        return {mode: {q: a for q, a in zip(qs, eng.generate(qs, mode=mode))} for mode in ("prag", "rag")}
    finally:
        eng.close()


def _ask(client, q: str, mode: str, stream: bool = False):
    kw = dict(model="prag-tiny", messages=[{"role": "user", "content": q}], extra_body={"prag": {"mode": mode}})
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.model_extra["prag"]
    chunks, prag = [], None
    for c in client.chat.completions.create(stream=True, **kw):
        if c.choices and c.choices[0].delta.content:
            chunks.append(c.choices[0].delta.content)
        prag = (c.model_extra or {}).get("prag") or prag
    return chunks, prag


def _replica_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ServeReplica:prag:generator"], capture_output=True, text=True).stdout
    return sorted(int(p) for p in out.split())


def test_replicas_answer_like_batch_evaluation(client, batch_answers):
    for mode in ("prag", "rag"):
        for q, want in batch_answers[mode].items():
            assert want.ok, want.error
            text, prag = _ask(client, q, mode)
            assert text == want.text and prag["doc_ids"] == want.doc_ids, (mode, q)
    q, want = next(iter(batch_answers["prag"].items()))
    chunks, prag = _ask(client, q, "prag", stream=True)
    assert len(chunks) > 1 and "".join(chunks) == want.text and prag["doc_ids"] == want.doc_ids


def test_metrics_carry_every_replicas_vllm_metrics(client, server, batch_answers):
    m = server.metrics()
    tokens = {k: v for k, v in m.items() if k.startswith("vllm:generation_tokens_total{")}
    replicas = {k.split('replica="')[1].split('"')[0] for k in tokens}
    assert len(replicas) == 2 and sum(tokens.values()) > 0
    assert m["prag_requests_total{mode=\"prag\",status=\"200\"}"] >= len(batch_answers["prag"]) + 1


def test_requests_for_a_document_set_land_on_the_replica_that_holds_it(client):
    sets = [[f"d{i}", f"d{i + 1}"] for i in range(10, 22, 2)]
    holder = {}
    for ids in sets:  # first request per set: some replica builds the adapter
        _, prag = _ask_docs(client, ids)
        assert prag["adapter_cache_hit"] is False
        holder[tuple(ids)] = prag["replica"]
    time.sleep(2.0)  # the replicas report the adapters they hold to Serve's routers
    with cf.ThreadPoolExecutor(8) as pool:
        repeats = list(pool.map(lambda ids: (tuple(ids), _ask_docs(client, ids)[1]), sets * 3))
    on_holder = sum(prag["replica"] == holder[ids] for ids, prag in repeats)
    hits = sum(prag["adapter_cache_hit"] for _, prag in repeats)
    assert on_holder == len(repeats) and hits == len(repeats)
    assert len(set(holder.values())) == 2  # new sets were spread over both replicas


def _ask_docs(client, ids):
    r = client.chat.completions.create(model="prag-tiny", messages=[{"role": "user", "content": "Who kept it?"}],
                                       max_tokens=4, extra_body={"prag": {"mode": "prag", "doc_ids": ids}})
    return r.choices[0].message.content, r.model_extra["prag"]


def test_a_killed_replica_loses_no_retried_request(client, server):
    pids = _replica_pids()
    assert len(pids) == 2, pids
    qs = questions(40, offset=100)

    def ask(q):
        return _ask(client, q, "prag")[0]

    with cf.ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(ask, q) for q in qs]
        time.sleep(1.0)
        os.kill(pids[0], signal.SIGKILL)
        answers = [f.result(timeout=300) for f in futures]
    assert len(answers) == len(qs) and all(isinstance(a, str) and a for a in answers)
    deadline = time.monotonic() + 240  # Serve starts a new replica in place of the dead one
    while len(_replica_pids()) < 2 or pids[0] in _replica_pids():
        assert time.monotonic() < deadline, "Serve did not restart the killed replica"
        time.sleep(1)
    assert _ask(client, qs[0], "prag")[0]
