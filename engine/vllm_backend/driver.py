"""Request drivers: the one place that submits requests to vLLM and hands their outputs back.

Both drivers have the same interface, ``async for out in driver.generate(token_ids, params, lora, request_id)``,
and both can be iterated from *any* asyncio loop (the HTTP server's, or a private one for batch
evaluation): outputs travel to the caller's loop with ``call_soon_threadsafe``. Closing the iterator
before the last output aborts the request inside vLLM.

* :class:`LLMDriver` drives a ``vllm.LLM`` (its ``LLMEngine``) from one thread. vLLM's engine is not
  thread-safe, so requests are added and aborted by that thread between steps; it steps whenever a
  request is live and sleeps otherwise. A request that arrives while others decode joins the running
  batch at the next step: continuous batching with no lock around a batch. With the engine core in
  this process (the CPU default) this is also the only way the memory hand-over reaches vLLM's worker.
* :class:`AsyncLLMDriver` runs vLLM's ``AsyncLLM`` (engine core in its own process, the GPU default) on
  a loop thread of its own.

Measured on the 2-core CPU machine (``benchmarks/serve_throughput.py --driver``): see the README.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from typing import Any, AsyncIterator

log = logging.getLogger(__name__)


class DriverClosed(RuntimeError):
    """The driver was shut down while a request was waiting or running."""


class _Stream:
    """One request's outputs on their way to the caller's loop."""

    __slots__ = ("loop", "queue")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def push(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass


async def _drain(stream: _Stream, abort, request_id: str) -> AsyncIterator[Any]:
    finished = False
    try:
        while True:
            item = await stream.queue.get()
            if isinstance(item, BaseException):
                finished = True
                raise item
            finished = bool(item.finished)
            yield item
            if finished:
                return
    finally:
        if not finished:  # the caller stopped listening (disconnect, cancel, error): free vLLM's slot now
            abort(request_id)


class LLMDriver:
    """Continuous batching over a ``vllm.LLM`` stepped by one thread (see the module doc)."""

    def __init__(self, llm: Any):
        self.llm = llm
        self.engine = llm.llm_engine
        self._cond = threading.Condition()
        self._commands: list[tuple] = []
        self._streams: dict[str, _Stream] = {}
        self._closed = False
        self.steps = 0
        self.aborted = 0
        self._thread = threading.Thread(target=self._run, name="prag-vllm-driver", daemon=True)
        self._thread.start()

    # -- any thread ------------------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self._streams)

    async def generate(self, prompt_token_ids: list[int], params: Any, lora_request: Any,
                       request_id: str) -> AsyncIterator[Any]:
        stream = _Stream(asyncio.get_running_loop())
        self._send(("add", request_id, prompt_token_ids, params, lora_request, stream))
        async for out in _drain(stream, self.abort, request_id):
            yield out

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def call(self, fn, *args) -> Any:
        """Run ``fn(*args)`` on the driver thread between two steps (vLLM's engine is single-threaded)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        from concurrent.futures import Future

        fut: Future = Future()
        self._send(("call", fn, args, fut))
        return fut.result()

    def reset_prefix_cache(self) -> bool:
        return self.call(self.llm.reset_prefix_cache)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=30)

    def _send(self, command: tuple) -> None:
        with self._cond:
            if self._closed:
                raise DriverClosed("the vLLM driver is shut down")
            self._commands.append(command)
            self._cond.notify()

    # -- the driver thread -------------------------------------------------------------------------
    def _run(self) -> None:
        from vllm import TokensPrompt

        engine = self.engine
        while True:
            with self._cond:
                while not self._commands and not self._closed and not self._streams:
                    self._cond.wait()
                commands, self._commands = self._commands, []
                closed = self._closed
            for cmd in commands:
                if cmd[0] == "add":
                    _, rid, ids, params, lora, stream = cmd
                    if closed:
                        stream.push(DriverClosed("the vLLM driver is shut down"))
                        continue
                    try:
                        engine.add_request(rid, TokensPrompt(prompt_token_ids=ids), params, lora_request=lora)
                    except Exception as exc:  # noqa: BLE001 - e.g. an invalid LoRA: that request fails alone
                        stream.push(exc)
                        continue
                    self._streams[rid] = stream
                elif cmd[0] == "call":
                    _, fn, args, fut = cmd
                    try:
                        fut.set_result(fn(*args))
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(exc)
                else:
                    stream = self._streams.pop(cmd[1], None)
                    if stream is not None:
                        engine.abort_request([cmd[1]], internal=False)
                        self.aborted += 1
            if closed:
                self._fail_all(DriverClosed("the vLLM driver shut down while this request ran"))
                return
            if not self._streams:
                continue
            try:
                outputs = engine.step()
            except Exception as exc:  # noqa: BLE001 - vLLM failed mid-step: every live request fails, loudly
                log.exception("vLLM step failed; failing %d live requests", len(self._streams))
                self._fail_all(exc)
                continue
            self.steps += 1
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                stream.push(out)

    def _fail_all(self, exc: BaseException) -> None:
        ids = list(self._streams)
        if ids:
            try:
                self.engine.abort_request(ids, internal=False)
            except Exception:  # noqa: BLE001 - the engine may be the thing that broke
                pass
        for rid in ids:
            self._streams.pop(rid).push(exc)


class AsyncLLMDriver:
    """vLLM's ``AsyncLLM`` on a loop thread of its own, so callers on any loop can use it."""

    def __init__(self, engine_kwargs: dict[str, Any]):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="prag-asyncllm", daemon=True)
        self._thread.start()
        self.steps = 0
        self.aborted = 0
        self._live: set[str] = set()

        async def build():
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            return AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs))

        self.llm = asyncio.run_coroutine_threadsafe(build(), self._loop).result()

    @property
    def vllm_config(self):
        return self.llm.vllm_config

    @property
    def in_flight(self) -> int:
        return len(self._live)

    async def generate(self, prompt_token_ids: list[int], params: Any, lora_request: Any,
                       request_id: str) -> AsyncIterator[Any]:
        from vllm import TokensPrompt

        stream = _Stream(asyncio.get_running_loop())

        async def pump():
            self._live.add(request_id)
            try:
                async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_token_ids), params,
                                                   request_id, lora_request=lora_request):
                    stream.push(out)
            except asyncio.CancelledError:
                self.aborted += 1
                raise
            except Exception as exc:  # noqa: BLE001 - delivered to the caller
                stream.push(exc)
            finally:
                self._live.discard(request_id)

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        async for out in _drain(stream, lambda _rid: future.cancel(), request_id):
            yield out

    def abort(self, request_id: str) -> None:
        asyncio.run_coroutine_threadsafe(self.llm.abort(request_id), self._loop)

    def reset_prefix_cache(self) -> bool:
        return asyncio.run_coroutine_threadsafe(self.llm.reset_prefix_cache(), self._loop).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self.llm.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)


# One driver per vllm.LLM: two threads stepping the same engine would corrupt it, and several
# Engines (over different stores) may share one vLLM engine.
_DRIVERS: "weakref.WeakKeyDictionary[Any, LLMDriver]" = weakref.WeakKeyDictionary()
_DRIVERS_LOCK = threading.Lock()


def driver_for(llm: Any) -> LLMDriver:
    """The (shared) driver of a ``vllm.LLM``."""
    with _DRIVERS_LOCK:
        driver = _DRIVERS.get(llm)
        if driver is None:
            driver = _DRIVERS[llm] = LLMDriver(llm)
        return driver


def close_driver(llm: Any) -> None:
    """Stop the driver thread of ``llm`` (before the engine shuts down)."""
    with _DRIVERS_LOCK:
        driver = _DRIVERS.pop(llm, None)
    if driver is not None:
        driver.close()
