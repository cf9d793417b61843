"""The paper's prompt format, shared by training (offline_encode) and inference (engine).

Training sequences and inference prompts must be tokenised identically, or the adapters learn
a format the engine never shows them; so both sides build token ids here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

DEFAULT_USER_TEMPLATE = (
    "You should answer the question by referring to the knowledge provided below "
    "and integrating your own knowledge.\n{passages}\n\nQuestion: {question}"
)
DEFAULT_COT_USER_TEMPLATE = (
    "You should reference the knowledge provided below and combine it with your own knowledge "
    "to answer the question. Please follow the format of the example I provided above.\n"
    "Here are some examples about how to answer the questions.\n{fewshot}"
    "Here are some reference.\n{passages}\n\n"
    "Let's think step by step. Answer the questions in the same format as the examples above.\n"
    "Question: {question}"
)
DEFAULT_ASSISTANT_PREFIX = "The answer is"
DEFAULT_COT_ASSISTANT_PREFIX = "Answer:"


@dataclass(frozen=True)
class PromptConfig:
    """How a question (plus optional passages and answer) becomes chat-formatted token ids."""

    user_template: str = DEFAULT_USER_TEMPLATE
    assistant_prefix: str = DEFAULT_ASSISTANT_PREFIX
    chain_of_thought: bool = False
    cot_user_template: str = DEFAULT_COT_USER_TEMPLATE
    cot_assistant_prefix: str = DEFAULT_COT_ASSISTANT_PREFIX
    fewshot: str = ""
    passage_format: str = "Passage {i}: {text}\n"


def normalize_question(question: str) -> str:
    """The paper ends every question with exactly one '?'."""
    question = question.strip()
    if not question.endswith("?"):
        return question + "?"
    if len(question) >= 2 and question[-2] == " ":
        return question[:-2] + "?"
    return question


def format_passages(passages: Sequence[str] | None, cfg: PromptConfig = PromptConfig()) -> str:
    return "".join(cfg.passage_format.format(i=i + 1, text=p) for i, p in enumerate(passages or []))


def user_message(question: str, passages: Sequence[str] | None, cfg: PromptConfig = PromptConfig()) -> str:
    ctx = format_passages(passages, cfg)
    if cfg.chain_of_thought:
        return cfg.cot_user_template.format(question=normalize_question(question), passages=ctx, fewshot=cfg.fewshot)
    return cfg.user_template.format(question=normalize_question(question), passages=ctx)


def assistant_text(answer: str | None, cfg: PromptConfig = PromptConfig()) -> str:
    """The assistant turn: the prefix alone at inference, prefix + answer + '.' in training."""
    prefix = cfg.cot_assistant_prefix if cfg.chain_of_thought else cfg.assistant_prefix
    if answer is None:
        return prefix
    answer = answer.strip()
    if not answer.endswith("."):
        answer += "."
    return f"{prefix} {answer}"


def build_prompt_ids(
    tokenizer,
    question: str,
    passages: Sequence[str] | None = None,
    answer: str | None = None,
    cfg: PromptConfig = PromptConfig(),
) -> list[int]:
    """Chat-template the user turn, then append the (pre-filled) assistant turn's tokens."""
    messages = [{"role": "user", "content": user_message(question, passages, cfg)}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    ids = list(ids)
    ids += tokenizer.encode(assistant_text(answer, cfg), add_special_tokens=False)
    return ids


def build_prompt_text(tokenizer, question: str, passages: Sequence[str] | None = None,
                      cfg: PromptConfig = PromptConfig()) -> str:
    """The same prompt as text, for logs and the predictions file."""
    messages = [{"role": "user", "content": user_message(question, passages, cfg)}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text + assistant_text(None, cfg)
