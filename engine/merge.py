"""Concatenation merge of per-document LoRA adapters (docs/method.md, section 3); pure tensor code.

The sum of k low-rank deltas is itself low-rank:

    dW = sum_d (alpha_d / r_d) B_d A_d = [B_1 ... B_k] @ [(alpha_1/r_1) A_1; ...; (alpha_k/r_k) A_k]

so the merged adapter has rank R = sum_d r_d and, with each document's scaling folded in,
lora_alpha = R (scaling 1). The scaling could sit on B instead; the product is the same, and we fold
it into A because that is what PEFT's ``add_weighted_adapter(weights=[1]*k, combination_type="cat")``
does: the tensors are then bit-identical to PEFT's, so the engine's greedy output can be compared
token for token with the paper's PEFT inference even when alpha/r is not a power of two. Adapters use the project's key convention
(``offline_encode.config``): ``"{module}.lora_A"`` [r, in] and ``"{module}.lora_B"`` [out, r].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from prag.errors import PragError

if TYPE_CHECKING:
    from prag.store import Layout

Adapter = Mapping[str, torch.Tensor]


@dataclass
class MergedAdapter:
    """A cat-merged adapter: ``tensors`` in the key convention, ``rank`` = sum of ranks, alpha = rank."""

    tensors: dict[str, torch.Tensor]
    rank: int

    @property
    def alpha(self) -> int:
        return self.rank  # scaling alpha/rank == 1: the per-document scaling lives in A

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def module_names(self) -> list[str]:
        return sorted(k[: -len(".lora_A")] for k in self.tensors if k.endswith(".lora_A"))


def _modules(adapter: Adapter, which: int) -> list[str]:
    mods = sorted(k[: -len(".lora_A")] for k in adapter if k.endswith(".lora_A"))
    for m in mods:
        if f"{m}.lora_B" not in adapter:
            raise PragError(f"adapter {which}: {m}.lora_A has no matching {m}.lora_B")
    if len(mods) * 2 != len(adapter):
        extra = sorted(k for k in adapter if not (k.endswith(".lora_A") or k.endswith(".lora_B")))
        raise PragError(f"adapter {which}: unexpected keys {extra[:3]} (expected '<module>.lora_A/B')")
    return mods


def cat_merge(adapters: Sequence[Adapter], alpha: float | Sequence[float],
              dtype: torch.dtype | None = torch.float32) -> MergedAdapter:
    """Merge ``adapters`` (same modules, same shapes apart from rank) into one rank-sum adapter.

    ``alpha`` is the LoRA alpha of the inputs (one value, or one per adapter); each input's
    rank is read from its tensors. The result's delta equals the sum of the inputs' deltas.
    """
    if not adapters:
        raise PragError("cat_merge needs at least one adapter")
    alphas = [float(alpha)] * len(adapters) if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
    if len(alphas) != len(adapters):
        raise PragError(f"cat_merge: {len(alphas)} alpha values for {len(adapters)} adapters")
    modules = _modules(adapters[0], 0)
    for i, ad in enumerate(adapters[1:], start=1):
        if _modules(ad, i) != modules:
            raise PragError(f"adapter {i} targets different modules than adapter 0; cannot merge")
    out: dict[str, torch.Tensor] = {}
    total_rank = 0
    for m in modules:
        a_parts, b_parts = [], []
        for i, ad in enumerate(adapters):
            a, b = ad[f"{m}.lora_A"], ad[f"{m}.lora_B"]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise PragError(f"adapter {i}, module {m}: lora_A {tuple(a.shape)} and lora_B "
                                f"{tuple(b.shape)} are not [r, in] and [out, r]")
            r = a.shape[0]
            a_parts.append((a.to(dtype) if dtype is not None else a) * (alphas[i] / r))
            b_parts.append(b.to(dtype) if dtype is not None else b)
        try:
            out[f"{m}.lora_A"] = torch.cat(a_parts, dim=0).contiguous()
            out[f"{m}.lora_B"] = torch.cat(b_parts, dim=1).contiguous()
        except RuntimeError as exc:
            raise PragError(f"module {m}: adapters have incompatible shapes ({exc})") from None
        total_rank = out[f"{m}.lora_A"].shape[0]
    return MergedAdapter(tensors=out, rank=total_rank)


class RowMerge:
    """:func:`cat_merge` of ``k`` flat store rows as one gather and one multiply.

    The engine merges one adapter per question, and the per-tensor loop of :func:`cat_merge` (48 tensors
    for an 8-layer model, each cast, scaled and concatenated) costs ~1.5 ms of Python per adapter, held
    under the GIL that the model's step needs too. Which input element lands where depends only on the
    store layout and ``k``, so that map is built once; every merge is then one ``index_select`` and one multiply.
    The result is bit-identical to :func:`cat_merge` (same fp32 products, same order of keys).
    """

    def __init__(self, layout: "Layout", k: int, alpha: float | Sequence[float]):
        """``layout``: the store's :class:`prag.store.Layout` (keys, shapes, offsets of a flat row)."""
        if k <= 0:
            raise PragError(f"RowMerge needs k >= 1, got {k}")
        alphas = [float(alpha)] * k if isinstance(alpha, (int, float)) else [float(a) for a in alpha]
        if len(alphas) != k:
            raise PragError(f"RowMerge: {len(alphas)} alpha values for k={k}")
        shape_of = dict(zip(layout.keys, layout.shapes))
        offsets = dict(zip(layout.keys, layout.offsets))
        self.params_per_doc = layout.params_per_doc
        modules = _modules(shape_of, 0)
        index_parts, scale_parts = [], []
        self.keys: list[str] = []
        self.shapes: list[tuple[int, ...]] = []
        for m in modules:
            (r, d_in), (d_out, r_b) = shape_of[f"{m}.lora_A"], shape_of[f"{m}.lora_B"]
            if r != r_b:
                raise PragError(f"module {m}: lora_A {(r, d_in)} and lora_B {(d_out, r_b)} are not [r, in] and [out, r]")
            a_at = torch.arange(r * d_in).view(r, d_in) + offsets[f"{m}.lora_A"]
            b_at = torch.arange(d_out * r).view(d_out, r) + offsets[f"{m}.lora_B"]
            docs = [i * self.params_per_doc for i in range(k)]
            index_parts += [torch.cat([a_at + d for d in docs], 0).reshape(-1),
                            torch.cat([b_at + d for d in docs], 1).reshape(-1)]
            scale_parts += [torch.cat([torch.full((r * d_in,), a / r) for a in alphas]),
                            torch.ones(d_out * r * k)]
            self.keys += [f"{m}.lora_A", f"{m}.lora_B"]
            self.shapes += [(k * r, d_in), (d_out, k * r)]
        self.k, self.rank = k, k * shape_of[f"{modules[0]}.lora_A"][0]
        self.index = torch.cat(index_parts)
        self.scale = torch.cat(scale_parts).to(torch.float32)

    def __call__(self, rows: torch.Tensor) -> MergedAdapter:
        """``rows``: ``[k, params_per_doc]`` store rows (any float dtype), in merge order."""
        if tuple(rows.shape) != (self.k, self.params_per_doc):
            raise PragError(f"RowMerge expects rows of shape {(self.k, self.params_per_doc)}, got {tuple(rows.shape)}")
        flat = rows.to(torch.float32).reshape(-1).index_select(0, self.index).mul_(self.scale)
        tensors, at = {}, 0
        for key, shape in zip(self.keys, self.shapes):
            n = shape[0] * shape[1]
            tensors[key] = flat[at:at + n].view(shape)
            at += n
        return MergedAdapter(tensors=tensors, rank=self.rank)


def delta_weight(adapter: Adapter, module: str, scaling: float = 1.0) -> torch.Tensor:
    """``scaling * B @ A`` for one module: the weight change the adapter applies (for tests/checks)."""
    return scaling * (adapter[f"{module}.lora_B"].double() @ adapter[f"{module}.lora_A"].double())
