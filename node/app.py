"""The node: owns the Redis clients, the fan-out, the servers and their lifecycles.

``Node.run()`` runs everything in one ``asyncio.TaskGroup`` until :meth:`Node.stop` is called
(SIGINT) or a drain (SIGTERM) finishes. Services (streams, rooms, sessions, commands) are plain
objects built here and passed the node; nothing is global but the metrics registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import random
import signal
import sys
import time
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiohttp import web
from websockets.asyncio.server import serve

from . import __version__, redisio
from .auth import Identity
from .commands import Caller, Commands
from .config import Settings
from .ephemeral import Ephemeral, EphemeralTopic, start_position
from .errors import ChatError, NotFound
from .fanout import Fanout, Flusher, ShardReader, Topic
from .http import build_app
from .keys import GENERAL, Keys, UserId
from .metrics import METRICS
from .opener import SessionOpener
from .pauses import PausePoints
from .personal import PersonalStreams, PersonalTopic
from .poll import Poller
from .presence import Presence
from .protocol import dumps, message_event, stream_id_tuple, ws_text_frame
from .rooms import Rooms
from .session import Sessions
from .streams import Appended, RoomMeta, RoomStreams, room_summary
from .supervise import ThrottledLog, supervise
from .unread import ReadMarkers, unread_count
from .ws import WsServer

log = logging.getLogger("chatcluster.node")

ONLINE_CACHE_S = 5.0
PRESENCE_COUNT_INTERVAL_S = 10.0
PRESENCE_DEBOUNCE_S = 1.0


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
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.keys = Keys(settings.shards)
        self.redis: Any = redisio.connect(settings.redis_url)
        self.streams = RoomStreams(self.redis, self.keys, maxlen=settings.history_maxlen,
                                   cmid_ttl_s=settings.cmid_ttl_s,
                                   max_age_s=settings.history_max_age_s,
                                   wait_replicas=settings.redis_wait_replicas)
        self.pauses = PausePoints()
        self.rooms = Rooms(self.redis, self.keys, self.streams, self.pauses)
        self.presence = Presence(self.redis, self.keys, settings.presence_ttl)
        self.personal = PersonalStreams(self.redis, self.keys, settings.personal_maxlen)
        self.ephemeral = Ephemeral(self.redis, self.keys, settings.typing_interval_ms)
        self.unread = ReadMarkers(self.redis, self.keys)
        self.sessions = Sessions(self)
        self.opener = SessionOpener(self)
        self.commands = Commands(self)
        self.poller = Poller(self)
        self.ws = WsServer(self)
        self.flusher: Flusher | None = None
        self.fanout: Fanout = None  # type: ignore[assignment]  # built in run(), needs the loop
        self.draining = False
        self.redis_ok = False
        self._stop = asyncio.Event()
        self.started = asyncio.Event()  # set once both servers listen (ports known)
        self.ws_port = 0
        self.http_port = 0
        self._tg: asyncio.TaskGroup | None = None
        self.loop_lag = 0.0
        self._online_cache: dict[str, tuple[float, int]] = {}
        self._online_pending: dict[str, asyncio.Future[int]] = {}
        self._local_sessions: dict[str, tuple[str, str]] = {}  # WS session id -> (user id, name)
        self._control: dict[str, Any] = {}  # cluster server name -> client for CLIENT UNBLOCK
        self.errors = ThrottledLog(log)

    # -- helpers used by the services -------------------------------------------------------
    @staticmethod
    def now_ms() -> int:
        return int(time.time() * 1000)

    def encode_room_entry(self, topic: Topic, sid: str, fields: dict[bytes, bytes]) -> bytes:
        return dumps(message_event(topic.name, sid, fields))

    def spawn(self, coro: Any, what: str) -> None:
        """Run a background job owned by the node's task group; failures are logged, not fatal."""

        async def guarded() -> None:
            try:
                await coro
            except Exception as exc:
                METRICS.background_errors.labels(task="job").inc()
                self.errors.error(f"background job {what}", exc)

        if self._tg is None:
            log.warning("background job dropped: the node is not running", extra={"job": what})
            coro.close()
            return
        self._tg.create_task(guarded(), name=what)

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

    # -- room summaries, online counts ------------------------------------------------------
    async def online_count(self, room: str, members: int = 0) -> int:
        """Online members of a room, cached per node (counts are advisory).

        A big room's count costs O(members) in Redis (SMEMBERS, then ZMSCORE of every member):
        it is kept as long as the throttled presence counts, transitions do not drop it, and
        concurrent callers share one computation.
        """
        now = time.monotonic()
        big = room == GENERAL or members > self.settings.presence_room_limit
        cached = self._online_cache.get(room)
        if cached is not None and now - cached[0] < (PRESENCE_COUNT_INTERVAL_S if big else ONLINE_CACHE_S):
            return cached[1]
        pending = self._online_pending.get(room)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._online_pending[room] = future
        try:
            if room == GENERAL:
                _, count = await self.presence.online_everyone(0)
            else:
                online = await self.presence.online_users(await self.rooms.members(room))
                count = sum(online.values())
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            raise
        finally:
            self._online_pending.pop(room, None)
        future.set_result(count)
        if len(self._online_cache) > 10_000:
            self._online_cache.clear()
        self._online_cache[room] = (now, count)
        return count

    async def who(self, room: str, limit: int) -> tuple[list[str], int]:
        if room == GENERAL:
            return await self.presence.online_everyone(limit)
        members = await self.rooms.members(room)
        online = await self.presence.online_users(members)
        users = sorted(u for u, up in online.items() if up)
        return users[:limit], len(users)

    async def summaries(self, user: UserId, metas: dict[str, RoomMeta],
                        positions: dict[str, str] | None = None,
                        known_seqs: dict[str, int] | None = None) -> list[dict[str, Any]]:
        """Room objects as in ``welcome``: with unread, member and online counts. ``known_seqs``:
        the seq at a room's position when the caller knows it (no Redis read for those)."""
        rooms = list(metas)
        if not rooms:
            return []
        with redisio.unavailable_on_redis_errors("summaries"):
            reads = await self.redis.hmget(self.keys.user_reads(user), rooms)
        members = await self.rooms.member_counts(rooms)
        online = await asyncio.gather(*(self.online_count(room, members[room]) for room in rooms))
        # seq as of the position live delivery starts from, not as of the metadata read a moment
        # earlier: clients count unread and check continuity from it.
        seqs = dict(known_seqs or {})
        unknown = {r: p for r, p in (positions or {}).items() if r not in seqs}
        if unknown:
            seqs.update(await self.streams.seqs_at(unknown))
        out = []
        for i, room in enumerate(rooms):
            meta = metas[room]
            if room in seqs:
                meta = dataclasses.replace(meta, seq=seqs[room])
            elif positions and positions.get(room) == "0-0":
                meta = dataclasses.replace(meta, seq=0)
            last_id = (positions or {}).get(room, meta.last_id)
            out.append(room_summary(meta, last_id, unread_count(meta.seq, reads[i]),
                                    members[room], online[i]))
        return out

    # -- membership changes, applied live on every node --------------------------------------
    async def joined(self, caller: Caller | None, meta: RoomMeta, users: list[str],
                     inviter: str | None = None, announce: bool = True) -> dict[str, Any]:
        """After users became members: subscribe the caller's own session at once, and tell
        every session of every user (any node) through their personal streams."""
        summary: dict[str, Any] = {}
        conn = caller.extra.get("conn") if caller is not None else None
        if conn is not None:
            async with conn.sub.lock:
                position = await self.sessions.subscribe_room(conn.sub, meta.room, None)
            summary = (await self.summaries(caller.user, {meta.room: meta}, {meta.room: position}))[0]  # type: ignore[union-attr]
        elif caller is not None:
            summary = (await self.summaries(caller.user, {meta.room: meta}))[0]
        if announce:
            base = room_summary(meta, meta.last_id, 0, 0, 0)
            event: dict[str, Any] = {"type": "room", "change": "added", "room": base}
            if inviter:
                event["by"] = inviter
            await self.personal.publish_many(list(dict.fromkeys(users)), event)
        return summary

    async def left(self, caller: Caller, room: str) -> None:
        conn = caller.extra.get("conn")
        if conn is not None:
            async with conn.sub.lock:
                self.sessions.unsubscribe_room(conn.sub, room)
        await self.personal.publish(caller.user, {"type": "room", "change": "removed", "room": {"id": room}})

    def _after_personal(self, topic: Topic, entries: list[tuple[str, dict[bytes, bytes]]]) -> None:
        """Personal events delivered on this node: apply room membership changes to the user's
        local sessions, and move the user's "delivered up to" marker."""
        if not topic.sinks:
            return
        for _sid, fields in entries:
            try:
                event = orjson.loads(fields.get(b"d", b"{}"))
            except orjson.JSONDecodeError:
                continue
            if event.get("type") != "room":
                continue
            room = (event.get("room") or {}).get("id")
            if not isinstance(room, str):
                continue
            for sink in list(topic.sinks):
                conn = self.ws.by_sink.get(sink)
                if conn is None:
                    continue
                if event.get("change") in ("added", "removed"):
                    start = (event.get("room") or {}).get("last_id") or "0-0"
                    self.spawn(self.sessions.reconcile_room(conn.sub, UserId(topic.name), room, start),
                               "membership")
        self.spawn(self.personal.mark_delivered(topic.name, entries[-1][0]), "personal-delivered")

    def personal_topic(self, user: str, last_id: str, epoch: str) -> tuple[Topic, bool]:
        """The user's personal topic on this node, created at ``last_id`` (the stream's newest
        entry as Redis said, never a client's cursor) if the node does not read it yet.

        Every creator (WebSocket session, long poll) gets the same topic with the same hook,
        so membership changes always reach the user's sessions. Synchronous."""
        key = self.keys.user_inbox(user)
        topic = self.fanout.get(key)
        if topic is not None:
            return topic, False
        return self.fanout.install(PersonalTopic(key, self.keys.user_shard(user), user, last_id,
                                                 epoch, self._after_personal)), True

    # -- presence ----------------------------------------------------------------------------
    async def session_started(self, caller: Caller, ttl_ms: int | None = None) -> None:
        """Register a session in presence. A WebSocket session is a local session (kept alive by
        this node's heartbeats) from before the first await, so that :meth:`session_ended`,
        whenever it runs, removes it; if it ended while this ran, it is ended again here (the
        end may have reached Redis before the start did)."""
        ws = caller.transport == "ws"
        if ws:
            self._local_sessions[caller.session_id] = (caller.user, caller.identity.name)
        with redisio.unavailable_on_redis_errors("session"):
            await self.redis.pfadd(self.keys.general_members(), caller.user)
        first = await self.presence.start(caller.user, caller.identity.name, caller.session_id, ttl_ms)
        await self.pauses.point("presence.started")
        if ws and caller.session_id not in self._local_sessions:
            await self.presence.end(caller.user, caller.session_id)
            return
        if first:
            self.spawn(self._announce_online(caller.user, caller.identity.name), "presence-online")

    async def _announce_online(self, user: str, name: str) -> None:
        """Debounced: a session that is gone within PRESENCE_DEBOUNCE_S (a reload, a client in a
        reconnect loop) announces nothing, so churn never floods rooms with presence events."""
        await asyncio.sleep(PRESENCE_DEBOUNCE_S)
        online, _ = await self.presence.status(user)
        if online:
            await self._announce(user, name, "online")

    async def session_ended(self, caller: Caller) -> None:
        self._local_sessions.pop(caller.session_id, None)
        try:
            online_ms = await self.presence.end(caller.user, caller.session_id)
        except ChatError:
            return  # Redis is down: the session expires by its TTL
        # A user online for less than the debounce never announced "online": stay quiet.
        if online_ms is not None and (online_ms < 0 or online_ms >= PRESENCE_DEBOUNCE_S * 1000):
            self.spawn(self._announce(caller.user, caller.identity.name, "offline"), "presence-offline")

    async def poll_heartbeat(self, identity: Identity, session: str, next_poll_ms: int) -> None:
        """A poll keeps the user online until a little after the next poll is due."""
        caller = Caller(identity, "p:" + session, "http")
        await self.session_started(caller, ttl_ms=next_poll_ms + self.settings.presence_ttl * 1000)

    def load_factor(self) -> float:
        """>1 when the node is busy: polling clients are asked to come back later."""
        factor = 1.0
        if self.loop_lag > 0.1:
            factor = 1.0 + min(3.0, self.loop_lag / 0.1)
        if len(self.ws.connections) > 0.9 * self.settings.max_connections:
            factor = max(factor, 2.0)
        return factor

    async def _announce(self, user: str, name: str, status: str) -> None:
        """Presence event to the user's rooms that are small enough for per-user events."""
        rooms = await self.rooms.user_rooms(UserId(user))
        counts = await self.rooms.member_counts(list(rooms))
        small: list[str] = [r for r in rooms if counts.get(r, 0) <= self.settings.presence_room_limit]
        for room in small:  # a big room's count is throttled; recomputing it is O(members)
            self._online_cache.pop(room, None)
        await self.ephemeral.presence(small, user, name, status)

    async def _heartbeats(self) -> None:
        interval = max(1.0, self.settings.presence_ttl / 3)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.heartbeat_once()
            except ChatError as exc:
                self.errors.error("heartbeat", exc)

    async def heartbeat_once(self) -> None:
        """Refresh every local session's TTL: O(1) Redis work per session, whatever its rooms."""
        sessions = [(user, sid) for sid, (user, _) in self._local_sessions.items()]
        missing = await self.presence.heartbeat(sessions)
        METRICS.presence_heartbeats.inc(len(sessions))
        # Sessions Redis no longer has although they are still open here: the node was stalled
        # past the TTL (or Redis lost them) and the sweeper took the user offline. Start them
        # again (announcing the user online if that is a transition). Ended sessions are never
        # refreshed: the heartbeat only touches live entries, and session_started ends a session
        # that closed while it ran.
        for _, sid in missing:
            local = self._local_sessions.get(sid)
            if local is not None:
                await self.session_started(Caller(Identity(UserId(local[0]), local[1], 0.0), sid, "ws"))

    async def _sweeper(self) -> None:
        """Users whose sessions all expired (their node died) go offline, announced once."""
        interval = max(1.0, min(5.0, self.settings.presence_ttl / 6))
        while True:
            await asyncio.sleep(interval * (0.5 + random.random()))
            for shard in range(self.keys.shards):
                try:
                    gone = await self.presence.sweep(shard)
                except ChatError:
                    break
                for user in gone:
                    with contextlib.suppress(Exception):
                        name = await self.redis.hget(self.keys.user_meta(user), "name")
                        self.spawn(self._announce(user, (name or user.encode()).decode(), "offline"),
                                   "presence-sweep")

    async def _room_counts(self) -> None:
        """Big rooms get throttled online counts instead of per-user presence events."""
        last: dict[str, int] = {}
        while True:
            await asyncio.sleep(PRESENCE_COUNT_INTERVAL_S)
            rooms = [t for t in list(self.fanout.topics.values()) if t.kind == "room" and t.sinks]
            if not rooms:
                continue
            try:
                counts = await self.rooms.member_counts([t.name for t in rooms])
            except ChatError:
                continue
            for topic in rooms:
                if counts.get(topic.name, 0) <= self.settings.presence_room_limit:
                    continue
                try:
                    online = await self.online_count(topic.name, counts.get(topic.name, 0))
                except ChatError:
                    break
                if last.get(topic.name) == online:
                    continue
                last[topic.name] = online
                frame = ws_text_frame(dumps({"type": "presence", "room": topic.name, "online": online}))
                for sink in list(topic.sinks):
                    sink.push(frame)
            if len(last) > 10_000:
                last.clear()

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
                    event = {"type": "room", "change": "updated", "recovered": False,
                             "room": room_summary(meta, meta.last_id, 0, 0, 0)}
                    frame = ws_text_frame(dumps(event))
                    for sink in topic.sinks:
                        sink.push(frame)
                continue
            log.warning("room epoch changed: stream data was lost", extra={"room_kind": meta.kind if meta else "gone"})
            topic.pos = "0-0"
            topic.seq = 0 if meta is not None else -1  # a new stream starts at seq 1
            if meta is None:
                event = {"type": "room", "change": "removed", "room": {"id": topic.name}, "recovered": False}
            else:
                topic.epoch = meta.epoch
                event = {"type": "room", "change": "updated", "recovered": False,
                         "room": room_summary(meta, meta.last_id, 0, 0, 0)}
            frame = ws_text_frame(dumps(event))
            for sink in topic.sinks:
                sink.push(frame)

    async def _rolled_back(self, topics: list[Topic]) -> dict[str, str]:
        """Rooms whose delivered position is newer than the stream's newest entry: the stream
        lost entries this node already delivered. Maps room -> the stream's newest id."""
        if not topics:
            return {}
        last = await self.streams.last_ids([t.name for t in topics])
        return {t.name: last[t.name] for t in topics
                if stream_id_tuple(last[t.name]) < stream_id_tuple(t.pos)}

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
        self.poller.wake_all()  # long polls answer now; their clients poll another node
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
                with redisio.unavailable_on_redis_errors("ping"):
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
            self.loop_lag = max(0.0, loop.time() - start - 0.5)
            METRICS.loop_lag.set(self.loop_lag)

    def ready(self) -> bool:
        return self.redis_ok and not self.draining and self.fanout is not None and self.fanout.healthy()

    def _ephemeral_topic(self, shard: int) -> Topic:
        def route(room: str) -> Topic | None:
            return self.fanout.topics.get(self.keys.room_stream(room))

        return EphemeralTopic(self.keys.shard_ephemeral(shard), shard, start_position(), route)

    async def _make_reader_conn(self, shard: int, refresh: bool) -> tuple[Any, Any]:
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

    async def run(self, announce: bool = True, signals: bool = True) -> None:
        """Run the node until :meth:`stop` (or a finished drain). ``signals=False`` leaves the
        process's signal handlers alone (a node embedded in another program, or a test)."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        METRICS.build_info.info({"version": __version__, "python": sys.version.split()[0],
                                 "node": settings.node_id})
        self.flusher = Flusher(loop)
        self.fanout = Fanout(settings, self.redis, self.flusher, self._make_reader_conn,
                             self.check_epochs, self._ephemeral_topic, keys=self.keys,
                             room_encoder=self.encode_room_entry, pauses=self.pauses)
        await self._ensure_redis()
        # Summed at scrape time only: walking every connection twice a second costs real CPU
        # on a node holding tens of thousands of idle sockets.
        METRICS.outbound_bytes.set_function(
            lambda: float(sum(c.sub.sink.buffered_bytes() for c in list(self.ws.connections))))
        for sig, handler in ((signal.SIGTERM, lambda: loop.create_task(self.drain())),
                             (signal.SIGINT, self.stop)):
            if not signals:
                break
            try:
                loop.add_signal_handler(sig, handler)
            except (NotImplementedError, RuntimeError):
                pass
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            tasks = [tg.create_task(self.fanout.run(), name="fanout")]
            # Each loop survives any failed iteration (Redis out of memory, read-only after a
            # failover, gone): logged once per cause per interval, counted, retried.
            for name, body in (("watch-redis", self._watch_redis), ("loop-lag", self._watch_loop_lag),
                               ("heartbeats", self._heartbeats), ("presence-sweeper", self._sweeper),
                               ("room-counts", self._room_counts)):
                tasks.append(tg.create_task(supervise(name, body, self.errors), name=name))
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
            runner = web.AppRunner(build_app(self), access_log=None, handle_signals=False)
            await runner.setup()
            site = web.TCPSite(runner, settings.host, settings.http_port, reuse_address=True)
            await site.start()
            self.ws_port = ws_server.sockets[0].getsockname()[1]
            self.http_port = runner.addresses[0][1]
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
                ws_server.close(close_connections=True)
                try:
                    await asyncio.wait_for(ws_server.wait_closed(), 5)
                except TimeoutError:
                    pass
                await runner.cleanup()
                for task in tasks:
                    task.cancel()
        for control in self._control.values():
            await control.aclose()
        await self.redis.aclose()
