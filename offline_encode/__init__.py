"""Augmented data -> per-document LoRA adapters (batched trainer, Ray) -> adapter store."""
