"""Version and signature checks shared by the boundary modules that list private symbols
(``engine/vllm_backend/compat.py`` for vLLM, ``prag/ray_compat.py`` for Ray)."""

from __future__ import annotations

import inspect
from typing import Any, Sequence


def package_version(module: Any) -> tuple[str, tuple[int, int, int]]:
    """(version string, its numeric (major, minor, patch)) of an imported package; '0.32.0+cpu' -> (0, 32, 0)."""
    text = getattr(module, "__version__", "0")
    nums: list[int] = []
    for part in text.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        nums.append(int(digits) if digits else 0)
    return text, tuple(nums + [0] * (3 - len(nums)))  # type: ignore[return-value]


def in_range(version: Sequence[int], tested: tuple[tuple[int, ...], tuple[int, ...]]) -> bool:
    low, high = tested
    return low <= tuple(version) < high


def lost_parameters(obj: Any, params: Sequence[str]) -> list[str]:
    """The names in ``params`` that ``obj``'s signature no longer has."""
    try:
        names = set(inspect.signature(obj).parameters)
    except (TypeError, ValueError):
        names = set()
    return [p for p in params if p not in names]
