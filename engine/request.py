"""What one question asks of the engine, and the one check every entry point runs on it.

The CLI (``prag eval``), the HTTP server and the engine itself all validate a request through
:func:`check_request`, so a limit (``top_k`` against the LoRA rank, ``max_tokens`` against the
context) is enforced in one place and every caller names the same parameter in its error.

Per-question failures are typed (:class:`FailureKind`): the server maps a kind to an HTTP status
without parsing message text, and batch evaluation counts them by kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Sequence

from prag.errors import PragError


class Mode(str, Enum):
    """The paper's four modes; each knows what it needs."""

    NONE = "none"
    RAG = "rag"
    PRAG = "prag"
    COMBINE = "combine"

    @property
    def needs_passages(self) -> bool:
        return self in (Mode.RAG, Mode.COMBINE)

    @property
    def needs_adapter(self) -> bool:
        return self in (Mode.PRAG, Mode.COMBINE)

    @property
    def needs_documents(self) -> bool:
        return self is not Mode.NONE

    @classmethod
    def parse(cls, value: Any) -> "Mode":
        if isinstance(value, Mode):
            return value
        try:
            return cls(value)
        except ValueError:
            raise RequestInvalid("mode", f"unknown mode {value!r}; valid modes: {', '.join(MODES)}") from None

    def __str__(self) -> str:  # "prag", not "Mode.PRAG", in messages and file names
        return self.value


MODES = tuple(m.value for m in Mode)


class FailureKind(str, Enum):
    """Why one question got no answer; the server maps each kind to a status (see engine/http)."""

    EMPTY_QUESTION = "empty_question"
    PROMPT_TOO_LONG = "prompt_too_long"
    NO_DOCUMENTS = "no_documents"  # retrieval found nothing
    UNKNOWN_DOCUMENT = "unknown_document"  # an explicit doc id that is not in the index
    MISSING_ADAPTER = "missing_adapter"  # a retrieved document has no adapter in the store
    CORRUPT_ADAPTER = "corrupt_adapter"  # its adapter failed the checksum / finiteness check
    RANK_LIMIT = "rank_limit"  # the merged rank exceeds the engine's max_lora_rank
    ENGINE = "engine_error"  # vLLM failed or returned nothing

    def __str__(self) -> str:
        return self.value


class RequestInvalid(PragError):
    """A request parameter is out of range; ``param`` names it (the HTTP layer answers 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Limits:
    """The engine's bounds that a request must respect."""

    max_model_len: int
    max_tokens: int  # the largest max_tokens one request may ask for
    adapter_rank: int | None  # rank of one document's adapter (None: no store)
    max_lora_rank: int | None  # the vLLM engine's merged-rank limit (None: LoRA off)
    max_top_k: int = 64  # retrieval depth cap for passage modes

    def top_k_limit(self, mode: Mode) -> int:
        if mode.needs_adapter and self.adapter_rank and self.max_lora_rank:
            return min(self.max_top_k, self.max_lora_rank // self.adapter_rank)
        return self.max_top_k


@dataclass(frozen=True)
class Sampling:
    """OpenAI sampling fields the engine honours; the defaults are the paper's greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def vllm_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p}
        if self.seed is not None:
            kw["seed"] = self.seed
        if self.stop:
            kw["stop"] = list(self.stop)
        return kw


@dataclass(frozen=True)
class PragRequest:
    """One validated question; build it with :func:`check_request`."""

    question: str
    mode: Mode
    top_k: int
    max_tokens: int
    doc_ids: tuple[str, ...] | None = None  # explicit documents instead of retrieval
    sampling: Sampling = field(default_factory=Sampling)


MAX_STOP_SEQUENCES = 4  # OpenAI's limit


def _positive_int(param: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestInvalid(param, f"{param} must be an integer, got {value!r}")
    if value < 1:
        raise RequestInvalid(param, f"{param} must be >= 1, got {value}")
    return value


def check_sampling(temperature: Any = None, top_p: Any = None, seed: Any = None, stop: Any = None) -> Sampling:
    t = 0.0 if temperature is None else temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0.0 <= t <= 2.0:
        raise RequestInvalid("temperature", f"temperature must be a number between 0 and 2, got {temperature!r}")
    p = 1.0 if top_p is None else top_p
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 < p <= 1.0:
        raise RequestInvalid("top_p", f"top_p must be a number in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not -2**63 <= seed < 2**63):
        raise RequestInvalid("seed", f"seed must be a 64-bit integer, got {seed!r}")
    stops: tuple[str, ...] = ()
    if stop is not None:
        items = [stop] if isinstance(stop, str) else stop
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            raise RequestInvalid("stop", "stop must be a non-empty string or a list of them")
        if len(items) > MAX_STOP_SEQUENCES:
            raise RequestInvalid("stop", f"stop takes at most {MAX_STOP_SEQUENCES} sequences, got {len(items)}")
        stops = tuple(items)
    return Sampling(temperature=float(t), top_p=float(p), seed=seed, stop=stops)


def check_request(limits: Limits, question: Any, mode: Any, top_k: Any, max_tokens: Any,
                  doc_ids: Sequence[str] | None = None, sampling: Sampling | None = None) -> PragRequest:
    """Validate one question's parameters against the engine's limits; raises :class:`RequestInvalid`.

    An empty question is not rejected here: batch evaluation records it as that question's failure
    (``FailureKind.EMPTY_QUESTION``) and goes on; the server checks it before calling the engine.
    """
    m = Mode.parse(mode)
    if not isinstance(question, str):
        raise RequestInvalid("question", f"the question must be text, got {type(question).__name__}")
    k = _positive_int("top_k", top_k)
    cap = limits.top_k_limit(m)
    if k > cap:
        why = (f"top_k x adapter rank {limits.adapter_rank} must fit the engine's max_lora_rank "
               f"{limits.max_lora_rank}" if m.needs_adapter and limits.adapter_rank and limits.max_lora_rank
               else "the retrieval depth cap")
        raise RequestInvalid("top_k", f"top_k must be <= {cap} in mode {m} ({why}), got {k}")
    n = _positive_int("max_tokens", max_tokens)
    if n > limits.max_tokens:
        raise RequestInvalid("max_tokens", f"max_tokens must be <= {limits.max_tokens}, got {n}")
    ids = None
    if doc_ids is not None:
        if isinstance(doc_ids, str) or not isinstance(doc_ids, (list, tuple)) or not doc_ids \
                or not all(isinstance(d, str) and d for d in doc_ids):
            raise RequestInvalid("doc_ids", "doc_ids must be a non-empty list of document id strings")
        ids = tuple(doc_ids)
        if m.needs_adapter and limits.adapter_rank and limits.max_lora_rank \
                and len(set(ids)) * limits.adapter_rank > limits.max_lora_rank:
            raise RequestInvalid("doc_ids", f"{len(set(ids))} documents x adapter rank {limits.adapter_rank} "
                                            f"exceed the engine's max_lora_rank {limits.max_lora_rank}")
    return PragRequest(question=question, mode=m, top_k=k, max_tokens=n, doc_ids=ids,
                       sampling=sampling or Sampling())
