"""``prag export-adapter``: one document's adapter from the store as a standard PEFT directory."""

from __future__ import annotations

import os
from pathlib import Path

from offline_encode.peft_format import CONFIG_NAME, WEIGHTS_NAME, write_peft_adapter
from prag.store import AdapterStore
from prag.io import OutputKind, check_output_dir, json_marker

_is_peft_config = json_marker(CONFIG_NAME, "r", "lora_alpha", peft_type="LORA")


def _is_previous_export(path: Path) -> bool:
    """Exactly what an export writes (a LoRA config and its weights), nothing a user added."""
    return _is_peft_config(path) and {p.name for p in path.iterdir()} <= {CONFIG_NAME, WEIGHTS_NAME}


EXPORT_OUTPUT = OutputKind("an exported adapter", "prag export-adapter", _is_previous_export)


def export_adapter(store_dir: str | os.PathLike, doc_id: str, out_dir: str | os.PathLike,
                   dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write ``doc_id``'s adapter (rank r, alpha as trained) to ``out_dir``; PEFT and vLLM load it.

    An unknown doc id raises ``MissingAdapterError`` (a ``PragError``) before anything is written.
    ``out_dir`` must be new or empty, or a previous export replaced with ``overwrite``; a folder of
    other files, the store itself, a folder containing it or one inside it are refused.
    """
    with AdapterStore.open(store_dir) as store:
        check_output_dir(out_dir, EXPORT_OUTPUT, overwrite=overwrite, inputs=(store_dir,))
        adapter = store.get(doc_id)
        return write_peft_adapter(adapter, out_dir, rank=store.rank, alpha=store.alpha,
                                  target_modules=store.target_modules, base_model_name_or_path=store.base_model,
                                  dtype=dtype or "float32")
