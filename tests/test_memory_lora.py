"""Merged adapters handed to vLLM from memory (engine/vllm_backend/memory_lora.py), on the real vLLM.

Shares the session engine ``shared_llm``; every check compares real generated tokens or tensors."""

from __future__ import annotations

import hashlib

import pytest
import torch

from prag.errors import PragError

QUESTIONS = ["Where does the river Varn flow?", "Who founded the school of landscape art?",
             "When was the bridge over the Olm completed?", "What is the capital of the province of Hest?"]
SETS = [["d0", "d1", "d2"], ["d5", "d4", "d3"], ["d6", "d7", "d8"], ["d9", "d10", "d11"]]


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_model_dir):
    from tests.helpers.random_store import build_random_store

    root = tmp_path_factory.mktemp("memlora")
    ids = [f"d{i}" for i in range(12)]
    # b_std large enough that every adapter changes the greedy output of the tiny model
    return {"one": build_random_store(root / "s1", tiny_model_dir, ids, seed=1, b_std=0.2),
            "two": build_random_store(root / "s2", tiny_model_dir, ids, seed=2, b_std=0.2), "root": root}


def _engine(model, store, llm, handover="auto"):
    from engine.engine import Engine, EngineConfig

    return Engine(model, store=store, llm=llm, config=EngineConfig(adapter_handover=handover))


def _tokens(engine, sets=SETS, mode="prag"):
    answers = engine.generate(QUESTIONS[:len(sets)], mode=mode, doc_ids=sets)
    assert all(a.ok for a in answers), [a.error for a in answers]
    return [a.output_token_ids for a in answers], answers


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def test_memory_and_directory_paths_give_identical_tokens(tiny_model_dir, stores, shared_llm):
    mem = _engine(tiny_model_dir, stores["one"], shared_llm)
    dirs = _engine(tiny_model_dir, stores["one"], shared_llm, handover="dir")
    try:
        assert mem.handover == "memory" and mem.cache.root is None
        assert dirs.handover == "dir" and dirs.cache.root.is_dir()
        from engine.vllm_backend.memory_lora import TIMERS

        fills = TIMERS.fills
        got, answers = _tokens(mem)
        assert TIMERS.fills - fills == len(SETS), "slots must be filled by the one-copy path"
        # the kernel's transposed B copies were refreshed slot by slot and match the slots exactly
        plan, checked = mem._slot_plan, 0
        cache = plan.slot_written.__self__._transposed
        for _, b_st in plan.targets:
            hit = cache.get(id(b_st))
            if hit is not None and hit[0] is b_st and hit[1] == b_st._version:
                assert torch.equal(hit[2], b_st[:, 0].transpose(1, 2))
                checked += 1
        assert checked == len(plan.targets)
        assert all(a.lora_name.startswith("prag-") for a in answers)
        assert mem.last_stats.adapters_built == len(SETS) and mem.last_stats.vllm_load_s > 0
        assert mem.last_stats.write_s == 0.0
        want, _ = _tokens(dirs)
        assert dirs.last_stats.write_s > 0
        assert got == want
        base, _ = _tokens(mem, mode="none")
        assert sum(g != b for g, b in zip(got, base)) >= len(SETS) - 1, "the adapters must act"
    finally:
        mem.close()
        dirs.close()


def test_slot_merge_is_row_merge_cast_once(tiny_model_dir, stores, shared_llm):
    """The one-gather merge into vLLM's padded slot layout == RowMerge, rounded once to vLLM's dtype."""
    from engine.merge import RowMerge
    from engine.vllm_backend import compat
    from engine.vllm_backend.memory_lora import SlotMerge, SlotPlan

    store = stores["one"]
    plan = SlotPlan.build(compat.worker_lora_manager(shared_llm), store.layout)
    assert len(plan.segments) == len(store.layout.keys) // 2
    rows = store.get_rows(["d0", "d1", "d2"])
    mem = SlotMerge(store.layout, 3, store.alpha, plan)(rows)
    ref = RowMerge(store.layout, 3, store.alpha)(rows)
    got = mem.tensors()
    assert set(got) == set(ref.tensors) and mem.rank == ref.rank == 3 * store.rank
    for key, t in ref.tensors.items():
        assert torch.equal(got[key], t.to(plan.dtype)), key
    # the padding is zero: a slot filled from these views holds nothing else
    for (a, b) in mem.views():
        assert not a[mem.rank:].any() and not b[:, mem.rank:].any()


def test_scale_applied_once_across_loads_evictions_and_reloads(tiny_model_dir, stores, shared_llm):
    """vLLM folds alpha/r into lora_B in place when it registers an adapter; loading the same registered
    tensors again (a repeat, a reload after vLLM evicted it, a rebuild after our cache dropped it) must
    not scale them twice."""
    from engine.vllm_backend import memory_lora

    engine = _engine(tiny_model_dir, stores["one"], shared_llm)
    try:
        first, answers = _tokens(engine, SETS[:1])
        (entry,) = engine.cache._entries.values()
        before = _digest(entry.payload.flat)
        loads = memory_lora.TIMERS.loads
        again, _ = _tokens(engine, SETS[:1])  # vLLM still holds it: no load
        assert memory_lora.TIMERS.loads == loads
        assert shared_llm.llm_engine.remove_lora(entry.lora_int_id)  # vLLM evicts it
        reloaded, _ = _tokens(engine, SETS[:1])  # loaded again from the same registered tensors
        assert memory_lora.TIMERS.loads == loads + 1
        assert _digest(entry.payload.flat) == before, "vLLM wrote into the registered adapter"
        engine.cache.clear()  # our cache drops it too: rebuilt from the store, same name
        assert memory_lora.registered(entry.lora_int_id) is None
        rebuilt, again_answers = _tokens(engine, SETS[:1])
        assert again_answers[0].lora_name == answers[0].lora_name
        assert first == again == reloaded == rebuilt
        # the LoRAModel vLLM holds has scaling 1 everywhere, so its in-place fold never runs
        from engine.vllm_backend import compat

        held = compat.worker_lora_manager(shared_llm)._adapter_manager.get_adapter(entry.lora_int_id)
        for layer in held.loras.values():
            scales = layer.scaling if isinstance(layer.scaling, list) else [layer.scaling]
            assert scales == [1.0] * len(scales)
    finally:
        engine.close()


def test_lora_model_built_twice_from_one_adapter_is_equal_and_leaves_it_untouched(tiny_model_dir, stores,
                                                                                  shared_llm):
    from engine.vllm_backend import compat
    from engine.vllm_backend.memory_lora import SlotMerge, SlotPlan, build_lora_model

    store = stores["one"]
    plan = SlotPlan.build(compat.worker_lora_manager(shared_llm), store.layout)
    adapter = SlotMerge(store.layout, 3, store.alpha, plan)(store.get_rows(["d3", "d4", "d5"]))
    before = _digest(adapter.flat)
    one, two = build_lora_model(10**6, adapter), build_lora_model(10**6 + 1, adapter)
    # vLLM's registration reads the device of the first layer's lora_a; a packed first layer (lora_a a list)
    # makes it str() a whole tensor, 1.6 ms per adapter in the serving benchmark
    assert not isinstance(next(iter(one.loras.values())).lora_a, list)
    for lora in (one, two):
        for layer in lora.loras.values():
            layer.optimize()  # what vLLM runs on registration
    for name, layer in one.loras.items():
        other = two.loras[name]
        b1 = layer.lora_b if isinstance(layer.lora_b, list) else [layer.lora_b]
        b2 = other.lora_b if isinstance(other.lora_b, list) else [other.lora_b]
        assert all(torch.equal(x, y) for x, y in zip(b1, b2))
    assert _digest(adapter.flat) == before


def test_new_store_version_gets_a_new_adapter_and_no_stale_kv(tiny_model_dir, stores, shared_llm):
    """Names follow (sorted doc ids, store version): a store that changes gets new adapters, and two stores
    with the same doc ids but other weights never share a name (vLLM's prefix cache keys on it)."""
    from tests.helpers.random_store import build_random_store
    from prag.store import AdapterStore

    path = stores["root"] / "growing"
    build_random_store(path, tiny_model_dir, [f"d{i}" for i in range(12)], seed=1, b_std=0.2)
    engine = _engine(tiny_model_dir, AdapterStore.open(path), shared_llm)
    other = _engine(tiny_model_dir, stores["two"], shared_llm)
    try:
        first, a1 = _tokens(engine, SETS[:2])
        version = engine.store.version
        build_random_store(path, tiny_model_dir, ["d12"], seed=1, b_std=0.2)  # a writer adds a document
        assert engine.store.version != version
        second, a2 = _tokens(engine, SETS[:2])
        assert engine.last_stats.adapters_built == 2 and engine.last_stats.adapters_reused == 0
        assert {a.lora_name for a in a1}.isdisjoint(a.lora_name for a in a2)
        assert first == second  # same documents, same weights
        # other weights for the same doc ids, same prompts, same vLLM (prefix cache on): other tokens
        third, a3 = _tokens(other, SETS[:2])
        assert {a.lora_name for a in a1}.isdisjoint(a.lora_name for a in a3)
        ref = _engine(tiny_model_dir, stores["two"], shared_llm, handover="dir")
        try:
            assert third == _tokens(ref, SETS[:2])[0]
        finally:
            ref.close()
        assert third != first
    finally:
        engine.close()
        other.close()


def test_handover_setting_is_checked(tiny_model_dir, stores, shared_llm):
    with pytest.raises(PragError, match="adapter_handover must be auto, memory or dir"):
        _engine(tiny_model_dir, stores["one"], shared_llm, handover="disk")


def test_unavailable_memory_path_falls_back_to_directories_or_is_refused(tiny_model_dir, stores, shared_llm,
                                                                         monkeypatch, caplog):
    """Outside the tested vLLM range (or with the worker in another process) ``auto`` warns once and uses
    tmpfs directories, with the same tokens; an explicit ``memory`` is refused with the reason."""
    from engine.vllm_backend import compat

    monkeypatch.setattr(compat, "vllm_version", lambda: ("0.40.0", (0, 40, 0)))
    with pytest.raises(PragError, match=r"adapter_handover='memory' is not possible: vLLM 0.40.0 is outside"):
        _engine(tiny_model_dir, stores["one"], shared_llm, handover="memory")
    with caplog.at_level("WARNING", logger="engine.engine"):
        engine = _engine(tiny_model_dir, stores["one"], shared_llm)
    try:
        warnings = [r.getMessage() for r in caplog.records if "tmpfs directories" in r.getMessage()]
        assert len(warnings) == 1 and "outside the tested range" in warnings[0]
        assert engine.handover == "dir" and engine.cache.root.is_dir()
        monkeypatch.undo()
        mem = _engine(tiny_model_dir, stores["one"], shared_llm)
        try:
            assert _tokens(engine, SETS[:2])[0] == _tokens(mem, SETS[:2])[0]
            assert engine.last_stats.write_s > 0 and any(engine.cache.root.iterdir())
        finally:
            mem.close()
    finally:
        engine.close()
