"""Contract test for every private vLLM symbol the project touches (engine/vllm_backend/compat.py).

When vLLM changes one of them, this fails here, naming it, instead of deep inside a batch."""

from __future__ import annotations

import pytest

from engine.vllm_backend import compat


def test_installed_vllm_is_in_the_tested_range():
    text, version = compat.vllm_version()
    assert compat.version_in_range(version), f"vLLM {text} is outside {compat.TESTED_VERSIONS}"
    assert not compat.version_in_range((0, 31, 9)) and not compat.version_in_range((0, 33, 0))


@pytest.mark.parametrize("sym", compat.PRIVATE_SYMBOLS, ids=lambda s: s.qualname)
def test_private_symbol_exists_with_the_parameters_used(sym):
    obj = compat.resolve(sym)
    if sym.params:
        import inspect

        params = set(inspect.signature(obj).parameters)
        assert set(sym.params) <= params, f"{sym.qualname}: {set(sym.params) - params} gone"
    assert sym.why and sym.builds in ("cpu", "cuda", "cpu+cuda")


def test_symbol_problems_is_empty_and_names_a_missing_symbol(monkeypatch):
    assert compat.symbol_problems() == []
    fake = compat.PrivateSymbol("vllm.lora.worker_manager", "WorkerLoRAManager._no_such_method", "probe")
    monkeypatch.setattr(compat, "PRIVATE_SYMBOLS", compat.PRIVATE_SYMBOLS + (fake,))
    problems = compat.symbol_problems()
    assert len(problems) == 1 and "_no_such_method" in problems[0]


def test_cpu_only_differences_are_marked():
    cpu_only = [s.qualname for s in compat.PRIVATE_SYMBOLS if s.builds == "cpu"]
    assert cpu_only == ["PunicaWrapperCPU"]


def test_live_engine_has_every_instance_attribute(shared_llm):
    manager = compat.worker_lora_manager(shared_llm)
    assert manager is not None, "the session engine runs in-process on a CPU; its worker must be reachable"
    assert compat.instance_problems(manager) == []
    assert compat.memory_handover_problem(shared_llm) is None


def test_unreachable_worker_and_old_vllm_are_reported(monkeypatch):
    assert "not in this process" in compat.memory_handover_problem(object())
    monkeypatch.setattr(compat, "vllm_version", lambda: ("0.31.0", (0, 31, 0)))
    assert "outside the tested range" in compat.memory_handover_problem(object())
