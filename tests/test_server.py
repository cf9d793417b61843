"""The OpenAI-compatible server as users run it: a ``prag serve`` subprocess on 127.0.0.1 (fixture
model, fp32), driven by the official ``openai`` client.

Every answer is compared with batch evaluation's (``Engine.generate`` over the session's vLLM engine,
same model, store and index): HTTP, streaming, 320 concurrent requests, a damaged adapter, continuous
batching and client disconnects. Error statuses and SIGTERM are in ``test_server_errors.py``.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.helpers.server import build_site, questions, start_server

MODEL = "prag-tiny"


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_model_dir):
    return build_site(tmp_path_factory.mktemp("server"), tiny_model_dir)


@pytest.fixture(scope="module")
def server(site, tmp_path_factory):
    srv = start_server(site, tmp_path_factory.mktemp("server-log") / "serve.log", "--max-in-flight", "256")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def batch(site, tiny_model_dir, shared_llm):
    """Batch evaluation over the same model, store and index: the answers HTTP must reproduce."""
    from engine.engine import Engine, EngineConfig

    engine = Engine(tiny_model_dir, index=site["index"], store=site["store"], llm=shared_llm, config=EngineConfig())
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=server.api_key, max_retries=0)


def aclient(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base}/v1", api_key=server.api_key, max_retries=0, timeout=120)


def chat(client, question: str, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}], **kw)


def test_models_health_and_loopback(server, client):
    from engine.http.app import ServerConfig

    assert ServerConfig().host == "127.0.0.1"
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.base}/health").json() == {"status": "ok"}  # the one route open without the key


@pytest.mark.parametrize("mode", ["prag", "combine", "rag", "none"])
def test_chat_equals_batch_evaluation(client, batch, mode):
    """Retrieval, prompt and generation over HTTP give batch evaluation's tokens, documents and scores."""
    qs = questions(3)
    want = batch.generate(qs, mode=mode)
    for q, w in zip(qs, want):
        r = chat(client, q, extra_body={"prag": {"mode": mode}})
        assert w.error is None
        assert r.choices[0].message.content == w.text
        assert r.usage.completion_tokens == len(w.output_token_ids) > 0
        assert r.usage.prompt_tokens == len(w.prompt_token_ids)
        assert r.choices[0].finish_reason == ("length" if w.finish_reason == "length" else "stop")
        info = r.model_extra["prag"]
        assert info["mode"] == mode and info["prediction"] == w.prediction
        assert info["doc_ids"] == w.doc_ids and info["scores"] == pytest.approx(w.scores, abs=1e-5)
        if mode != "none":
            assert len(info["doc_ids"]) == 3


def test_completions_with_doc_ids_top_k_and_a_list_prompt(client, batch):
    qs = questions(3, offset=7)
    sets = [["d1", "d2"], ["d5", "d9"], ["d13", "d0"]]
    r = client.completions.create(model=MODEL, prompt=qs[0], max_tokens=7,
                                  extra_body={"prag": {"doc_ids": sets[0], "mode": "prag"}})
    want = batch.generate(qs, mode="prag", doc_ids=sets, max_new_tokens=7)
    assert r.choices[0].text == want[0].text and len(want[0].output_token_ids) <= 7
    assert r.model_extra["prag"]["doc_ids"] == sets[0]
    # a list prompt: one choice per question, one prag object per question
    r = client.completions.create(model=MODEL, prompt=qs, max_tokens=5, extra_body={"prag": {"mode": "rag", "top_k": 2}})
    want = batch.generate(qs, mode="rag", top_k=2, max_new_tokens=5)
    assert [c.text for c in r.choices] == [a.text for a in want]
    assert [p["doc_ids"] for p in r.model_extra["prag"]] == [a.doc_ids for a in want]
    assert r.usage.completion_tokens == sum(len(a.output_token_ids) for a in want)


def test_streaming_sends_a_chunk_per_step_and_the_same_text(client):
    q = questions(1, offset=3)[0]
    plain = chat(client, q, max_tokens=30)
    chunks = list(chat(client, q, max_tokens=30, stream=True, stream_options={"include_usage": True}))
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 5  # one chunk per generated step, not one at the end
    assert "".join(content) == plain.choices[0].message.content
    first, last, usage = chunks[0], chunks[-2], chunks[-1]
    assert first.choices[0].delta.role == "assistant"
    assert first.model_extra["prag"]["doc_ids"] == plain.model_extra["prag"]["doc_ids"]  # before the answer
    assert last.choices[0].finish_reason == plain.choices[0].finish_reason
    assert last.model_extra["prag"]["prediction"] == plain.model_extra["prag"]["prediction"]
    assert usage.choices == [] and usage.usage.completion_tokens == plain.usage.completion_tokens
    # completions stream the same way
    text = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt=q, max_tokens=30,
                                                                         stream=True) if c.choices)
    assert text == plain.choices[0].message.content


def test_stop_seed_and_temperature_are_honoured(client):
    q = questions(1, offset=11)[0]
    full = chat(client, q, max_tokens=40).choices[0].message.content
    stop = full[12:15]
    cut = chat(client, q, max_tokens=40, stop=[stop])
    assert cut.choices[0].message.content == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, q, max_tokens=40, stop=stop, stream=True))
    assert streamed == full[:full.index(stop)]
    # sampling: the same seed gives the same text, and a sampled answer is not the greedy one
    sampled = [chat(client, q, max_tokens=40, temperature=1.0, seed=s).choices[0].message.content for s in (7, 7, 8)]
    assert sampled[0] == sampled[1]
    assert sampled[0] != full or sampled[2] != full


def test_load_64_clients_x_5_requests_mixed_modes(server, batch):
    """Every request answered once, with batch evaluation's text; /metrics counts what was sent."""
    modes = ["prag", "rag", "none", "combine"]
    qs = questions(320, offset=100)
    before = server.metrics()

    async def run():
        ac = aclient(server)

        async def one_client(c: int):
            out = []
            for j in range(5):
                i = c * 5 + j
                r = await ac.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": qs[i]}],
                                                     extra_body={"prag": {"mode": modes[i % 4]}})
                out.append((i, r))
            return out

        try:
            return [x for part in await asyncio.gather(*(one_client(c) for c in range(64))) for x in part]
        finally:
            await ac.close()

    t0 = time.monotonic()
    got = asyncio.run(run())
    wall = time.monotonic() - t0
    assert sorted(i for i, _ in got) == list(range(320))  # none lost, none duplicated
    assert len({r.id for _, r in got}) == 320
    by_mode: dict[str, list] = {m: [] for m in modes}
    for i, r in got:
        by_mode[modes[i % 4]].append((i, r))
    for mode, rows in by_mode.items():
        docs = [r.model_extra["prag"]["doc_ids"] or None for _, r in rows]
        want = batch.generate([qs[i] for i, _ in rows], mode=mode, doc_ids=docs if mode != "none" else None)
        for (i, r), w in zip(rows, want):
            assert w.error is None and r.choices[0].message.content == w.text, (mode, qs[i])
    after = server.metrics()
    for mode in modes:
        key = f'prag_requests_total{{mode="{mode}",status="200"}}'
        assert after.get(key, 0) - before.get(key, 0) == 80, mode
        hist = f'prag_request_latency_seconds_count{{mode="{mode}"}}'
        assert after[hist] - before.get(hist, 0) == 80
    assert after["prag_requests_in_flight"] == 0 and after["prag_engine_requests_in_flight"] == 0
    assert after["prag_adapter_cache_misses_total"] > before.get("prag_adapter_cache_misses_total", 0)
    assert after['prag_retrieval_seconds_count'] - before.get('prag_retrieval_seconds_count', 0) == 240
    print(f"\n320 requests from 64 clients in {wall:.1f} s ({320 / wall:.0f} q/s)")


def test_vllm_metrics_are_exported(server):
    names = {k.split("{")[0] for k in server.metrics()}
    assert any(n.startswith("vllm:") for n in names), sorted(names)[:20]
    assert {"prag_requests_total", "prag_time_to_first_token_seconds_count", "prag_adapter_seconds_count",
            "prag_adapter_cache_hits_total", "prag_requests_in_flight"} <= names


def test_a_damaged_adapter_fails_only_the_requests_that_need_it(server, site, batch):
    """Damage one document's stored adapter while the server runs: the requests that need it fail with
    a message naming it, the others are answered as before, and after repair all succeed again."""
    from tests.test_faults_store import overwrite_row, row_span

    client = openai.OpenAI(base_url=f"{server.base}/v1", api_key=server.api_key, max_retries=0)
    # two-document sets: no earlier test (top-3) has merged them, so each must be read from the store
    sets = [["d20", "d1"], ["d2", "d3"], ["d21", "d20"], ["d4", "d5"], ["d20", "d6"], ["d7", "d8"]]
    qs = questions(len(sets), offset=500)
    want = batch.generate(qs, mode="prag", doc_ids=sets)
    path, offset, width = row_span(site["store"], "d20")
    original = path.read_bytes()[offset:offset + width]

    def ask():
        out = []
        for q, docs in zip(qs, sets):
            try:
                r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                                   extra_body={"prag": {"mode": "prag", "doc_ids": docs}})
                out.append((200, r.choices[0].message.content))
            except openai.APIStatusError as exc:
                out.append((exc.status_code, exc.body))
        return out

    overwrite_row(site["store"], "d20", b"\xa5" * 64)
    try:
        damaged = ask()
    finally:
        with open(path, "r+b") as fh:
            fh.seek(offset)
            fh.write(original)
    for (status, body), docs, w in zip(damaged, sets, want):
        if "d20" in docs:
            assert status == 422, body
            assert "'d20'" in body["message"] and body["code"] == "corrupt_adapter" and body["type"]
        else:
            assert status == 200 and body == w.text
    repaired = ask()
    assert repaired == [(200, w.text) for w in want]


def test_continuous_batching_a_short_request_joins_running_long_ones(server):
    """A 2-token request sent while 32 requests of 120 tokens decode finishes in a small part of their time."""
    sets = [[f"d{3 * j}", f"d{3 * j + 1}", f"d{3 * j + 2}"] for j in range(4)]
    qs = questions(33, offset=700)

    def running(metrics: dict) -> float:
        return next(v for k, v in metrics.items() if k.startswith("vllm:num_requests_running"))

    async def run():
        ac = aclient(server)

        async def ask(i: int, max_tokens: int, docs: list[str]):
            r = await ac.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": qs[i]}],
                                                 max_tokens=max_tokens, extra_body={"prag": {"mode": "prag", "doc_ids": docs}})
            return r, time.monotonic()

        try:
            t0 = time.monotonic()
            longs = [asyncio.create_task(ask(i, 120, sets[i % 4])) for i in range(32)]
            while running(await asyncio.to_thread(server.metrics)) < 32:  # all 32 in vLLM's running batch
                assert time.monotonic() - t0 < 60, "the long requests did not all start"
                await asyncio.sleep(0.02)
            s0 = time.monotonic()
            r, s1 = await ask(32, 2, ["d20", "d21", "d22"])
            done = await asyncio.gather(*longs)
            return r, s0, s1, done, t0
        finally:
            await ac.close()

    r, s0, s1, done, t0 = asyncio.run(run())
    wall, short = max(t for _, t in done) - t0, s1 - s0
    assert r.usage.completion_tokens == 2
    tokens = [d.usage.completion_tokens for d, _ in done]
    assert sum(tokens) >= 0.8 * 32 * 120, tokens  # they really were long (a few end early)
    assert sum(t > s1 for _, t in done) >= 24  # it overtook them: they were still decoding
    print(f"\nshort request {short * 1000:.0f} ms while 32 x 120 tokens took {wall * 1000:.0f} ms "
          f"(ratio {short / wall:.3f}); engine timings {r.model_extra['prag']['timings']}")
    assert short <= 0.25 * wall, (short, wall)


def _wait_for(fn, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


def test_a_client_that_goes_away_aborts_its_request(server, client):
    """Closing a stream mid-answer, or dropping a non-streamed request, aborts the vLLM request; the
    server stays healthy."""
    before = server.metrics()
    aborted = 'prag_requests_aborted_total{mode="prag"}'
    tokens = next(k for k in before if k.startswith("vllm:generation_tokens_total"))
    q, q2 = questions(2, offset=901)  # both answer with 800 tokens when left alone (some questions hit EOS early)
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", headers=server.headers, timeout=30,
                      json={"model": MODEL, "messages": [{"role": "user", "content": q}], "max_tokens": 800,
                            "stream": True, "prag": {"mode": "prag"}}) as r:
        lines = []
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
            if len(lines) == 4:
                break
    assert _wait_for(lambda: server.metrics()["prag_engine_requests_in_flight"] == 0, 5)
    after = server.metrics()
    assert after[aborted] - before.get(aborted, 0) == 1
    assert after["prag_requests_in_flight"] == 0
    # vLLM aborted it: it stopped generating long before the 800 tokens asked for
    assert after["prag_vllm_aborts_total"] - before["prag_vllm_aborts_total"] == 1
    time.sleep(0.5)
    assert server.metrics()[tokens] == after[tokens] < before[tokens] + 400
    # a non-streamed request dropped by its client (a timeout) is aborted too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.base}/v1/chat/completions", headers=server.headers, timeout=0.5,
                   json={"model": MODEL, "messages": [{"role": "user", "content": q2}], "max_tokens": 800})
    assert _wait_for(lambda: server.metrics()[aborted] - before.get(aborted, 0) == 2, 5)
    assert _wait_for(lambda: server.metrics()["prag_engine_requests_in_flight"] == 0, 5)
    assert server.metrics()["prag_vllm_aborts_total"] - before["prag_vllm_aborts_total"] == 2
    assert chat(client, "Who kept the lighthouse of Pell2?", max_tokens=3).usage.completion_tokens > 0
    assert httpx.get(f"{server.base}/health").status_code == 200


def test_docs_are_served_behind_the_key(server):
    assert httpx.get(f"{server.base}/docs").status_code == 401
    assert httpx.get(f"{server.base}/openapi.json").status_code == 401
    spec = httpx.get(f"{server.base}/openapi.json", headers=server.headers).json()
    assert "ChatCompletionRequest" in spec["components"]["schemas"]
    assert "prag" in spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
