"""The request drivers (engine/vllm_backend/driver.py) on a real vLLM engine: continuous batching,
abort, and the AsyncLLM driver giving the same tokens as the in-process one."""

from __future__ import annotations

import asyncio
import time

import pytest

pytestmark = pytest.mark.slow

LONG, SHORT = 96, 2


@pytest.fixture(scope="module")
def llm(shared_llm):
    return shared_llm


def _params(n: int, delta: bool = False):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True,
                          output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY)


async def _collect(driver, ids, n, rid, delta=False):
    tokens, finished_at = [], None
    async for out in driver.generate(ids, _params(n, delta), None, rid):
        tokens.extend(out.outputs[0].token_ids)
        if out.finished:
            finished_at = time.perf_counter()
    return tokens, finished_at


def test_a_short_request_joins_a_running_batch(llm):
    """Sent while 8 long requests decode, a 2-token request finishes long before them (no batch lock)."""
    from engine.vllm_backend.driver import driver_for

    driver = driver_for(llm)
    prompts = [[1, 100 + i, 200 + i, 300] for i in range(9)]

    async def main():
        longs = [asyncio.create_task(_collect(driver, p, LONG, f"long-{i}")) for i, p in enumerate(prompts[:8])]
        while driver.steps == 0 or driver.in_flight < 8:
            await asyncio.sleep(0.005)
        steps_before, t0 = driver.steps, time.perf_counter()
        short_tokens, short_done = await _collect(driver, prompts[8], SHORT, "short")
        short_steps = driver.steps - steps_before
        long_results = await asyncio.gather(*longs)
        return t0, short_tokens, short_done, short_steps, long_results

    t0, short_tokens, short_done, short_steps, long_results = asyncio.run(main())
    assert len(short_tokens) == SHORT and all(len(t) == LONG for t, _ in long_results)
    assert short_steps <= SHORT + 2  # it joined the running batch at once
    last_long = max(done for _, done in long_results)
    assert (short_done - t0) <= 0.25 * (last_long - t0)


def test_closing_a_stream_aborts_the_request(llm):
    from engine.vllm_backend.driver import driver_for

    driver = driver_for(llm)
    aborted = driver.aborted

    async def main():
        gen = driver.generate([1, 5, 6, 7], _params(200, delta=True), None, "to-abort")
        got = 0
        async for out in gen:
            got += len(out.outputs[0].token_ids)
            if got >= 3:
                break
        await gen.aclose()
        for _ in range(200):
            if driver.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        return got

    got = asyncio.run(main())
    assert got >= 3 and driver.in_flight == 0 and driver.aborted == aborted + 1
    assert not driver.call(llm.llm_engine.has_unfinished_requests)
    # and the engine still answers afterwards
    tokens, _ = asyncio.run(_collect(driver, [1, 5, 6, 7], 4, "after-abort"))
    assert len(tokens) == 4


def test_asyncllm_driver_gives_the_same_tokens(llm, tiny_model_dir):
    """vLLM's AsyncLLM (engine core in its own process) against the in-process driver, greedy fp32."""
    from engine.vllm_backend.driver import AsyncLLMDriver, driver_for
    from engine.vllm_backend.llm import LLMConfig, async_engine_kwargs

    prompts = [[1, 40 + i, 41 + i, 42] for i in range(4)]

    async def run(driver, tag):
        return await asyncio.gather(*(_collect(driver, p, 12, f"{tag}-{i}", delta=True)
                                      for i, p in enumerate(prompts)))

    inproc = [t for t, _ in asyncio.run(run(driver_for(llm), "llm"))]
    from offline_encode.config import EncodeConfig

    cfg = LLMConfig(model=str(tiny_model_dir), dtype="float32", max_model_len=1024, max_loras=8,
                    lora_target_modules=tuple(EncodeConfig().target_modules))  # as conftest's shared_llm
    driver = AsyncLLMDriver(async_engine_kwargs(cfg))
    try:
        other = [t for t, _ in asyncio.run(run(driver, "async"))]

        async def abort_one():
            gen = driver.generate(prompts[0], _params(500, delta=True), None, "async-abort")
            async for _ in gen:
                break
            await gen.aclose()
            for _ in range(300):
                if driver.in_flight == 0:
                    return True
                await asyncio.sleep(0.01)
            return False

        assert asyncio.run(abort_one())
    finally:
        driver.close()
    assert other == inproc and all(len(t) == 12 for t in inproc)
