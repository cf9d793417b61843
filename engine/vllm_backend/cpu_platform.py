"""vLLM's CPU platform with our LoRA ops, chosen through vLLM's ``vllm.platform_plugins`` entry point.

Only ``get_punica_wrapper`` differs, and only while :func:`engine.vllm_backend.plugin.active` says so;
otherwise it is vLLM's ``CpuPlatform``. Kept import-light: vLLM imports this module while it resolves
its platform, when nothing may read ``vllm.platforms.current_platform``.
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform  # private: listed in engine/vllm_backend/compat.py


class PragCpuPlatform(CpuPlatform):
    """``CpuPlatform`` whose punica wrapper is :class:`engine.vllm_backend.cpu_lora.GroupedPunicaWrapperCPU`."""

    @classmethod
    def get_punica_wrapper(cls) -> str:
        from engine.vllm_backend import plugin

        return plugin.WRAPPER_QUALNAME if plugin.active() else super().get_punica_wrapper()
