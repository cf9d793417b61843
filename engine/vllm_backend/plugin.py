"""vLLM plugin hooks (entry points in pyproject): our CPU LoRA ops, switched on per process.

* :func:`detect_platform` (``vllm.platform_plugins``): vLLM asks it while resolving its platform, in
  every process. Where vLLM itself would pick its plain ``CpuPlatform`` and its version is tested, it
  answers :class:`engine.vllm_backend.cpu_platform.PragCpuPlatform`, whose punica wrapper is ours.
* :func:`register` (``vllm.general_plugins``): vLLM calls it in every process it starts (front end,
  engine core, workers). It makes the worker's per-request adapter lookup a dict lookup.

Both act only when ``PRAG_CPU_LORA=1``, which :func:`engine.vllm_backend.llm.make_llm` sets for the
engines this project builds: other vLLM programs in the same environment keep vLLM's behaviour (the
platform class is then ours, but answers exactly as vLLM's). When the installed vLLM is outside the
tested range, a listed private symbol changed, or vLLM did not choose our platform, the plugin stays
off with ONE warning that says why, and vLLM's own CPU LoRA ops run (same answers, slower).
Kept import-light: it runs in every vLLM process, enabled or not.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Set as AbstractSet

log = logging.getLogger(__name__)

ENV_FLAG = "PRAG_CPU_LORA"
WRAPPER_QUALNAME = "engine.vllm_backend.cpu_lora.GroupedPunicaWrapperCPU"
PLATFORM_QUALNAME = "engine.vllm_backend.cpu_platform.PragCpuPlatform"
VLLM_CPU_PLATFORM = "vllm.platforms.cpu.CpuPlatform"
# Set once the switch-off warning is said; vLLM's engine-core and worker processes inherit it.
WARNED_ENV = "PRAG_CPU_LORA_OFF_WARNED"
_warned = False


def enabled() -> bool:
    return os.environ.get(ENV_FLAG) == "1"


def detect_platform() -> str | None:
    """vLLM's platform-plugin hook: our CPU platform where vLLM would pick its plain ``CpuPlatform``.

    It does not look at ``PRAG_CPU_LORA``: a process may resolve its platform before ``make_llm`` sets
    it, so the platform asks at the time vLLM builds its LoRA ops (:func:`active`). It must not read
    ``vllm.platforms.current_platform`` (vLLM is resolving it)."""
    from vllm.platforms import cpu_platform_plugin  # private: listed in engine/vllm_backend/compat.py

    from engine.vllm_backend import compat

    if compat.version_problem() is not None:
        return None  # vLLM's own platform; register() says why when the plugin is wanted
    return PLATFORM_QUALNAME if cpu_platform_plugin() == VLLM_CPU_PLATFORM else None


def register() -> None:
    """vLLM's general-plugin hook: the fast adapter lookup, when the plugin is on in this process."""
    if not enabled():
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and active():
        _fast_adapter_lookup()


def active() -> bool:
    """Whether our CPU LoRA ops run in this process; when wanted but impossible, one warning says why."""
    if not enabled():
        return False
    from engine.vllm_backend import compat

    problem = compat.cpu_plugin_problem()
    if problem is None:
        from vllm.platforms import current_platform

        from engine.vllm_backend.cpu_platform import PragCpuPlatform

        if not isinstance(current_platform, PragCpuPlatform):
            problem = _why_not_our_platform(type(current_platform).__name__)
    if problem is None:
        return True
    switched_off(problem)
    return False


def _why_not_our_platform(chosen: str) -> str:
    from importlib.metadata import entry_points

    if not any(ep.value == f"{__name__}:detect_platform" for ep in entry_points(group="vllm.platform_plugins")):
        return "its vllm.platform_plugins entry point is not installed (run `make install`)"
    if os.environ.get("VLLM_TARGET_DEVICE", "").lower() == "cpu":
        return "VLLM_TARGET_DEVICE=cpu makes vLLM skip platform plugins (unset it to use ours)"
    return f"vLLM chose the platform {chosen} (VLLM_PLUGINS, another platform plugin, or zentorch on AMD Zen)"


def switched_off(problem: str) -> None:
    """The one warning (per process tree) that the CPU plugin is off, and why."""
    global _warned
    if _warned or os.environ.get(WARNED_ENV) == "1":
        return
    _warned = True
    os.environ[WARNED_ENV] = "1"
    log.warning("prag: the CPU LoRA plugin is off: %s. vLLM's own CPU LoRA ops run instead (same answers, "
                "slower); set %s=0 to silence this", problem, ENV_FLAG)


def _fast_adapter_lookup() -> None:
    """vLLM's worker checks ``lora_int_id in self.list_adapters()`` for every request of every step,
    and ``list_adapters`` copies the adapter LRU through a Python-level mapping view: with 96 active
    adapters and a 384-entry cache that is ~37k Python calls, 11 ms of a 75 ms decoding step. Here it is
    the cache's live keys view: a set-like object whose ``in`` is one dict lookup, and whose set
    operations (vLLM's base manager subtracts from it before changing the cache) return plain sets.
    A class patch: vLLM has no hook to supply another worker manager (see compat's module doc)."""
    from vllm.lora.worker_manager import WorkerLoRAManager  # private: listed in engine/vllm_backend/compat.py

    def list_adapters(self) -> AbstractSet[int]:
        return self._adapter_manager._registered_adapters.keys()

    WorkerLoRAManager.list_adapters = list_adapters
