"""Typed configuration for parametric encoding. Defaults are the paper's (DESIGN.md section 2).

Adapter tensors travel through the project as ``dict[str, Tensor]`` keyed by
``"{module_name}.lora_A"`` (shape ``[r, in]``) and ``"{module_name}.lora_B"`` (shape ``[out, r]``),
where ``module_name`` is the HF module path, e.g. ``model.layers.0.mlp.gate_proj``. PEFT's key for
the same tensor is ``base_model.model.{module_name}.lora_A.weight``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

DEFAULT_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class EncodeConfig:
    rank: int = 2
    alpha: int = 32
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    learning_rate: float = 3e-4
    epochs: int = 1
    weight_decay: float = 0.01  # torch.optim.AdamW's default, which the paper's code uses
    docs_per_step: int = 32  # documents trained together in one batched step
    compute_dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    storage_dtype: str = "float32"  # float32 | bfloat16 | float16
    init_seed: int = 42  # seed of the one shared initial adapter
    loss_chunk_tokens: int = 1024  # logits are materialised this many positions at a time
    max_padding: float = 0.2  # a step's rows are split into micro-batches that pad at most this fraction
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    with_cot: bool = False  # train on full_answer (chain-of-thought answers) instead of answer

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


def lora_key(module_name: str, which: str) -> str:
    """``which`` is 'A' or 'B'."""
    return f"{module_name}.lora_{which}"


def peft_key(module_name: str, which: str) -> str:
    return f"base_model.model.{module_name}.lora_{which}.weight"
