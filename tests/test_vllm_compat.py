"""Contract tests for the vLLM boundary (engine/vllm_backend/compat.py).

One test per private vLLM symbol the project touches: when vLLM changes one of them, this fails here,
naming it, instead of deep inside a batch. Then the version gate: outside the tested range the CPU
plugin switches itself off with one warning and the engine still answers, on vLLM's own LoRA ops.
And the boundary itself: code outside engine/vllm_backend/ imports only public vLLM names."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.vllm_backend import compat
from engine.vllm_backend import plugin as vllm_plugin

REPO = Path(__file__).resolve().parents[1]
BOUNDARY = REPO / "engine" / "vllm_backend"
VLLM_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
OLD = ("0.99.0", (0, 99, 0))  # a vLLM outside the tested range


def test_installed_vllm_is_in_the_tested_range():
    text, version = compat.vllm_version()
    assert compat.version_in_range(version), f"vLLM {text} is outside {compat.TESTED_VERSIONS}"
    assert not compat.version_in_range((0, 31, 9)) and not compat.version_in_range((0, 33, 0))
    assert compat.version_problem() is None


@pytest.mark.parametrize("sym", compat.PRIVATE_SYMBOLS, ids=lambda s: s.qualname)
def test_private_symbol_exists_with_the_parameters_used(sym):
    obj = compat.resolve(sym)
    if sym.params:
        params = set(inspect.signature(obj).parameters)
        assert set(sym.params) <= params, f"{sym.qualname}: {set(sym.params) - params} gone"
    assert compat.symbol_problem(sym) is None  # also the text it must contain, if any
    assert sym.why and sym.used_in and sym.builds in ("cpu", "cpu+cuda")


@pytest.mark.parametrize("name", compat.PUBLIC_SYMBOLS)
def test_public_symbol_exists(name):
    module, _, attr = name.rpartition(".")
    assert hasattr(importlib.import_module(module), attr), name


def test_every_listed_user_exists():
    """``used_in`` names a real function or class of this project (so the list cannot go stale silently)."""
    for sym in compat.PRIVATE_SYMBOLS:
        for use in sym.used_in.split(", "):
            if use.startswith("tests/"):
                assert (REPO / use).is_file(), f"{sym.qualname}: {use}"
                continue
            module, *path = use.split(".")
            obj = importlib.import_module(f"engine.vllm_backend.{module}")
            for part in path:
                obj = getattr(obj, part)


def test_symbol_problems_is_empty_and_names_a_missing_symbol(monkeypatch):
    assert compat.symbol_problems() == []
    fake = compat.PrivateSymbol("vllm.lora.worker_manager", "WorkerLoRAManager._no_such_method", "probe")
    monkeypatch.setattr(compat, "PRIVATE_SYMBOLS", compat.PRIVATE_SYMBOLS + (fake,))
    problems = compat.symbol_problems()
    assert len(problems) == 1 and "_no_such_method" in problems[0]
    assert compat.symbol_problems(cpu_plugin_only=True) == []  # the fake is nobody's


def test_a_log_message_that_changed_is_named():
    changed = compat.PrivateSymbol("vllm.model_executor.models.utils", "logger", "probe",
                                   text="Attempted to load weight %s in a new wording")
    assert "no longer contains" in compat.symbol_problem(changed)


def test_the_copied_dtype_names_match_vllms():
    from engine.vllm_backend.llm import _DTYPE_ALIASES, dtype_name

    sym = next(s for s in compat.PRIVATE_SYMBOLS if s.qualname == "_STR_DTYPE_TO_TORCH_DTYPE")
    theirs = {k: dtype_name(v) for k, v in compat.resolve(sym).items()}
    assert theirs == _DTYPE_ALIASES


def test_the_lru_worker_manager_inherits_the_patched_list_adapters():
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager, WorkerLoRAManager

    assert issubclass(LRUCacheWorkerLoRAManager, WorkerLoRAManager)
    assert "list_adapters" not in vars(LRUCacheWorkerLoRAManager)


def test_cpu_only_differences_are_marked():
    """Exactly the CPU plugin's platform and punica wrapper differ on a CUDA build; the memory hand-over
    shares only PunicaWrapperCPU's stacked tensors, which the GPU wrapper reads too."""
    cpu_only = {s.qualname for s in compat.PRIVATE_SYMBOLS if s.builds == "cpu"}
    assert cpu_only == {"PunicaWrapperCPU", "CpuPlatform.get_punica_wrapper", "PunicaWrapperCPU.update_metadata",
                        "PunicaWrapperCPU.token_lora_indices", "PunicaWrapperCPU.add_lora_linear",
                        "PunicaWrapperCPU.add_shrink", "PunicaWrapperCPU.add_expand"}
    assert {s.qualname for s in compat.PRIVATE_SYMBOLS if s.builds == "cpu" and s.memory_path} == {"PunicaWrapperCPU"}
    assert all(s.cpu_plugin for s in compat.PRIVATE_SYMBOLS if s.builds == "cpu")


def test_live_engine_has_every_instance_attribute(shared_llm):
    manager = compat.worker_lora_manager(shared_llm)
    assert manager is not None, "the session engine runs in-process on a CPU; its worker must be reachable"
    assert compat.instance_problems(manager) == []
    assert compat.memory_handover_problem(shared_llm) is None
    engine_sym = next(s for s in compat.PRIVATE_SYMBOLS if s.qualname == "LLMEngine")
    assert isinstance(shared_llm.llm_engine, compat.resolve(engine_sym))
    assert [a for a in engine_sym.attrs if not hasattr(shared_llm.llm_engine, a)] == []
    assert isinstance(manager._adapter_manager._registered_adapters,
                      compat.resolve(next(s for s in compat.PRIVATE_SYMBOLS if s.qualname == "AdapterLRUCache")))


def test_unreachable_worker_and_old_vllm_are_reported(monkeypatch):
    assert "not in this process" in compat.memory_handover_problem(object())
    monkeypatch.setattr(compat, "vllm_version", lambda: ("0.31.0", (0, 31, 0)))
    assert "outside the tested range" in compat.memory_handover_problem(object())


# -- the version gate of the CPU plugin --------------------------------------------------------------------

@pytest.fixture
def plugin_warnings(monkeypatch):
    """The plugin's warnings, with its say-it-once state fresh and vLLM's class restored afterwards."""
    from vllm.lora.worker_manager import WorkerLoRAManager

    monkeypatch.setattr(WorkerLoRAManager, "list_adapters", WorkerLoRAManager.list_adapters)
    monkeypatch.setattr(vllm_plugin, "_warned", False)
    monkeypatch.setenv(vllm_plugin.WARNED_ENV, "0")
    monkeypatch.setenv(vllm_plugin.ENV_FLAG, "1")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    vllm_plugin.log.addHandler(handler)
    yield records
    vllm_plugin.log.removeHandler(handler)


def test_in_range_the_plugin_is_on_without_a_word(plugin_warnings):
    from vllm.platforms import current_platform

    assert compat.cpu_plugin_problem() is None and vllm_plugin.active()
    assert current_platform.get_punica_wrapper() == vllm_plugin.WRAPPER_QUALNAME
    assert plugin_warnings == []


def test_out_of_range_vllm_switches_the_plugin_off_with_one_warning(plugin_warnings, monkeypatch):
    from vllm.lora.worker_manager import WorkerLoRAManager
    from vllm.platforms import current_platform

    vllms_lookup = WorkerLoRAManager.list_adapters
    monkeypatch.setattr(compat, "vllm_version", lambda: OLD)
    assert vllm_plugin.detect_platform() is None  # a fresh process would resolve vLLM's own CpuPlatform
    vllm_plugin.register()  # what vLLM calls in each of its processes
    assert WorkerLoRAManager.list_adapters is vllms_lookup  # no class patched
    for _ in range(3):  # vLLM asks once per LoRA model manager
        assert current_platform.get_punica_wrapper() == VLLM_WRAPPER
    assert len(plugin_warnings) == 1, [r.getMessage() for r in plugin_warnings]
    msg = plugin_warnings[0].getMessage()
    assert "CPU LoRA plugin is off" in msg and "vLLM 0.99.0 is outside the tested range [0.32.0, 0.33.0)" in msg
    assert os.environ[vllm_plugin.WARNED_ENV] == "1"  # vLLM's child processes stay quiet


def test_a_changed_symbol_switches_the_plugin_off_and_names_it(plugin_warnings, monkeypatch):
    from vllm.platforms import current_platform

    gone = compat.PrivateSymbol("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU.add_lora_linear",
                                "probe", params=("a_parameter_vllm_dropped",), cpu_plugin=True)
    monkeypatch.setattr(compat, "PRIVATE_SYMBOLS", compat.PRIVATE_SYMBOLS + (gone,))
    assert current_platform.get_punica_wrapper() == VLLM_WRAPPER
    assert len(plugin_warnings) == 1 and "a_parameter_vllm_dropped" in plugin_warnings[0].getMessage()
    # the memory hand-over does not need that symbol: only the (absent) worker stops it here
    assert "not in this process" in compat.memory_handover_problem(object())


@pytest.mark.parametrize("cause, said", [
    ("target", "VLLM_TARGET_DEVICE=cpu makes vLLM skip platform plugins"),
    ("not installed", "entry point is not installed (run `make install`)"),
    ("other", "vLLM chose the platform CpuPlatform"),
])
def test_a_platform_vllm_chose_over_ours_is_reported(plugin_warnings, monkeypatch, cause, said):
    from vllm.platforms.cpu import CpuPlatform

    monkeypatch.setattr("vllm.platforms.cpu_platform_plugin", lambda: "vllm.platforms.zen_cpu.ZenCpuPlatform")
    assert vllm_plugin.detect_platform() is None  # AMD Zen with zentorch: vLLM's Zen platform stays
    monkeypatch.setattr("vllm.platforms._current_platform", CpuPlatform())  # what vLLM resolved instead
    monkeypatch.delenv("VLLM_TARGET_DEVICE", raising=False)
    if cause == "target":
        monkeypatch.setenv("VLLM_TARGET_DEVICE", "cpu")
    elif cause == "not installed":
        monkeypatch.setattr("importlib.metadata.entry_points", lambda group: [])
    assert not vllm_plugin.active()
    assert len(plugin_warnings) == 1 and said in plugin_warnings[0].getMessage()


def test_plugin_off_by_flag_is_silent(plugin_warnings, monkeypatch):
    monkeypatch.setenv(vllm_plugin.ENV_FLAG, "0")
    monkeypatch.setattr(compat, "vllm_version", lambda: OLD)
    vllm_plugin.register()
    assert not vllm_plugin.active() and plugin_warnings == []


_OLD_VLLM_ENGINE = """
import json, sys
from engine.vllm_backend import compat
compat.vllm_version = lambda: ("0.99.0", (0, 99, 0))  # what the gate reads: vLLM outside the tested range
from engine.vllm_backend.llm import LLMConfig, make_llm, shutdown_llm
model, adapter, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
llm = make_llm(LLMConfig(model=model, dtype="float32", max_model_len=1024, max_loras=2, in_process=True,
                         lora_target_modules=("gate_proj", "up_proj", "down_proj")))
from vllm import SamplingParams
from vllm.lora.request import LoRARequest
from vllm.lora.worker_manager import WorkerLoRAManager
from vllm.platforms import current_platform
params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
out = llm.generate([{"prompt_token_ids": ids}], params, lora_request=LoRARequest("old-vllm", 1, adapter),
                   use_tqdm=False)
manager = compat.worker_lora_manager(llm)._adapter_manager
print(json.dumps({"tokens": list(out[0].outputs[0].token_ids), "platform": type(current_platform).__name__,
                  "wrappers": sorted({type(w).__name__ for w in manager.punica_wrapper_mapping.values()}),
                  "lookup": WorkerLoRAManager.list_adapters.__module__}))
shutdown_llm(llm)
"""


def test_an_engine_on_an_untested_vllm_still_answers_on_vllms_own_lora_ops(shared_llm, tiny_model_dir, tmp_path):
    """A fresh process (the platform is resolved once per process) whose gate reads vLLM 0.99.0: vLLM's
    own CpuPlatform, punica wrapper and adapter lookup, one warning, and the same greedy tokens with the
    same adapter as the session engine on our ops."""
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    from offline_encode.export import export_adapter
    from prag.prompt import build_prompt_ids
    from tests.helpers.random_store import build_random_store

    build_random_store(tmp_path / "store", tiny_model_dir, ["doc"], b_std=0.5).close()
    adapter = export_adapter(tmp_path / "store", "doc", tmp_path / "doc")
    ids = build_prompt_ids(AutoTokenizer.from_pretrained(tiny_model_dir), "Who founded the Brenn Chemical Company?")
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    ours = shared_llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False,
                               lora_request=LoRARequest("compat-doc", 9101, str(adapter)))[0].outputs[0].token_ids
    base = shared_llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs[0].token_ids
    assert list(ours) != list(base), "the random adapter must change the answer for this test to mean anything"

    env = {k: v for k, v in os.environ.items() if k not in (vllm_plugin.WARNED_ENV, vllm_plugin.ENV_FLAG)}
    env.update(HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1")
    r = subprocess.run([sys.executable, "-c", _OLD_VLLM_ENGINE, str(tiny_model_dir), str(adapter), json.dumps(ids)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["platform"] == "CpuPlatform" and got["wrappers"] == ["PunicaWrapperCPU"]
    assert got["lookup"] == "vllm.lora.worker_manager"  # vLLM's own list_adapters
    warnings = [ln for ln in r.stderr.splitlines() if "CPU LoRA plugin is off" in ln]
    assert len(warnings) == 1 and "vLLM 0.99.0 is outside the tested range" in warnings[0], r.stderr[-3000:]
    assert got["tokens"] == list(ours)


# -- the boundary: nothing outside engine/vllm_backend/ imports private vLLM names ------------------------

def _python_files() -> list[Path]:
    skip = {"__pycache__", "build", "dist", "node_modules"}
    out = []
    for path in REPO.rglob("*.py"):
        rel = path.relative_to(REPO)
        if any(p.startswith(".") or p in skip or p.endswith(".egg-info") for p in rel.parts[:-1]):
            continue
        if BOUNDARY in path.parents:
            continue
        out.append(path)
    return out


def vllm_imports(source: str) -> list[tuple[int, str]]:
    """(line, dotted name) for every vLLM name a module imports, and every ``vllm.x`` attribute it reads
    after a bare ``import vllm``."""
    tree = ast.parse(source)
    names, bare = [], False
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                (node.module == "vllm" or node.module.startswith("vllm.")):
            names += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "vllm":
                    bare = True
                elif a.name.startswith("vllm."):
                    names.append((node.lineno, a.name))
    if bare:
        names += [(n.lineno, f"vllm.{n.attr}") for n in ast.walk(tree)
                  if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "vllm"]
    return names


def test_the_import_scanner_sees_every_form():
    src = ("import vllm\nimport vllm.lora.request\nfrom vllm import LLM, SamplingParams as SP\n"
           "from vllm.platforms.cpu import CpuPlatform\nx = vllm.envs\nfrom .vllm import y\n")
    assert [n for _, n in vllm_imports(src)] == ["vllm.lora.request", "vllm.LLM", "vllm.SamplingParams",
                                                  "vllm.platforms.cpu.CpuPlatform", "vllm.envs"]


def test_only_public_vllm_names_are_imported_outside_the_boundary():
    """Product code outside engine/vllm_backend/ imports only compat.PUBLIC_SYMBOLS; tests may also
    import the private names compat lists (each has its contract test above)."""
    files = _python_files()
    assert any(p.name == "engine.py" for p in files) and not any(BOUNDARY in p.parents for p in files)
    public = set(compat.PUBLIC_SYMBOLS)
    listed = {s.import_name for s in compat.PRIVATE_SYMBOLS}
    bad = []
    for path in files:
        rel = path.relative_to(REPO)
        allowed = public | listed if rel.parts[0] == "tests" else public
        bad += [f"{rel}:{line}: {name}" for line, name in vllm_imports(path.read_text()) if name not in allowed]
    assert bad == [], "private vLLM names outside engine/vllm_backend/ (go through the boundary or list them " \
                      "in compat.PUBLIC_SYMBOLS if vLLM documents them):\n" + "\n".join(bad)
