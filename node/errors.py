"""One error root whose subclasses carry their protocol code and HTTP status.

Library errors (Redis, JSON, JWT) are converted once, at the boundary, into these; the WebSocket
and HTTP layers turn any :class:`ChatError` into a reply frame or an HTTP response with
:func:`error_body`. Anything else becomes ``internal`` with no details leaked.
"""

from __future__ import annotations

from typing import Any


class ChatError(Exception):
    code = "internal"
    status = 500

    def __init__(self, message: str = "", *, limit: str | None = None) -> None:
        super().__init__(message or self.code.replace("_", " "))
        self.message = message or self.code.replace("_", " ")
        # The configured limit that refused the command (a chatcluster_rate_limited_total
        # label such as "rooms_per_user"), if any: a typed reason, never parsed from the text.
        self.limit = limit


class BadRequest(ChatError):
    code, status = "bad_request", 400


class Unauthorized(ChatError):
    code, status = "unauthorized", 401


class Forbidden(ChatError):
    code, status = "forbidden", 403


class NotFound(ChatError):
    code, status = "not_found", 404


class Conflict(ChatError):
    code, status = "conflict", 409


class TooLarge(ChatError):
    code, status = "too_large", 413


class RateLimited(ChatError):
    code, status = "rate_limited", 429


class Unavailable(ChatError):
    code, status = "unavailable", 503


class Internal(ChatError):
    code, status = "internal", 500


def error_body(exc: BaseException) -> dict[str, Any]:
    """``{"code", "message"}`` for a reply frame or an HTTP error body."""
    if isinstance(exc, ChatError):
        return {"code": exc.code, "message": exc.message}
    return {"code": "internal", "message": "internal error"}


def status_of(exc: BaseException) -> int:
    return exc.status if isinstance(exc, ChatError) else 500


class CloseCodes:
    """WebSocket close codes of the contract (section 2.4)."""

    DRAINING = 4001
    SLOW_CONSUMER = 4002
    RATE_LIMITED = 4003
    UNAUTHORIZED = 4500
    NO_HELLO = 4501
    PROTOCOL = 4502
    TOO_LARGE = 1009
    INTERNAL = 1011
    TRY_AGAIN = 1013  # RFC 6455 "try again later": Redis unavailable while opening a session
    GOING_AWAY = 1001


def close_code_of(exc: BaseException) -> int:
    """The close code for a session that cannot go on because of ``exc`` (the one mapping used
    by every path that closes for an error). Unknown errors are 1011 with no details."""
    if isinstance(exc, Unavailable):
        return CloseCodes.TRY_AGAIN
    if isinstance(exc, Unauthorized):
        return CloseCodes.UNAUTHORIZED
    if isinstance(exc, RateLimited):
        return CloseCodes.RATE_LIMITED
    return CloseCodes.INTERNAL
