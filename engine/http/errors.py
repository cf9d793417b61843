"""Errors in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with their status.

Per-question failures come from the engine typed (:class:`engine.request.FailureKind`), so the
status is a table lookup, never a parse of message text. Messages never echo a client's input back
beyond a short excerpt (a 5 MB question must not come back as a 5 MB error).
"""

from __future__ import annotations

from typing import Any, Mapping

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from engine.request import FailureKind, RequestInvalid

# What each per-question failure means to an HTTP client: its own fault (400), a document the server
# cannot use right now (422, the message names the document), or the server's (500).
STATUS_BY_KIND: dict[FailureKind, int] = {
    FailureKind.EMPTY_QUESTION: 400,
    FailureKind.PROMPT_TOO_LONG: 400,
    FailureKind.UNKNOWN_DOCUMENT: 400,
    FailureKind.RANK_LIMIT: 400,
    FailureKind.NO_DOCUMENTS: 422,
    FailureKind.MISSING_ADAPTER: 422,
    FailureKind.CORRUPT_ADAPTER: 422,
    FailureKind.ENGINE: 500,
}

_TYPE_BY_STATUS = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                   429: "rate_limit_error", 503: "service_unavailable_error"}


def error_type(status: int) -> str:
    if status in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status]
    return "server_error" if status >= 500 else "invalid_request_error"


class APIError(Exception):
    """An error answer; raise it anywhere in a route, the app turns it into the OpenAI shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or error_type(status)
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def from_failure(kind: FailureKind | None, message: str, param: str | None = None) -> APIError:
    """A question the engine could not answer; ``message`` names the document where one is at fault."""
    kind = kind or FailureKind.ENGINE
    return APIError(STATUS_BY_KIND.get(kind, 500), message, param=param, code=str(kind))


def from_invalid(exc: RequestInvalid, rename: Mapping[str, str] | None = None) -> APIError:
    """:func:`engine.request.check_request`'s error; ``rename`` maps its parameter names to the
    request's (``top_k`` -> ``prag.top_k``)."""
    param = (rename or {}).get(exc.param, exc.param)
    return APIError(400, str(exc), param=param, code="invalid_value")


def from_validation(exc: ValidationError) -> APIError:
    """The first pydantic error, named by its dotted location, without the offending input."""
    err = exc.errors(include_input=False, include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden" and len(err["loc"]) >= 2:
        parent, key = ".".join(str(p) for p in err["loc"][:-1]), err["loc"][-1]
        known = ", ".join(_known_keys(parent)) or "none"
        return APIError(400, f"unknown key {str(key)[:40]!r} in {parent} (known keys: {known})", param=loc,
                        code="unknown_parameter")
    if kind == "missing":
        return APIError(400, f"{loc} is required", param=loc, code="missing_parameter")
    msg = err["msg"].removeprefix("Value error, ")
    return APIError(400, f"{loc}: {msg}" if loc else msg, param=loc or None, code="invalid_value")


def _known_keys(parent: str) -> tuple[str, ...]:
    from engine.http.protocol import PRAG_KEYS

    return {"prag": PRAG_KEYS, "stream_options": ("include_usage",)}.get(parent, ())
