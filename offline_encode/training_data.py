"""Augmented record -> the paper's training sequences for one document (docs/method.md, section 1).

Recipe (PRAG's ``get_train_data``): the first ceil(n/2) QA pairs appear twice, once with the original
passage and once with the (first) rewrite as context; the remaining QA pairs appear with no passage.
Three QA pairs therefore give five sequences. Every sequence is the shared chat prompt plus the
pre-filled answer (``prag.prompt.build_prompt_ids``); the loss covers the whole sequence.
"""

from __future__ import annotations

import math

from offline_encode.augment.records import record_problem as skip_reason
from prag.errors import PragError
from prag.prompt import PromptConfig, build_prompt_ids


def training_texts(record: dict, with_cot: bool = False) -> list[tuple[str, list[str] | None, str]]:
    """The (question, passages, answer) triples of one document, in the paper's order."""
    reason = skip_reason(record)
    if reason is not None:
        raise PragError(f"augmented record {record.get('doc_id', '?') if isinstance(record, dict) else '?'!r}: "
                        f"{reason}")
    passage = record["passage"]
    rewrites = [r for r in (record.get("rewrites") or []) if isinstance(r, str) and r.strip()]
    contexts = [passage] + rewrites[:1]
    qa = record["qa"]
    n_with_context = math.ceil(len(qa) / 2)
    triples: list[tuple[str, list[str] | None, str]] = []
    for i, pair in enumerate(qa):
        answer = (pair.get("full_answer") or pair["answer"]) if with_cot else pair["answer"]
        if i < n_with_context:
            triples.extend((pair["question"], [ctx], answer) for ctx in contexts)
        else:
            triples.append((pair["question"], None, answer))
    return triples


def build_training_sequences(tokenizer, record: dict, prompt_cfg: PromptConfig = PromptConfig(),
                             with_cot: bool = False) -> list[list[int]]:
    """Token ids of every training sequence of one augmented record (labels = the ids themselves)."""
    return [build_prompt_ids(tokenizer, q, ctx, a, prompt_cfg) for q, ctx, a in training_texts(record, with_cot)]
