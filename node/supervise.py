"""Long-lived tasks that survive whatever one iteration raises, and logs that do not flood.

A node's background loops (heartbeats, the presence sweeper, online counts, shard readers,
background jobs) talk to Redis, which can refuse service at any moment: out of memory, a
failed save, a replica after a failover, a restart. None of that may end the process: an
iteration that raises is logged (once per cause per interval), counted in
``chatcluster_background_errors_total{task}``, and the loop starts again after a backoff.
Only cancellation (shutdown) ends a supervised task.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from .errors import ChatError
from .metrics import METRICS
from .redisio import is_transient

LOG_INTERVAL_S = 10.0
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0


class ThrottledLog:
    """One log line per (where, cause) per interval; the lines held back are counted in the
    next one. A Redis outage gives a handful of lines, not a traceback per request."""

    def __init__(self, logger: logging.Logger, interval_s: float = LOG_INTERVAL_S) -> None:
        self.logger = logger
        self.interval_s = interval_s
        self._last: dict[tuple[str, str], tuple[float, int]] = {}

    def error(self, where: str, exc: BaseException, **extra: Any) -> None:
        cause = type(exc).__name__
        if isinstance(exc, ChatError):
            cause = f"{cause}:{exc.code}"
        key = (where, cause)
        now = time.monotonic()
        last, held = self._last.get(key, (-1e9, 0))
        if now - last < self.interval_s:
            self._last[key] = (last, held + 1)
            return
        if len(self._last) > 1000:
            self._last.clear()
        self._last[key] = (now, 0)
        fields = {"where": where, "error": cause, "suppressed": held, **extra}
        if is_transient(exc) or isinstance(exc, ChatError):
            # Redis refusing service is an operational condition, not a bug: no traceback.
            self.logger.warning("%s failed: %s", where, _reason(exc), extra=fields)
        else:
            self.logger.error("%s failed", where, exc_info=exc, extra=fields)


def _reason(exc: BaseException) -> str:
    text = str(exc).split("\n", 1)[0]
    return text[:120]


async def supervise(name: str, body: Callable[[], Awaitable[Any]], errors: ThrottledLog) -> None:
    """Run ``body`` (a loop) for ever: if it raises, log, count, back off and start it again.

    ``name`` is a code literal (it becomes a metric label): never a room, user or message.
    """
    counter = METRICS.background_errors.labels(task=name)
    backoff = BACKOFF_MIN_S
    while True:
        started = time.monotonic()
        try:
            await body()
            return  # a loop that ends by itself is done
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            counter.inc()
            errors.error(name, exc)
        if time.monotonic() - started > 30.0:
            backoff = BACKOFF_MIN_S  # it ran fine for a while: this is a new fault
        await asyncio.sleep(backoff * (0.5 + random.random()))
        backoff = min(backoff * 2, BACKOFF_MAX_S)


class Jobs:
    """Background jobs (a presence announcement, a membership change to apply), owned by one
    task group: :meth:`run` holds it for the node's life and cancels what is left at shutdown.
    A job that fails is logged and counted, never fatal. Jobs spawned before :meth:`run` starts
    wait for it (bounded), so none is dropped silently."""

    MAX_WAITING = 10_000

    def __init__(self, errors: ThrottledLog) -> None:
        self.errors = errors
        self._tg: asyncio.TaskGroup | None = None
        self._waiting: list[tuple[Awaitable[Any], str]] = []

    def spawn(self, coro: Awaitable[Any], what: str) -> None:
        """Run ``coro`` in the background. ``what`` names it in logs (a code literal)."""
        if self._tg is None:
            if len(self._waiting) >= self.MAX_WAITING:
                METRICS.background_errors.labels(task="job").inc()
                self.errors.error(f"background job {what}", RuntimeError("too many jobs waiting"))
                getattr(coro, "close", lambda: None)()
                return
            self._waiting.append((coro, what))
            return
        self._tg.create_task(self._guarded(coro, what), name=what)

    async def _guarded(self, coro: Awaitable[Any], what: str) -> None:
        try:
            await coro
        except Exception as exc:
            METRICS.background_errors.labels(task="job").inc()
            self.errors.error(f"background job {what}", exc)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            waiting, self._waiting = self._waiting, []
            for coro, what in waiting:
                tg.create_task(self._guarded(coro, what), name=what)
            try:
                await asyncio.Event().wait()  # lives until cancelled with the node
            finally:
                self._tg = None
