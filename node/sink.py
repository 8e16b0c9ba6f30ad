"""The outbound side of connections: a bounded buffer per socket and one flush per loop tick.

* :class:`Sink` -- one client connection's bounded outbound buffer. ``push`` never blocks; the
  frames queued for one socket during one event-loop tick are written with one
  ``transport.write``. A sink over its byte limit is cut off (close 4002).
* :class:`Flusher` -- the per-node list of sinks with pending frames, flushed once per tick.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from websockets.protocol import State

from .metrics import METRICS
from .supervise import ThrottledLog

log = logging.getLogger("chatcluster.sink")
_errors = ThrottledLog(log)


class Flusher:
    """Collects sinks with pending frames and flushes them all in one callback per loop tick."""

    __slots__ = ("_dirty", "_scheduled", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._dirty: list[Sink] = []
        self._scheduled = False
        self._loop = loop  # the running loop, found at the first mark when not given

    def mark(self, sink: Sink) -> None:
        self._dirty.append(sink)
        if not self._scheduled:
            self._scheduled = True
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        self._scheduled = False
        for sink in dirty:
            try:
                sink.flush()
            except Exception as exc:
                # One broken socket must not leave the sinks after it unflushed for ever (their
                # pending frames would never be marked again): cut it off and go on.
                METRICS.background_errors.labels(task="flush").inc()
                _errors.error("flush", exc)
                try:
                    sink.overflow()
                except Exception as again:
                    _errors.error("flush-overflow", again)


class Sink:
    """Outbound side of one WebSocket connection.

    Frames are pre-framed WebSocket bytes (see :func:`node.protocol.ws_text_frame`), written
    straight to the transport: every frame is whole and unfragmented, so they interleave safely
    with the control frames (ping/pong/close) the websockets library writes itself.

    While ``holding`` (during a replay), live frames wait in ``held`` so that they go out after
    the replay, in order. Holds nest: frames are released when the last replay ends.
    """

    __slots__ = ("ws", "transport", "flusher", "limit", "pending", "pending_bytes", "holding",
                 "held", "held_bytes", "closed", "on_overflow", "owner", "session", "sub")

    # Typing and presence events are pushed to it (a long-poll waiter takes only stream entries).
    takes_ephemeral = True

    def __init__(self, ws: Any, flusher: Flusher, limit: int,
                 on_overflow: Callable[[], None]) -> None:
        self.owner = ""  # user id, set after hello
        self.session = ""
        self.sub: Any = None  # the session's Subscription (node.session), set with it
        self.ws = ws
        self.transport = ws.transport
        self.flusher = flusher
        self.limit = limit
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.holding = 0
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.closed = False
        self.on_overflow = on_overflow

    def push(self, frame: bytes) -> None:
        """Queue one frame. Never blocks, never raises."""
        if self.closed:
            return
        if self.holding:
            self.held.append(frame)
            self.held_bytes += len(frame)
            if self.held_bytes > self.limit:
                self.overflow()
            return
        self._queue(frame)

    def push_now(self, frame: bytes) -> None:
        """Queue a frame that must not wait behind ``held`` (welcome, replay, replies)."""
        if self.closed:
            return
        self._queue(frame)

    def _queue(self, frame: bytes) -> None:
        if not self.pending:
            self.flusher.mark(self)
        self.pending.append(frame)
        self.pending_bytes += len(frame)
        if self.pending_bytes > self.limit:
            # A burst larger than the buffer within one tick: write it now. What counts against
            # the limit is what the client has not taken (the transport's buffer), so a client
            # that reads is never cut off for the size of one burst.
            self.flush()

    def hold(self) -> None:
        self.holding += 1

    def release(self) -> None:
        """End a replay: held live frames follow whatever was queued with ``push_now``."""
        self.holding = max(0, self.holding - 1)
        if self.holding:
            return
        held, self.held, self.held_bytes = self.held, [], 0
        for frame in held:
            self.push(frame)

    def flush(self) -> None:
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        self.pending_bytes = 0
        if self.closed or self.ws.protocol.state is not State.OPEN:
            return
        transport = self.transport
        transport.write(pending[0] if len(pending) == 1 else b"".join(pending))
        if transport.get_write_buffer_size() > self.limit:
            self.overflow()

    def overflow(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.pending = []
        self.held = []
        self.pending_bytes = self.held_bytes = 0
        METRICS.slow_consumers.inc()
        self.on_overflow()

    def buffered_bytes(self) -> int:
        try:
            return self.pending_bytes + self.held_bytes + self.transport.get_write_buffer_size()
        except Exception:
            return 0
