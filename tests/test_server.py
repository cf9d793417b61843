"""The OpenAI-compatible server over loopback, driven by the official ``openai`` client.

A real uvicorn server runs in a thread on 127.0.0.1 over a real Engine (session ``shared_llm``);
every answer is compared with the engine's own batched output for the same question.
"""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

API_KEY = "test-key-123"
DOCS = {f"d{i}": f"Record {i}: the lighthouse of Pell{i} was lit in {1900 + i} by keeper Orla{i}."
        for i in range(9)}
QUESTIONS = ["When was the lighthouse of Pell1 lit?", "Who kept the lighthouse of Pell4?",
             "Where is Orla7's lighthouse?"]
SETS = [["d0", "d1", "d2"], ["d3", "d4", "d5"], ["d6", "d7", "d8"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, shared_llm):
    import uvicorn

    from engine.engine import Engine, EngineConfig
    from tests.helpers.random_store import build_random_store
    from engine.http.server import ServerConfig, create_app

    store = build_random_store(tmp_path_factory.mktemp("srv") / "store", tiny_model_dir, list(DOCS), seed=3)
    engine = Engine(tiny_model_dir, store=store, llm=shared_llm, documents=DOCS, config=EngineConfig())
    port = _free_port()
    cfg = ServerConfig(port=port, api_key=API_KEY, served_model_name="prag-tiny", batch_window_ms=20)
    srv = uvicorn.Server(uvicorn.Config(create_app(engine, cfg), host=cfg.host, port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0)
    yield {"engine": engine, "client": client, "port": port}
    srv.should_exit = True
    thread.join(timeout=10)
    engine.close()


def test_binds_loopback_and_lists_models(server):
    from engine.http.server import ServerConfig

    assert ServerConfig().host == "127.0.0.1"
    models = server["client"].models.list()
    assert [m.id for m in models.data] == ["prag-tiny"]


def test_api_key_is_enforced(server):
    bad = openai.OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model="prag-tiny", messages=[{"role": "user", "content": "Who?"}])
    assert err.value.status_code == 401


@pytest.mark.parametrize("mode", ["prag", "combine", "rag", "none"])
def test_chat_matches_engine_output(server, mode):
    engine, client = server["engine"], server["client"]
    want = engine.generate(QUESTIONS, mode=mode, doc_ids=SETS)
    for q, docs, w in zip(QUESTIONS, SETS, want):
        r = client.chat.completions.create(model="prag-tiny", messages=[{"role": "user", "content": q}],
                                           extra_body={"mode": mode, "doc_ids": docs})
        assert r.choices[0].message.content == w.text
        assert r.usage.completion_tokens == len(w.output_token_ids)
        assert r.usage.prompt_tokens == len(w.prompt_token_ids)
        extra = r.model_extra["prag"]
        assert extra["mode"] == mode and extra["prediction"] == w.prediction
        assert extra["doc_ids"] == ([] if mode == "none" else docs)


def test_concurrent_requests_are_batched_and_identical(server):
    engine, client = server["engine"], server["client"]
    want = {q: a.text for q, a in zip(QUESTIONS, engine.generate(QUESTIONS, mode="prag", doc_ids=SETS))}

    def ask(i: int) -> tuple[str, str]:
        q = QUESTIONS[i % 3]
        r = client.completions.create(model="prag-tiny", prompt=q, extra_body={"doc_ids": SETS[i % 3]})
        return q, r.choices[0].text

    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(ask, range(12)))
    assert len(got) == 12
    for q, text in got:
        assert text == want[q]


def test_completions_list_prompt_and_max_tokens(server):
    engine, client = server["engine"], server["client"]
    r = client.completions.create(model="prag-tiny", prompt=QUESTIONS, max_tokens=3,
                                  extra_body={"mode": "none"})
    want = engine.generate(QUESTIONS, mode="none", max_new_tokens=3)
    assert [c.text for c in r.choices] == [a.text for a in want]
    assert all(len(a.output_token_ids) <= 3 for a in want)
    assert r.usage.completion_tokens == sum(len(a.output_token_ids) for a in want)


def test_streaming_chat(server):
    engine, client = server["engine"], server["client"]
    want = engine.generate(QUESTIONS[:1], mode="prag", doc_ids=SETS[:1])[0]
    stream = client.chat.completions.create(model="prag-tiny", stream=True, extra_body={"doc_ids": SETS[0]},
                                            messages=[{"role": "user", "content": QUESTIONS[0]}])
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body, fragment", [
    ({"messages": [{"role": "user", "content": "   "}]}, "empty question"),
    ({"messages": [{"role": "user", "content": "Who?"}], "mode": "magic"}, "valid modes: none, rag, prag, combine"),
    ({"messages": [{"role": "user", "content": "Who?"}], "top_k": 0}, "top_k"),
    ({"messages": [{"role": "user", "content": "Who?"}], "temperature": 0.7}, "greedy"),
    ({"messages": []}, "messages"),
])
def test_bad_requests_get_400_with_reason(server, body, fragment):
    client = server["client"]
    messages = body.pop("messages")
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="prag-tiny", messages=messages, extra_body=body)
    assert err.value.status_code == 400
    assert fragment in str(err.value)


def test_unknown_doc_id_is_a_per_request_error(server):
    with pytest.raises(openai.UnprocessableEntityError) as err:
        server["client"].chat.completions.create(model="prag-tiny", extra_body={"doc_ids": ["nope"]},
                                                 messages=[{"role": "user", "content": "Who?"}])
    assert "nope" in str(err.value)
