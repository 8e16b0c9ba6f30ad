"""The node: builds the services, wires them together and runs them.

``Node.run()`` runs everything in one ``asyncio.TaskGroup`` until :meth:`Node.stop` is called
(SIGINT) or a drain (SIGTERM) finishes. Each service gets the few collaborators it uses; state
has one owner (membership of live sessions: :mod:`node.session`; online counts and summaries:
:mod:`node.summaries`; presence of this node's sessions: :mod:`node.online`; Redis loss:
:mod:`node.recovery`). Nothing is global but the metrics registry.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from typing import Any

from aiohttp import web
from websockets.asyncio.server import serve

from . import __version__, redisio
from .commands import Commands
from .config import Settings
from .ephemeral import Ephemeral, EphemeralTopic, start_position
from .fanout import Fanout, Topic
from .http import HttpContext, build_app
from .keys import Keys
from .metrics import METRICS
from .online import Online
from .opener import SessionOpener
from .pauses import PausePoints
from .personal import PersonalStreams
from .poll import Poller
from .presence import Presence
from .recovery import Recovery
from .rooms import Rooms
from .session import Sessions
from .sink import Flusher
from .status import NodeStatus
from .streams import RoomStreams
from .summaries import RoomSummaries
from .supervise import Jobs, ThrottledLog, supervise
from .unread import ReadMarkers
from .webhooks import Outbox, Webhooks
from .ws import WsServer

log = logging.getLogger("chatcluster.node")


def tune_gc() -> None:
    """Fewer and shorter cyclic-GC pauses on a node holding many long-lived objects.

    Everything alive after start-up is frozen (never scanned again), and the young generation
    is collected every 50,000 allocations instead of 700: a node's hot path allocates many
    short-lived frames and dicts that reference counting frees anyway, and each gen-0/1 pass
    that promotes connection objects makes the next full collection longer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


class Node:
    """Construct inside a running event loop; then ``await node.run()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = s = settings
        self.keys = keys = Keys(s.shards)
        redis = redisio.connect(s.redis_url)
        self.redis: Any = redis
        self.errors = ThrottledLog(log)
        self.jobs = Jobs(self.errors)
        self.pauses = pauses = PausePoints()
        self.status = NodeStatus(s.max_connections)

        # Redis-backed data
        # Webhooks on: the room scripts write the outbox, and this node delivers a share of it.
        outbox = Outbox(keys, s.webhook_outbox_maxlen if s.webhook_url else 0)
        self.webhooks = Webhooks(s, redis, keys, self.errors) if outbox.enabled else None
        self.streams = RoomStreams(redis, keys, maxlen=s.history_maxlen, cmid_ttl_s=s.cmid_ttl_s,
                                   max_age_s=s.history_max_age_s, wait_replicas=s.redis_wait_replicas,
                                   outbox=outbox)
        self.rooms = Rooms(redis, keys, self.streams, pauses)
        self.presence = Presence(redis, keys, s.presence_ttl)
        self.personal = PersonalStreams(redis, keys, s.personal_maxlen)
        self.ephemeral = Ephemeral(redis, keys, s.typing_interval_ms)
        self.unread = ReadMarkers(redis, keys)
        self.recovery = Recovery(s, redis, keys, self.streams, self.rooms)

        # delivery
        self.flusher = Flusher()
        self.fanout = Fanout(s, redis, self.flusher, self.recovery.reader_conn, self.recovery.check_epochs,
                             self._ephemeral_topic, keys=keys, pauses=pauses)

        # sessions and commands
        self.summaries = RoomSummaries(s, redis, keys, self.rooms, self.streams, self.presence)
        self.online = Online(s, redis, keys, self.presence, self.rooms, self.ephemeral, self.jobs, pauses)
        self.opener = SessionOpener(s, self.rooms, self.streams, self.personal, self.summaries, pauses)
        self.sessions = Sessions(s, keys, self.fanout, self.streams, self.rooms, self.personal,
                                 self.summaries, self.opener, self.jobs, pauses)
        self.commands = Commands(s, self.rooms, self.streams, self.sessions, self.summaries, self.presence,
                                 self.unread, self.personal, self.ephemeral, self.errors)
        self.poller = Poller(s, self.rooms, self.streams, self.personal, self.fanout, self.sessions,
                             self.opener, self.online, self.status)

        # transports
        self.ws = WsServer(s, self.commands, self.sessions, self.online, self.presence, self.status,
                           self.flusher, self.errors)
        self.status.connections = lambda: len(self.ws.connections)
        self.http = HttpContext(s, self.commands, self.poller, self.rooms, self.personal, self.presence,
                                self.status, self.ready, lambda: self.recovery.redis_ok, self.fanout.lag)

        self._stop = asyncio.Event()
        self._drain = asyncio.Event()
        self.started = asyncio.Event()  # set once both servers listen (ports known)

    @property
    def ws_port(self) -> int:
        return self.http.ws_port

    @property
    def http_port(self) -> int:
        return self.http.http_port

    def _ephemeral_topic(self, shard: int) -> Topic:
        def route(room: str) -> Topic | None:
            return self.fanout.topics.get(self.keys.room_stream(room))

        return EphemeralTopic(self.keys.shard_ephemeral(shard), shard, start_position(), route)

    def ready(self) -> bool:
        return self.recovery.redis_ok and not self.status.draining and self.fanout.healthy()

    # -- lifecycle --------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    async def drain(self) -> None:
        """SIGTERM: not ready, long polls answered, every client told to reconnect elsewhere and
        closed (4001) over the drain window; stop when the last one is gone or the window ends."""
        if self.status.draining:
            return
        self.status.draining = True
        METRICS.draining.set(1)
        self.poller.wake_all()  # long polls answer now; their clients poll another node
        await self.ws.drain(self.settings.drain_seconds)
        self.stop()

    async def _drain_on_request(self) -> None:
        await self._drain.wait()
        await self.drain()

    async def _watch_loop_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(0.5)
            self.status.loop_lag = max(0.0, loop.time() - start - 0.5)
            METRICS.loop_lag.set(self.status.loop_lag)

    async def run(self, announce: bool = True, signals: bool = True) -> None:
        """Run the node until :meth:`stop` (or a finished drain). ``signals=False`` leaves the
        process's signal handlers alone (a node embedded in another program, or a test)."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        METRICS.build_info.info({"version": __version__, "python": sys.version.split()[0],
                                 "node": settings.node_id})
        await self.recovery.ensure_redis()
        # Summed at scrape time only: walking every connection twice a second costs real CPU
        # on a node holding tens of thousands of idle sockets.
        METRICS.outbound_bytes.set_function(self.ws.buffered_bytes)
        METRICS.streams_read.set_function(lambda: float(len(self.fanout.topics)))
        METRICS.streams_lingering.set_function(self.fanout.lingering)
        if signals:
            for sig, handler in ((signal.SIGTERM, self._drain.set), (signal.SIGINT, self.stop)):
                try:
                    loop.add_signal_handler(sig, handler)
                except (NotImplementedError, RuntimeError):
                    pass
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self.fanout.run(), name="fanout"),
                     tg.create_task(self.jobs.run(), name="jobs"),
                     tg.create_task(self._drain_on_request(), name="drain")]
            # Each loop survives any failed iteration (Redis out of memory, read-only after a
            # failover, gone): logged once per cause per interval, counted, retried.
            for name, body in (("watch-redis", self.recovery.watch_redis), ("loop-lag", self._watch_loop_lag),
                               ("heartbeats", self.online.heartbeats), ("presence-sweeper", self.online.sweeper),
                               ("poll-cache-sweeper", self.poller.sweeper),
                               ("room-counts", lambda: self.summaries.room_counts(self.fanout))):
                tasks.append(tg.create_task(supervise(name, body, self.errors), name=name))
            if self.webhooks is not None:
                tasks.append(tg.create_task(supervise("webhooks", self.webhooks.run, self.errors),
                                            name="webhooks"))
            ws_server = await serve(
                self.ws.handler, settings.host, settings.ws_port,
                process_request=self.ws.process_request,
                compression=None,  # frames are built once for all recipients
                max_size=settings.max_frame_bytes,
                max_queue=8,
                ping_interval=settings.ping_interval_s,
                ping_timeout=settings.ping_interval_s,
                close_timeout=5,
                open_timeout=10,
                backlog=4096,  # a reconnect storm must queue in the kernel, not be refused
                server_header=None,
            )
            runner = web.AppRunner(build_app(self.http), access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, settings.host, settings.http_port, reuse_address=True)
            await site.start()
            self.http.ws_port = ws_server.sockets[0].getsockname()[1]
            self.http.http_port = runner.addresses[0][1]
            log.info("listening", extra={"ws_port": self.ws_port, "http_port": self.http_port,
                                         "auth": settings.auth})
            if settings.gc_freeze:
                tune_gc()
            self.started.set()
            if announce:
                print(f"CHATCLUSTER READY node={settings.node_id} ws={self.ws_port} "
                      f"http={self.http_port}", flush=True)
            try:
                await self._stop.wait()
            finally:
                log.info("stopping")
                self.ws.cancel_timers()
                ws_server.close(close_connections=True)
                try:
                    await asyncio.wait_for(ws_server.wait_closed(), 5)
                except TimeoutError:
                    pass
                await runner.cleanup()
                await self.fanout.stop()
                for task in tasks:
                    task.cancel()
        await self.recovery.aclose()
        await self.streams.aclose()
        await self.redis.aclose()
