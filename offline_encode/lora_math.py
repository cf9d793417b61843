"""Pure tensor maths of the batched encoder: the per-row LoRA delta and a row-masked AdamW step.

No I/O and no model code here, so each piece can be tested against its PyTorch/PEFT counterpart.
"""

from __future__ import annotations

import torch
from torch import Tensor


def batched_lora_delta(x: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """Per-row LoRA output: row i of ``x`` [n, L, in] uses its own ``a[i]`` [r, in] and ``b[i]`` [out, r].

    Same operation order as PEFT's ``lora_B(lora_A(x)) * scaling``, so fp32 results agree to rounding.
    """
    return torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2)) * scaling


def adamw_update_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int | Tensor, *,
                  lr: float, weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.999),
                  eps: float = 1e-8, row_mask: Tensor | None = None) -> None:
    """One ``torch.optim.AdamW`` step, in place, on stacked per-document parameters.

    Dim 0 of every tensor is the document (row). ``step`` is the 1-based step count after this update,
    either one int for all rows or an int tensor [n] (rows that started later have smaller counts).
    Rows where ``row_mask`` is False are left untouched (parameter and both moments), which is what
    "this document has no example at this step" means. The op order mirrors torch's single-tensor
    AdamW (decoupled decay, lerp for the first moment, bias-corrected denominator), so one document's
    trajectory equals training it alone with torch.optim.AdamW.
    """
    beta1, beta2 = betas
    if row_mask is not None:
        keep = ~row_mask.to(torch.bool)
        saved = (param[keep].clone(), exp_avg[keep].clone(), exp_avg_sq[keep].clone())
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    if isinstance(step, Tensor):
        shape = (-1,) + (1,) * (param.dim() - 1)
        step_f = step.to(device=param.device, dtype=torch.float64).clamp(min=1).view(shape)
        bias_correction1 = (1 - beta1 ** step_f).to(param.dtype)
        bias_correction2_sqrt = ((1 - beta2 ** step_f) ** 0.5).to(param.dtype)
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg * (-lr / bias_correction1), denom)
    else:
        bias_correction1 = 1 - beta1 ** step
        bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    if row_mask is not None:
        param[keep], exp_avg[keep], exp_avg_sq[keep] = saved


def weighted_token_ce(hidden: Tensor, lm_weight: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """``sum_t weights[t] * CE(hidden[t] @ lm_weight.T, targets[t])`` with logits upcast to fp32 like HF."""
    logits = torch.nn.functional.linear(hidden, lm_weight).float()
    ce = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    return (ce * weights).sum()
