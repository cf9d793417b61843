"""Adapter stores filled with random-but-seeded per-document adapters.

Throughput does not depend on adapter values, and equivalence tests need adapters that clearly
change the output; both want a store without training. Each document's tensors depend only on
``(seed, doc_id)``, so the same id gets the same adapter in every store built this way.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Iterable, Sequence

import torch

from offline_encode.config import EncodeConfig
from prag.store import AdapterStore, StoreSpec, model_fingerprint
from prag.errors import PragError


def _meta_model(model: str | Path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def random_adapter(template: dict[str, torch.Tensor], doc_id: str, seed: int = 0,
                   a_std: float | None = None, b_std: float = 0.02) -> dict[str, torch.Tensor]:
    """A random adapter shaped like ``template``: A ~ N(0, 1/in) (or ``a_std``), B ~ N(0, b_std)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(doc_id.encode()))
    out = {}
    for key, t in template.items():
        if key.endswith(".lora_A"):
            std = a_std if a_std is not None else t.shape[1] ** -0.5
        else:
            std = b_std
        out[key] = torch.randn(t.shape, generator=gen, dtype=torch.float32) * std
    return out


def build_random_store(path: str | Path, model: str | Path, doc_ids: Iterable[str], seed: int = 0,
                       cfg: EncodeConfig = EncodeConfig(), b_std: float = 0.02,
                       batch: int = 512) -> AdapterStore:
    """Create (or extend) a store at ``path`` for ``model`` with a random adapter per doc id."""
    from offline_encode.trainer import make_init_adapter

    init = make_init_adapter(_meta_model(model), cfg)
    spec = StoreSpec(base_model=str(model), model_fingerprint=model_fingerprint(model), rank=cfg.rank,
                     alpha=cfg.alpha, target_modules=tuple(cfg.target_modules), encode_config=cfg.to_dict(),
                     prompt_config={"random_store_seed": seed})
    store = AdapterStore.create_or_open(path, spec, init_adapter=init)
    try:
        ids = [str(d) for d in doc_ids if str(d) not in store]
        if len(set(ids)) != len(ids):
            raise PragError("duplicate doc ids given to build_random_store")
        for start in range(0, len(ids), batch):
            chunk: Sequence[str] = ids[start:start + batch]
            store.add_batch(chunk, [random_adapter(init, d, seed, b_std=b_std) for d in chunk])
    finally:
        store.close()
    return AdapterStore.open(path)
