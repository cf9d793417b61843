"""The paper's encoding loop, kept as the yardstick for the batched trainer (tests and benchmark).

Per document: a PEFT LoRA model starting from the shared initial adapter, batch 1, a fresh
``torch.optim.AdamW(lr, weight_decay)``, ``for epoch: for sequence: step``, loss = the HF causal-LM
loss over the whole sequence. ``pad_to=3000`` pads every sequence the way the paper's code does
(pad token, attention mask 0, labels -100), which costs time but not results.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from offline_encode.config import EncodeConfig, lora_key
from offline_encode.device import resolve_device, resolve_dtype
from offline_encode.peft_format import read_peft_adapter
from offline_encode.trainer import Adapter, check_adapter, load_base_model, target_module_names


def train_reference(model_path, init_adapter_dir_or_tensors: str | Path | Adapter,
                    sequences_per_doc: Sequence[Sequence[Sequence[int]]], cfg: EncodeConfig = EncodeConfig(),
                    pad_to: int | None = None, dtype: str = "float32", progress: bool = False) -> list[Adapter]:
    """Train each document alone with PEFT; returns CPU float32 adapters in the project's key convention.

    ``model_path`` may also be an already loaded HF model (it gets LoRA layers injected and removed again).
    ``dtype`` is the base model's precision; the paper trains in float32.
    """
    from peft import LoraConfig, get_peft_model

    device = resolve_device(cfg.device)
    if isinstance(model_path, (str, Path)):
        model, tokenizer = load_base_model(model_path, device, resolve_dtype(dtype, device))
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    else:
        model = model_path
        model.eval()
        model.requires_grad_(False)
        device = next(model.parameters()).device
        pad_id = getattr(model.config, "pad_token_id", None) or 0
    if isinstance(init_adapter_dir_or_tensors, (str, Path)):
        init = {k: v.to(torch.float32) for k, v in read_peft_adapter(init_adapter_dir_or_tensors)[0].items()}
    else:
        init = init_adapter_dir_or_tensors
    names = target_module_names(model, cfg.target_modules)
    check_adapter(init, model, names, cfg.rank, "init adapter")

    peft_model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha,
                                                  target_modules=list(cfg.target_modules), lora_dropout=0.0))
    layers = dict(peft_model.base_model.model.named_modules())
    params: dict[str, Tensor] = {}
    for name in names:
        params[lora_key(name, "A")] = layers[name].lora_A["default"].weight
        params[lora_key(name, "B")] = layers[name].lora_B["default"].weight
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(sequences_per_doc), desc="reference", unit="doc")
    results: list[Adapter] = []
    try:
        for seqs in sequences_per_doc:
            with torch.no_grad():
                for key, p in params.items():
                    p.copy_(init[key])
            optimizer = torch.optim.AdamW(list(params.values()), lr=cfg.learning_rate,
                                          weight_decay=cfg.weight_decay)
            for _ in range(cfg.epochs):
                for seq in seqs:
                    input_ids, attention_mask, labels = _example(seq, pad_to, pad_id, device)
                    out = peft_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
                    out.loss.backward()
                    optimizer.step()
                    optimizer.zero_grad()
            results.append({k: p.detach().to("cpu", torch.float32).clone() for k, p in params.items()})
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        peft_model.unload()
    return results


def _example(seq: Sequence[int], pad_to: int | None, pad_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """One batch-1 example; with ``pad_to`` it mirrors the paper's TrainingData (truncate/pad to max_length)."""
    ids = list(seq)
    labels = list(seq)
    mask = [1] * len(ids)
    if pad_to:
        ids, labels, mask = ids[:pad_to], labels[:pad_to], mask[:pad_to]
        extra = pad_to - len(ids)
        ids += [pad_id] * extra
        labels += [-100] * extra
        mask += [0] * extra
    as_tensor = lambda x: torch.tensor([x], dtype=torch.long, device=device)  # noqa: E731
    return as_tensor(ids), as_tensor(mask), as_tensor(labels)
