"""Corpus -> embeddings -> FAISS index (+ doc store, manifest) -> Retriever."""
