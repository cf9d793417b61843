"""An OpenAI-compatible HTTP front end over one ``Engine``.

Why a micro-batcher: the engine is fastest when many questions share one vLLM ``generate`` call
(continuous batching over distinct merged adapters). HTTP requests arrive one by one, so a single
background task drains the queue: it waits at most ``batch_window_ms`` for more requests with the
same (mode, top_k, max_tokens), then answers them all with one ``Engine.generate`` call run in a
worker thread. While that call runs, new requests pile up and form the next batch.

Routes: ``GET /v1/models``, ``POST /v1/completions`` (``prompt`` = the question, or a list of them),
``POST /v1/chat/completions`` (the last user message = the question). The engine wraps the question
in the paper's prompt itself. PRAG options travel in the request body (with the openai client:
``extra_body={"mode": "rag", "top_k": 3, "doc_ids": [...]}``); the response carries a ``prag`` object
with the retrieved doc ids, scores and the extracted short answer. ``stream=True`` is answered as
server-sent events: the answer arrives as one content chunk once it is generated (generation
happens in batches, so there is no per-token stream), then a finish chunk and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from engine.engine import MODES, Answer, Engine
from prag.errors import PragError


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"  # loopback by default: exposing the server is an explicit choice
    port: int = 8000
    api_key: str | None = None  # when set, every /v1 request needs "Authorization: Bearer <key>"
    served_model_name: str | None = None  # default: the engine's model path/name
    default_mode: str = "prag"
    batch_window_ms: float = 5.0
    max_batch_size: int = 256


class RequestError(Exception):
    """A 4xx answer in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


@dataclass
class _Job:
    question: str
    doc_ids: list[str] | None
    future: asyncio.Future


class MicroBatcher:
    """Groups concurrent requests with the same (mode, top_k, max_tokens) into one engine call."""

    def __init__(self, engine: Engine, window_s: float, max_batch: int):
        self.engine, self.window_s, self.max_batch = engine, window_s, max_batch
        self.queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def submit(self, key: tuple, questions: list[str], doc_ids: list | None) -> list[Answer]:
        loop = asyncio.get_running_loop()
        jobs = [_Job(q, doc_ids, loop.create_future()) for q in questions]
        for job in jobs:
            await self.queue.put((key, job))
        return list(await asyncio.gather(*(j.future for j in jobs)))

    async def _run(self) -> None:
        pending: list[tuple[tuple, _Job]] = []
        while True:
            if not pending:
                pending.append(await self.queue.get())
            deadline = time.monotonic() + self.window_s
            while len(pending) < self.max_batch:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    pending.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            key = pending[0][0]
            batch = [job for k, job in pending if k == key]
            pending = [(k, job) for k, job in pending if k != key]
            await self._answer(key, batch)

    async def _answer(self, key: tuple, batch: list[_Job]) -> None:
        mode, top_k, max_tokens = key
        try:
            answers = await asyncio.to_thread(
                self.engine.generate, [j.question for j in batch], mode, top_k,
                [j.doc_ids for j in batch] if any(j.doc_ids is not None for j in batch) else None,
                max_new_tokens=max_tokens)
        except Exception as exc:  # a configuration error fails the whole batch, loudly
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(exc)
            return
        for j, a in zip(batch, answers):
            if not j.future.done():
                j.future.set_result(a)


def _error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
                code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def create_app(engine: Engine, config: ServerConfig | None = None):
    """The FastAPI application; ``engine`` is shared by all requests."""
    cfg = config or ServerConfig()
    if cfg.default_mode not in MODES:
        raise PragError(f"default mode must be one of {', '.join(MODES)}, got {cfg.default_mode!r}")
    model_name = cfg.served_model_name or engine.model
    batcher = MicroBatcher(engine, cfg.batch_window_ms / 1000.0, cfg.max_batch_size)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="prag-engine", version="0.1.0", lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def _request_error(_request, exc: RequestError):
        return JSONResponse(_error_body(exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if cfg.api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
                return JSONResponse(_error_body("invalid or missing API key", "authentication_error",
                                                code="invalid_api_key"), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "prag-engine"}]}

    async def _body(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        return body

    def _options(body: dict) -> tuple[tuple, list | None]:
        mode = body.get("mode", cfg.default_mode)
        if mode not in MODES:
            raise RequestError(400, f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}", "mode")
        top_k = body.get("top_k", engine.config.top_k)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
            raise RequestError(400, f"top_k must be a positive integer, got {top_k!r}", "top_k")
        if engine.rank is not None and engine.max_lora_rank is not None and \
                mode in ("prag", "combine") and top_k * engine.rank > engine.max_lora_rank:
            raise RequestError(400, f"top_k={top_k} x adapter rank {engine.rank} exceeds the engine's "
                                    f"max_lora_rank {engine.max_lora_rank}", "top_k")
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                       or max_tokens <= 0):
            raise RequestError(400, f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
        temperature = body.get("temperature")
        if temperature not in (None, 0, 0.0):
            raise RequestError(400, "only greedy decoding is served: temperature must be 0 or absent",
                               "temperature")
        if body.get("n", 1) != 1:
            raise RequestError(400, "n must be 1", "n")
        doc_ids = body.get("doc_ids")
        if doc_ids is not None and (not isinstance(doc_ids, list) or not all(isinstance(d, str) for d in doc_ids)
                                    or not doc_ids):
            raise RequestError(400, "doc_ids must be a non-empty list of document id strings", "doc_ids")
        return (mode, top_k, max_tokens), doc_ids

    async def _answers(key: tuple, questions: list[str], doc_ids: list | None) -> list[Answer]:
        try:
            answers = await batcher.submit(key, questions, doc_ids)
        except PragError as exc:
            raise RequestError(400, str(exc)) from None
        for a in answers:
            if a.error is not None:
                status = 400 if a.error.startswith("empty question") else 422
                raise RequestError(status, f"question {a.question!r}: {a.error}", "messages")
        return answers

    def _prag(a: Answer) -> dict:
        out = {"mode": a.mode, "doc_ids": a.doc_ids, "scores": a.scores, "prediction": a.prediction,
               "truncated": a.truncated}
        if a.on_missing_adapter:  # what the --on-missing-adapter policy did to this answer
            out["missing_adapter"] = {"policy": a.on_missing_adapter, "doc_ids": a.missing_doc_ids}
        return out

    def _usage(answers: list[Answer]) -> dict:
        p = sum(len(a.prompt_token_ids) for a in answers)
        c = sum(len(a.output_token_ids) for a in answers)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def _finish(a: Answer) -> str:
        return "length" if a.finish_reason == "length" else "stop"

    def _sse(chunks: list[dict]):
        async def gen():
            for c in chunks:
                yield f"data: {json.dumps(c)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await _body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(400, "messages must be a non-empty list", "messages")
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise RequestError(400, "messages needs at least one user message (the question)", "messages")
        content = users[-1].get("content")
        if isinstance(content, list):  # content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise RequestError(400, "the last user message's content must be text", "messages")
        key, doc_ids = _options(body)
        (a,) = await _answers(key, [content], doc_ids)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.get("stream"):
            base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}
            return _sse([
                {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": a.text},
                                      "finish_reason": None}], "prag": _prag(a)},
                {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": _finish(a)}]},
            ])
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": a.text},
                             "finish_reason": _finish(a)}],
                "usage": _usage([a]), "prag": _prag(a)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(request)
        prompt = body.get("prompt")
        questions = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(questions, list) or not questions or not all(isinstance(q, str) for q in questions):
            raise RequestError(400, "prompt must be a question string or a non-empty list of them", "prompt")
        key, doc_ids = _options(body)
        answers = await _answers(key, questions, doc_ids)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        choices = [{"index": i, "text": a.text, "finish_reason": _finish(a), "logprobs": None}
                   for i, a in enumerate(answers)]
        if body.get("stream"):
            base = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
            return _sse([{**base, "choices": [c], "prag": _prag(a)} for c, a in zip(choices, answers)])
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": _usage(answers), "prag": [_prag(a) for a in answers]}

    return app


def serve(engine: Engine, config: ServerConfig | None = None) -> None:
    """Run the server in the foreground until interrupted."""
    import sys

    import uvicorn

    from prag.logs import is_verbose

    cfg = config or ServerConfig()
    verbose = is_verbose()  # quiet: no uvicorn banner or per-request access lines, one line of our own
    if not verbose:
        print(f"prag serve: http://{cfg.host}:{cfg.port}/v1 (Ctrl+C stops)", file=sys.stderr, flush=True)
    uvicorn.run(create_app(engine, cfg), host=cfg.host, port=cfg.port, log_level="info" if verbose else "warning",
                access_log=verbose)
