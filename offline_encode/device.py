"""Where and in which precision the encoder trains: one resolver shared by the trainer, the reference
loop and the benchmark, so 'auto' means the same thing everywhere."""

from __future__ import annotations

import torch

from prag.errors import PragError

def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda``/``cuda:N`` fail clearly without a GPU."""
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise PragError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PragError(f"device {spec!r} requested but no CUDA GPU is available; use device='auto' or 'cpu'")
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA (the fast path), float32 on CPU (exact, and bf16 matmuls are slow there)."""
    if spec in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    from offline_encode.peft_format import resolve_dtype as dtype_by_name

    return dtype_by_name(spec)
