"""Cheap checks of a base-model folder, run before anything slow loads it (transformers, vLLM).

A truncated ``model.safetensors`` (an interrupted download or copy) or a folder without tokenizer files
otherwise surfaces as a Rust or tokenizer traceback after the worker or the vLLM engine has started.
``check_model_dir`` is the one check shared by ``prag encode`` and the engine (``prag eval``/``serve``):
it reads only each weight file's header (its JSON table of tensors) and compares the data length the
header describes with the file's size, so it costs a few KiB of reads whatever the model's size.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from prag.errors import PragError
from prag.hub import resolve_local_model

# Files from which transformers can build a tokenizer (fast JSON, SentencePiece, BPE/WordPiece vocab, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
                   "vocab.txt", "tokenizer.tiktoken", "tiktoken.model")
# Bytes per element of safetensors dtypes; others (sub-byte formats) are checked only for total coverage.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
                "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "C64": 8}
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors format's own limit on the header size
INDEX_FILE = "model.safetensors.index.json"


def read_safetensors_header(fd: int) -> tuple[dict, int, int]:
    """``(header, data start, file size)`` of an open safetensors file; ``ValueError`` saying what is wrong.

    The header length (the file's first 8 bytes, little endian) is bounded by the file size before
    anything is allocated: another file in its place (e.g. a ``torch.save`` zip) would ask for petabytes.
    """
    size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise ValueError(f"{size} bytes, shorter than a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > min(size - 8, MAX_SAFETENSORS_HEADER):
        raise ValueError(f"its header claims {n:,} bytes, the file holds {size:,}")
    try:
        header = json.loads(os.pread(fd, n, 8))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    return header, 8 + n, size


def check_safetensors_file(path: str | os.PathLike) -> int:
    """Parse a safetensors header and check the file holds exactly the bytes it describes; returns the
    number of tensors. Raises a ``PragError`` naming the file when it is truncated or damaged."""
    path = Path(path)
    damaged = f"model weights file {path} is truncated or damaged"
    hint = "re-download or rebuild the model"
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise PragError(f"cannot read model weights file {path}: {exc.strerror or exc}") from None
    try:
        header, data_start, size = read_safetensors_header(fd)
    except ValueError as exc:
        raise PragError(f"{damaged} ({exc}); {hint}") from None
    except OSError as exc:
        raise PragError(f"cannot read model weights file {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    end = 0
    tensors = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = (int(v) for v in info["data_offsets"])
            numel = 1
            for dim in info["shape"]:
                numel *= int(dim)
            width = _DTYPE_BYTES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise PragError(f"{damaged} (tensor {name!r} has no valid dtype/shape/data_offsets); {hint}") from None
        if stop < begin or (width is not None and stop - begin != numel * width):
            raise PragError(f"{damaged} (tensor {name!r}: offsets {begin}..{stop} do not fit its shape and "
                            f"dtype); {hint}")
        end = max(end, stop)
        tensors += 1
    data = size - data_start
    if end != data:
        raise PragError(f"{damaged} (its header describes {end:,} bytes of tensor data, the file holds {data:,}); "
                        f"{hint}")
    return tensors


def check_model_dir(model: str | os.PathLike, *, what: str = "--model", tokenizer: bool = True) -> Path:
    """Resolve ``model`` (a directory or a cached hub id, never a download) and check it can be loaded: ``config.json``, a
    tokenizer (if ``tokenizer``), and safetensors weight files whose headers match their sizes
    (all shards named by ``model.safetensors.index.json`` present). Returns the directory."""
    model_dir = resolve_local_model(model, what="model", flag=None)
    if not (model_dir / "config.json").is_file():
        raise PragError(f"{what}: model directory has no config.json: {model_dir}")
    if tokenizer and not (any((model_dir / name).is_file() for name in TOKENIZER_FILES)
                          or any(model_dir.glob("*.tiktoken"))):
        raise PragError(f"{what}: model directory has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}): "
                        f"{model_dir}")
    weights = sorted(p for p in model_dir.glob("*.safetensors") if p.is_file())
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise PragError(f"{what}: {index} is damaged (expected a JSON object with a 'weight_map')") from None
        missing = sorted(s for s in shards if not (model_dir / s).is_file())
        if missing:
            raise PragError(f"{what}: weight shard(s) listed in {index} are missing: {', '.join(missing[:5])}")
    if not weights:
        raise PragError(f"{what}: model directory has no weight files (*.safetensors): {model_dir}")
    for path in weights:
        try:
            check_safetensors_file(path)
        except PragError as exc:
            raise PragError(f"{what}: {exc}") from None
    return model_dir
