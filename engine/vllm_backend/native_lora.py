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
_ERRORS = {1: "unsupported dtype", 2: "rank above the kernel's limit (512)", 3: "out of memory for scratch memory"}


def supports(dtype: torch.dtype) -> bool:
    return dtype in _DTYPE_CODES


def dtype_code(dtype: torch.dtype) -> int:
    """The kernel's code for a supported dtype (0 float32, 1 bfloat16)."""
    return _DTYPE_CODES[dtype]


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
        lib = ctypes.CDLL(str(path))
        self._fn = lib.prag_lora_linear
        p, i = ctypes.c_void_p, ctypes.c_int
        self._fn.argtypes = [p, i, _I64, p, i, _I64, _I64, _I64, p, _I64,
                             i, p, p, p, p, p, p, p, p, p, _I64, i, ctypes.c_float, i]
        self._fn.restype = ctypes.c_int
        self._live_fn = lib.prag_live_ranks
        self._live_fn.argtypes = [p, p, i, _I64, _I64, _I64, _I64, _I64]
        self._live_fn.restype = None
        self.fill_slot_fn = lib.prag_fill_slot  # called by cpu_lora's fill_slot with prepared pointer arrays
        self.fill_slot_fn.argtypes = [i, i, _I64, p, p, p, p, p, p, p, p]
        self.fill_slot_fn.restype = None
        self._merge_fn = lib.prag_slot_merge
        self._merge_fn.argtypes = [p, i, p, i, _I64, _I64, _I64, _I64, p, p, p, p, p, p]
        self._merge_fn.restype = ctypes.c_int

    def linear(self, y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, lora_as: Sequence[torch.Tensor],
               lora_bts: Sequence[torch.Tensor], offsets: Sequence[int], widths: Sequence[int],
               scale: float, live: Sequence[torch.Tensor | None] | None = None) -> None:
        """``y[t, off_k:off_k+w_k] += (scale * x[t] @ A_k[s].T) @ BT_k[s]`` for each slice k, s = slots[t].

        ``x`` [T, in] and ``y`` [T, *] with unit column stride; ``slots`` int64 [T] contiguous (< 0: no
        adapter); ``lora_as[k]`` [L, R, in] and ``lora_bts[k]`` [L, R, >= w_k] with unit last stride.
        ``live[k]`` (optional, int64 [L] contiguous, from :meth:`live_ranks`): rows of ``lora_bts[k][s]``
        from ``live[k][s]`` on are zero, so the kernel skips them and the matching rows of A.
        """
        self.prepare(lora_as, lora_bts, offsets, widths, live)(y, x, slots, scale)

    def prepare(self, lora_as: Sequence[torch.Tensor], lora_bts: Sequence[torch.Tensor], offsets: Sequence[int],
                widths: Sequence[int], live: Sequence[torch.Tensor | None] | None = None) -> "PreparedLoRA":
        """:meth:`linear` with the weight arguments checked and converted once: a LoRA layer calls the
        kernel with the same weights at every step, so only x, y and the slots are checked per call."""
        n = len(lora_as)
        if not (n == len(lora_bts) == len(offsets) == len(widths)) or n == 0:
            raise ValueError("lora_as, lora_bts, offsets and widths must have one entry per slice")
        for name, t in (*((f"lora_as[{k}]", a) for k, a in enumerate(lora_as)),
                        *((f"lora_bts[{k}]", b) for k, b in enumerate(lora_bts))):
            if t.dim() != 3 or t.stride(-1) != 1 or t.dtype not in _DTYPE_CODES or t.device.type != "cpu":
                raise ValueError(f"{name}: needs a CPU float32/bfloat16 [L, R, *] tensor with unit last stride, "
                                 f"got {t.dtype} {tuple(t.shape)} on {t.device} with strides {t.stride()}")
        w_dtypes = {a.dtype for a in (*lora_as, *lora_bts)}
        if len(w_dtypes) != 1:
            raise ValueError(f"lora weights must share one dtype, got {sorted(map(str, w_dtypes))}")
        n_slots, rank, d_in = lora_as[0].shape
        for k, (a, b) in enumerate(zip(lora_as, lora_bts)):
            if a.shape[0] != n_slots or b.shape[0] != n_slots or a.shape[1] != rank or b.shape[1] != rank \
                    or a.shape[2] != d_in or b.shape[2] < widths[k]:
                raise ValueError(f"slice {k}: A {tuple(a.shape)} and BT {tuple(b.shape)} do not match "
                                 f"[{n_slots}, {rank}, {d_in}] and [{n_slots}, {rank}, >= {widths[k]}]")
        if live is not None:
            if len(live) != n:
                raise ValueError("live must have one entry per slice")
            for k, lv in enumerate(live):
                if lv is not None and (lv.dtype != torch.int64 or not lv.is_contiguous()
                                       or lv.numel() != n_slots or lv.device.type != "cpu"):
                    raise ValueError(f"live[{k}]: needs a contiguous CPU int64 tensor with one entry per slot")
        return PreparedLoRA(self._fn, lora_as, lora_bts, offsets, widths, live, _DTYPE_CODES[w_dtypes.pop()])

    def prepare_merge(self, max_rank: int, a_off: Sequence[int], b_off: Sequence[int], ranks: Sequence[int],
                      d_in: Sequence[int], d_out: Sequence[int], scales: Sequence[float]) -> "PreparedMerge":
        """The cat-merge of k store rows into vLLM's padded slot layout, one segment per store module (A
        [max_rank, d_in] scaled by its alpha/r, then B [d_out, max_rank]; see ``prag_slot_merge``), with the
        layout checked and converted once: the adapter thread calls it for every cold adapter."""
        n = len(a_off)
        if not (n == len(b_off) == len(ranks) == len(d_in) == len(d_out) == len(scales)) or n == 0:
            raise ValueError("a_off, b_off, ranks, d_in, d_out and scales must have one entry per segment")
        if min((*a_off, *b_off)) < 0 or min((*ranks, *d_in, *d_out)) <= 0:
            raise ValueError("segment offsets must be >= 0 and ranks and widths > 0")
        return PreparedMerge(self._merge_fn, max_rank, a_off, b_off, ranks, d_in, d_out, scales)

    def live_ranks(self, bt: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out[s]`` = 1 + the last row of ``bt[s]`` ([L, R, width], unit last stride) holding a nonzero bit
        pattern, 0 for an all-zero slot: the live rank of an adapter padded to max_lora_rank. Cheap: zero rows
        are read, the scan of a live row stops at its first nonzero element."""
        if bt.dim() != 3 or bt.stride(-1) != 1 or bt.dtype not in _DTYPE_CODES or bt.device.type != "cpu":
            raise ValueError(f"bt: needs a CPU float32/bfloat16 [L, R, width] tensor with unit last stride, "
                             f"got {bt.dtype} {tuple(bt.shape)} strides {bt.stride()}")
        if out.dtype != torch.int64 or not out.is_contiguous() or out.numel() != bt.shape[0]:
            raise ValueError("out: needs a contiguous int64 tensor with one entry per slot")
        self._live_fn(out.data_ptr(), bt.data_ptr(), _DTYPE_CODES[bt.dtype], bt.shape[0], bt.shape[1], bt.shape[2],
                      bt.stride(0), bt.stride(1))
        return out


class PreparedLoRA:
    """One LoRA layer's kernel call with its weights bound (:meth:`NativeLoRA.prepare`); holds the weight
    tensors, so the pointers it passes stay valid."""

    def __init__(self, fn, lora_as: Sequence[torch.Tensor], lora_bts: Sequence[torch.Tensor], offsets: Sequence[int],
                 widths: Sequence[int], live: Sequence[torch.Tensor | None] | None, w_code: int):
        n = len(lora_as)

        def arr(values: Sequence[int]) -> ctypes.Array:
            return (_I64 * n)(*values)

        def ptrs(tensors: Sequence[torch.Tensor | None]) -> ctypes.Array:
            return (ctypes.c_void_p * n)(*(t.data_ptr() if t is not None else None for t in tensors))
        self._fn, self._keep = fn, (tuple(lora_as), tuple(lora_bts), tuple(live or ()))
        self.n_slots, self.d_in = lora_as[0].shape[0], lora_as[0].shape[2]
        self.y_width = max(o + w for o, w in zip(offsets, widths))
        self._static = (n, ptrs(lora_as), arr([a.stride(0) for a in lora_as]), arr([a.stride(1) for a in lora_as]),
                        ptrs(lora_bts), arr([b.stride(0) for b in lora_bts]), arr([b.stride(1) for b in lora_bts]),
                        None if live is None else ptrs(live), arr(offsets), arr(widths), lora_as[0].shape[1], w_code)

    def takes(self, y: torch.Tensor, x: torch.Tensor) -> bool:
        """Whether the kernel takes these activations (else the caller keeps its fallback)."""
        return (x.dtype in _DTYPE_CODES and y.dtype in _DTYPE_CODES and x.stride(-1) == 1 and y.stride(-1) == 1
                and x.dim() == 2 and y.dim() == 2 and x.shape[1] == self.d_in and y.shape[1] >= self.y_width
                and y.shape[0] == x.shape[0] and x.device.type == "cpu" and y.device.type == "cpu")

    def __call__(self, y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, scale: float) -> None:
        if not self.takes(y, x):
            x_ok = self.takes(x.new_empty((x.shape[0] if x.dim() else 0, self.y_width), dtype=torch.float32), x)
            name, t, cols = ("y", y, f">= {self.y_width}") if x_ok else ("x", x, f"{self.d_in}")
            raise ValueError(f"{name}: needs a CPU float32/bfloat16 [T, {cols}] tensor with unit last stride "
                             f"(x and y with the same T), got {t.dtype} {tuple(t.shape)} on {t.device} with "
                             f"strides {t.stride()}")
        if slots.dtype != torch.int64 or not slots.is_contiguous() or slots.numel() != x.shape[0]:
            raise ValueError("slots: needs a contiguous int64 tensor with one entry per token")
        rc = self._fn(y.data_ptr(), _DTYPE_CODES[y.dtype], y.stride(0),
                      x.data_ptr(), _DTYPE_CODES[x.dtype], x.stride(0), self.d_in,
                      x.shape[0], slots.data_ptr(), self.n_slots, *self._static, float(scale),
                      torch.get_num_threads())  # torch's own intra-op count, not OpenMP's per-thread default
        if rc != 0:
            raise RuntimeError(f"prag_lora_linear: {_ERRORS.get(rc, rc)}")


class PreparedMerge:
    """:meth:`NativeLoRA.prepare_merge`'s call: ``merge(out, rows)`` writes the merge of ``rows`` [k, P]
    (float32/bfloat16, contiguous) into ``out`` (float32/bfloat16, contiguous, :attr:`numel` values)."""

    def __init__(self, fn, max_rank: int, a_off, b_off, ranks, d_in, d_out, scales):
        n = len(a_off)

        def arr(values: Sequence[int]) -> ctypes.Array:
            return (_I64 * n)(*values)
        self._fn, self.max_rank, self.max_rank_used = fn, max_rank, max(ranks)
        self.numel = sum(max_rank * a + b * max_rank for a, b in zip(d_in, d_out))
        self.row_len_needed = max([o + r * w for o, r, w in zip(a_off, ranks, d_in)]
                                  + [o + w * r for o, r, w in zip(b_off, ranks, d_out)])
        self._args = (max_rank, n, arr(a_off), arr(b_off), arr(ranks), arr(d_in), arr(d_out),
                      (ctypes.c_float * n)(*scales))

    def __call__(self, out: torch.Tensor, rows: torch.Tensor) -> None:
        for name, t in (("out", out), ("rows", rows)):
            if t.dtype not in _DTYPE_CODES or not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError(f"{name}: needs a contiguous CPU float32/bfloat16 tensor, got {t.dtype} on {t.device}")
        if rows.dim() != 2 or rows.shape[1] < self.row_len_needed:
            raise ValueError(f"rows: needs [k, >= {self.row_len_needed}], got shape {tuple(rows.shape)}")
        if out.numel() != self.numel:
            raise ValueError(f"out: needs {self.numel} elements for this layout, got {out.numel()}")
        rc = self._fn(out.data_ptr(), _DTYPE_CODES[out.dtype], rows.data_ptr(), _DTYPE_CODES[rows.dtype],
                      rows.shape[0], rows.shape[1], *self._args)
        if rc == 2:
            raise ValueError(f"{rows.shape[0]} documents x rank {self.max_rank_used} exceed max_rank {self.max_rank}")
        if rc != 0:
            raise RuntimeError(f"prag_slot_merge: {_ERRORS.get(rc, rc)}")


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
