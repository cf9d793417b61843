"""Reciprocal-rank fusion (Cormack et al., 2009): pure maths, no I/O."""

from __future__ import annotations

from typing import Hashable, Sequence, TypeVar

K = TypeVar("K", bound=Hashable)

RRF_K = 60  # the constant from the paper; damps the weight of the very top ranks


def reciprocal_rank_fusion(rankings: Sequence[Sequence[K]], k: int, rrf_k: int = RRF_K) -> list[tuple[K, float]]:
    """Fuse ranked lists: score(d) = sum over lists of 1 / (rrf_k + rank), rank starting at 1.

    Ties keep the order in which items were first seen (list order, then rank), so the result
    is deterministic.
    """
    scores: dict[K, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, start=1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (rrf_k + rank)
    order = {item: i for i, item in enumerate(scores)}
    best = sorted(scores.items(), key=lambda kv: (-kv[1], order[kv[0]]))
    return best[:k]
