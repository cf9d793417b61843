"""The OpenAI-compatible app over one PRAG :class:`~engine.engine.Engine`: routes, limits, lifecycle.

Every request becomes one ``engine.stream`` per question; the engine submits it to vLLM's async
engine the moment its adapter is ready, so requests that arrive while others decode join the running
batch at the next step (no batching or lock here). ``stream: true`` sends one SSE chunk per generated
step. A client that goes away closes its engine streams, which aborts their vLLM requests.

Routes: ``POST /v1/chat/completions`` (the last message is the user's question), ``POST
/v1/completions`` (``prompt`` is a question or a list of them), ``GET /v1/models``, ``GET /metrics``
(Prometheus), ``GET /health`` (the only route open without the API key).

Guards, in order: API key (401), shutting down (503), declared body size (413, before a byte is
read), then in the route: the body read with a byte cap (413), JSON (400), fields (400, see
:mod:`engine.http.protocol`), model (404), the one request check (400), requests in flight (429 with
``Retry-After``). Per-question failures map by kind (:data:`engine.http.errors.STATUS_BY_KIND`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from engine.http import metrics as metrics_mod
from engine.http.errors import APIError, from_failure, from_invalid, from_validation
from engine.http.protocol import (ChatChoice, ChatCompletionRequest, ChatCompletionResponse, AssistantMessage,
                                  CompletionChoice, CompletionRequest, CompletionResponse, ErrorResponse,
                                  MissingAdapter, ModelCard, ModelList, PragControls, PragInfo, Usage)
from engine.engine import Delta, Finished, Retrieved
from engine.request import FailureKind, Mode, RequestInvalid, check_request, check_sampling
from prag.errors import PragError

log = logging.getLogger(__name__)

GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServerConfig:
    """Server settings; the engine's own settings live in ``EngineConfig``."""

    host: str = "127.0.0.1"  # loopback by default: exposing the server is an explicit choice
    port: int = 8000
    api_key: str | None = None  # when set, every route but /health needs "Authorization: Bearer <key>"
    served_model_name: str | None = None  # default: the engine's model path/name
    default_mode: str = "prag"
    max_in_flight: int = 256  # questions being answered at once; more get 429 + Retry-After
    max_body_bytes: int = 1 << 20  # larger bodies get 413 before they are read or parsed
    max_tokens_cap: int | None = None  # None: the engine's limit (the context minus the shortest prompt)
    shutdown_grace: float = 30.0  # seconds in-flight requests get to finish after SIGTERM
    docs: bool = True  # /docs and /openapi.json (behind the key when one is set)
    close_engine: bool = False  # the app's shutdown closes the engine (serve() owns it)

    def check(self) -> "ServerConfig":
        Mode.parse(self.default_mode)
        for name in ("max_in_flight", "max_body_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PragError(f"{name} must be a positive integer, got {value!r}")
        if self.max_tokens_cap is not None and (not isinstance(self.max_tokens_cap, int) or self.max_tokens_cap < 1):
            raise PragError(f"max_tokens_cap must be a positive integer, got {self.max_tokens_cap!r}")
        if not self.shutdown_grace >= 0:
            raise PragError(f"shutdown_grace must be >= 0 seconds, got {self.shutdown_grace!r}")
        if not 0 < self.port < 65536:
            raise PragError(f"port must be between 1 and 65535, got {self.port}")
        return self


class _ClientGone(Exception):
    """The client closed the connection before its answer was complete."""


class _State:
    """What the routes share: limits, slots, metrics, the shutdown flag."""

    def __init__(self, engine: Any, cfg: ServerConfig):
        self.engine, self.cfg = engine, cfg
        self.model_name = cfg.served_model_name or str(engine.model)
        limits = engine.limits
        if cfg.max_tokens_cap is not None:
            limits = replace(limits, max_tokens=min(limits.max_tokens, cfg.max_tokens_cap))
        self.limits = limits
        self.default_max_tokens = min(engine.max_new_tokens, limits.max_tokens)
        self.metrics = metrics_mod.ServerMetrics(engine)
        self.used = 0  # slots taken (questions in flight); the event loop is the only writer
        self.draining = False

    def take(self, n: int) -> None:
        if n > self.cfg.max_in_flight:
            raise APIError(400, f"the request holds {n} questions, more than the server answers at once "
                                f"({self.cfg.max_in_flight})", param="prompt")
        if self.used + n > self.cfg.max_in_flight:
            raise APIError(429, f"too many requests in flight ({self.used} of {self.cfg.max_in_flight}); "
                                "retry shortly", code="too_many_requests", headers={"Retry-After": "1"})
        self.used += n
        self.metrics.in_flight.set(self.used)

    def give(self, n: int) -> None:
        self.used -= n
        self.metrics.in_flight.set(self.used)


class _Track:
    """One request's metrics: counted once, by mode and the status the client saw."""

    def __init__(self, state: _State):
        self.metrics, self.t0, self.mode, self.done = state.metrics, time.monotonic(), metrics_mod.NO_MODE, False

    def first_token(self, at: float | None = None) -> None:
        self.metrics.ttft.labels(self.mode).observe((at or time.monotonic()) - self.t0)

    def finish(self, status: int) -> None:
        if self.done:
            return
        self.done = True
        self.metrics.requests.labels(self.mode, str(status)).inc()
        if status == 499:
            self.metrics.aborted.labels(self.mode).inc()
        elif status == 200:
            self.metrics.e2e.labels(self.mode).observe(time.monotonic() - self.t0)


class _Gate:
    """ASGI middleware: API key, shutdown and declared body size, before any route reads the body."""

    def __init__(self, app, state: _State):
        self.app, self.state = app, state
        self.key = state.cfg.api_key.encode() if state.cfg.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        error = None
        if self.key is not None:
            auth = headers.get(b"authorization", b"")
            token = auth[7:] if auth[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(token, self.key):
                error = APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                 code="invalid_api_key")
        if error is None and self.state.draining:
            error = APIError(503, "the server is shutting down", code="shutting_down", headers={"Connection": "close"})
        declared = headers.get(b"content-length")
        if error is None and declared is not None and declared.isdigit() \
                and int(declared) > self.state.cfg.max_body_bytes:
            error = _too_large(self.state.cfg.max_body_bytes)
        if error is None:
            return await self.app(scope, receive, send)
        if scope["path"] in GENERATION_PATHS:
            self.state.metrics.requests.labels(metrics_mod.NO_MODE, str(error.status)).inc()
        await error.response()(scope, receive, send)


def _too_large(cap: int) -> APIError:
    # the unread rest of the body makes the connection unusable: close it
    return APIError(413, f"request body is over the server's limit of {cap} bytes (--max-body-bytes)",
                    code="request_too_large", headers={"Connection": "close"})


async def _read_json(request: Request, cap: int) -> dict:
    """The body as a JSON object, read with a byte cap (never parsed when too large)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise _too_large(cap)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise APIError(400, "request body is empty; send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, "request body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise APIError(400, f"request body is not valid JSON{where}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"request body must be a JSON object, got a JSON {type(body).__name__}",
                       code="invalid_json")
    return body


async def _until_disconnect(request: Request) -> None:
    """Returns when the client has gone away (the body must already be read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Run:
    """The engine streams of one HTTP request's questions, merged into one queue of ``(i, event)``.

    Cancelling the run closes each ``engine.stream`` generator, which aborts its vLLM request."""

    def __init__(self, engine: Any, reqs: Sequence[Any], request_id: str, stream_tokens: bool):
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks = [asyncio.create_task(self._pump(engine, i, r, request_id if len(reqs) == 1 else f"{request_id}-{i}",
                                                     stream_tokens)) for i, r in enumerate(reqs)]

    async def _pump(self, engine: Any, i: int, req: Any, request_id: str, stream_tokens: bool) -> None:
        try:
            async with contextlib.aclosing(engine.stream(req, request_id=request_id,
                                                         stream_tokens=stream_tokens)) as events:
                async for ev in events:
                    self.queue.put_nowait((i, ev))
        except Exception as exc:  # the engine reports failures in Finished; anything else is a bug
            log.exception("engine stream %s failed", request_id)
            self.queue.put_nowait((i, exc))

    async def next(self, gone: asyncio.Future | None = None) -> tuple[int, Any]:
        """The next event; with ``gone`` (a disconnect watcher), :class:`_ClientGone` if it fires first."""
        if gone is None:
            return await self.queue.get()
        if not self.queue.empty():
            return self.queue.get_nowait()
        get = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        raise _ClientGone

    def cancel(self) -> None:
        """Cancel what still runs; no await, so it also works inside a cancelled scope (anyio cancels
        every await there again)."""
        for t in self.tasks:
            t.cancel()


def _finish_reason(answer: Any) -> str:
    return "length" if answer.finish_reason == "length" else "stop"


def _usage(answers: Sequence[Any]) -> Usage:
    p = sum(len(a.prompt_token_ids) for a in answers)
    c = sum(len(a.output_token_ids) for a in answers)
    return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _prag_info(mode: str, answer: Any) -> PragInfo:
    missing = None
    if getattr(answer, "on_missing_adapter", None):
        missing = MissingAdapter(policy=answer.on_missing_adapter, doc_ids=list(answer.missing_doc_ids))
    return PragInfo(mode=mode, doc_ids=list(answer.doc_ids), scores=[float(s) for s in answer.scores],
                    prediction=answer.prediction, truncated=answer.truncated,
                    adapter_cache_hit=getattr(answer, "adapter_cache_hit", None), missing_adapter=missing,
                    replica=getattr(answer, "replica", None),
                    timings={k: round(v, 6) for k, v in (getattr(answer, "timings", None) or {}).items()})


def _engine_error(exc: BaseException) -> APIError:
    """An exception out of the engine: 500, or what it asks for (a dead replica: 503, retry)."""
    status = getattr(exc, "http_status", 500)
    if status == 503:
        return APIError(503, str(exc), code="replica_unavailable", headers={"Retry-After": "1"})
    return APIError(status, f"the engine failed ({type(exc).__name__}); see the server log", code="engine_error")


def _answer_error(answer: Any, param: str) -> APIError:
    return from_failure(getattr(answer, "error_kind", None), answer.error, param=param)


def create_app(engine: Any, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI application over ``engine`` (shared by all requests).

    What it uses of the engine (an :class:`~engine.engine.Engine`, or anything shaped like one):
    ``model``, ``limits``, ``max_new_tokens``, ``config.top_k``, ``request(...)``, ``stream(...)`` and
    ``close()``; read when present: ``max_question_chars``, ``in_flight``, ``cache.stats.hits/misses``,
    ``driver.aborted`` (metrics)."""
    cfg = (config or ServerConfig()).check()
    state = _State(engine, cfg)
    max_chars = getattr(engine, "max_question_chars", None) or float("inf")

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        state.draining = True
        if cfg.close_engine:  # after uvicorn's grace period: in-flight requests are done or cancelled
            await asyncio.to_thread(engine.close)

    docs = cfg.docs
    app = FastAPI(title="prag-engine", version="0.1.0", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url=None, openapi_url="/openapi.json" if docs else None)
    app.state.prag = state
    app.add_middleware(_Gate, state=state)

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):  # unknown route (404), wrong method (405)
        return APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _internal(_request, exc: Exception):
        log.error("internal error: %s", exc, exc_info=exc)
        return APIError(500, f"internal server error ({type(exc).__name__}); see the server log",
                        code="internal_error").response()

    @app.get("/health")
    async def health():
        """Open without the API key; 503 while the server shuts down."""
        if state.draining:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        return ModelList(data=[ModelCard(id=state.model_name)])

    @app.get("/metrics")
    async def metrics():
        refresh = getattr(engine, "refresh_metrics", None)  # engines whose metrics live elsewhere (replicas)
        if refresh is not None:
            await refresh()
        return Response(state.metrics.render(), media_type=metrics_mod.CONTENT_TYPE)

    errors = {s: {"model": ErrorResponse} for s in (400, 401, 404, 413, 422, 429, 500, 503)}

    @app.post("/v1/chat/completions", responses={200: {"model": ChatCompletionResponse}, **errors},
              openapi_extra=_body_doc(ChatCompletionRequest))
    async def chat(request: Request):
        return await _generate(request, ChatCompletionRequest)

    @app.post("/v1/completions", responses={200: {"model": CompletionResponse}, **errors},
              openapi_extra=_body_doc(CompletionRequest))
    async def completions(request: Request):
        return await _generate(request, CompletionRequest)

    # -- one generation request ------------------------------------------------------------------

    def _parse(body: dict, kind: type) -> tuple[Any, list[str], str]:
        try:
            req = kind.model_validate(body)
        except ValidationError as exc:
            raise from_validation(exc) from None
        req.check_fields()
        if req.model is not None and req.model != state.model_name:
            raise APIError(404, f"model {req.model[:100]!r} does not exist; this server serves "
                                f"{state.model_name!r} (GET /v1/models)", param="model", code="model_not_found")
        if kind is ChatCompletionRequest:
            questions, param = [req.question()], f"messages.{len(req.messages) - 1}.content"
        else:
            questions, param = req.questions(), "prompt"
        return req, questions, param

    def _prag_requests(req: Any, questions: list[str], param: str) -> list[Any]:
        """The one request check (``engine.request`` -> ``check_request``), with the server's token cap."""
        for i, q in enumerate(questions):
            where = param if len(questions) == 1 else f"{param}.{i}"
            if not q.strip():
                raise APIError(400, "empty question", param=where, code=str(FailureKind.EMPTY_QUESTION))
            if len(q) > max_chars:  # cannot fit the context whatever it says: refused before tokenising
                raise APIError(400, f"the question is {len(q)} characters long and cannot fit the model's "
                                    f"context of {state.limits.max_model_len} tokens", param=where,
                               code=str(FailureKind.PROMPT_TOO_LONG))
        controls = req.prag or PragControls()
        mode = cfg.default_mode if controls.mode is None else controls.mode
        top_k = engine.config.top_k if controls.top_k is None else controls.top_k
        max_tokens = state.default_max_tokens if req.token_limit() is None else req.token_limit()
        rename = {"mode": "prag.mode", "top_k": "prag.top_k", "doc_ids": "prag.doc_ids",
                  "max_tokens": req.token_param(), "question": param}
        try:
            sampling = check_sampling(req.temperature, req.top_p, req.seed, req.stop)
            out = []
            for q in questions:
                if state.limits is not engine.limits:  # the server's own --max-tokens-cap
                    check_request(state.limits, q, mode, top_k, max_tokens, controls.doc_ids, sampling)
                out.append(engine.request(q, mode, top_k, max_tokens, controls.doc_ids, sampling))
            return out
        except RequestInvalid as exc:
            raise from_invalid(exc, rename) from None

    async def _generate(request: Request, kind: type):
        track = _Track(state)
        try:
            try:
                body = await _read_json(request, cfg.max_body_bytes)
            except ClientDisconnect:  # gone while sending its body: nothing to answer
                track.finish(499)
                return Response(status_code=499)
            req, questions, param = _parse(body, kind)
            preqs = _prag_requests(req, questions, param)
            track.mode = str(preqs[0].mode)
            state.take(len(preqs))
        except APIError as exc:
            track.finish(exc.status)
            raise
        rid = f"{'chatcmpl' if kind is ChatCompletionRequest else 'cmpl'}-{uuid.uuid4().hex}"
        if req.user:
            log.info("request %s from user %r", rid, req.user[:100])
        t_run = time.monotonic()  # the engine's timings count from here
        run = _Run(engine, preqs, rid, stream_tokens=req.stream)
        handed_over = False
        collect: asyncio.Future | None = None
        gone = asyncio.ensure_future(_until_disconnect(request))
        try:
            if req.stream:
                events = await _first_events(run, len(preqs), gone, param, track)
                handed_over = True
                chunks = _sse(run, events, len(preqs), req, kind, rid, track)
                return StreamingResponse(chunks, media_type="text/event-stream", headers=STREAM_HEADERS)
            # one wait for the whole answer, raced once against the disconnect watcher (not per event)
            collect = asyncio.ensure_future(_answers(run, len(preqs), param))
            done, _ = await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
            if collect not in done:
                raise _ClientGone
            answers = collect.result()
            for a in answers:
                state.metrics.observe_answer(track.mode, a)
            ttft = min((a.timings.get("ttft_s", float("inf")) for a in answers), default=float("inf"))
            if ttft < float("inf"):
                track.first_token(t_run + ttft)
            track.finish(200)
            # pydantic-core writes the JSON itself: no intermediate dict and no json.dumps
            return Response(_response(req, kind, rid, answers, track.mode).model_dump_json(),
                            media_type="application/json")
        except _ClientGone:
            track.finish(499)
            return Response(status_code=499)
        except APIError as exc:
            track.finish(exc.status)
            raise
        except BaseException:
            track.finish(500)
            raise
        finally:
            gone.cancel()
            if collect is not None:
                collect.cancel()
            if not handed_over:
                run.cancel()
                state.give(len(preqs))

    async def _answers(run: _Run, n: int, param: str) -> list[Any]:
        answers: list[Any] = [None] * n
        left = n
        while left:
            i, ev = await run.next()
            if isinstance(ev, BaseException):
                raise _engine_error(ev)
            if isinstance(ev, Finished):
                answers[i] = ev.answer
                left -= 1
                if ev.answer.error is not None:
                    raise _answer_error(ev.answer, param if n == 1 else f"{param}.{i}")
        return answers

    async def _first_events(run: _Run, n: int, gone: asyncio.Future, param: str, track: _Track) -> list:
        """Events up to every question's first token (or its end): a question that fails before its
        first token (a missing adapter, a prompt too long) still gets its proper status, not a 200."""
        events, started = [], set()
        while len(started) < n:
            i, ev = await run.next(gone)
            if isinstance(ev, BaseException):
                raise _engine_error(ev)
            if isinstance(ev, Finished) and ev.answer.error is not None:
                raise _answer_error(ev.answer, param if n == 1 else f"{param}.{i}")
            if isinstance(ev, (Delta, Finished)):
                if not started:
                    track.first_token()
                started.add(i)
            events.append((i, ev))
        return events

    async def _sse(run: _Run, first: list, n: int, req: Any, kind: type, rid: str,
                   track: _Track) -> AsyncIterator[str]:
        chat = kind is ChatCompletionRequest
        usage_on = bool(req.stream_options and req.stream_options.include_usage)
        base = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": state.model_name}
        if usage_on:
            base["usage"] = None
        # one delta chunk is formatted by hand: it is sent once per token of every streamed answer
        head = 'data: ' + json.dumps(base)[:-1] + ', "choices": [{"index": '
        mid = ', "delta": {"content": ' if chat else ', "text": '
        tail = '}, "logprobs": null, "finish_reason": null}]}\n\n' if chat else \
            ', "logprobs": null, "finish_reason": null}]}\n\n'

        def chunk(i: int, extra: dict, finish: str | None = None, prag: PragInfo | None = None) -> str:
            choice = {"index": i, **extra, "logprobs": None, "finish_reason": finish}
            body = {**base, "choices": [choice]}
            if prag is not None:
                body["prag"] = prag.model_dump(mode="json")
            return f"data: {json.dumps(body)}\n\n"

        empty = {"delta": {}} if chat else {"text": ""}
        opened, finished, answers = set(), 0, []
        pending = list(first)
        status = 499
        try:
            while finished < n:
                i, ev = pending.pop(0) if pending else await run.next()
                if isinstance(ev, BaseException):
                    err = APIError(500, f"the engine failed ({type(ev).__name__}); see the server log",
                                   code="engine_error")
                    yield f"data: {json.dumps(err.body())}\n\n"
                    status = 500
                    break
                if i not in opened:  # the first chunk: the role, and the documents PRAG retrieved
                    opened.add(i)
                    info = PragInfo(mode=track.mode, doc_ids=list(ev.doc_ids), scores=[float(s) for s in ev.scores]) \
                        if isinstance(ev, Retrieved) else PragInfo(mode=track.mode)
                    yield chunk(i, {"delta": {"role": "assistant", "content": ""}} if chat else {"text": ""},
                                prag=info)
                if isinstance(ev, Delta):
                    yield f"{head}{i}{mid}{json.dumps(ev.text)}{tail}"
                elif isinstance(ev, Finished):
                    a = ev.answer
                    finished += 1
                    if a.error is not None:  # failed after its first token: the engine's own error
                        err = _answer_error(a, "prompt" if not chat else "messages")
                        yield f"data: {json.dumps(err.body())}\n\n"
                        status = err.status
                        break
                    answers.append(a)
                    state.metrics.observe_answer(track.mode, a)
                    yield chunk(i, empty, _finish_reason(a), _prag_info(track.mode, a))
            else:
                if usage_on:
                    yield f"data: {json.dumps({**base, 'choices': [], 'usage': _usage(answers).model_dump()})}\n\n"
                status = 200
            yield "data: [DONE]\n\n"
        finally:
            track.finish(status)
            state.give(n)
            run.cancel()

    def _response(req: Any, kind: type, rid: str, answers: list, mode: str):
        created = int(time.time())
        if kind is ChatCompletionRequest:
            a = answers[0]
            return ChatCompletionResponse(
                id=rid, created=created, model=state.model_name, usage=_usage(answers), prag=_prag_info(mode, a),
                choices=[ChatChoice(index=0, message=AssistantMessage(content=a.text),
                                    finish_reason=_finish_reason(a))])
        infos = [_prag_info(mode, a) for a in answers]
        return CompletionResponse(
            id=rid, created=created, model=state.model_name, usage=_usage(answers),
            prag=infos[0] if isinstance(req.prompt, str) else infos,
            choices=[CompletionChoice(index=i, text=a.text, finish_reason=_finish_reason(a))
                     for i, a in enumerate(answers)])

    def _openapi() -> dict:
        """FastAPI's schema plus the request models (the routes read their bodies themselves)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (ChatCompletionRequest, CompletionRequest):
                s = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(s.pop("$defs", {}))
                components[model.__name__] = s
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = _openapi
    return app


def _body_doc(model: type) -> dict:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def begin_shutdown(app: FastAPI) -> None:
    """Refuse new requests (503) from now on; requests in flight go on."""
    app.state.prag.draining = True


def serve(engine: Any, config: ServerConfig | None = None) -> None:
    """Run the server in the foreground until SIGINT/SIGTERM, then shut down gracefully: new requests
    get 503, those in flight get ``shutdown_grace`` seconds to finish, then the engine closes (which
    also removes its merged-adapter folder)."""
    import sys

    import uvicorn

    from prag.logs import is_verbose

    cfg = replace(config or ServerConfig(), close_engine=True).check()
    app = create_app(engine, cfg)

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            begin_shutdown(app)
            super().handle_exit(sig, frame)

    verbose = is_verbose()  # quiet: no uvicorn banner or per-request access lines, one line of our own
    if not verbose:
        print(f"prag serve: http://{cfg.host}:{cfg.port}/v1 (Ctrl+C stops)", file=sys.stderr, flush=True)
    _Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info" if verbose else "warning",
                           access_log=verbose, timeout_graceful_shutdown=cfg.shutdown_grace,
                           lifespan="on")).run()
