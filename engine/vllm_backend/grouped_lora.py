"""Multi-LoRA matmuls grouped by adapter: pure tensor code behind :mod:`engine.vllm_backend.cpu_lora`.

A step's tokens are grouped once into *segments*, runs of consecutive tokens that share an adapter.
Long runs (prefill chunks) gather their adapter once and apply it with one batched matmul, padded to
the longest run. Tokens of short runs (decoding, one token per request) are done token by token as
``[S, 1, in] @ [S, in, r]``, with the gathered weights cached while the batch keeps decoding. The
arithmetic is vLLM's ``x @ A.T`` then ``@ B.T``; only the grouping differs from vLLM-CPU's per-token
gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class SegmentPlan:
    """Where each adapter applies in one step's flattened token batch.

    ``single_*``: tokens done one by one, those of runs shorter than ``MIN_SHARED_RUN``
    (``single_tokens`` are their rows, ``single_loras`` their adapter slots). ``multi_*``: the longer
    runs, padded to ``[S, L]``: ``multi_rows[s, j]`` is the row of the segment's j-th token (0 where ``multi_valid`` is False). Tokens without an adapter
    (slot -1) are in neither.

    A decoding batch keeps the same plan for many steps, so the per-token gathered
    weights are cached on the plan (keyed by the stacked tensor and its version counter, which
    vLLM's in-place adapter loads bump).
    """

    slots: torch.Tensor
    single_tokens: torch.Tensor
    single_loras: torch.Tensor
    multi_rows: torch.Tensor
    multi_valid: torch.Tensor
    multi_loras: torch.Tensor
    multi_tokens: torch.Tensor  # multi_rows[multi_valid]: rows in the order the padded output yields
    _gathered: dict = field(default_factory=dict, repr=False)
    _spans: dict = field(default_factory=dict, repr=False)

    def span(self, rows: torch.Tensor) -> slice | None:
        """``rows`` as a slice when they are one contiguous run (usual: vLLM keeps decoding requests
        before new prefills), so results land with a slice op instead of a slow ``index_add_``."""
        key = id(rows)
        if key not in self._spans:
            n = rows.numel()
            first, last = (int(rows[0]), int(rows[-1])) if n else (0, -1)
            self._spans[key] = slice(first, last + 1) if last - first + 1 == n else None
        return self._spans[key]

    @property
    def num_tokens(self) -> int:
        return self.slots.numel()

    def same_slots(self, token_slots: torch.Tensor) -> bool:
        return token_slots.shape == self.slots.shape and bool(torch.equal(token_slots, self.slots))

    def single_weights(self, stacked: torch.Tensor, width: int) -> torch.Tensor:
        """``stacked[single_loras, :width]`` transposed to ``[S, cols, width]``, fp32, contiguous; cached.

        fp32 because a rank-8 bmm is faster in fp32 than in bf16 on the CPU (measured), and vLLM's
        LoRA buffers between shrink and expand are fp32 anyway."""
        key = (stacked.data_ptr(), tuple(stacked.shape), stacked._version, width)
        hit = self._gathered.get(key)
        if hit is None:
            stale = [k for k in self._gathered if k[:2] == key[:2]]
            for k in stale:  # the same tensor at an older version
                del self._gathered[k]
            hit = self._gathered[key] = stacked[self.single_loras, :width].transpose(1, 2).to(torch.float32).contiguous()
        return hit


MIN_SHARED_RUN = 8
"""Runs of at least this many tokens with one adapter (prefill chunks) share one gathered adapter; shorter
runs are treated token by token. Decoding requests that happen to share an adapter (the same documents)
sit next to each other in a batch; treating their two-token runs as shared segments would cut the decode
tokens into pieces, and non-contiguous rows must land with ``index_add_``, 10x slower than a slice add."""


def plan_segments(token_slots: torch.Tensor, min_shared_run: int = MIN_SHARED_RUN) -> SegmentPlan:
    """Group a step's per-token adapter slots (-1 = no adapter) into runs of equal slots."""
    slots = token_slots.to(torch.long).reshape(-1).clone()
    empty_long = slots.new_empty(0)
    if slots.numel() == 0:
        return SegmentPlan(slots, empty_long, empty_long, slots.new_zeros(0, 0),
                           torch.zeros(0, 0, dtype=torch.bool), empty_long, empty_long)
    run_slots, run_lengths = torch.unique_consecutive(slots, return_counts=True)
    run_starts = torch.cumsum(run_lengths, 0) - run_lengths
    used = run_slots >= 0
    shared = used & (run_lengths >= min_shared_run)
    per_token = (used & ~shared).repeat_interleave(run_lengths)
    single_tokens = per_token.nonzero().reshape(-1)
    m_starts, m_lengths = run_starts[shared], run_lengths[shared]
    if m_starts.numel():
        width = int(m_lengths.max())
        offsets = torch.arange(width, dtype=torch.long)
        valid = offsets.unsqueeze(0) < m_lengths.unsqueeze(1)
        rows = torch.where(valid, m_starts.unsqueeze(1) + offsets.unsqueeze(0), torch.zeros((), dtype=torch.long))
    else:
        valid = torch.zeros(0, 0, dtype=torch.bool)
        rows = slots.new_zeros(0, 0)
    return SegmentPlan(slots, single_tokens, slots[single_tokens], rows, valid, run_slots[shared], rows[valid])


def _rows(t: torch.Tensor, rows: torch.Tensor, span: slice | None) -> torch.Tensor:
    return t[span] if span is not None else t[rows]


def _scatter(target: torch.Tensor, rows: torch.Tensor, span: slice | None, values: torch.Tensor,
             add: bool) -> None:
    """``target[rows] (+)= values``; a slice op when ``rows`` is the contiguous run ``span``."""
    if span is not None:
        part = target[span]
        part.add_(values) if add else part.copy_(values)
    elif add:
        target.index_add_(0, rows, values)
    else:
        target[rows] = values


def grouped_shrink(outs: Sequence[torch.Tensor], x: torch.Tensor, lora_as: Sequence[torch.Tensor],
                   plan: SegmentPlan, scale: float) -> None:
    """``outs[i][t] = scale * x[t] @ A_i[slot(t)].T`` for every token with an adapter; 0 elsewhere.

    One entry per output slice of the layer (gate and up share ``x``, which is gathered once).
    ``lora_as[i]`` is vLLM's stacked ``[max_loras, 1, r, in]``; ``outs[i]`` is ``[T, r]`` (any float dtype).
    """
    x_single = x_multi = None
    for out, lora_a in zip(outs, lora_as, strict=True):
        a = lora_a[:, 0] if lora_a.dim() == 4 else lora_a  # [max_loras, r, in]
        rank = min(out.shape[1], a.shape[1])
        if plan.single_tokens.numel() + plan.multi_tokens.numel() < plan.num_tokens or rank < out.shape[1]:
            out.zero_()
        target = out[:, :rank]
        if plan.single_tokens.numel():
            if x_single is None:
                x_single = _rows(x, plan.single_tokens, plan.span(plan.single_tokens)).float().unsqueeze(1)
            ys = torch.bmm(x_single, plan.single_weights(a, rank)).squeeze(1)  # [S, r]
            _scatter(target, plan.single_tokens, plan.span(plan.single_tokens), (ys * scale).to(out.dtype),
                     add=False)
        if plan.multi_tokens.numel():
            if x_multi is None:
                x_multi = x[plan.multi_rows].to(a.dtype)  # [S, L, in]
            ym = torch.bmm(x_multi, a[plan.multi_loras, :rank].transpose(1, 2))[plan.multi_valid]  # [tokens, r]
            _scatter(target, plan.multi_tokens, plan.span(plan.multi_tokens), (ym * scale).to(out.dtype),
                     add=False)


def grouped_expand(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor, plan: SegmentPlan,
                   offset: int, size: int, add_inputs: bool = True) -> None:
    """``y[t, offset:offset+size] (+)= buf[t] @ B[slot(t)].T`` for every token with an adapter.

    ``lora_b`` is vLLM's stacked ``[max_loras, 1, out, r]``; ``buf`` is the shrink output ``[T, r]``.
    Tokens without an adapter keep ``y`` (or get 0 when ``add_inputs`` is False).
    """
    b = lora_b[:, 0] if lora_b.dim() == 4 else lora_b  # [max_loras, out, r]
    width = min(size, b.shape[1])
    target = y[:, offset:offset + width]
    if not add_inputs:
        target.zero_()
    if plan.single_tokens.numel():
        bs = _rows(buf, plan.single_tokens, plan.span(plan.single_tokens))
        ys = torch.bmm(bs.float().unsqueeze(1), plan.single_weights(b, width)).squeeze(1)  # [S, out]
        _scatter(target, plan.single_tokens, plan.span(plan.single_tokens), ys.to(y.dtype), add=True)
    if plan.multi_tokens.numel():
        bm = buf[plan.multi_rows].to(b.dtype)  # [S, L, r]
        ym = torch.bmm(bm, b[plan.multi_loras, :width].transpose(1, 2))[plan.multi_valid]
        _scatter(target, plan.multi_tokens, plan.span(plan.multi_tokens), ym.to(y.dtype), add=True)
