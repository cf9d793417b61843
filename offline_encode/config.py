"""Typed configuration for parametric encoding. Defaults are the paper's (docs/method.md, section 2).

Adapter tensors travel through the project as ``dict[str, Tensor]`` keyed by
``"{module_name}.lora_A"`` (shape ``[r, in]``) and ``"{module_name}.lora_B"`` (shape ``[out, r]``),
where ``module_name`` is the HF module path, e.g. ``model.layers.0.mlp.gate_proj``. PEFT's key for
the same tensor is ``base_model.model.{module_name}.lora_A.weight``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from prag.errors import PragError

DEFAULT_TARGETS = ("gate_proj", "up_proj", "down_proj")
STORAGE_DTYPES = ("float32", "bfloat16", "float16")
COMPUTE_DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
# The `prag encode` flag of each field, so a library caller and a CLI user read the same error.
FLAGS = {"rank": "--rank", "alpha": "--alpha", "target_modules": "--targets", "learning_rate": "--lr",
         "epochs": "--epochs", "weight_decay": "--weight-decay", "docs_per_step": "--docs-per-step",
         "compute_dtype": "--compute-dtype", "storage_dtype": "--storage-dtype", "init_seed": "--init-seed",
         "loss_chunk_tokens": "--loss-chunk-tokens", "max_padding": "max_padding", "device": "--device",
         "with_cot": "--with-cot"}


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

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse settings that cannot train (``--lr -1``, ``--epochs 0``, NaN) before any model loads;
        the ``PragError`` names the flag (and field) and the bad value."""
        def bad(name: str, rule: str) -> PragError:
            label = FLAGS[name] if FLAGS[name].lstrip("-") == name else f"{FLAGS[name]} ({name})"
            return PragError(f"{label} must be {rule}, got {getattr(self, name)!r}")

        def number(name: str, integer: bool = False) -> float:
            value = getattr(self, name)
            ok = isinstance(value, int) if integer else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok or not math.isfinite(value):
                raise bad(name, "a whole number" if integer else "a finite number")
            return value

        for name in ("rank", "epochs", "docs_per_step", "loss_chunk_tokens"):
            if number(name, integer=True) < 1:
                raise bad(name, "at least 1")
        number("init_seed", integer=True)
        if number("learning_rate") <= 0:
            raise bad("learning_rate", "a finite number > 0")
        if number("alpha") <= 0:
            raise bad("alpha", "a finite number > 0")
        if number("weight_decay") < 0:
            raise bad("weight_decay", "a finite number >= 0")
        if not 0 <= number("max_padding") < 1:
            raise bad("max_padding", "in [0, 1)")
        targets = self.target_modules
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t.strip() for t in targets):
            raise bad("target_modules", "a non-empty list of module names (e.g. gate_proj,up_proj,down_proj)")
        if len(set(targets)) != len(targets):
            raise bad("target_modules", "a list without repeated names")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise bad("storage_dtype", f"one of {', '.join(STORAGE_DTYPES)}")
        if str(self.compute_dtype).lower() not in COMPUTE_DTYPES:
            raise bad("compute_dtype", f"one of {', '.join(COMPUTE_DTYPES)}")
        device = self.device
        if not isinstance(device, str) or not (device in ("auto", "cpu", "cuda") or
                                               (device.startswith("cuda:") and device[5:].isdigit())):
            raise bad("device", "auto, cpu, cuda or cuda:N")
        assert {f.name for f in fields(self)} <= set(FLAGS), "every field needs its flag in FLAGS"

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
