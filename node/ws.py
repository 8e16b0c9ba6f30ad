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
import random
import secrets
import time
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from . import protocol
from .auth import Identity, authenticate_hello, refresh_identity
from .commands import Caller, refused
from .connection import Action, Close, ConnectionCore, OpenSession, Refresh, Run, Send
from .errors import (
    ChatError,
    CloseCodes,
    RateLimited,
    Unauthorized,
    Unavailable,
    close_code_of,
    error_body,
)
from .metrics import CLOSE_CODES, METRICS
from .origins import origin_allowed
from .ratelimit import LIMITS, Counts, PenaltyBox, client_ip
from .session import Subscription
from .sink import Flusher, Sink

if TYPE_CHECKING:
    from .commands import Commands
    from .config import Settings
    from .online import Online
    from .presence import Presence
    from .session import Sessions
    from .status import NodeStatus
    from .supervise import ThrottledLog

log = logging.getLogger("chatcluster.ws")

# A client cut off for being slow gets this long to read up to its close frame (4002) before
# its socket is aborted: its buffered frames are the memory the cut-off is meant to free.
SLOW_CONSUMER_GRACE_S = 2.0

# A handshake counts as a hello in progress (admission control) until its welcome, but one whose
# client has sent nothing this long after the upgrade stops counting: idle sockets (from one
# address, up to CHAT_MAX_CONNECTIONS_PER_IP) must not keep the node refusing everyone else.
SILENT_HELLO_GRACE_S = 2.0

# Sends of one connection started and not yet answered: past this, the connection's reading
# waits for the oldest (bounded memory; a client cannot queue work without limit).
MAX_SENDS_IN_FLIGHT = 64

for _limit in LIMITS:  # every series exists from the first scrape
    METRICS.rate_limited.labels(limit=_limit)


# Closes the server makes for abuse: they count towards the address's penalty box.
ABUSIVE_CLOSES = frozenset({CloseCodes.TOO_LARGE, CloseCodes.PROTOCOL, CloseCodes.RATE_LIMITED})


class Connection:
    """One WebSocket connection: its protocol state (:class:`ConnectionCore`), its session's
    subscription and the timers and close task it owns; owned by :meth:`WsServer.handler`."""

    __slots__ = ("ws", "id", "sub", "caller", "core", "close_task", "ip", "token_timers", "inflight",
                 "ended")

    def __init__(self, ws: ServerConnection, sink: Sink, core: ConnectionCore) -> None:
        self.ws = ws
        self.id = "c-" + secrets.token_hex(5)
        self.sub = Subscription(sink)
        self.caller: Caller | None = None
        self.core = core
        self.close_task: asyncio.Task[None] | None = None
        self.ip = ""
        self.token_timers: list[asyncio.TimerHandle] = []
        self.inflight: list[asyncio.Task[None]] = []  # sends started, not yet answered (in order)
        self.ended = False  # the handler is finishing: no close task may be started any more

    def cancel_token_timers(self) -> None:
        for timer in self.token_timers:
            timer.cancel()
        self.token_timers.clear()

    def close_soon(self, code: int, reason: str, abort_after: float | None = None) -> None:
        """Start the closing handshake without waiting for it (safe from sync code).

        The close frame is written at once; if the handshake has not finished ``abort_after``
        seconds later (default: just after the connection's close timeout), the socket is aborted.
        """
        if self.close_task is None and not self.ended:
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
    def __init__(self, settings: Settings, commands: Commands, sessions: Sessions, online: Online,
                 presence: Presence, status: NodeStatus, flusher: Flusher, errors: ThrottledLog) -> None:
        self.settings = settings
        self.commands = commands
        self.sessions = sessions
        self.online = online
        self.presence = presence
        self.status = status
        self.flusher = flusher
        self.errors = errors
        self.connections: set[Connection] = set()
        self._timers: list[asyncio.TimerHandle] = []  # the drain's closes, owned here
        s = settings
        # Per-IP counts: a handshake is counted from process_request (so that a burst of
        # handshakes cannot all pass before any handler runs) until its handler ends.
        self.ip_counts = Counts()
        self._handshaking: dict[ServerConnection, str] = {}
        # Admission control: handshakes admitted by process_request whose welcome has not been
        # sent yet (removed when it is, or when the connection ends).
        self.hellos: set[ServerConnection] = set()
        self._silent: dict[ServerConnection, asyncio.TimerHandle] = {}  # no frame yet
        METRICS.hellos_in_progress.set_function(lambda: float(len(self.hellos)))
        self.penalty = PenaltyBox(s.abuse_closes_max, s.abuse_window_s, s.abuse_penalty_s)

    # -- the node's lifecycle ----------------------------------------------------------------
    async def drain(self, window: float) -> None:
        """Tell every client to reconnect elsewhere and close them (4001), spread over
        ``window`` seconds; returns when they are gone or the window (plus 2 s) has passed."""
        conns = list(self.connections)
        log.info("draining", extra={"connections": len(conns), "window_s": window})
        loop = asyncio.get_running_loop()
        for conn in conns:
            delay = random.uniform(0, window * 0.8) if window > 0 else 0.0
            event = {"type": "reconnect", "reason": "draining", "retry_after_ms": int(delay * 1000)}
            conn.sub.sink.push(protocol.ws_text_frame(protocol.dumps(event)))
            self._timers.append(loop.call_later(delay, conn.close_soon, CloseCodes.DRAINING, "node draining"))
        deadline = loop.time() + window + 2.0
        while self.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)

    def cancel_timers(self) -> None:
        """At shutdown: no drain close is left to fire after the server is gone."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def buffered_bytes(self) -> float:
        return float(sum(c.sub.sink.buffered_bytes() for c in list(self.connections)))

    # -- handshake --------------------------------------------------------------------------
    def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        """Refuse the upgrade early: wrong path, foreign origin, draining, full, or overloaded."""
        settings = self.settings
        path = request.path.split("?", 1)[0]
        if path not in ("/ws", "/"):
            return ws.respond(HTTPStatus.NOT_FOUND, "not found\n")
        origin = request.headers.get("Origin")
        if origin is not None and not origin_allowed(origin, settings.allowed_origins, request.headers.get("Host")):
            METRICS.hello_rejected.labels(reason="origin").inc()
            return ws.respond(HTTPStatus.FORBIDDEN, "origin not allowed\n")
        if self.status.draining:
            METRICS.hello_rejected.labels(reason="draining").inc()
            return ws.respond(HTTPStatus.SERVICE_UNAVAILABLE, "draining\n")
        if len(self.connections) >= settings.max_connections:
            METRICS.hello_rejected.labels(reason="full").inc()
            return ws.respond(HTTPStatus.SERVICE_UNAVAILABLE, "node full\n")
        peer = ws.remote_address[0] if ws.remote_address else None
        ip = client_ip(peer, request.headers.get("X-Forwarded-For"), settings.trusted_proxies)
        penalty = self.penalty.blocked_for(ip, time.monotonic())
        if penalty:
            METRICS.rate_limited.labels(limit="abuse_penalty").inc()
            response = ws.respond(HTTPStatus.TOO_MANY_REQUESTS, "too many abusive connections from this address\n")
            response.headers["Retry-After"] = str(max(1, round(penalty)))
            return response
        self._forget_failed_handshakes()
        if settings.max_connections_per_ip and self.ip_counts.get(ip) >= settings.max_connections_per_ip:
            METRICS.rate_limited.labels(limit="connections_per_ip").inc()
            response = ws.respond(HTTPStatus.TOO_MANY_REQUESTS, "too many connections from this address\n")
            response.headers["Retry-After"] = "10"
            return response
        # Admission control: while hellos queue (too many admitted handshakes still waiting for
        # their welcome, or a lagging event loop), refuse at once rather than let every welcome
        # take seconds; the Retry-After is jittered so the refused do not come back together.
        lag_bound = settings.admission_max_lag_ms
        if ((settings.max_hellos_in_progress and len(self.hellos) >= settings.max_hellos_in_progress)
                or (lag_bound and self.status.loop_lag * 1000.0 > lag_bound)):
            METRICS.hello_rejected.labels(reason="overloaded").inc()
            response = ws.respond(HTTPStatus.SERVICE_UNAVAILABLE, "overloaded, retry later\n")
            response.headers["Retry-After"] = str(random.randint(1, settings.admission_retry_after_s))
            return response
        self.ip_counts.add(ip)
        self._handshaking[ws] = ip
        self.hellos.add(ws)
        return None

    def _forget_failed_handshakes(self) -> None:
        """Handshakes accepted by process_request whose handler never ran (the client went away
        mid-handshake) give their per-IP slot back."""
        if not self._handshaking:
            return
        for ws, ip in list(self._handshaking.items()):
            if ws.state is State.CLOSED:
                del self._handshaking[ws]
                self.ip_counts.remove(ip)
                self.hellos.discard(ws)

    # -- connection -------------------------------------------------------------------------
    async def handler(self, ws: ServerConnection) -> None:
        conn: Connection | None = None

        def overflow() -> None:
            if conn is not None:
                log.info("slow consumer cut off", extra={"conn": conn.id})
                conn.close_soon(CloseCodes.SLOW_CONSUMER, "slow consumer", SLOW_CONSUMER_GRACE_S)

        conn = Connection(ws, Sink(ws, self.flusher, self.settings.outbound_buffer_bytes, overflow),
                          ConnectionCore(self.settings, time.monotonic()))
        conn.ip = self._handshaking.pop(ws, "")
        self._silent[ws] = asyncio.get_running_loop().call_later(
            SILENT_HELLO_GRACE_S, self.hellos.discard, ws)
        self.connections.add(conn)
        METRICS.connections_accepted.inc()
        METRICS.connections_open.labels(transport="ws").inc()
        try:
            if await self._hello(conn):
                await self._serve(conn)
        except ConnectionClosed:
            pass
        except Exception as exc:
            self.errors.error("connection handler", exc, conn=conn.id)
            conn.close_soon(close_code_of(exc), "internal error")
        finally:
            # Before any await: the address must be in the penalty box by the time the client,
            # having seen our close frame, can reconnect.
            recorded = self._record_abuse(conn)
            self.hellos.discard(ws)
            if (silent := self._silent.pop(ws, None)) is not None:
                silent.cancel()
            conn.cancel_token_timers()
            if conn.ip:
                self.ip_counts.remove(conn.ip)
            self.connections.discard(conn)
            rooms = conn.sub.rooms()
            self.sessions.close_ws(conn.sub)
            if conn.inflight:  # sends already queued to Redis: let them finish (owned here)
                try:
                    async with asyncio.timeout(10):
                        await asyncio.gather(*conn.inflight, return_exceptions=True)
                except TimeoutError:
                    for task in list(conn.inflight):
                        task.cancel()
            if conn.caller is not None:
                await self.online.ended(conn.caller.user, conn.caller.identity.name, conn.caller.session_id,
                                        rooms)
            METRICS.connections_open.labels(transport="ws").dec()
            conn.ended = True  # a later close_soon (a drain timer) starts no task nobody awaits
            if conn.close_task is not None:
                try:
                    await conn.close_task
                except Exception:
                    pass
            code = ws.close_code if ws.close_code is not None else 1006
            sent = ws.protocol.close_sent
            if code == 1006 and sent is not None:
                # The server failed the connection (1009, 4502...) without waiting for the echo.
                code = sent.code
            METRICS.connections_closed.labels(code=_code_label(code)).inc()
            if sent is not None and sent.code == CloseCodes.TOO_LARGE:
                METRICS.rate_limited.labels(limit="frame_bytes").inc()
            if not recorded:  # a close_soon() whose frame went out after the handler returned
                self._record_abuse(conn)

    def _record_abuse(self, conn: Connection) -> bool:
        """Count an abusive close towards the address's penalty box; True if there was one."""
        sent = conn.ws.protocol.close_sent
        if sent is None or sent.code not in ABUSIVE_CLOSES or not conn.ip:
            return False
        METRICS.abuse_closes.inc()
        if self.penalty.record(conn.ip, time.monotonic()):
            log.warning("address refused for repeated abuse",
                        extra={"penalty_s": self.settings.abuse_penalty_s})
        return True

    def _reply(self, conn: Connection, frame: bytes) -> None:
        conn.sub.sink.push_now(protocol.ws_text_frame(frame))

    def _act(self, conn: Connection, action: Action) -> bool:
        """Carry out a Send or a Close of the core; False once the connection is closing."""
        if isinstance(action, Send):
            self._reply(conn, action.payload)
            return True
        if isinstance(action, Close):
            conn.close_soon(action.code, action.reason)
            return False
        raise AssertionError(f"not an action for the glue: {action!r}")

    async def _hello(self, conn: Connection) -> bool:
        """Wait for a valid hello and open the session. False if the connection was closed."""
        ws, core = conn.ws, conn.core
        while True:
            remaining = core.hello_deadline - time.monotonic()
            overdue = core.hello_overdue(time.monotonic())
            if overdue is not None:
                await ws.close(overdue.code, overdue.reason)
                return False
            try:
                raw = await asyncio.wait_for(ws.recv(), remaining)
            except TimeoutError:
                continue
            if (silent := self._silent.pop(ws, None)) is not None:
                silent.cancel()  # the client spoke: it counts until its welcome
            action = core.receive(raw, time.monotonic())
            if not isinstance(action, OpenSession):
                if not self._act(conn, action):
                    return False
                continue
            if await self._open(conn, action):
                core.opened()
                return True
            core.hello_failed()
            return False

    async def _open(self, conn: Connection, hello: OpenSession) -> bool:
        """Authenticate a hello and open its session; False if it was refused (and closed)."""
        try:
            identity = authenticate_hello(self.settings, hello.frame)
        except Unauthorized as exc:
            METRICS.hello_rejected.labels(reason="auth").inc()
            log.info("hello refused", extra={"conn": conn.id, "reason": exc.message})
            await conn.ws.close(close_code_of(exc), exc.message[:100])
            return False
        try:
            conn.caller = Caller(identity, conn.id, "ws", conn.sub)
            conn.sub.sink.owner = identity.user
            conn.sub.sink.session = conn.id
            # CHAT_MAX_CONNECTIONS_PER_USER, cluster-wide, is checked where the session is added.
            await self.online.started(identity.user, identity.name, conn.id, True, rooms=conn.sub.rooms)
            await self.sessions.open_ws(identity, hello.frame, conn.sub, conn.id)
        except RateLimited as exc:
            log.info("hello refused: too many sessions", extra={"conn": conn.id, "user": identity.user})
            self._reply(conn, refused(hello.ref, exc).encode())
            conn.close_soon(close_code_of(exc), "too many connections for this user")
            return False
        except Exception as exc:
            # Redis refusing service (down, restarting, out of memory) gives `unavailable`
            # and 1013: the client retries with backoff. Anything else: 1011, no details.
            METRICS.hello_rejected.labels(reason="unavailable" if isinstance(exc, Unavailable) else "error").inc()
            self.errors.error("hello", exc)
            self._reply(conn, protocol.reply_error(hello.ref, error_body(exc)))
            conn.close_soon(close_code_of(exc), error_body(exc)["code"])
            return False
        self.hellos.discard(conn.ws)  # welcomed: no longer in the admission count
        self._schedule_token_timers(conn, identity)
        log.info("session opened", extra={"conn": conn.id, "user": identity.user})
        return True

    # -- token expiry and refresh -----------------------------------------------------------
    def _schedule_token_timers(self, conn: Connection, identity: Identity) -> None:
        conn.cancel_token_timers()
        now = time.time()
        times = conn.core.token_times(identity.expires_at, now)
        if times is None:
            return
        loop = asyncio.get_running_loop()
        conn.token_timers.append(loop.call_later(
            times.notice_at - now, lambda: conn.sub.sink.push_now(protocol.ws_text_frame(times.notice))))
        conn.token_timers.append(loop.call_later(max(0.0, times.close_at - now), self._token_expired, conn))

    def _token_expired(self, conn: Connection) -> None:
        log.info("token expired without refresh", extra={"conn": conn.id})
        self._act(conn, conn.core.token_expired())

    def _refresh(self, conn: Connection, frame: dict[str, Any]) -> dict[str, Any]:
        assert conn.caller is not None
        identity = refresh_identity(self.settings, conn.caller.identity, frame.get("token"))
        conn.caller.identity = identity
        self._schedule_token_timers(conn, identity)
        return {"expires_at": int(identity.expires_at or 0)}

    async def _run(self, conn: Connection, action: Run) -> None:
        assert conn.caller is not None
        outcome = await self.commands.execute(conn.caller, action.frame)
        if not (action.frame["type"] == "typing" and action.ref is None and outcome.ok):
            self._reply(conn, outcome.encode())  # typing needs no reply unless asked

    async def _serve(self, conn: Connection) -> None:
        assert conn.caller is not None
        core = conn.core
        inflight = conn.inflight
        async for raw in conn.ws:
            if conn.close_task is not None:
                break
            action = core.receive(raw, time.monotonic())
            if isinstance(action, Run) and self.commands.ordered_send(conn.caller, action.frame):
                # Started now, not awaited: the next frame is read at once. Sends started in
                # order are appended in order (node.autopipe) and answered in order.
                if len(inflight) >= MAX_SENDS_IN_FLIGHT:
                    await inflight[0]
                task = asyncio.get_running_loop().create_task(self._run(conn, action))
                inflight.append(task)
                task.add_done_callback(inflight.remove)
                continue
            if inflight:  # any other frame waits until the sends before it are answered
                await asyncio.gather(*inflight, return_exceptions=True)
            if isinstance(action, Run):
                await self._run(conn, action)
            elif isinstance(action, Refresh):  # the WebSocket's own frame: renew the token
                try:
                    self._reply(conn, protocol.reply_ok(action.ref, self._refresh(conn, action.frame)))
                except ChatError as exc:
                    self._reply(conn, refused(action.ref, exc).encode())
            elif not self._act(conn, action):
                break


def _code_label(code: int) -> str:
    label = str(code)
    return label if label in CLOSE_CODES else "other"
