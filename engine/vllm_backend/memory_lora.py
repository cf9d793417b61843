"""Merged adapters handed to an in-process vLLM worker from memory, without a PEFT directory.

Why: the directory path writes each merged adapter to tmpfs, and vLLM's worker reads it back,
builds a ``LoRAModel`` and copies it into its slot tensors with a reset and two copies per
module slice. For a cold batch of 96 small adapters that was ~0.4 s of a ~2 s run.

How (all private vLLM symbols are listed in :mod:`engine.vllm_backend.compat`):

* :class:`SlotPlan` maps the store's flat row layout onto vLLM's slot tensors: each store module
  (``model.layers.i.mlp.gate_proj``) is one slice of one vLLM LoRA module (``gate_up_proj`` slice 0),
  A padded to ``[max_lora_rank, in]`` and B to ``[out, max_lora_rank]``, exactly a slot's shape.
* :class:`SlotMerge` is the cat-merge of k store rows as one gather into that padded slot layout
  (the per-document alpha/r folded into A, as :class:`engine.merge.RowMerge`; same fp32 products,
  then one cast to vLLM's LoRA dtype), done on the engine's adapter thread.
* :func:`install` replaces two methods *on the instances* of one engine's worker LoRA manager:
  ``_load_adapter`` builds the ``LoRAModel`` from the registered tensors when the request's path is
  ``prag-mem://...`` (any other path keeps vLLM's directory loader), and ``activate_adapter`` fills
  a slot with one ``copy_`` per slot tensor for such adapters (vLLM's own for the rest).

The alpha/r trap: vLLM folds ``scaling`` into lora_B *in place* while registering an adapter, and
``tensor.to(dtype)`` of a tensor already in that dtype is the same tensor, so staged tensors loaded
twice would be scaled twice. Here every layer is built with ``scaling=1`` (the scale is already in A),
which makes vLLM's fold a no-op, and the registered buffer is never written after it is built.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import torch

from prag.errors import PragError

if TYPE_CHECKING:
    from prag.store import Layout

SCHEME = "prag-mem://"


@dataclass
class HandoverTimers:
    """Seconds spent inside vLLM's step on adapters: building LoRAModels (``load``) and filling slots."""

    load_s: float = 0.0
    slot_fill_s: float = 0.0
    loads: int = 0
    fills: int = 0

    def snapshot(self) -> "HandoverTimers":
        return HandoverTimers(self.load_s, self.slot_fill_s, self.loads, self.fills)


@dataclass(frozen=True)
class Segment:
    """One store module = one slice of one vLLM LoRA module."""

    module: str  # vLLM module name, e.g. model.layers.0.mlp.gate_up_proj
    slice: int
    key: str  # store module name, e.g. model.layers.0.mlp.gate_proj
    a_shape: tuple[int, int]  # padded [R, in]
    b_shape: tuple[int, int]  # padded [out, R]


@dataclass
class SlotPlan:
    """Where each store module goes in one vLLM engine's LoRA slots (see module doc)."""

    segments: list[Segment]
    max_rank: int
    dtype: torch.dtype
    # (A stacked, B stacked) per segment, and the vLLM modules no segment covers (reset on activate)
    targets: list[tuple[torch.Tensor, torch.Tensor]] = field(repr=False, default_factory=list)
    uncovered: list[Any] = field(repr=False, default_factory=list)
    packed: dict[str, int] = field(default_factory=dict)  # vLLM module -> slices (for LoRAModel building)
    # our CPU punica wrapper keeps B transposed per stacked tensor; told about each slot write, it refreshes
    # one slot instead of re-transposing all of them on the next step (None: vLLM's own wrapper)
    slot_written: Any = field(repr=False, default=None)
    # the same wrapper's one-call slot fill (stacked A and B, transposed B, live ranks); None: torch copies
    fill_slot: Any = field(repr=False, default=None)

    @property
    def numel(self) -> int:
        return sum(a[0] * a[1] + b[0] * b[1] for s in self.segments for a, b in [(s.a_shape, s.b_shape)])

    @classmethod
    def build(cls, worker_manager: Any, layout: "Layout") -> "SlotPlan":
        """Match the store ``layout`` to the LoRA modules of an in-process ``WorkerLoRAManager``
        (:func:`engine.vllm_backend.compat.worker_lora_manager`); PragError names what does not fit."""
        adapter_manager = worker_manager._adapter_manager
        store_modules = {k.rpartition(".lora_")[0] for k in layout.keys}
        shapes = dict(zip(layout.keys, layout.shapes))
        max_rank = int(adapter_manager.lora_config.max_lora_rank)
        segments, targets, uncovered, packed, dtype = [], [], [], {}, None
        found: set[str] = set()
        for name, module in adapter_manager.modules.items():
            subs = adapter_manager.packed_modules.get(name, [name])
            a_st, b_st = getattr(module, "lora_a_stacked", None), getattr(module, "lora_b_stacked", None)
            hit = [s for s in subs if s in store_modules]
            if not hit:
                uncovered.append(module)
                continue
            if a_st is None or len(a_st) != len(subs) or len(b_st) != len(subs):
                raise PragError(f"vLLM module {name} has {len(a_st or ())} LoRA slices for {len(subs)} "
                                f"sub-modules; the memory hand-over cannot fill it")
            packed[name] = len(subs) if name in adapter_manager.packed_modules else 0
            for i, sub in enumerate(subs):
                if sub not in store_modules:
                    raise PragError(f"the adapter store covers only part of vLLM's packed module {name} "
                                    f"(no {sub}); use the directory hand-over")
                (r, d_in), (d_out, r_b) = shapes[f"{sub}.lora_A"], shapes[f"{sub}.lora_B"]
                a_slot, b_slot = tuple(a_st[i].shape[-2:]), tuple(b_st[i].shape[-2:])
                if a_slot[1] != d_in or b_slot[0] != d_out or a_slot[0] != max_rank or b_slot[1] != max_rank:
                    raise PragError(f"store module {sub} (A {[r, d_in]}, B {[d_out, r_b]}) does not fit vLLM's "
                                    f"slot tensors (A {list(a_slot)}, B {list(b_slot)})")
                segments.append(Segment(name, i, sub, a_slot, b_slot))
                targets.append((a_st[i], b_st[i]))
                dtype = a_st[i].dtype
                found.add(sub)
        missing = sorted(store_modules - found)
        if missing:
            raise PragError(f"vLLM has no LoRA layer for store module(s) {missing[:3]}; start vLLM with the "
                            f"store's target modules (lora_target_modules)")
        wrappers = [w for w in getattr(adapter_manager, "punica_wrapper_mapping", {}).values()
                    if hasattr(w, "slot_written")]
        notify = wrappers[0].slot_written if len(wrappers) == 1 else None
        fill = getattr(wrappers[0], "fill_slot", None) if len(wrappers) == 1 else None
        return cls(segments, max_rank, dtype or torch.float32, targets, uncovered, packed, notify, fill)


@dataclass
class MemoryAdapter:
    """A merged adapter in :class:`SlotPlan` layout: one flat buffer, never written after it is built."""

    flat: torch.Tensor
    rank: int  # the merged rank (k * r); the buffer is padded to the plan's max_rank
    plan: SlotPlan
    _views: list = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # made where the adapter is built (the adapter thread), not in vLLM's step, where the LoRAModel is
        # built from them: 48 views per adapter of the serving benchmark
        parts = self.flat.split([n for seg in self.plan.segments
                                 for n in (seg.a_shape[0] * seg.a_shape[1], seg.b_shape[0] * seg.b_shape[1])])
        self._views = [(parts[2 * i].view(seg.a_shape), parts[2 * i + 1].view(seg.b_shape))
                       for i, seg in enumerate(self.plan.segments)]

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def views(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(A [R, in], B [out, R]) per plan segment, views into ``flat``."""
        return self._views

    def tensors(self) -> dict[str, torch.Tensor]:
        """The merged adapter in the project's key convention, unpadded (for checks and tests)."""
        out = {}
        for seg, (a, b) in zip(self.plan.segments, self.views()):
            out[f"{seg.key}.lora_A"], out[f"{seg.key}.lora_B"] = a[:self.rank], b[:, :self.rank]
        return out


class SlotMerge:
    """Cat-merge of ``k`` flat store rows straight into :class:`SlotPlan` layout: one gather, one multiply.

    Bit-identical to :class:`engine.merge.RowMerge` followed by vLLM's cast to its LoRA dtype: the
    same fp32 products, rounded once. Padding gathers an appended zero.
    """

    def __init__(self, layout: "Layout", k: int, alpha: float, plan: SlotPlan):
        if k <= 0:
            raise PragError(f"SlotMerge needs k >= 1, got {k}")
        shapes, offsets = dict(zip(layout.keys, layout.shapes)), dict(zip(layout.keys, layout.offsets))
        self.params_per_doc, self.k, self.plan = layout.params_per_doc, k, plan
        zero = k * self.params_per_doc  # index of the appended zero
        index_parts, scale_parts = [], []
        rank = None
        for seg in plan.segments:
            (r, d_in), (d_out, _) = shapes[f"{seg.key}.lora_A"], shapes[f"{seg.key}.lora_B"]
            rank = k * r
            if rank > plan.max_rank:
                raise PragError(f"{k} documents x rank {r} = {rank} exceed vLLM's max_lora_rank {plan.max_rank}")
            pad = plan.max_rank - rank
            a_at = torch.arange(r * d_in).view(r, d_in) + offsets[f"{seg.key}.lora_A"]
            b_at = torch.arange(d_out * r).view(d_out, r) + offsets[f"{seg.key}.lora_B"]
            docs = [i * self.params_per_doc for i in range(k)]
            a_idx = torch.cat([a_at + d for d in docs] + [torch.full((pad, d_in), zero)], 0)
            b_idx = torch.cat([b_at + d for d in docs] + [torch.full((d_out, pad), zero)], 1)
            a_scale = torch.cat([torch.full((k * r, d_in), alpha / r), torch.zeros(pad, d_in)], 0)
            index_parts += [a_idx.reshape(-1), b_idx.reshape(-1)]
            scale_parts += [a_scale.reshape(-1), torch.ones(d_out * plan.max_rank)]
        self.rank = int(rank or 0)
        self.index = torch.cat(index_parts)
        self.scale = torch.cat(scale_parts).to(torch.float32)
        # the same merge in one C pass (engine/vllm_backend/csrc/lora_cpu.c, prag_slot_merge) where the kernel
        # builds: 0.4 ms per benchmark adapter instead of 0.7-2.9 ms of torch ops, and no OpenMP team of its own
        # fighting the model's threads for the two cores
        from engine.vllm_backend import native_lora

        native = native_lora.load() if native_lora.supports(plan.dtype) else None
        segments = [(offsets[f"{s.key}.lora_A"], offsets[f"{s.key}.lora_B"], shapes[f"{s.key}.lora_A"][0],
                     shapes[f"{s.key}.lora_A"][1], shapes[f"{s.key}.lora_B"][0]) for s in plan.segments]
        a_off, b_off, ranks, d_in, d_out = zip(*segments) if segments else ((),) * 5
        # A's alpha/r, rounded to fp32 as torch.full does above
        self._native = native.prepare_merge(plan.max_rank, a_off, b_off, ranks, d_in, d_out,
                                            [alpha / r for r in ranks]) if native is not None and segments else None

    def __call__(self, rows: torch.Tensor) -> MemoryAdapter:
        if tuple(rows.shape) != (self.k, self.params_per_doc):
            raise PragError(f"SlotMerge expects rows of shape {(self.k, self.params_per_doc)}, got {tuple(rows.shape)}")
        if self._native is not None:
            if rows.dtype not in (torch.float32, torch.bfloat16) or not rows.is_contiguous():
                rows = rows.to(torch.float32).contiguous()  # exact, as the cast below
            flat = torch.empty(self.index.numel(), dtype=self.plan.dtype)
            self._native(flat, rows)
            return MemoryAdapter(flat=flat, rank=self.rank, plan=self.plan)
        src = torch.empty(self.k * self.params_per_doc + 1, dtype=torch.float32)
        src[:-1].view(self.k, self.params_per_doc).copy_(rows)  # the cast to fp32, as RowMerge does
        src[-1] = 0
        flat = src.index_select(0, self.index).mul_(self.scale).to(self.plan.dtype)
        return MemoryAdapter(flat=flat, rank=self.rank, plan=self.plan)


# -- the registry and the worker hooks ------------------------------------------------------------

_LOCK = threading.Lock()
_REGISTRY: dict[int, MemoryAdapter] = {}  # lora_int_id -> adapter; ids are unique per process
TIMERS = HandoverTimers()


def register(lora_int_id: int, adapter: MemoryAdapter) -> None:
    with _LOCK:
        _REGISTRY[int(lora_int_id)] = adapter


def unregister(lora_int_id: int) -> None:
    with _LOCK:
        _REGISTRY.pop(int(lora_int_id), None)


def registered(lora_int_id: int) -> MemoryAdapter | None:
    with _LOCK:
        return _REGISTRY.get(int(lora_int_id))


def lora_path(lora_name: str) -> str:
    return f"{SCHEME}{lora_name}"


def build_lora_model(lora_int_id: int, adapter: MemoryAdapter) -> Any:
    """A vLLM ``LoRAModel`` whose layers are views of ``adapter.flat``, packed as vLLM's modules are,
    each with ``scaling=1`` (so vLLM's in-place fold of alpha/r into B never runs)."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.lora_weights import LoRALayerWeights, PackedLoRALayerWeights

    plan, views = adapter.plan, adapter.views()
    grouped: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for seg, ab in zip(plan.segments, views):
        grouped.setdefault(seg.module, []).append(ab)
    loras: dict[str, Any] = {}
    r = plan.max_rank
    # unpacked layers first: after packing, vLLM's _create_merged_loras_inplace takes the device of the first
    # layer with `next(iter(lora_a))`, which for a packed layer (lora_a a list) is a tensor, and then formats
    # it with str() -- 1.6 ms per adapter on this CPU, a third of a cold adapter's cost inside vLLM's step.
    # (vLLM's own loader puts unpacked layers first too: it pops the packed sub-layers and appends the pack.)
    for name, parts in sorted(grouped.items(), key=lambda item: bool(plan.packed.get(item[0]))):
        if plan.packed.get(name):
            loras[name] = PackedLoRALayerWeights(name, r, [r] * len(parts), [a for a, _ in parts],
                                                 [b for _, b in parts], scaling=[1.0] * len(parts))
        else:
            (a, b), = parts
            loras[name] = LoRALayerWeights(name, r, r, a, b, scaling=1.0)
    model = LoRAModel(lora_int_id, r, loras)
    model._prag_views, model._prag_plan = views, plan  # marks it for the one-copy slot fill
    return model


def install(worker_manager: Any) -> None:
    """Teach one in-process worker LoRA manager to load ``prag-mem://`` adapters from the registry and
    to fill slots with one copy per tensor. Idempotent; other adapters keep vLLM's own code."""
    if getattr(worker_manager, "_prag_memory_installed", False):
        return
    manager = worker_manager._adapter_manager
    dir_load = worker_manager._load_adapter
    vllm_activate = manager.activate_adapter
    lru = hasattr(manager._active_adapters, "remove_oldest")

    def _load_adapter(lora_request):
        t0 = time.perf_counter()
        try:
            adapter = registered(lora_request.lora_int_id) if lora_request.lora_path.startswith(SCHEME) else None
            if adapter is None:
                if lora_request.lora_path.startswith(SCHEME):
                    raise PragError(f"merged adapter {lora_request.lora_name} is no longer registered")
                return dir_load(lora_request)
            return build_lora_model(lora_request.lora_int_id, adapter)
        finally:
            TIMERS.load_s += time.perf_counter() - t0
            TIMERS.loads += 1

    def activate_adapter(lora_id: int) -> bool:
        t0 = time.perf_counter()
        try:
            model = manager._registered_adapters.get(lora_id) if lora_id not in manager._active_adapters else None
            views = getattr(model, "_prag_views", None)
            if views is None or not lru:
                return vllm_activate(lora_id)
            if len(manager._active_adapters) >= manager.lora_slots:
                manager._active_adapters.remove_oldest()  # frees its slot (vLLM's LRU manager does the same)
            index = manager.lora_index_to_id.index(None)
            manager._active_adapters[lora_id] = None
            manager.lora_index_to_id[index] = lora_id
            plan = model._prag_plan
            if plan.fill_slot is None or not plan.fill_slot(index, plan.targets, views):
                notify = plan.slot_written
                for (a_st, b_st), (a, b) in zip(plan.targets, views):  # the padded views fill the whole slot
                    a_st[index, 0].copy_(a)
                    b_st[index, 0].copy_(b)
                    if notify is not None:
                        notify(b_st, index)
            for module in plan.uncovered:
                module.reset_lora(index)
            manager._active_adapters.touch(lora_id)
            TIMERS.fills += 1
            return True
        finally:
            TIMERS.slot_fill_s += time.perf_counter() - t0

    worker_manager._load_adapter = _load_adapter
    manager.activate_adapter = activate_adapter
    worker_manager._prag_memory_installed = True

