"""Which private vLLM symbols this project touches, and whether the installed vLLM has them.

vLLM has no public API for loading a LoRA adapter from memory (upstream #4068, RFC #48297), so the
memory hand-over (:mod:`engine.vllm_backend.memory_lora`) uses private parts of vLLM's worker-side
LoRA machinery. Each one is listed in :data:`PRIVATE_SYMBOLS` with why it is used and on which vLLM
builds it is the same; ``tests/test_vllm_compat.py`` checks every entry against the installed vLLM.
Outside :data:`TESTED_VERSIONS`, or when a symbol is missing, :func:`memory_handover_problem` says
why and the engine falls back to the directory path with one warning.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

# vLLM versions the memory hand-over was tested with: [low, high)
TESTED_VERSIONS = ((0, 32, 0), (0, 33, 0))


@dataclass(frozen=True)
class PrivateSymbol:
    """One private vLLM name: ``module``:``qualname`` (``attrs``: instance attributes read or written)."""

    module: str
    qualname: str
    why: str
    params: tuple[str, ...] = ()  # keyword parameters the code passes (checked against the signature)
    attrs: tuple[str, ...] = ()  # instance attributes (checked on a live engine)
    builds: str = "cpu+cuda"  # where the symbol is the same; "cpu" marks a CPU-only difference
    memory_path: bool = True  # the memory hand-over needs it (else only the named caller does)


PRIVATE_SYMBOLS: tuple[PrivateSymbol, ...] = (
    PrivateSymbol("vllm.lora.worker_manager", "WorkerLoRAManager._load_adapter",
                  "replaced per instance: builds the LoRAModel from registered tensors, not a directory",
                  params=("lora_request",), attrs=("_adapter_manager", "lora_config")),
    PrivateSymbol("vllm.lora.model_manager", "LoRAModelManager.activate_adapter",
                  "replaced per instance: fills a slot with one copy per stacked tensor",
                  params=("lora_id",),
                  attrs=("_active_adapters", "_registered_adapters", "lora_index_to_id", "modules",
                         "packed_modules", "lora_slots", "lora_config", "punica_wrapper_mapping")),
    PrivateSymbol("vllm.lora.model_manager", "LRUCacheLoRAModelManager.activate_adapter",
                  "its LRU eviction of active slots is kept (remove_oldest, touch)", params=("lora_id",)),
    PrivateSymbol("vllm.lora.lora_model", "LoRAModel",
                  "the adapter object the worker caches", params=("lora_model_id", "rank", "loras")),
    PrivateSymbol("vllm.lora.lora_weights", "LoRALayerWeights",
                  "one module's A and B; built with scaling=1 so vLLM's in-place alpha/r fold is a no-op",
                  params=("module_name", "rank", "lora_alpha", "lora_a", "lora_b", "scaling")),
    PrivateSymbol("vllm.lora.lora_weights", "PackedLoRALayerWeights",
                  "gate/up packed as vLLM's gate_up_proj wants them",
                  params=("module_name", "rank", "lora_alphas", "lora_a", "lora_b", "scaling")),
    PrivateSymbol("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.reset_lora",
                  "zeroes a slot of a module the adapter does not cover", params=("index",),
                  attrs=("lora_a_stacked", "lora_b_stacked")),
    PrivateSymbol("vllm.v1.engine.core_client", "InprocClient",
                  "in-process engine core: the path to the worker (engine_core.engine_core)"),
    PrivateSymbol("vllm.v1.executor.uniproc_executor", "UniProcExecutor",
                  "in-process worker: model_executor.driver_worker.worker"),
    PrivateSymbol("vllm.v1.worker.lora_model_runner_mixin", "LoRAModelRunnerMixin",
                  "model_runner.lora_manager, the WorkerLoRAManager (CPU and GPU model runners share it)"),
    PrivateSymbol("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU",
                  "the CPU build's LoRA ops; CUDA builds use punica_gpu (SGMV/Triton) instead. The memory "
                  "path only writes the stacked slot tensors both read, so it runs on either", builds="cpu"),
    PrivateSymbol("vllm.config.model", "_get_and_verify_dtype",
                  "engine.vllm_backend.llm.resolve_dtype: the dtype vLLM will run a checkpoint in under --dtype auto, known "
                  "before an engine starts (eval's resume check records it)",
                  params=("config", "dtype", "is_pooling_model"), memory_path=False),
)


def vllm_version() -> tuple[str, tuple[int, ...]]:
    """(version string, its numeric (major, minor, patch)) of the installed vLLM."""
    import vllm

    text = getattr(vllm, "__version__", "0")
    nums: list[int] = []
    for part in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        nums.append(int(digits) if digits else 0)
    return text, tuple(nums + [0] * (3 - len(nums)))


def version_in_range(version: tuple[int, ...] | None = None) -> bool:
    version = vllm_version()[1] if version is None else version
    low, high = TESTED_VERSIONS
    return low <= tuple(version) < high


def resolve(sym: PrivateSymbol) -> Any:
    """The object ``sym`` names; raises AttributeError/ImportError when vLLM no longer has it."""
    obj: Any = importlib.import_module(sym.module)
    for part in sym.qualname.split("."):
        obj = getattr(obj, part)
    return obj


def symbol_problems(memory_path_only: bool = False) -> list[str]:
    """One line per listed symbol that is missing or whose parameters changed; empty when all match."""
    problems = []
    for sym in PRIVATE_SYMBOLS:
        if memory_path_only and not sym.memory_path:
            continue
        try:
            obj = resolve(sym)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{sym.module}.{sym.qualname}: missing ({exc})")
            continue
        if sym.params:
            try:
                names = set(inspect.signature(obj).parameters)
            except (TypeError, ValueError):
                names = set()
            lost = [p for p in sym.params if p not in names]
            if lost:
                problems.append(f"{sym.module}.{sym.qualname}: parameters {lost} are gone")
    return problems


def instance_problems(worker_manager: Any) -> list[str]:
    """Instance attributes the memory path reads, checked on a live worker LoRA manager."""
    problems = []
    manager = getattr(worker_manager, "_adapter_manager", None)
    owners = {"WorkerLoRAManager._load_adapter": worker_manager,
              "LoRAModelManager.activate_adapter": manager}
    for sym in PRIVATE_SYMBOLS:
        owner = owners.get(sym.qualname)
        if owner is None:
            continue
        problems += [f"{type(owner).__name__}.{a}: missing" for a in sym.attrs if not hasattr(owner, a)]
    if manager is not None:
        for name, module in getattr(manager, "modules", {}).items():
            lost = [a for a in ("lora_a_stacked", "lora_b_stacked", "reset_lora") if not hasattr(module, a)]
            if lost:
                problems.append(f"LoRA module {name} ({type(module).__name__}) lacks {lost}")
                break
    return problems


def worker_lora_manager(llm: Any) -> Any | None:
    """The WorkerLoRAManager of an in-process ``vllm.LLM``, or None when the worker lives elsewhere
    (a separate engine-core process, the default with a GPU) or LoRA is off."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    core = getattr(core, "engine_core", None)  # InprocClient -> EngineCore; a multiprocess client has none
    executor = getattr(core, "model_executor", None)
    worker = getattr(getattr(executor, "driver_worker", None), "worker", None)
    runner = getattr(worker, "model_runner", None)
    return getattr(runner, "lora_manager", None)


def memory_handover_problem(llm: Any) -> str | None:
    """Why adapters cannot go to this ``llm`` from memory, or None when they can."""
    try:
        text, version = vllm_version()
    except ImportError:
        return "vLLM is not installed"
    if not version_in_range(version):
        low, high = (".".join(map(str, v)) for v in TESTED_VERSIONS)
        return f"vLLM {text} is outside the tested range [{low}, {high})"
    problems = symbol_problems(memory_path_only=True)
    if problems:
        return "private vLLM symbols changed: " + "; ".join(problems[:3])
    manager = worker_lora_manager(llm)
    if manager is None:
        return "vLLM's worker is not in this process (engine core in its own process, or LoRA off)"
    problems = instance_problems(manager)
    if problems:
        return "vLLM's LoRA manager changed: " + "; ".join(problems[:3])
    return None
