"""Inference prompts on top of ``prag.prompt`` (the one prompt format), plus the passage-truncation rule.

Truncation rule (documented in the README): the prompt must leave room for the answer, so its
budget is ``max_model_len - max_new_tokens`` tokens. When the full prompt is longer, only the
passages shrink; the instruction, the question and the chat template are never touched. Passages
are cut from their end "longest first" (water-filling): we find the largest cap ``c`` such that
truncating every passage to at most ``c`` tokens fits the budget, so short passages survive whole
and long ones lose the same amount. Because decoded-then-re-encoded text can tokenise slightly
differently, the cap is lowered until the rebuilt prompt really fits. If even empty passages do
not fit, the question fails with an error naming the lengths.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from prag.errors import PragError
from prag.io import read_json
from prag.prompt import PromptConfig, build_prompt_ids, build_prompt_text

# Generic chain-of-thought examples in the paper's few-shot format ("Question: q\nAnswer: a\n\n").
DEFAULT_FEWSHOT_EXAMPLES = [
    {"question": "Who was the first person to walk on the Moon, and in which year?",
     "answer": "The Apollo 11 mission landed on the Moon in 1969, and Neil Armstrong stepped out first. "
               "So the answer is Neil Armstrong."},
    {"question": "Are the Nile and the Amazon on the same continent?",
     "answer": "The Nile flows through Africa. The Amazon flows through South America. "
               "So the answer is no."},
    {"question": "What is the capital of the country where the Eiffel Tower stands?",
     "answer": "The Eiffel Tower stands in France. The capital of France is Paris. So the answer is Paris."},
]


def format_fewshot(examples: Sequence[dict]) -> str:
    return "".join(f"Question: {e['question']}\nAnswer: {e['answer']}\n\n" for e in examples)


def load_fewshot(path: str | Path) -> str:
    """A JSON list of ``{question, answer}`` (the paper's ``fewshot/<dataset>.json``) as prompt text."""
    data = read_json(path, "few-shot file")
    if not isinstance(data, list) or not all(isinstance(e, dict) and "question" in e and "answer" in e
                                             for e in data):
        raise PragError(f"{path}: expected a JSON list of {{\"question\", \"answer\"}} objects")
    return format_fewshot(data)


def prompt_config(chain_of_thought: bool = False, fewshot: str | None = None,
                  base: PromptConfig | None = None) -> PromptConfig:
    """The paper's prompt, or its chain-of-thought variant with few-shot examples."""
    base = base or PromptConfig()
    if not chain_of_thought:
        return replace(base, chain_of_thought=False)
    shots = fewshot if fewshot is not None else (base.fewshot or format_fewshot(DEFAULT_FEWSHOT_EXAMPLES))
    return replace(base, chain_of_thought=True, fewshot=shots)


@dataclass
class BuiltPrompt:
    ids: list[int]
    text: str
    passages: list[str]  # as placed in the prompt (after truncation)
    truncation: dict | None = None  # {"budget", "tokens_before", "passage_tokens_before", "passage_tokens_after"}


def _water_fill_cap(lengths: Sequence[int], remove: int) -> int:
    """Largest cap c with sum(min(l, c)) <= sum(lengths) - remove."""
    target = sum(lengths) - remove
    if target <= 0:
        return 0
    lo, hi = 0, max(lengths)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in lengths) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def build_prompt(tokenizer, question: str, passages: Sequence[str] | None, cfg: PromptConfig,
                 budget: int) -> BuiltPrompt:
    """Prompt ids/text for one question, truncating passages (see module doc) to fit ``budget`` tokens."""
    passages = list(passages or [])
    ids = build_prompt_ids(tokenizer, question, passages or None, cfg=cfg)
    if len(ids) <= budget:
        return BuiltPrompt(ids, build_prompt_text(tokenizer, question, passages or None, cfg), passages)
    before = len(ids)
    if not passages:
        raise PragError(f"the prompt has {before} tokens without passages, more than the {budget} allowed "
                        f"(max_model_len minus max_new_tokens); shorten the question or raise max_model_len")
    p_ids = [tokenizer.encode(p, add_special_tokens=False) for p in passages]
    lengths = [len(p) for p in p_ids]
    overflow = before - budget
    cap = _water_fill_cap(lengths, overflow)
    while True:
        cut = [tokenizer.decode(p[:cap]).strip() if len(p) > cap else passages[i] for i, p in enumerate(p_ids)]
        ids = build_prompt_ids(tokenizer, question, cut, cfg=cfg)
        if len(ids) <= budget:
            break
        if cap == 0:
            raise PragError(f"the prompt has {len(ids)} tokens even with empty passages, more than the {budget} "
                            f"allowed (max_model_len minus max_new_tokens); raise max_model_len")
        cap = max(0, min(cap - 1, _water_fill_cap([min(n, cap) for n in lengths], len(ids) - budget)))
    after = [min(n, cap) for n in lengths]
    trunc = {"budget": budget, "tokens_before": before, "tokens_after": len(ids),
             "passage_tokens_before": lengths, "passage_tokens_after": after}
    return BuiltPrompt(ids, build_prompt_text(tokenizer, question, cut, cfg), cut, trunc)

