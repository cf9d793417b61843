"""The grouped CPU LoRA ops (engine.vllm_backend.grouped_lora) against the per-token definition and vLLM's own ops."""

from __future__ import annotations

import pytest
import torch

from engine.vllm_backend.grouped_lora import grouped_expand, grouped_shrink, plan_segments

# two prefill chunks, decode tokens, tokens without an adapter, one adapter used by two segments
SLOTS = [2, 2, 2, -1, -1, 0, 1, 1, 3, 4, 4, 4, 4, 5, -1, 5, 2]


def _stacked(max_loras: int, r: int, d_in: int, d_out: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(max_loras, 1, r, d_in, generator=g, dtype=torch.float32).to(dtype)
    b = torch.randn(max_loras, 1, d_out, r, generator=g, dtype=torch.float32).to(dtype)
    return a, b


def _per_token(x, a, b, slots, scale):
    """The definition, token by token, in float64."""
    shrink = torch.zeros(len(slots), a.shape[2], dtype=torch.float64)
    expand = torch.zeros(len(slots), b.shape[2], dtype=torch.float64)
    for t, s in enumerate(slots):
        if s >= 0:
            shrink[t] = scale * (a[s, 0].double() @ x[t].double())
            expand[t] = b[s, 0].double() @ shrink[t]
    return shrink, expand


def test_plan_groups_runs_of_equal_slots():
    plan = plan_segments(torch.tensor(SLOTS), min_shared_run=2)
    assert plan.single_tokens.tolist() == [5, 8, 13, 15, 16]
    assert plan.single_loras.tolist() == [0, 3, 5, 5, 2]
    assert plan.multi_loras.tolist() == [2, 1, 4]
    assert plan.multi_tokens.tolist() == [0, 1, 2, 6, 7, 9, 10, 11, 12]
    assert plan.multi_valid.sum().item() == 9 and tuple(plan.multi_rows.shape) == (3, 4)
    assert plan.span(plan.single_tokens) is None  # not one contiguous run
    contiguous = plan_segments(torch.tensor([-1, 3, 3, 1, 1, 1]), min_shared_run=2)
    assert contiguous.span(contiguous.multi_tokens) == slice(1, 6)


def test_decoding_requests_sharing_an_adapter_stay_one_contiguous_span():
    """Neighbouring decode requests with the same documents have the same slot. Short runs are done token by
    token, so the decode rows stay one slice (a slice add, not index_add_) and the prefill after them too."""
    decode = [4, 7, 7, 1, 2, 2, 2, 5]
    plan = plan_segments(torch.tensor(decode + [3] * 12 + [6] * 9))
    assert plan.single_tokens.tolist() == list(range(8)) and plan.single_loras.tolist() == decode
    assert plan.span(plan.single_tokens) == slice(0, 8)
    assert plan.multi_loras.tolist() == [3, 6] and plan.span(plan.multi_tokens) == slice(8, 29)


def test_plan_without_adapters_and_empty():
    plan = plan_segments(torch.tensor([-1, -1, -1]))
    assert plan.single_tokens.numel() == 0 and plan.multi_tokens.numel() == 0
    assert plan_segments(torch.tensor([], dtype=torch.long)).num_tokens == 0


@pytest.mark.parametrize("min_shared_run", [2, 8])
@pytest.mark.parametrize("slots", [SLOTS, [3] * 7, list(range(6)), [-1, 0, 0, 0, 1, 1], [1, 5, 5] + [2] * 9 + [-1]])
def test_shrink_and_expand_match_the_per_token_definition(slots, min_shared_run):
    a, b = _stacked(6, 8, 32, 48)
    x = torch.randn(len(slots), 32, generator=torch.Generator().manual_seed(1))
    plan = plan_segments(torch.tensor(slots), min_shared_run)
    buf = torch.full((len(slots), 8), 7.0)  # stale values must be overwritten (zeros where no adapter)
    grouped_shrink([buf], x, [a], plan, scale=0.5)
    y0 = torch.randn(len(slots), 2 * 48, generator=torch.Generator().manual_seed(2))
    y = y0.clone()
    grouped_expand(y, buf, b, plan, offset=48, size=48, add_inputs=True)
    want_shrink, want_expand = _per_token(x, a, b, slots, 0.5)
    torch.testing.assert_close(buf.double(), want_shrink, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[:, 48:].double(), y0[:, 48:].double() + want_expand, atol=1e-4, rtol=1e-5)
    assert torch.equal(y[:, :48], y0[:, :48])  # the other output slice is untouched
    y2 = y0.clone()
    grouped_expand(y2, buf, b, plan, offset=0, size=48, add_inputs=False)
    torch.testing.assert_close(y2[:, :48].double(), want_expand, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("min_shared_run", [2, 8])
def test_matches_vllm_torch_ops(min_shared_run):
    """The same numbers as vLLM-CPU's own (per-token gather) ops, which this replaces."""
    from vllm.lora.ops.torch_ops import bgmv_expand_slice, bgmv_shrink

    slots = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 5, 5])  # every token has an adapter, as vLLM's ops assume
    a, b = _stacked(6, 8, 64, 96, seed=3)
    x = torch.randn(len(slots), 64, generator=torch.Generator().manual_seed(4))
    ref_buf = torch.zeros(len(slots), 8)
    bgmv_shrink(x, a, ref_buf, slots, 1.0)
    ref_y = torch.zeros(len(slots), 96)
    bgmv_expand_slice(ref_buf, b, ref_y, slots, 0, 96, True)
    plan = plan_segments(slots, min_shared_run)
    buf = torch.zeros(len(slots), 8)
    grouped_shrink([buf], x, [a], plan, 1.0)
    y = torch.zeros(len(slots), 96)
    grouped_expand(y, buf, b, plan, 0, 96)
    torch.testing.assert_close(buf, ref_buf, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, ref_y, atol=1e-4, rtol=1e-5)


def test_cached_decode_weights_follow_in_place_adapter_loads():
    """A decoding plan caches gathered weights; vLLM loads a new adapter into a slot in place."""
    slots = [0, 1, 2]
    a, b = _stacked(3, 8, 16, 24)
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(5))
    plan = plan_segments(torch.tensor(slots))
    buf = torch.zeros(3, 8)
    grouped_shrink([buf], x, [a], plan, 1.0)
    a[1, 0].copy_(torch.randn(8, 16, generator=torch.Generator().manual_seed(6)))  # new adapter in slot 1
    b[2, 0].mul_(3.0)
    grouped_shrink([buf], x, [a], plan, 1.0)
    y = torch.zeros(3, 24)
    grouped_expand(y, buf, b, plan, 0, 24)
    want_shrink, want_expand = _per_token(x, a, b, slots, 1.0)
    torch.testing.assert_close(buf.double(), want_shrink, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.double(), want_expand, atol=1e-4, rtol=1e-5)
    assert plan.same_slots(torch.tensor(slots)) and not plan.same_slots(torch.tensor([0, 1]))


def test_bf16_close_to_float64():
    a, b = _stacked(6, 8, 64, 96, dtype=torch.bfloat16, seed=7)
    x = torch.randn(len(SLOTS), 64, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    plan = plan_segments(torch.tensor(SLOTS), min_shared_run=2)
    buf = torch.zeros(len(SLOTS), 8)
    grouped_shrink([buf], x, [a], plan, 1.0)
    y = torch.zeros(len(SLOTS), 96, dtype=torch.bfloat16)
    grouped_expand(y, buf, b, plan, 0, 96)
    want_shrink, want_expand = _per_token(x, a, b, SLOTS, 1.0)
    torch.testing.assert_close(buf.double(), want_shrink, atol=0.1, rtol=0.02)
    torch.testing.assert_close(y.double(), want_expand, atol=1.0, rtol=0.03)


def test_vllm_chose_our_platform_and_it_routes_to_our_wrapper_only_when_enabled(monkeypatch):
    """vLLM resolved its platform through our ``vllm.platform_plugins`` entry point (no class patch); the
    platform answers our punica wrapper only while PRAG_CPU_LORA=1, else vLLM's own."""
    import importlib

    from vllm.platforms import current_platform
    from vllm.platforms.cpu import CpuPlatform

    from engine.vllm_backend import plugin as vllm_plugin
    from engine.vllm_backend.cpu_platform import PragCpuPlatform

    assert type(current_platform) is PragCpuPlatform
    assert CpuPlatform.get_punica_wrapper() == "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"  # unpatched
    monkeypatch.setenv(vllm_plugin.ENV_FLAG, "0")
    assert current_platform.get_punica_wrapper() == CpuPlatform.get_punica_wrapper()
    monkeypatch.setenv(vllm_plugin.ENV_FLAG, "1")
    assert current_platform.get_punica_wrapper() == vllm_plugin.WRAPPER_QUALNAME
    module, _, name = vllm_plugin.WRAPPER_QUALNAME.rpartition(".")
    assert getattr(importlib.import_module(module), name).__name__ == "GroupedPunicaWrapperCPU"
    assert vllm_plugin.detect_platform() == vllm_plugin.PLATFORM_QUALNAME == (
        f"{PragCpuPlatform.__module__}.{PragCpuPlatform.__qualname__}")


def test_fast_adapter_lookup_lists_the_same_adapters_as_vllm(monkeypatch):
    """The plugin's ``list_adapters`` (the LRU's live keys view) against vLLM's own (a dict copy), for the
    ways vLLM's managers use it: membership, equality and subtraction before the cache changes."""
    from types import SimpleNamespace

    from vllm.lora.model_manager import AdapterLRUCache, LRUCacheLoRAModelManager
    from vllm.lora.worker_manager import WorkerLoRAManager

    from engine.vllm_backend import plugin as vllm_plugin

    monkeypatch.setattr(WorkerLoRAManager, "list_adapters", WorkerLoRAManager.list_adapters)  # restored after
    cache = AdapterLRUCache(4, lambda key: None)
    for key in (3, 9, 4, 11, 7, 20):  # six into four places: 3 and 9 are evicted
        cache[key] = object()
    cache.touch(4)
    adapter_manager = SimpleNamespace(_registered_adapters=cache)
    want = set(LRUCacheLoRAModelManager.list_adapters(adapter_manager))
    vllm_plugin._fast_adapter_lookup()
    got = WorkerLoRAManager.list_adapters(SimpleNamespace(_adapter_manager=adapter_manager))
    assert got == want == {4, 11, 7, 20}
    assert [k in got for k in (3, 9, 4, 20, 5)] == [False, False, True, True, False]
    stale = got - {11, 99}
    assert isinstance(stale, set) and stale == {4, 7, 20}
    cache[21] = object()  # evicts the least recently used (11): the view follows the cache, the difference does not
    assert 21 in got and 11 not in got and stale == {4, 7, 20}


def test_plugin_is_registered_as_vllm_entry_points():
    from importlib.metadata import entry_points

    values = {ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert "engine.vllm_backend.plugin:register" in values
    values = {ep.value for ep in entry_points(group="vllm.platform_plugins")}
    assert "engine.vllm_backend.plugin:detect_platform" in values


def test_the_shared_engine_runs_our_lora_ops_on_ffn_modules_only(shared_llm):
    """The test session's vLLM engine (the one the prag/combine token-identity tests use) is built by
    ``make_llm``: in-process on a CPU, our punica wrapper with the native kernel, LoRA layers only where
    adapters can be."""
    from engine.vllm_backend import compat
    from engine.vllm_backend.cpu_lora import GroupedPunicaWrapperCPU

    manager = compat.worker_lora_manager(shared_llm)._adapter_manager
    wrappers = set(map(type, manager.punica_wrapper_mapping.values()))
    assert wrappers == {GroupedPunicaWrapperCPU}
    # and the fused C kernel behind it, so the token-identity tests against PEFT run on that kernel
    assert all(w._native is not None for w in manager.punica_wrapper_mapping.values())
    suffixes = {name.rsplit(".", 1)[-1] for name in manager.modules}
    assert suffixes == {"gate_up_proj", "down_proj"}
    # vLLM's C++ ops for norms, rotary and activation in the eager LoRA model
    assert "all" in shared_llm.llm_engine.vllm_config.compilation_config.custom_ops


def test_llm_config_turns_the_cpu_settings_into_vllm_arguments(monkeypatch):
    from engine.vllm_backend import llm as llm_mod
    from engine.vllm_backend.llm import LLMConfig

    monkeypatch.setattr(llm_mod, "has_cuda", lambda: False)
    kw = LLMConfig(model="m", max_loras=4, lora_target_modules=("gate_proj", "down_proj")).to_engine_kwargs()
    assert kw["lora_target_modules"] == ["gate_proj", "down_proj"]
    assert kw["distributed_executor_backend"] == "uni"  # in-process by default on a CPU
    assert kw["compilation_config"] == {"custom_ops": ["all"]}  # vLLM's C++ norm/rotary/activation ops
    kw = LLMConfig(model="m", in_process=False).to_engine_kwargs()
    assert "distributed_executor_backend" not in kw and "lora_target_modules" not in kw
    custom = {"custom_ops": ["none"], "mode": 0}
    assert LLMConfig(model="m", engine_args={"compilation_config": custom}).to_engine_kwargs()["compilation_config"] \
        == custom  # the caller's own setting wins
    assert "compilation_config" not in LLMConfig(model="m", enable_lora=False).to_engine_kwargs()
    monkeypatch.setattr(llm_mod, "has_cuda", lambda: True)
    assert LLMConfig(model="m").resolved_in_process() is False
    assert "compilation_config" not in LLMConfig(model="m").to_engine_kwargs()  # GPUs keep vLLM's compile


def test_cli_in_process_flag_reaches_the_engine_config():
    import argparse

    from engine.cli import add_engine_flags, engine_config

    p = argparse.ArgumentParser()
    add_engine_flags(p)
    assert engine_config(p.parse_args([])).in_process is None
    assert engine_config(p.parse_args(["--no-in-process"])).in_process is False
    assert engine_config(p.parse_args(["--in-process"])).in_process is True


def test_a_second_in_process_engine_is_refused_while_one_is_alive(shared_llm, tiny_model_dir):
    """vLLM's parallel state is per process: the shared engine is in-process, so asking for another
    in-process engine must fail clearly (the default, in_process=None, falls back to a separate process)."""
    from prag.errors import PragError
    from engine.vllm_backend.llm import LLMConfig, make_llm

    assert type(shared_llm.llm_engine.engine_core).__name__ == "InprocClient"
    with pytest.raises(PragError, match="already runs inside this process"):
        make_llm(LLMConfig(model=str(tiny_model_dir), in_process=True))


def test_shrink_of_two_slices_sharing_the_input():
    """gate and up share x (gathered once); each slice gets its own adapter's result."""
    a1, b1 = _stacked(6, 8, 32, 48, seed=11)
    a2, _ = _stacked(6, 8, 32, 48, seed=12)
    x = torch.randn(len(SLOTS), 32, generator=torch.Generator().manual_seed(13))
    plan = plan_segments(torch.tensor(SLOTS), min_shared_run=2)
    bufs = [torch.zeros(len(SLOTS), 8), torch.zeros(len(SLOTS), 8)]
    grouped_shrink(bufs, x, [a1, a2], plan, 1.0)
    for buf, a in zip(bufs, (a1, a2)):
        want, _ = _per_token(x, a, b1, SLOTS, 1.0)
        torch.testing.assert_close(buf.double(), want, atol=1e-5, rtol=1e-5)
