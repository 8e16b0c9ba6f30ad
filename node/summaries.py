"""Room summaries as clients see them (``welcome.rooms``, ``join``, ``rooms``): unread, member
and online counts; and the node's cache of online counts, with the throttled online counts
sent to big rooms.

Online counts are advisory and cost O(members) in Redis, so they are cached per node (a few
seconds) and shared by concurrent callers; clients follow presence events between them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING, Any

from .config import Settings
from .keys import GENERAL, Keys, UserId
from .presence import Presence
from .protocol import dumps, ws_text_frame
from .redisio import concurrently, unavailable_on_redis_errors
from .rooms import Rooms
from .streams import RoomMeta, RoomStreams, room_summary
from .unread import unread_count

if TYPE_CHECKING:
    from .fanout import Fanout

ONLINE_CACHE_S = 5.0
PRESENCE_COUNT_INTERVAL_S = 10.0
MAX_CACHED_ROOMS = 10_000


class RoomSummaries:
    def __init__(self, settings: Settings, redis: Any, keys: Keys, rooms: Rooms,
                 streams: RoomStreams, presence: Presence) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self.rooms = rooms
        self.streams = streams
        self.presence = presence
        self._online_cache: dict[str, tuple[float, int]] = {}
        self._online_pending: dict[str, asyncio.Future[int]] = {}

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
        if len(self._online_cache) > MAX_CACHED_ROOMS:
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
        # seq as of the position live delivery starts from, not as of the metadata read a moment
        # earlier: clients count unread and check continuity from it.
        seqs = dict(known_seqs or {})
        unknown = {r: p for r, p in (positions or {}).items() if r not in seqs}

        async def read_markers() -> list[Any]:
            with unavailable_on_redis_errors("summaries"):
                return list(await self.redis.hmget(self.keys.user_reads(user), rooms))

        async def counts() -> tuple[dict[str, int], list[int]]:
            members = await self.rooms.member_counts(rooms)
            return members, list(await asyncio.gather(*(self.online_count(r, members[r]) for r in rooms)))

        async def seqs_at() -> dict[str, int]:
            return await self.streams.seqs_at(unknown) if unknown else {}

        # Independent reads, concurrently: one round trip of latency (two for uncached counts).
        reads, (members, online), found = await concurrently(read_markers(), counts(), seqs_at())
        seqs.update(found)
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

    async def room_counts(self, fanout: Fanout) -> None:
        """Big rooms get throttled online counts instead of per-user presence events (a loop)."""
        last: dict[str, int] = {}
        while True:
            await asyncio.sleep(PRESENCE_COUNT_INTERVAL_S)
            rooms = [t for t in list(fanout.topics.values()) if t.kind == "room" and t.sinks]
            if not rooms:
                continue
            counts = await self.rooms.member_counts([t.name for t in rooms])
            for topic in rooms:
                if counts.get(topic.name, 0) <= self.settings.presence_room_limit:
                    continue
                online = await self.online_count(topic.name, counts.get(topic.name, 0))
                if last.get(topic.name) == online:
                    continue
                last[topic.name] = online
                frame = ws_text_frame(dumps({"type": "presence", "room": topic.name, "online": online}))
                for sink in list(topic.sinks):
                    sink.push(frame)
            if len(last) > MAX_CACHED_ROOMS:
                last.clear()
