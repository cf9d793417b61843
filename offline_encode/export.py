"""``prag export-adapter``: one document's adapter from the store as a standard PEFT directory."""

from __future__ import annotations

import os
from pathlib import Path

from offline_encode.peft_format import write_peft_adapter
from offline_encode.store import AdapterStore


def export_adapter(store_dir: str | os.PathLike, doc_id: str, out_dir: str | os.PathLike,
                   dtype: str | None = None) -> Path:
    """Write ``doc_id``'s adapter (rank r, alpha as trained) to ``out_dir``; PEFT and vLLM load it.

    An unknown doc id raises ``MissingAdapterError`` (a ``PragError``) before anything is written.
    """
    with AdapterStore.open(store_dir) as store:
        adapter = store.get(doc_id)
        return write_peft_adapter(adapter, out_dir, rank=store.rank, alpha=store.alpha,
                                  target_modules=store.target_modules, base_model_name_or_path=store.base_model,
                                  dtype=dtype or "float32")
