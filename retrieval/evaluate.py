"""Retrieval evaluation helpers: the NQ gold-passage pool and recall metrics (used by tests and benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from prag.errors import PragError
from prag.io import atomic_write_jsonl, iter_jsonl


@dataclass(frozen=True)
class PooledQA:
    question: str
    gold_id: str
    answers: tuple[str, ...] = ()


def pool_oracle_passages(path: str | Path) -> tuple[list[dict], list[PooledQA]]:
    """Pool the unique gold passages (``ctxs[0]``) of an NQ-open oracle file into a corpus.

    Returns corpus records ``{id, title, text}`` (ids ``nq-<n>`` in first-seen order) and, per
    question, the id of its gold passage and its answers. Identical (title, text) pairs share one document.
    """
    docs: list[dict] = []
    ids: dict[tuple[str, str], str] = {}
    qas: list[PooledQA] = []
    for lineno, rec in iter_jsonl(path, "NQ oracle file"):
        try:
            ctx = rec["ctxs"][0]
            key = (ctx.get("title") or "", ctx["text"])
            question = rec["question"]
        except (KeyError, IndexError, TypeError, AttributeError):
            raise PragError(f"{path}:{lineno}: expected 'question' and 'ctxs[0].text'") from None
        answers = rec.get("answers") or []
        if key not in ids:
            ids[key] = f"nq-{len(docs)}"
            docs.append({"id": ids[key], "title": key[0], "text": key[1]})
        qas.append(PooledQA(question, ids[key], tuple(a for a in answers if isinstance(a, str))))
    return docs, qas


def write_pool(path: str | Path, out_corpus: str | Path) -> list[PooledQA]:
    docs, qas = pool_oracle_passages(path)
    atomic_write_jsonl(out_corpus, docs)
    return qas


def recall_at_k(retrieved: Sequence[Sequence[str]], gold: Sequence[str], k: int) -> float:
    """Fraction of questions whose gold id is among the first ``k`` retrieved."""
    if len(retrieved) != len(gold):
        raise ValueError("one retrieved list per gold id")
    return sum(g in r[:k] for r, g in zip(retrieved, gold)) / max(1, len(gold))


def overlap_at_k(approx: Sequence[Sequence], exact: Sequence[Sequence], k: int) -> float:
    """Recall of an approximate index relative to the exact one: mean |top-k ∩ exact top-k| / k."""
    if len(approx) != len(exact):
        raise ValueError("one result list per query in both")
    total = sum(len(set(a[:k]) & set(e[:k])) / min(k, max(1, len(e[:k]))) for a, e in zip(approx, exact))
    return total / max(1, len(exact))
