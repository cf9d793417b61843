"""vLLM general-plugin hook (entry point ``vllm.general_plugins`` in pyproject).

vLLM calls :func:`register` in every process it starts (front end, engine core, workers). It only
acts when ``PRAG_CPU_LORA=1``, which :func:`prag.llm.make_llm` sets for the engines this project
builds, so other vLLM programs in the same environment keep vLLM's own behaviour. Kept import-light:
it runs in every vLLM process, enabled or not.
"""

from __future__ import annotations

import os

ENV_FLAG = "PRAG_CPU_LORA"
WRAPPER_QUALNAME = "engine.vllm_cpu_lora.GroupedPunicaWrapperCPU"


def register() -> None:
    """Route the CPU platform's punica wrapper to :class:`engine.vllm_cpu_lora.GroupedPunicaWrapperCPU`."""
    if os.environ.get(ENV_FLAG) != "1":
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    type(current_platform).get_punica_wrapper = classmethod(lambda cls: WRAPPER_QUALNAME)
