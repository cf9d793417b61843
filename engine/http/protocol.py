"""The OpenAI wire format the server speaks, as pydantic v2 models, plus PRAG's namespaced controls.

Why explicit models: a client must learn at once when the server would not do what it asked. Every
OpenAI field the engine honours is declared here; an OpenAI field that would change the output and
that the engine does not implement is rejected with a 400 naming it (unless it carries its neutral
value, e.g. ``frequency_penalty: 0``), and so is any unknown field. Range checks are not repeated
here: the route hands the values to :func:`engine.request.check_request` / ``check_sampling``, the
one request check shared with the CLI and the engine.

PRAG's own controls travel in one object so they never collide with OpenAI's or vLLM's sampling
extras (vLLM's ``top_k`` is a sampling parameter): ``{"prag": {"mode": "rag", "top_k": 3,
"doc_ids": [...]}}`` (with the openai client: ``extra_body={"prag": {...}}``).
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, WithJsonSchema

from engine.http.errors import APIError


def _json_int(value: Any) -> int:
    """A JSON integer; ``1e9`` (which JSON parsers hand over as a float) counts when it is whole."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be an integer, got {_short(value)}")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"must be an integer, got {_short(value)}")
        return int(value)
    return value


def _json_number(value: Any) -> float:
    """A JSON number (not a bool, not a string); its range is check_sampling's job."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    """A value for an error message, never long: errors must not echo big inputs back."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


Int = Annotated[int, PlainValidator(_json_int), WithJsonSchema({"type": "integer"})]
Number = Annotated[float, PlainValidator(_json_number), WithJsonSchema({"type": "number"})]

PRAG_KEYS = ("mode", "top_k", "doc_ids")


class PragControls(BaseModel):
    """PRAG's per-request controls; any other key is an error (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid")

    mode: str | None = Field(None, description="none | rag | prag | combine (default: the server's --default-mode)")
    top_k: Int | None = Field(None, description="documents retrieved per question (default: the engine's)")
    doc_ids: list[str] | None = Field(None, description="answer from these documents instead of retrieving")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


# OpenAI request fields that this server does not implement, with the values that leave the output as
# the engine computes it anyway; any other value is a 400 naming the field.
NEUTRAL_VALUES: dict[str, tuple] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "modalities": (None, ["text"]),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "reasoning_effort": (None,),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
}
# OpenAI fields that never change the output: accepted as they are.
INERT_FIELDS = frozenset({"metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"})
# PRAG's controls sent the old way, at the top level
_MOVED = {k: f"PRAG's {k} goes in the prag object: {{\"prag\": {{\"{k}\": ...}}}}" for k in PRAG_KEYS}
_MOVED["top_k"] += " (sampling top_k is not served: decoding is greedy or temperature/top_p)"


class _OpenAIRequest(BaseModel):
    """Fields shared by chat and completions requests."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="must be the served model id (GET /v1/models)")
    max_tokens: Int | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    seed: Int | None = None
    stop: str | list[str] | None = None
    n: Int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="an end-user id; logged with the request id")
    prag: PragControls | None = None

    def check_fields(self) -> None:
        """Reject what the engine would not honour: unknown fields, unsupported OpenAI fields with a
        value that would change the output, n > 1, stream_options without stream."""
        for key, value in (self.model_extra or {}).items():
            if key in INERT_FIELDS:
                continue
            if key in _MOVED:
                raise APIError(400, _MOVED[key], param=key)
            neutral = NEUTRAL_VALUES.get(key)
            if neutral is None:
                raise APIError(400, f"unknown parameter {key!r}", param=key, code="unknown_parameter")
            if value not in neutral:
                raise APIError(400, f"parameter {key!r} is not supported by this server (only its default "
                                    f"{neutral[-1]!r} is accepted)", param=key, code="unsupported_parameter")
        if self.n is not None and self.n != 1:
            raise APIError(400, f"n must be 1 (one answer per question), got {self.n}", param="n")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")


class ChatMessage(BaseModel):
    """One message; only the last one (the user's question) reaches the engine."""

    model_config = ConfigDict(extra="allow")  # e.g. an assistant turn's tool_calls in earlier history

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(..., description="the last message must be the user's question")
    max_completion_tokens: Int | None = None

    def question(self) -> str:
        """The last message's text, which must be the user's question; earlier turns are context the
        paper's prompt has no place for (the README says so)."""
        if not self.messages:
            raise APIError(400, "messages must hold at least the user's question", param="messages")
        last = len(self.messages) - 1
        msg = self.messages[last]
        if msg.role != "user":
            raise APIError(400, f"the last message must be the user's question, got role {msg.role!r}",
                           param=f"messages.{last}.role")
        content = msg.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise APIError(400, f"only text content parts are supported, got {_short(kind)}",
                                   param=f"messages.{last}.content.{j}")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise APIError(400, "the user's question must be text", param=f"messages.{last}.content")
        return content

    def token_limit(self) -> int | None:
        """``max_completion_tokens`` (OpenAI's newer name) or ``max_tokens``; both must agree."""
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise APIError(400, f"max_tokens ({a}) and max_completion_tokens ({b}) disagree; send one",
                           param="max_completion_tokens")
        return b if b is not None else a

    def token_param(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] = Field(..., description="the question, or a list of questions")

    def questions(self) -> list[str]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if not self.prompt:
            raise APIError(400, "prompt must be a question or a non-empty list of questions", param="prompt")
        return list(self.prompt)

    def token_limit(self) -> int | None:
        return self.max_tokens

    def token_param(self) -> str:
        return "max_tokens"


# -- responses ---------------------------------------------------------------------------------------


class MissingAdapter(BaseModel):
    policy: str
    doc_ids: list[str]


class PragInfo(BaseModel):
    """What PRAG did for one question: the documents, their scores and the extracted short answer."""

    mode: str
    doc_ids: list[str] = Field(default_factory=list)
    scores: list[float] = Field(default_factory=list)
    prediction: str | None = None  # the short answer (None in a stream's first chunk)
    truncated: bool | None = None  # passages cut to fit the context
    adapter_cache_hit: bool | None = None  # the merged adapter came from the cache (None: no adapter)
    missing_adapter: MissingAdapter | None = None  # what --on-missing-adapter did
    replica: str | None = None  # the engine replica that answered (prag serve --replicas only)
    timings: dict[str, float] | None = None  # seconds: retrieve_s, adapter_s, ttft_s, total_s (engine side)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prag: PragInfo


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    prag: PragInfo | list[PragInfo]  # one per question: a list when the prompt was a list


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "prag-engine"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
