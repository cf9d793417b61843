"""vLLM general-plugin hook (entry point ``vllm.general_plugins`` in pyproject).

vLLM calls :func:`register` in every process it starts (front end, engine core, workers). It only
acts when ``PRAG_CPU_LORA=1``, which :func:`engine.vllm_backend.llm.make_llm` sets for the engines this project
builds, so other vLLM programs in the same environment keep vLLM's own behaviour. Kept import-light:
it runs in every vLLM process, enabled or not.
"""

from __future__ import annotations

import os
from collections.abc import Set as AbstractSet

ENV_FLAG = "PRAG_CPU_LORA"
WRAPPER_QUALNAME = "engine.vllm_backend.cpu_lora.GroupedPunicaWrapperCPU"


def register() -> None:
    """Route the CPU platform's punica wrapper to :class:`engine.vllm_backend.cpu_lora.GroupedPunicaWrapperCPU`."""
    if os.environ.get(ENV_FLAG) != "1":
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    type(current_platform).get_punica_wrapper = classmethod(lambda cls: WRAPPER_QUALNAME)
    _fast_adapter_lookup()


def _fast_adapter_lookup() -> None:
    """vLLM's worker checks ``lora_int_id in self.list_adapters()`` for every request of every step,
    and ``list_adapters`` copies the adapter LRU through a Python-level mapping view: with 96 active
    adapters and a 384-entry cache that is ~37k Python calls, 11 ms of a 75 ms decoding step. Here it is
    the cache's live keys view: a set-like object whose ``in`` is one dict lookup, and whose set
    operations (vLLM's base manager subtracts from it before changing the cache) return plain sets."""
    from vllm.lora.worker_manager import WorkerLoRAManager

    def list_adapters(self) -> AbstractSet[int]:
        return self._adapter_manager._registered_adapters.keys()

    WorkerLoRAManager.list_adapters = list_adapters
