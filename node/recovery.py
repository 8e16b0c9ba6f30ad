"""Redis, lost and found again: the readers' connections (which follow a failover), the rooms
whose stream was lost or rolled back (their sessions are told ``recovered: false``), and
whether Redis answers (for ``/readyz``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis

from . import redisio
from .config import Settings
from .fanout import ShardReader, Topic
from .keys import GENERAL, Keys
from .protocol import dumps, stream_id_tuple, ws_text_frame
from .rooms import Rooms
from .streams import RoomStreams, room_gap_event

log = logging.getLogger("chatcluster.recovery")


class Recovery:
    def __init__(self, settings: Settings, redis: Any, keys: Keys, streams: RoomStreams, rooms: Rooms) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self.streams = streams
        self.rooms = rooms
        self.redis_ok = False
        self._control: dict[str, Any] = {}  # cluster server name -> client for CLIENT UNBLOCK

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
        rolled_back = await self._rolled_back([t for t in topics if (m := metas.get(t.name)) is not None
                                               and m.epoch == t.epoch and t.pos != "0-0"])
        for topic in topics:
            meta = metas.get(topic.name)
            if meta is not None and meta.epoch == topic.epoch:
                if topic.name in rolled_back:
                    # A replica promoted without the newest entries (replication is async):
                    # what this node delivered is gone from history. Say so, then go on from
                    # what the stream has now; new entries get ids after the lost ones.
                    log.warning("room stream rolled back (failover lost entries)")
                    topic.pos = rolled_back[topic.name]
                    topic.seq = -1  # unknown until the next entry (no gap check across the loss)
                    _tell(topic, room_gap_event(meta, meta.last_id))
                continue
            log.warning("room epoch changed: stream data was lost", extra={"room_kind": meta.kind if meta else "gone"})
            topic.pos = "0-0"
            if meta is None:
                topic.seq = -1
                _tell(topic, {"type": "room", "change": "removed", "room": {"id": topic.name}, "recovered": False})
            else:
                topic.seq = 0  # a new stream starts at seq 1
                topic.epoch = meta.epoch
                topic.meta = meta
                _tell(topic, room_gap_event(meta, meta.last_id))

    async def _rolled_back(self, topics: list[Topic]) -> dict[str, str]:
        """Rooms whose delivered position is newer than the stream's newest entry: the stream
        lost entries this node already delivered. Maps room -> the stream's newest id."""
        if not topics:
            return {}
        last = await self.streams.last_ids([t.name for t in topics])
        return {t.name: last[t.name] for t in topics
                if stream_id_tuple(last[t.name]) < stream_id_tuple(t.pos)}

    async def ensure_redis(self) -> None:
        """Wait for Redis at start-up (with backoff), and make sure the general room exists."""
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

    async def watch_redis(self) -> None:
        """Loop: keep ``redis_ok`` (for /readyz) current."""
        while True:
            try:
                with redisio.unavailable_on_redis_errors("ping"):
                    await self.redis.ping()
                self.redis_ok = True
            except Exception:
                self.redis_ok = False
            await asyncio.sleep(1.0)

    async def reader_conn(self, shard: int, refresh: bool) -> tuple[Any, Any]:
        """A blocking connection for a shard reader, and how to CLIENT UNBLOCK it.

        On Redis Cluster the connection goes straight to the master owning the shard's slot
        (every key of a shard shares it); after a failure the slot map is refreshed first, so a
        failover or a migrated slot is followed.
        """
        block_ms = self.settings.read_block_ms
        if not redisio.is_cluster_url(self.settings.redis_url):
            return redisio.connect_dedicated(self.settings.redis_url, block_ms), self.redis.client_unblock
        if refresh:
            with contextlib.suppress(Exception):
                await self.redis.nodes_manager.initialize()
        server = self.redis.get_node_from_key(self.keys.shard_ephemeral(shard))
        password = self.redis.get_connection_kwargs().get("password")
        conn = redisio.connect_server(server.host, server.port, block_ms, password)
        control = self._control.get(server.name)
        if control is None:
            control = self._control[server.name] = aioredis.Redis(
                host=server.host, port=server.port, password=password, socket_connect_timeout=2,
                socket_timeout=5, max_connections=8)
        return conn, control.client_unblock

    async def aclose(self) -> None:
        for control in self._control.values():
            await control.aclose()


def _tell(topic: Topic, event: dict[str, Any]) -> None:
    frame = ws_text_frame(dumps(event))
    for sink in topic.sinks:
        sink.push(frame)
