"""The node: owns the Redis clients, the fan-out, the servers and their lifecycles.

``Node.run()`` runs everything in one ``asyncio.TaskGroup`` until :meth:`Node.stop` is called
(SIGINT) or a drain (SIGTERM) finishes. Services (streams, rooms, sessions, commands) are plain
objects built here and passed the node; nothing is global but the metrics registry.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import sys
import time
from typing import Any

from aiohttp import web
from websockets.asyncio.server import serve

from . import __version__, redisio
from .auth import Identity
from .commands import Caller, Commands
from .config import Settings
from .errors import NotFound
from .fanout import Fanout, Flusher, ShardReader, Topic
from .http import build_app
from .keys import GENERAL, Keys, UserId
from .metrics import METRICS
from .protocol import dumps, message_event, ws_text_frame
from .rooms import Rooms
from .session import Sessions, Subscription, room_summary
from .streams import Appended, RoomMeta, RoomStreams
from .unread import unread_count
from .ws import WsServer

log = logging.getLogger("chatcluster.node")


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.shards)
        self.redis: Any = redisio.connect(settings.redis_url)
        self.streams = RoomStreams(self.redis, self.keys, maxlen=settings.history_maxlen,
                                   cmid_ttl_s=settings.cmid_ttl_s)
        self.rooms = Rooms(self.redis, self.keys, self.streams)
        self.sessions = Sessions(self)
        self.commands = Commands(self)
        self.ws = WsServer(self)
        self.flusher: Flusher | None = None
        self.fanout: Fanout = None  # type: ignore[assignment]  # built in run(), needs the loop
        self.draining = False
        self.redis_ok = False
        self._stop = asyncio.Event()
        self.ws_port = 0
        self.http_port = 0

    # -- helpers used by the services -------------------------------------------------------
    @staticmethod
    def now_ms() -> int:
        return int(time.time() * 1000)

    def encode_room_entry(self, topic: Topic, sid: str, fields: dict[bytes, bytes]) -> bytes:
        return dumps(message_event(topic.name, sid, fields))

    async def publish(self, room: str, user: str, name: str, text: str, cmid: str | None,
                      kind: str = "") -> Appended:
        try:
            appended = await self.streams.append(room, user, name, text, cmid, kind)
        except NotFound:
            if room != GENERAL:
                raise
            await self.rooms.ensure_general()  # Redis lost its data: the general room comes back
            appended = await self.streams.append(room, user, name, text, cmid, kind)
        if not appended.duplicate:
            METRICS.messages_published.inc()
        return appended

    async def room_summaries(self, user: UserId, metas: dict[str, RoomMeta],
                             positions: dict[str, str]) -> list[dict[str, Any]]:
        rooms = list(metas)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hmget(self.keys.user_reads(user), rooms)
        for room in rooms:
            if room == GENERAL:
                pipe.pfcount(self.keys.general_members())
            else:
                pipe.scard(self.keys.room_members(room))
            pipe.zcount(self.keys.room_online(room), self.now_ms(), "+inf")
        with redisio.unavailable_on_redis_errors("summaries"):
            results = await pipe.execute()
        reads = results[0]
        out = []
        for i, room in enumerate(rooms):
            meta = metas[room]
            members, online = int(results[1 + 2 * i]), int(results[2 + 2 * i])
            out.append(room_summary(meta, positions.get(room, meta.last_id),
                                    unread_count(meta.seq, reads[i]), members, online))
        return out

    async def open_personal(self, identity: Identity, hello: dict[str, Any], sub: Subscription,
                            welcome: dict[str, Any]) -> list[bytes]:
        """Personal stream replay frames; filled in by the personal-stream service."""
        return []

    async def session_started(self, caller: Caller) -> None:
        with redisio.unavailable_on_redis_errors("session"):
            await self.redis.pfadd(self.keys.general_members(), caller.user)

    async def session_ended(self, caller: Caller) -> None:
        return None

    # -- Redis loss -------------------------------------------------------------------------
    async def check_epochs(self, reader: ShardReader) -> None:
        """After a reader reconnects: rooms whose epoch changed lost their data (Redis restarted
        empty, or failed over without it). Their sessions are told ``recovered: false`` and the
        reader starts the new stream from its beginning."""
        topics = [t for t in reader.topics.values() if t.kind == "room"]
        if not topics:
            return
        metas = await self.streams.metas([t.name for t in topics])
        if GENERAL in metas and metas[GENERAL] is None:
            await self.rooms.ensure_general()
            metas[GENERAL] = await self.streams.meta(GENERAL)
        for topic in topics:
            meta = metas.get(topic.name)
            if meta is not None and meta.epoch == topic.epoch:
                continue
            log.warning("room epoch changed: stream data was lost", extra={"room_kind": meta.kind if meta else "gone"})
            topic.pos = "0-0"
            if meta is None:
                event = {"type": "room", "change": "removed", "room": {"id": topic.name}, "recovered": False}
            else:
                topic.epoch = meta.epoch
                event = {"type": "room", "change": "updated", "recovered": False,
                         "room": room_summary(meta, meta.last_id, 0, 0, 0)}
            frame = ws_text_frame(dumps(event))
            for sink in topic.sinks:
                sink.push(frame)

    # -- lifecycle --------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    async def drain(self) -> None:
        """SIGTERM: not ready, tell every client to reconnect elsewhere, spread the closes
        (4001) over the drain window, and stop when the last one is gone or the window ends."""
        if self.draining:
            return
        self.draining = True
        METRICS.draining.set(1)
        window = self.settings.drain_seconds
        conns = list(self.ws.connections)
        log.info("draining", extra={"connections": len(conns), "window_s": window})
        loop = asyncio.get_running_loop()
        for conn in conns:
            delay = random.uniform(0, window * 0.8) if window > 0 else 0.0
            event = {"type": "reconnect", "reason": "draining", "retry_after_ms": int(delay * 1000)}
            conn.sub.sink.push(ws_text_frame(dumps(event)))
            loop.call_later(delay, conn.close_soon, 4001, "node draining")
        deadline = loop.time() + window + 2.0
        while self.ws.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.stop()

    async def _ensure_redis(self) -> None:
        backoff = 0.05
        while True:
            try:
                await self.rooms.ensure_general()
                self.redis_ok = True
                return
            except Exception as exc:
                log.warning("waiting for Redis", extra={"error": type(exc).__name__})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _watch_redis(self) -> None:
        """Keep ``redis_ok`` (for /readyz) current."""
        while True:
            try:
                await self.redis.ping()
                self.redis_ok = True
            except Exception:
                self.redis_ok = False
            await asyncio.sleep(1.0)

    async def _watch_loop_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(0.5)
            METRICS.loop_lag.set(max(0.0, loop.time() - start - 0.5))
            METRICS.outbound_bytes.set(sum(c.sub.sink.buffered_bytes() for c in self.ws.connections))

    def ready(self) -> bool:
        return self.redis_ok and not self.draining and self.fanout is not None and self.fanout.healthy()

    def _make_reader_conn(self, shard: int) -> Any:
        return redisio.connect_dedicated(self.settings.redis_url)

    async def run(self, announce: bool = True) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        METRICS.build_info.info({"version": __version__, "python": sys.version.split()[0]})
        self.flusher = Flusher(loop)
        self.fanout = Fanout(settings, self.redis, self.flusher, self._make_reader_conn,
                             self.check_epochs)
        await self._ensure_redis()
        for sig, handler in ((signal.SIGTERM, lambda: loop.create_task(self.drain())),
                             (signal.SIGINT, self.stop)):
            try:
                loop.add_signal_handler(sig, handler)
            except (NotImplementedError, RuntimeError):
                pass
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self.fanout.run(), name="fanout"),
                tg.create_task(self._watch_redis(), name="watch-redis"),
                tg.create_task(self._watch_loop_lag(), name="loop-lag"),
            ]
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
                server_header=None,
            )
            runner = web.AppRunner(build_app(self), access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, settings.host, settings.http_port, reuse_address=True)
            await site.start()
            self.ws_port = ws_server.sockets[0].getsockname()[1]
            self.http_port = runner.addresses[0][1]
            log.info("listening", extra={"ws_port": self.ws_port, "http_port": self.http_port,
                                         "auth": settings.auth})
            if announce:
                print(f"CHATCLUSTER READY node={settings.node_id} ws={self.ws_port} "
                      f"http={self.http_port}", flush=True)
            try:
                await self._stop.wait()
            finally:
                log.info("stopping")
                ws_server.close(close_connections=True)
                try:
                    await asyncio.wait_for(ws_server.wait_closed(), 5)
                except TimeoutError:
                    pass
                await runner.cleanup()
                for task in tasks:
                    task.cancel()
        await self.redis.aclose()
