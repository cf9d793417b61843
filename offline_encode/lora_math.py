"""Pure tensor maths of the batched encoder: the per-row LoRA delta, AdamW on stacked rows, chunk loss.

No I/O and no model code here, so each piece can be tested against its PyTorch/PEFT counterpart.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def add_batched_lora(base_out: Tensor, x: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """``base_out + scaling * (x @ a[i].T) @ b[i].T`` per row: row i of ``x`` [n, L, in] uses its own
    ``a[i]`` [r, in] and ``b[i]`` [out, r]; ``base_out`` is the frozen layer's output [n, L, out].

    The same maths as PEFT's ``base(x) + lora_B(lora_A(x)) * scaling``; ``baddbmm`` fuses the scale and
    the add into the second matmul, so the wide [n, L, out] delta is never materialised separately.
    """
    return torch.baddbmm(base_out, torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2), alpha=scaling)


def adamw_update_(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                  exp_avg_sqs: Sequence[Tensor], step: int, *, lr: float, weight_decay: float = 0.01,
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """One ``torch.optim.AdamW`` step (in place) on a list of tensors whose dim 0 is the document.

    The maths is element-wise, so every row (document) is updated exactly as if it were optimised
    alone. ``step`` is the 1-based step count after this update; it is shared by all the rows passed
    in. Rows that must not move at this step (their document has no example left) are simply not
    passed: the trainer hands in the prefix views ``p[:k]``, which is the row mask without a gather.
    The op order mirrors torch's single-tensor AdamW (decoupled decay, lerp for the first moment,
    ``sqrt(v)/sqrt(bc2) + eps``, ``addcdiv`` with ``-lr/bc1``); ``_foreach`` ops keep it to a few
    kernel launches for all target modules on a GPU.
    """
    beta1, beta2 = betas
    params, grads, exp_avgs, exp_avg_sqs = list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)
    if not params:
        return
    bias_correction1 = 1 - beta1 ** step
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, value=-lr / bias_correction1)


def weighted_token_ce(hidden: Tensor, lm_weight: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """``sum_t weights[t] * CE(hidden[t] @ lm_weight.T, targets[t])``, logits upcast to fp32 as HF does."""
    logits = torch.nn.functional.linear(hidden, lm_weight).float()
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return (ce * weights).sum()
