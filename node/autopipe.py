"""Appends in order, many per round trip: the node's auto-pipeline of the append script.

Every append of the node is queued here and sent to Redis in the order it was submitted, as one
pipeline per batch, one batch in flight at a time: what was queued while a batch was on its way
goes in the next. A connection that sends many messages therefore has them appended in its own
order without waiting a round trip for each (the WebSocket loop submits a send and reads the
next frame), and many connections' sends share round trips. On Redis Cluster the pipeline is
split per master, each part on one connection, in order.

:meth:`AppendPipe.submit` is synchronous (it only queues), so callers that submit in order get
their appends in that order; its future resolves, in the same order, with the script's reply.
Retrying is safe: every append carries a dedupe key (see :mod:`node.streams`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.exceptions as rexc

from .metrics import METRICS
from .redisio import chat_error_of

log = logging.getLogger("chatcluster.autopipe")

MAX_BATCH = 256  # appends per pipeline: bounds one batch's encoding time and reply size


class AppendPipe:
    def __init__(self, redis: Any, script: Any) -> None:
        self.redis = redis
        self.script = script  # a redis-py Script: .sha and .script
        self._queue: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None
        self.batches = 0

    def submit(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        """Queue one append (never blocks); the future gets the script's reply or the error."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((keys, args, fut))
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._drain(), name="append-pipe")
        return fut

    async def _drain(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
            try:
                await self._send(batch)
            except asyncio.CancelledError:
                for _, _, fut in batch + self._queue:
                    if not fut.done():
                        fut.cancel()
                self._queue = []
                raise
            except Exception as exc:  # never leave a caller waiting for ever
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)

    async def _send(self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]) -> None:
        self.batches += 1
        errors = METRICS.redis_errors.labels(op="append")
        results = await self._execute(batch)
        if any(isinstance(r, rexc.NoScriptError) for r in results):
            # Redis restarted or was flushed: load the script and send those again, in order
            # (they all went to the server that lost it, after anything else in the batch).
            await self.redis.script_load(self.script.script)
            again = [i for i, r in enumerate(results) if isinstance(r, rexc.NoScriptError)]
            for i, r in zip(again, await self._execute([batch[i] for i in again]), strict=True):
                results[i] = r
        for (_, _, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, BaseException):
                errors.inc()
                mapped = chat_error_of(result)
                fut.set_exception(mapped if mapped is not None else result)
            else:
                fut.set_result(result)

    async def _execute(self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for keys, args, _ in batch:
            # (execute_command: the cluster pipeline refuses its evalsha method, not the command)
            pipe.execute_command("EVALSHA", self.script.sha, len(keys), *keys, *args)
        try:
            return list(await pipe.execute(raise_on_error=False))
        except Exception as exc:  # the whole pipeline failed (connection lost, cluster down)
            return [exc] * len(batch)

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
