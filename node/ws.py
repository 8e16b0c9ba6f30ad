"""WebSocket transport: the glue between the ``websockets`` library and the chat core.

One handler per connection: wait for ``hello`` (close 4501 after the timeout), authenticate
(close 4500), open the session (welcome, replay, live), then read commands until the socket
closes. All outbound frames go through the connection's :class:`~node.fanout.Sink`, so replies,
replayed messages and live events leave in one order. Every exception maps to a reply or a close
code here and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import protocol
from .auth import authenticate_hello
from .commands import Caller
from .errors import (
    BadRequest,
    ChatError,
    CloseCodes,
    RateLimited,
    Unauthorized,
    Unavailable,
    error_body,
)
from .fanout import Sink
from .metrics import CLOSE_CODES, METRICS
from .origins import origin_allowed
from .ratelimit import TokenBucket
from .session import Subscription

if TYPE_CHECKING:
    from .app import Node

log = logging.getLogger("chatcluster.ws")

# A client cut off for being slow gets this long to read up to its close frame (4002) before
# its socket is aborted: its buffered frames are the memory the cut-off is meant to free.
SLOW_CONSUMER_GRACE_S = 2.0


class Connection:
    """State of one WebSocket connection; owned by :meth:`WsServer.handler`."""

    __slots__ = ("ws", "id", "sub", "caller", "bucket", "protocol_errors", "rate_strikes",
                 "close_task", "said_hello", "opened")

    def __init__(self, ws: ServerConnection, sink: Sink) -> None:
        self.ws = ws
        self.id = "c-" + secrets.token_hex(5)
        self.sub = Subscription(sink)
        self.caller: Caller | None = None
        self.bucket: TokenBucket | None = None
        self.protocol_errors = 0
        self.rate_strikes = 0
        self.close_task: asyncio.Task[None] | None = None
        self.said_hello = False
        self.opened = time.monotonic()

    def close_soon(self, code: int, reason: str, abort_after: float | None = None) -> None:
        """Start the closing handshake without waiting for it (safe from sync code).

        The close frame is written at once; if the handshake has not finished ``abort_after``
        seconds later (default: just after the connection's close timeout), the socket is aborted.
        """
        if self.close_task is None:
            if abort_after is None:  # leave the normal case to websockets' own close timeout
                abort_after = (self.ws.close_timeout or 10.0) + 1.0
            grace = abort_after
            self.close_task = asyncio.get_running_loop().create_task(self._close(code, reason, grace))

    async def _close(self, code: int, reason: str, grace: float) -> None:
        # websockets' close() first waits for the write buffer to drain, with no timeout: a
        # client that never reads would keep its socket, its buffer and this handler forever.
        try:
            async with asyncio.timeout(grace):
                await self.ws.close(code, reason)
        except TimeoutError:
            log.info("close handshake timed out, aborting", extra={"conn": self.id, "code": code})
            self.ws.transport.abort()


class WsServer:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.connections: set[Connection] = set()
        self.by_sink: dict[Sink, Connection] = {}

    # -- handshake --------------------------------------------------------------------------
    def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        """Refuse the upgrade early: wrong path, foreign origin, draining, or full."""
        settings = self.node.settings
        path = request.path.split("?", 1)[0]
        if path not in ("/ws", "/"):
            return ws.respond(HTTPStatus.NOT_FOUND, "not found\n")
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(origin, settings.allowed_origins, request.headers.get("Host")):
            METRICS.hello_rejected.labels(reason="origin").inc()
            return ws.respond(HTTPStatus.FORBIDDEN, "origin not allowed\n")
        if self.node.draining:
            METRICS.hello_rejected.labels(reason="draining").inc()
            return ws.respond(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
        if len(self.connections) >= settings.max_connections:
            METRICS.hello_rejected.labels(reason="full").inc()
            return ws.respond(HTTPStatus.SERVICE_UNAVAILABLE, "node full\n")
        return None

    # -- connection -------------------------------------------------------------------------
    async def handler(self, ws: ServerConnection) -> None:
        node = self.node
        conn: Connection | None = None

        def overflow() -> None:
            if conn is not None:
                log.info("slow consumer cut off", extra={"conn": conn.id})
                conn.close_soon(CloseCodes.SLOW_CONSUMER, "slow consumer", SLOW_CONSUMER_GRACE_S)

        conn = Connection(ws, Sink(ws, node.flusher, node.settings.outbound_buffer_bytes, overflow))
        self.connections.add(conn)
        self.by_sink[conn.sub.sink] = conn
        METRICS.connections_accepted.inc()
        METRICS.connections_open.labels(transport="ws").inc()
        try:
            if await self._hello(conn):
                await self._serve(conn)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("connection handler failed", extra={"conn": conn.id})
            conn.close_soon(CloseCodes.INTERNAL, "internal error")
        finally:
            self.connections.discard(conn)
            self.by_sink.pop(conn.sub.sink, None)
            node.sessions.close_ws(conn.sub)
            if conn.caller is not None:
                await node.session_ended(conn.caller)
            METRICS.connections_open.labels(transport="ws").dec()
            if conn.close_task is not None:
                try:
                    await conn.close_task
                except Exception:
                    pass
            code = ws.close_code if ws.close_code is not None else 1006
            METRICS.connections_closed.labels(code=_code_label(code)).inc()

    def _reply(self, conn: Connection, frame: bytes) -> None:
        conn.sub.sink.push_now(protocol.ws_text_frame(frame))

    def _protocol_error(self, conn: Connection, kind: str, ref: Any, exc: ChatError) -> bool:
        """Reply with the error; returns False once the connection must be closed (4502)."""
        METRICS.protocol_errors.labels(kind=kind).inc()
        conn.protocol_errors += 1
        if conn.protocol_errors > self.node.settings.protocol_errors_max:
            conn.close_soon(CloseCodes.PROTOCOL, "protocol violation")
            return False
        self._reply(conn, protocol.reply_error(ref, error_body(exc)))
        return True

    async def _hello(self, conn: Connection) -> bool:
        """Wait for a valid hello and open the session. False if the connection was closed."""
        node = self.node
        ws = conn.ws
        deadline = time.monotonic() + node.settings.hello_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                METRICS.hello_rejected.labels(reason="timeout").inc()
                await ws.close(CloseCodes.NO_HELLO, "no hello in time")
                return False
            try:
                raw = await asyncio.wait_for(ws.recv(), remaining)
            except TimeoutError:
                continue
            if isinstance(raw, bytes):
                if not self._protocol_error(conn, "binary", None, BadRequest("binary frames are not supported")):
                    return False
                continue
            try:
                frame = protocol.parse_frame(raw)
            except ChatError as exc:
                if not self._protocol_error(conn, "malformed", protocol.ref_of(_loose(raw)), exc):
                    return False
                continue
            ref = protocol.ref_of(frame)
            if frame["type"] != "hello":
                if not self._protocol_error(conn, "before_hello", ref, Unauthorized("send hello first")):
                    return False
                continue
            try:
                identity = authenticate_hello(node.settings, frame)
            except Unauthorized as exc:
                METRICS.hello_rejected.labels(reason="auth").inc()
                log.info("hello refused", extra={"conn": conn.id, "reason": exc.message})
                await ws.close(CloseCodes.UNAUTHORIZED, exc.message[:100])
                return False
            conn.caller = Caller(identity, conn.id, "ws", {"conn": conn})
            conn.sub.sink.owner = identity.user
            conn.sub.sink.session = conn.id
            conn.bucket = TokenBucket(node.settings.rate_per_s, node.settings.rate_burst)
            try:
                await node.session_started(conn.caller)
                await node.sessions.open_ws(identity, frame, conn.sub, conn.id)
            except ChatError as exc:
                self._reply(conn, protocol.reply_error(ref, error_body(exc)))
                code = 1013 if isinstance(exc, Unavailable) else CloseCodes.INTERNAL
                conn.close_soon(code, exc.code)
                return False
            conn.said_hello = True
            log.info("session opened", extra={"conn": conn.id, "user": identity.user})
            return True

    async def _serve(self, conn: Connection) -> None:
        node = self.node
        assert conn.caller is not None and conn.bucket is not None
        async for raw in conn.ws:
            if conn.close_task is not None:
                break
            if isinstance(raw, bytes):
                if not self._protocol_error(conn, "binary", None, BadRequest("binary frames are not supported")):
                    break
                continue
            try:
                frame = protocol.parse_frame(raw)
            except ChatError as exc:
                if not self._protocol_error(conn, "malformed", protocol.ref_of(_loose(raw)), exc):
                    break
                continue
            ref = protocol.ref_of(frame)
            if not conn.bucket.take(time.monotonic()):
                METRICS.rate_limited.labels(limit="commands").inc()
                conn.rate_strikes += 1
                if conn.rate_strikes > node.settings.rate_strikes_max:
                    conn.close_soon(CloseCodes.RATE_LIMITED, "rate limit exceeded")
                    break
                self._reply(conn, protocol.reply_error(ref, error_body(RateLimited("slow down"))))
                continue
            if frame["type"] == "hello":
                self._reply(conn, protocol.reply_error(ref, error_body(BadRequest("already said hello"))))
                continue
            try:
                data = await node.commands.dispatch(conn.caller, frame)
            except ChatError as exc:
                self._reply(conn, protocol.reply_error(ref, error_body(exc)))
                continue
            except Exception:
                log.exception("command failed", extra={"conn": conn.id, "type": frame["type"]})
                self._reply(conn, protocol.reply_error(ref, error_body(RuntimeError())))
                continue
            if frame["type"] == "typing" and ref is None:
                continue  # typing needs no reply unless the client asked for one
            self._reply(conn, protocol.reply_ok(ref, data))


def _loose(raw: str) -> Any:
    """Best-effort decode for echoing a ``ref`` in the error reply of an invalid frame."""
    try:
        return protocol.decode(raw)
    except ChatError:
        return None


def _code_label(code: int) -> str:
    label = str(code)
    return label if label in CLOSE_CODES else "other"
