"""The fused CPU multi-LoRA kernel (``engine/vllm_backend/csrc/lora_cpu.c``): compiled on first use, called via ctypes.

Why ctypes and a plain C file rather than a torch extension: it compiles in about a second with the
system C compiler (no torch headers, no ninja), and ctypes releases the GIL during the call. The
shared object is cached per source, compiler flags and CPU (it is built with ``-march=native``) under
``$PRAG_CACHE_DIR`` or ``~/.cache/prag-engine/native``, written atomically, so concurrent processes
never load a half-written file.

:func:`load` returns None, and says why once in the log, when there is no C compiler or the build
fails; the caller then keeps the pure-torch grouped ops (:mod:`engine.vllm_backend.grouped_lora`).
``PRAG_NATIVE_LORA=0`` switches the kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV_FLAG = "PRAG_NATIVE_LORA"
SOURCE = Path(__file__).with_name("csrc") / "lora_cpu.c"
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11",
          # GCC keeps 256-bit vectors on many Intel CPUs unless told; the kernel is written for 16 floats.
          *(("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()))
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
_I64 = ctypes.c_int64
_ERRORS = {1: "unsupported dtype", 2: "rank above the kernel's limit (512)", 3: "out of memory for scratch rows"}


def supports(dtype: torch.dtype) -> bool:
    return dtype in _DTYPE_CODES


def _compiler() -> str | None:
    names = [os.environ.get("CC"), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc", "gcc", "clang"]
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


def _cpu_signature() -> str:
    """The CPU model and flags: a ``-march=native`` build must not be reused on another CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    wanted = [ln for ln in lines if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted))


def cache_dir() -> Path:
    root = os.environ.get("PRAG_CACHE_DIR")
    return Path(root) / "native" if root else Path.home() / ".cache" / "prag-engine" / "native"


def build(cc: str, out_dir: Path) -> Path:
    """Compile the kernel into ``out_dir`` (once per source/flags/CPU) and return the shared object."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    digest = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(CFLAGS), version, _cpu_signature()])
                            .encode()).hexdigest()[:16]
    target = out_dir / f"lora_cpu-{digest}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *CFLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed on {SOURCE}:\n{proc.stderr.strip()}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class NativeLoRA:
    """ctypes binding of ``prag_lora_linear``; see the C file for the layouts."""

    def __init__(self, path: Path):
        self.path = path
        self._fn = ctypes.CDLL(str(path)).prag_lora_linear
        p, i = ctypes.c_void_p, ctypes.c_int
        self._fn.argtypes = [p, i, _I64, p, i, _I64, _I64, _I64, p, _I64,
                             i, p, p, p, p, p, p, p, p, _I64, i, ctypes.c_float, i]
        self._fn.restype = ctypes.c_int

    def linear(self, y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, lora_as: Sequence[torch.Tensor],
               lora_bts: Sequence[torch.Tensor], offsets: Sequence[int], widths: Sequence[int],
               scale: float) -> None:
        """``y[t, off_k:off_k+w_k] += (scale * x[t] @ A_k[s].T) @ BT_k[s]`` for each slice k, s = slots[t].

        ``x`` [T, in] and ``y`` [T, *] with unit column stride; ``slots`` int64 [T] contiguous (< 0: no
        adapter); ``lora_as[k]`` [L, R, in] and ``lora_bts[k]`` [L, R, >= w_k] with unit last stride.
        """
        n = len(lora_as)
        if not (n == len(lora_bts) == len(offsets) == len(widths)):
            raise ValueError("lora_as, lora_bts, offsets and widths must have one entry per slice")
        for name, t in (("x", x), ("y", y), *((f"lora_as[{k}]", a) for k, a in enumerate(lora_as)),
                        *((f"lora_bts[{k}]", b) for k, b in enumerate(lora_bts))):
            if t.stride(-1) != 1 or t.dtype not in _DTYPE_CODES or t.device.type != "cpu":
                raise ValueError(f"{name}: needs a CPU float32/bfloat16 tensor with unit last stride, "
                                 f"got {t.dtype} on {t.device} with strides {t.stride()}")
        if slots.dtype != torch.int64 or not slots.is_contiguous() or slots.numel() != x.shape[0]:
            raise ValueError("slots: needs a contiguous int64 tensor with one entry per token")
        w_dtypes = {a.dtype for a in (*lora_as, *lora_bts)}
        if len(w_dtypes) != 1:
            raise ValueError(f"lora weights must share one dtype, got {sorted(map(str, w_dtypes))}")
        rank = lora_as[0].shape[1]

        def arr(values: Sequence[int]) -> ctypes.Array:
            return (_I64 * n)(*values)

        def ptrs(tensors: Sequence[torch.Tensor]) -> ctypes.Array:
            return (ctypes.c_void_p * n)(*(t.data_ptr() for t in tensors))
        rc = self._fn(y.data_ptr(), _DTYPE_CODES[y.dtype], y.stride(0),
                      x.data_ptr(), _DTYPE_CODES[x.dtype], x.stride(0), x.shape[1],
                      x.shape[0], slots.data_ptr(), lora_as[0].shape[0],
                      n, ptrs(lora_as), arr([a.stride(0) for a in lora_as]), arr([a.stride(1) for a in lora_as]),
                      ptrs(lora_bts), arr([b.stride(0) for b in lora_bts]), arr([b.stride(1) for b in lora_bts]),
                      arr(offsets), arr(widths), rank, _DTYPE_CODES[w_dtypes.pop()], float(scale),
                      torch.get_num_threads())  # torch's own intra-op count, not OpenMP's per-thread default
        if rc != 0:
            raise RuntimeError(f"prag_lora_linear: {_ERRORS.get(rc, rc)}")


_lock = threading.Lock()
_loaded: dict[str, NativeLoRA | None] = {}


def load() -> NativeLoRA | None:
    """The process's kernel, built on first call; None (logged once) when disabled or unbuildable."""
    with _lock:
        if "kernel" not in _loaded:
            _loaded["kernel"] = _try_load()
        return _loaded["kernel"]


def _try_load() -> NativeLoRA | None:
    if os.environ.get(ENV_FLAG, "1") == "0":
        log.info("native LoRA kernel off (%s=0): using the torch grouped ops", ENV_FLAG)
        return None
    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found (set CC): multi-LoRA runs on the slower torch grouped ops")
        return None
    try:
        return NativeLoRA(build(cc, cache_dir()))
    except (OSError, RuntimeError) as exc:
        log.warning("native LoRA kernel unavailable, using the torch grouped ops: %s", exc)
        return None
