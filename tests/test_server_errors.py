"""Every error a demanding client can provoke gets OpenAI's shape and the right status, fast, without
echoing the input; and SIGTERM is graceful. One ``prag serve`` subprocess with tight limits
(2 requests in flight, a 300 kB body cap, max_tokens <= 800, merged adapters in /dev/shm folders);
its last test stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import glob
import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from tests.helpers.server import REPO, build_site, questions, start_server

MODEL = "prag-tiny"
BODY_CAP = 300_000
USER = [{"role": "user", "content": "Who kept the lighthouse of Pell3?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    site = build_site(tmp_path_factory.mktemp("server-errors"), tiny_model_dir)
    srv = start_server(site, tmp_path_factory.mktemp("server-errors-log") / "serve.log", "--max-in-flight", "2",
                       "--max-body-bytes", str(BODY_CAP), "--max-tokens-cap", "800", "--adapter-handover", "dir",
                       "--shutdown-grace", "60")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key=server.api_key, max_retries=0)


def post(server, body, path: str = "/v1/chat/completions", headers: dict | None = None, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.base}{path}", content=content, timeout=30,
                      headers={"Content-Type": "application/json", **(server.headers if headers is None else headers)},
                      **kw)


def error_of(r: httpx.Response, status: int) -> dict:
    """The OpenAI error object of ``r``, after checking the status and the shape."""
    assert r.status_code == status, r.text[:500]
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)
    return err


BAD_REQUESTS = [
    # (name, body, path, status, param, fragment of the message)
    ("invalid JSON", b'{"model": "prag-tiny", "messages": [', None, 400, None, "not valid JSON"),
    ("JSON nested 100k deep", b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None, 400, None,
     "nested too deeply"),
    ("not an object", b"[1, 2]", None, 400, None, "must be a JSON object"),
    ("empty body", b"", None, 400, None, "empty"),
    ("no messages", {"model": MODEL}, None, 400, "messages", "required"),
    ("empty messages", {"model": MODEL, "messages": []}, None, 400, "messages", "at least"),
    ("no prompt", {"model": MODEL}, "/v1/completions", 400, "prompt", "required"),
    ("empty question", {"messages": [{"role": "user", "content": "  \n"}]}, None, 400, "messages.0.content",
     "empty question"),
    ("empty question in a list", {"prompt": ["Who?", ""]}, "/v1/completions", 400, "prompt.1", "empty question"),
    ("unknown mode", {"messages": USER, "prag": {"mode": "magic"}}, None, 400, "prag.mode",
     "valid modes: none, rag, prag, combine"),
    ("top_k 0", {"messages": USER, "prag": {"top_k": 0}}, None, 400, "prag.top_k", ">= 1"),
    ("top_k over the rank limit", {"messages": USER, "prag": {"mode": "prag", "top_k": 5}}, None, 400, "prag.top_k",
     "max_lora_rank"),
    ("top_k over the depth cap", {"messages": USER, "prag": {"mode": "rag", "top_k": 65}}, None, 400, "prag.top_k",
     "<= 64"),
    ("top_k not an integer", {"messages": USER, "prag": {"top_k": "3"}}, None, 400, "prag.top_k", "integer"),
    ("unknown key in prag", {"messages": USER, "prag": {"mode": "rag", "topk": 3}}, None, 400, "prag.topk",
     "known keys: mode, top_k, doc_ids"),
    ("doc_ids not a list", {"messages": USER, "prag": {"doc_ids": "d1"}}, None, 400, "prag.doc_ids", "list"),
    ("PRAG control outside prag", {"messages": USER, "mode": "rag"}, None, 400, "mode", "prag object"),
    ("max_tokens 0", {"messages": USER, "max_tokens": 0}, None, 400, "max_tokens", ">= 1"),
    ("max_tokens 1e9", b'{"messages": [{"role": "user", "content": "Who?"}], "max_tokens": 1e9}', None, 400,
     "max_tokens", "<= 800"),
    ("max_tokens over the cap", {"messages": USER, "max_tokens": 801}, None, 400, "max_tokens", "<= 800"),
    ("max_completion_tokens over the cap", {"messages": USER, "max_completion_tokens": 900}, None, 400,
     "max_completion_tokens", "<= 800"),
    ("n 2", {"messages": USER, "n": 2}, None, 400, "n", "n must be 1"),
    ("temperature 5", {"messages": USER, "temperature": 5}, None, 400, "temperature", "between 0 and 2"),
    ("temperature text", {"messages": USER, "temperature": "hot"}, None, 400, "temperature", "number"),
    ("top_p 0", {"messages": USER, "top_p": 0}, None, 400, "top_p", "(0, 1]"),
    ("five stop strings", {"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, None, 400, "stop", "at most 4"),
    ("seed text", {"messages": USER, "seed": "x"}, None, 400, "seed", "integer"),
    ("unsupported penalty", {"messages": USER, "frequency_penalty": 0.5}, None, 400, "frequency_penalty",
     "not supported"),
    ("logprobs", {"messages": USER, "logprobs": True}, None, 400, "logprobs", "not supported"),
    ("unknown field", {"messages": USER, "min_p": 0.1}, None, 400, "min_p", "unknown parameter"),
    ("stream_options without stream", {"messages": USER, "stream_options": {"include_usage": True}}, None, 400,
     "stream_options", "stream: true"),
    ("image content", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     None, 400, "messages.0.content.0", "text"),
    ("last message not the user's", {"messages": [*USER, {"role": "assistant", "content": "x"}]}, None, 400,
     "messages.1.role", "user's question"),
    ("unknown document, rag", {"messages": USER, "prag": {"mode": "rag", "doc_ids": ["d1", "nope"]}}, None, 400,
     None, "'nope'"),
    ("document without an adapter, prag", {"messages": USER, "prag": {"mode": "prag", "doc_ids": ["d1", "nope"]}},
     None, 422, None, "'nope'"),
    ("unknown model", {"model": "gpt-4", "messages": USER}, None, 404, "model", "does not exist"),
    ("unknown route", {"messages": USER}, "/v1/embeddings", 404, None, "Not Found"),
]


@pytest.mark.parametrize("name, body, path, status, param, fragment", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_its_status_and_openai_error_shape(server, name, body, path, status, param, fragment):
    t0 = time.monotonic()
    err = error_of(post(server, body, path or "/v1/chat/completions"), status)
    assert time.monotonic() - t0 < 5
    assert fragment in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    assert len(err["message"]) < 400  # no echo of the input


def test_the_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=USER)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=USER, extra_body={"prag": {"mode": "magic"}})
    assert err.value.body["param"] == "prag.mode"
    with pytest.raises(openai.UnprocessableEntityError) as err:
        client.chat.completions.create(model=MODEL, messages=USER, extra_body={"prag": {"doc_ids": ["gone"]}})
    assert "'gone'" in err.value.body["message"]
    # a failure before the first token is an error status even with stream=True, not a 200 stream
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=MODEL, messages=USER, stream=True, extra_body={"prag": {"doc_ids": ["gone"]}})


def test_api_key(server, client):
    bad = openai.OpenAI(base_url=f"{server.base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model=MODEL, messages=USER)
    assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
    error_of(post(server, {"messages": USER}, headers={}), 401)  # no key at all
    for path in ("/metrics", "/docs", "/openapi.json", "/v1/models"):
        assert httpx.get(f"{server.base}{path}").status_code == 401, path
        assert httpx.get(f"{server.base}{path}", headers=server.headers).status_code == 200, path
    assert httpx.get(f"{server.base}/health").status_code == 200  # the one open route
    assert client.models.list().data[0].id == MODEL


def test_question_too_long_for_the_context_is_400_before_tokenising(server):
    long = "lighthouse " * 25_000  # 275 kB, under the body cap; far over 1024 tokens whatever the tokenizer
    t0 = time.monotonic()
    err = error_of(post(server, {"messages": [{"role": "user", "content": long}]}), 400)
    assert time.monotonic() - t0 < 2 and err["code"] == "prompt_too_long" and len(err["message"]) < 400
    # short enough in characters to be tokenised, too long in tokens: the engine's typed failure
    err = error_of(post(server, {"messages": [{"role": "user", "content": "Pell Orla Varn " * 400}]}), 400)
    assert err["code"] == "prompt_too_long"


def test_oversized_body_is_413_fast_never_echoed_and_others_do_not_wait(server, client):
    """A 5 MB question: 413 at once (never read or parsed), a short error; requests beside it go on."""
    results: dict[str, float] = {}

    def big(i: int):
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 5_000_000}])
        assert err.value.status_code == 413 and len(err.value.response.content) < 400
        assert err.value.body["code"] == "request_too_large"
        results[f"big{i}"] = time.monotonic() - t0

    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3)  # warm
    t0 = time.monotonic()
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3)
    alone = time.monotonic() - t0
    threads = [threading.Thread(target=big, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    client.chat.completions.create(model=MODEL, messages=USER, max_tokens=3)
    beside = time.monotonic() - t0
    for t in threads:
        t.join()
    assert len(results) == 3 and max(results.values()) < 2.0, results
    assert beside < alone + 1.0, (alone, beside)

    # a body without Content-Length (chunked) is read with a byte cap
    def chunks():
        for _ in range(40):
            yield b" " * 10_000

    r = httpx.post(f"{server.base}/v1/chat/completions", headers=server.headers, content=chunks(), timeout=30)
    assert error_of(r, 413)["code"] == "request_too_large"


def test_too_many_requests_in_flight_is_429_with_retry_after(server):
    async def run():
        ac = openai.AsyncOpenAI(base_url=f"{server.base}/v1", api_key=server.api_key, max_retries=0)
        streams = []
        try:
            for q in questions(2, offset=40):
                s = await ac.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}],
                                                     max_tokens=800, stream=True, extra_body={"prag": {"mode": "prag"}})
                await s.__anext__()  # its slot is taken
                streams.append(s)
            with pytest.raises(openai.RateLimitError) as err:
                await ac.chat.completions.create(model=MODEL, messages=USER, max_tokens=2)
            assert err.value.response.headers["retry-after"] == "1"
            assert err.value.body["type"] == "rate_limit_error"
        finally:
            for s in streams:
                await s.close()
            await ac.close()

    asyncio.run(run())
    deadline = time.monotonic() + 10
    while True:  # the closed streams give their slots back
        try:
            r = httpx.post(f"{server.base}/v1/chat/completions", headers=server.headers, timeout=30,
                           json={"messages": USER, "max_tokens": 2})
        except httpx.HTTPError:
            r = None
        if r is not None and r.status_code == 200:
            break
        assert time.monotonic() < deadline, r.text if r is not None else "no answer"
        time.sleep(0.1)


def test_serve_flags_are_checked_before_the_engine_starts(tmp_path):
    out = subprocess.run([sys.executable, "-m", "prag.cli", "serve", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--default-mode", "--max-in-flight", "--max-body-bytes", "--max-tokens-cap", "--shutdown-grace",
                 "--api-key"):
        assert flag in out.stdout
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "prag.cli", "serve", "--model", str(tmp_path), "--max-in-flight", "0"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "max_in_flight must be a positive integer" in out.stderr
    assert time.monotonic() - t0 < 30


def test_sigterm_lets_requests_in_flight_finish_and_cleans_up(server, client):
    """Last test of the module: it stops the server."""
    pid = server.proc.pid
    q_stream, q_plain = questions(2, offset=60)
    kw = {"max_tokens": 200, "extra_body": {"prag": {"mode": "prag"}}}
    want_stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q_stream}], **kw)
    want_plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q_plain}], **kw)
    folders = glob.glob(f"/dev/shm/prag-adapters-{pid}-*")
    assert len(folders) == 1 and glob.glob(f"{folders[0]}/*"), "the dir hand-over writes merged adapters there"

    async def run():
        ac = openai.AsyncOpenAI(base_url=f"{server.base}/v1", api_key=server.api_key, max_retries=0)
        try:
            plain = asyncio.create_task(ac.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": q_plain}], **kw))
            stream = await ac.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q_stream}],
                                                      stream=True, **kw)
            text = [c.choices[0].delta.content or "" async for c in _first(stream, 3)]
            server.proc.send_signal(15)  # SIGTERM while both are in flight
            await asyncio.sleep(0.3)
            try:
                r = httpx.post(f"{server.base}/v1/chat/completions", headers=server.headers, timeout=5,
                               json={"messages": USER, "max_tokens": 2})
                late = r.status_code
            except httpx.HTTPError:
                late = "refused"
            text += [c.choices[0].delta.content or "" async for c in stream]
            return "".join(text), (await plain).choices[0].message.content, late
        finally:
            await ac.close()

    streamed, plain, late = asyncio.run(run())
    assert late in (503, "refused")  # no new requests once shutting down
    assert streamed == want_stream.choices[0].message.content
    assert plain == want_plain.choices[0].message.content
    rc = server.proc.wait(60)
    assert rc in (0, -15), server.log_tail()
    assert not glob.glob(f"/dev/shm/prag-adapters-{pid}-*")  # the merged-adapter folder is removed
    assert "Traceback" not in server.log_tail(20_000)


async def _first(stream, n: int):
    i = 0
    async for c in stream:
        yield c
        i += 1
        if i == n:
            return
