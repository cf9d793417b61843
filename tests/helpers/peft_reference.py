"""The paper's PRAG inference loop (PEFT + HF generate, one question at a time), as a reference.

For each question: load the k document adapters into a ``PeftModel``, merge them with
``add_weighted_adapter(weights=[1]*k, combination_type="cat")``, greedy-generate, then delete
the merged adapter and unload (the paper's ``src/inference.py``). The engine's equivalence
test compares against this token for token, and the serving benchmark times it.

Per-document adapters are exported once as PEFT directories (the paper's on-disk layout), so
the timed loop loads them from disk exactly as the paper's code does.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import torch

from offline_encode.peft_format import write_peft_adapter


class PeftReference:
    """Greedy PRAG/combine generation with PEFT's cat-merge on an HF model (batch 1)."""

    def __init__(self, model_dir: str | Path, store, dtype: torch.dtype = torch.float32,
                 adapter_root: str | Path | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_dir = str(model_dir)
        self.store = store
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype)
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._tmp = tempfile.TemporaryDirectory(prefix="prag-reference-") if adapter_root is None else None
        self.adapter_root = Path(adapter_root or self._tmp.name)
        self._dirs: dict[str, Path] = {}

    def export(self, doc_ids: Sequence[str]) -> list[Path]:
        """Write each document's adapter once as a PEFT directory (not part of the timed loop)."""
        todo = [d for d in dict.fromkeys(doc_ids) if d not in self._dirs]
        if todo:
            for d, adapter in zip(todo, self.store.get_many(todo)):
                path = self.adapter_root / f"doc-{len(self._dirs):06d}"
                write_peft_adapter(adapter, path, rank=self.store.rank, alpha=self.store.alpha,
                                   target_modules=self.store.target_modules, base_model_name_or_path=self.model_dir)
                self._dirs[d] = path
        return [self._dirs[d] for d in doc_ids]

    @torch.no_grad()
    def _generate(self, model, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([list(prompt_ids)])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=pad)
        return out[0, ids.shape[1]:].tolist()

    def generate_base(self, prompt_ids: Sequence[int], max_new_tokens: int = 20) -> list[int]:
        return self._generate(self.model, prompt_ids, max_new_tokens)

    def generate(self, prompt_ids: Sequence[int], doc_ids: Sequence[str], max_new_tokens: int = 20) -> list[int]:
        """Load the documents' adapters, cat-merge with PEFT, generate greedily, unload."""
        from peft import PeftModel

        dirs = self.export(doc_ids)
        names = [str(i) for i in range(len(dirs))]
        model = PeftModel.from_pretrained(self.model, str(dirs[0]), adapter_name=names[0], is_trainable=False)
        for name, path in zip(names[1:], dirs[1:]):
            model.load_adapter(str(path), adapter_name=name)
        model.add_weighted_adapter(adapters=names, weights=[1] * len(names), adapter_name="merge",
                                   combination_type="cat")
        model.set_adapter("merge")
        try:
            return self._generate(model, prompt_ids, max_new_tokens)
        finally:
            model.delete_adapter("merge")
            self.model = model.unload()

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
