"""The protocol state of one WebSocket connection, without I/O.

:class:`ConnectionCore` takes the client's frames and the time and says what to do: send a
reply, close with a code, open the session (``hello``), run a command through the gate, renew
the token. It owns the rules of the contract's section 2 that are not about chat: the hello
deadline (4501), frames before ``hello``, binary and malformed frames (4502 after
CHAT_PROTOCOL_ERRORS_MAX), the per-connection rate limit (4003 after CHAT_RATE_STRIKES_MAX),
and when a token's expiry is announced and enforced (4500). :mod:`node.ws` is the glue that
feeds it from the ``websockets`` library and carries out its actions; the unit tests drive it
with strings and numbers.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from . import protocol
from .commands import refused
from .config import Settings
from .errors import BadRequest, ChatError, CloseCodes, RateLimited, Unauthorized
from .metrics import METRICS
from .ratelimit import TokenBucket


@dataclass(frozen=True, slots=True)
class Send:
    """Write this frame (a JSON payload) to the client."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection with this code."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class OpenSession:
    """A valid-looking ``hello``: authenticate it and open the session."""

    frame: dict[str, Any]
    ref: Any


@dataclass(frozen=True, slots=True)
class Run:
    """A command for the gate (:meth:`node.commands.Commands.execute`)."""

    frame: dict[str, Any]
    ref: Any


@dataclass(frozen=True, slots=True)
class Refresh:
    """A ``refresh`` frame: renew the connection's token."""

    frame: dict[str, Any]
    ref: Any


Action = Send | Close | OpenSession | Run | Refresh


class State(enum.Enum):
    AWAIT_HELLO = "await_hello"
    OPENING = "opening"  # a hello is being served; no other frame is read meanwhile
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class TokenTimes:
    """When to announce a token's expiry (``token_expiring``) and when to close (4500)."""

    notice_at: float
    close_at: float
    notice: bytes  # the token_expiring event


class ConnectionCore:
    def __init__(self, settings: Settings, now: float) -> None:
        self.settings = settings
        self.state = State.AWAIT_HELLO
        self.hello_deadline = now + settings.hello_timeout_s
        self.protocol_errors = 0
        self.rate_strikes = 0
        self.bucket = TokenBucket(settings.rate_per_s, settings.rate_burst)

    # -- frames ----------------------------------------------------------------------------
    def receive(self, data: str | bytes, now: float) -> Action:
        """One frame from the client: what to do about it."""
        if self.state is State.CLOSED:
            return Close(CloseCodes.GOING_AWAY, "closing")
        if isinstance(data, bytes):
            return self._protocol_error("binary", None, BadRequest("binary frames are not supported"))
        try:
            frame = protocol.parse_frame(data, self.settings.max_json_depth)
        except ChatError as exc:
            return self._protocol_error("malformed", protocol.loose_ref(data), exc)
        ref = protocol.ref_of(frame)
        kind = frame["type"]
        if self.state is State.AWAIT_HELLO:
            if kind != "hello":
                return self._protocol_error("before_hello", ref, Unauthorized("send hello first"))
            self.state = State.OPENING
            return OpenSession(frame, ref)
        if not self.bucket.take(now):
            METRICS.rate_limited.labels(limit="commands").inc()
            self.rate_strikes += 1
            if self.rate_strikes > self.settings.rate_strikes_max:
                return self.close(CloseCodes.RATE_LIMITED, "rate limit exceeded")
            return Send(refused(ref, RateLimited("slow down")).encode())
        if kind == "refresh":
            return Refresh(frame, ref)
        return Run(frame, ref)

    def _protocol_error(self, kind: str, ref: Any, exc: ChatError) -> Action:
        METRICS.protocol_errors.labels(kind=kind).inc()
        outcome = refused(ref, exc)
        self.protocol_errors += 1
        if self.protocol_errors > self.settings.protocol_errors_max:
            return self.close(CloseCodes.PROTOCOL, "protocol violation")
        return Send(outcome.encode())

    # -- the session -------------------------------------------------------------------------
    def hello_failed(self) -> None:
        """The hello was refused (the glue closes): nothing more is read."""
        self.state = State.CLOSED

    def opened(self) -> None:
        """The welcome is out: commands are read from now on."""
        self.state = State.OPEN

    def hello_overdue(self, now: float) -> Close | None:
        """Close 4501 if the hello has not come in time."""
        if self.state is State.AWAIT_HELLO and now >= self.hello_deadline:
            METRICS.hello_rejected.labels(reason="timeout").inc()
            return self.close(CloseCodes.NO_HELLO, "no hello in time")
        return None

    def close(self, code: int, reason: str) -> Close:
        self.state = State.CLOSED
        return Close(code, reason)

    # -- tokens ------------------------------------------------------------------------------
    def token_times(self, expires_at: float | None, now: float) -> TokenTimes | None:
        """``token_expiring`` shortly before the token expires, close 4500 once it has expired
        (``exp`` + leeway) and the refresh window has passed without a ``refresh``."""
        if expires_at is None:
            return None
        s = self.settings
        expires = expires_at + s.jwt_leeway_s
        close_at = expires + s.token_refresh_window_s
        notice = protocol.dumps({"type": "token_expiring", "expires_at": int(expires_at),
                                 "close_at": int(close_at)})
        return TokenTimes(max(now, expires - s.token_notice_s), close_at, notice)

    def token_expired(self) -> Close:
        return self.close(CloseCodes.UNAUTHORIZED, "token expired")
