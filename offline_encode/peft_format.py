"""Read and write standard PEFT LoRA directories (``adapter_config.json`` + ``adapter_model.safetensors``).

PEFT's own ``save_pretrained`` needs a live ``PeftModel`` and, for cat-merged adapters, wrote an
empty file in our tests; vLLM only loads adapters from a directory. So the
project writes the directory itself from raw tensors: it is what ``prag export-adapter`` produces
and what the engine writes (to tmpfs) for every merged adapter, so it must be cheap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open

from offline_encode.config import peft_key
from prag.errors import PragError
from prag.io import atomic_dir

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Accept ``torch.float32`` or its names (``float32``/``fp32``, ``bfloat16``/``bf16``, ``float16``/``fp16``)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise PragError(f"unknown dtype {dtype!r}; expected one of float32, bfloat16, float16") from None


def split_key(key: str) -> tuple[str, str]:
    """``'model.layers.0.mlp.gate_proj.lora_A'`` -> ``('model.layers.0.mlp.gate_proj', 'A')``."""
    module, sep, which = key.rpartition(".lora_")
    if not sep or which not in ("A", "B"):
        raise PragError(f"adapter key {key!r} is not '<module>.lora_A' or '<module>.lora_B'")
    return module, which


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` in the safetensors format: an 8-byte header length, a JSON header, the raw bytes.

    Written here rather than with ``safetensors.torch.save_file``, which converts every tensor through
    numpy and ctypes (~30 us each): the engine writes a 48-tensor merged adapter for every new document
    set, on threads that share the GIL with the model's step. Files read back with ``safetensors``
    (tests compare). An I/O failure (disk full, ...) raises ``OSError`` with its errno.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    parts, at = [], 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise PragError(f"cannot write tensor {name!r} of dtype {tensor.dtype} as safetensors")
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        nbytes = data.numel() * data.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [at, at + nbytes]}
        parts.append(data)
        at += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for data in parts:
            if data.numel():
                f.write(memoryview(data.view(torch.uint8).numpy()))


def adapter_config(rank: int, alpha: float, target_modules: Iterable[str],
                   base_model_name_or_path: str | None) -> dict:
    """The LoRA ``adapter_config.json`` fields PEFT and vLLM read (everything else takes PEFT's default)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": int(rank),
        "lora_alpha": alpha,
        "target_modules": sorted(set(target_modules)),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def write_peft_adapter(adapter: Mapping[str, torch.Tensor], out_dir: str | os.PathLike, rank: int, alpha: float,
                       target_modules: Iterable[str], base_model_name_or_path: str | None = None,
                       dtype: str | torch.dtype | None = None) -> Path:
    """Write ``adapter`` (config key convention) as a PEFT LoRA directory at ``out_dir``, atomically.

    ``dtype`` converts the tensors (``None`` keeps theirs). ``rank``/``alpha`` go to the config
    as given: for a cat-merge of k rank-r adapters pass ``rank=k*r, alpha=k*r`` (scaling 1).
    An existing ``out_dir`` is replaced; readers never see a half-written directory.
    """
    if not adapter:
        raise PragError("refusing to write an empty adapter")
    torch_dtype = resolve_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in adapter.items():
        module, which = split_key(key)
        if value.dim() != 2:
            raise PragError(f"adapter tensor {key!r} must be 2-D, got shape {tuple(value.shape)}")
        if torch_dtype is not None and value.dtype != torch_dtype:
            value = value.to(torch_dtype)
        tensors[peft_key(module, which)] = value  # save_safetensors makes it a contiguous CPU buffer
    config = adapter_config(rank, alpha, target_modules, base_model_name_or_path)
    with atomic_dir(out_dir) as tmp:
        save_safetensors(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            fd = os.open(tmp / name, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    return Path(out_dir)


def read_peft_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a PEFT LoRA directory (safetensors only) -> (tensors in config key convention, config dict)."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not config_path.is_file():
        raise PragError(f"not a PEFT adapter directory (no {CONFIG_NAME}): {path}")
    if not weights_path.is_file():
        hint = " (pickled adapter_model.bin is refused; convert it to safetensors)" \
            if (path / "adapter_model.bin").exists() else ""
        raise PragError(f"no {WEIGHTS_NAME} in {path}{hint}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise PragError(f"{config_path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    out: dict[str, torch.Tensor] = {}
    with safe_open(str(weights_path), framework="pt") as fh:
        for key in fh.keys():
            if not key.startswith(_PREFIX) or not key.endswith(".weight"):
                raise PragError(f"{weights_path}: unexpected tensor {key!r} (expected "
                                f"'{_PREFIX}<module>.lora_A.weight' / '.lora_B.weight')")
            short = key[len(_PREFIX):-len(".weight")]
            split_key(short)  # validates the lora_A / lora_B suffix
            out[short] = fh.get_tensor(key)
    return out, config
