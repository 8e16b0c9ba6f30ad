"""Room summaries as clients see them (``welcome.rooms``, ``join``, ``rooms``): unread, member
and online counts, mentions, the user's role and (direct rooms) the other member's read marker; and the node's cache of online counts, with the throttled online counts
sent to big rooms.

Online counts are advisory and cost O(members) in Redis, so they are cached per node (a few
seconds) and shared by concurrent callers; clients follow presence events between them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .config import Settings
from .keys import GENERAL, Keys, UserId
from .mentions import mention_count
from .presence import Presence
from .protocol import dumps, ws_text_frame
from .redisio import concurrently, unavailable_on_redis_errors
from .roles import ROLE_KINDS, role_of
from .rooms import Rooms, dm_members
from .streams import RoomMeta, RoomStreams, room_summary
from .unread import parse_marker, unread_count

if TYPE_CHECKING:
    from .fanout import Fanout

ONLINE_CACHE_S = 5.0
PRESENCE_COUNT_INTERVAL_S = 10.0
MAX_CACHED_ROOMS = 10_000


def dm_other(room: str, user: str) -> str | None:
    """The other member of a direct room."""
    pair = dm_members(room)
    if pair is None or user not in pair:
        return None
    return pair[1] if pair[0] == user else pair[0]


@dataclasses.dataclass(frozen=True, slots=True)
class KnownFacts:
    """What the caller already read of the rooms (:meth:`RoomStreams.room_facts`): the summaries
    do not read it again."""

    members: dict[str, int]  # member counts (``general``'s is never here: it is a HyperLogLog)
    roles: dict[str, Any]  # the user's stored role per room (None: none stored)
    markers: dict[str, tuple[Any, Any]]  # room -> (raw read marker, raw mentions) of the user


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

        async def compute() -> dict[str, int]:
            if room == GENERAL:
                _, count = await self.presence.online_everyone(0)
            else:
                count = sum((await self.presence.online_users(await self.rooms.members(room))).values())
            return {room: count}

        return (await self._computed([room], now, compute))[room]

    async def _computed(self, rooms: list[str], now: float,
                        compute: Callable[[], Awaitable[dict[str, int]]]) -> dict[str, int]:
        """Online counts of ``rooms`` by ``compute``, once: concurrent callers wait for it (the
        pending futures) and get its error if it fails; the counts are cached as of ``now``."""
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future[int]] = {room: loop.create_future() for room in rooms}
        self._online_pending.update(futures)
        try:
            counts = await compute()
        except BaseException as exc:
            for future in futures.values():
                future.set_exception(exc)
                future.exception()  # retrieved: waiters re-raise it, nobody logs it as lost
            raise
        finally:
            for room in rooms:
                self._online_pending.pop(room, None)
        if len(self._online_cache) > MAX_CACHED_ROOMS:
            self._online_cache.clear()
        for room, count in counts.items():
            futures[room].set_result(count)
            self._online_cache[room] = (now, count)
        return counts

    async def online_counts(self, members: dict[str, int]) -> dict[str, int]:
        """:meth:`online_count` of many rooms (room -> member count). The small rooms that are
        neither cached nor being computed are computed together: one pipeline of their member
        sets, one of the online scores of all those members (each user once) -- two round
        trips for a hello's rooms instead of two per room."""
        now = time.monotonic()
        out: dict[str, int] = {}
        batch: list[str] = []
        single: list[str] = []
        for room, count in members.items():
            cached = self._online_cache.get(room)
            if room == GENERAL or count > self.settings.presence_room_limit or room in self._online_pending:
                single.append(room)
            elif cached is not None and now - cached[0] < ONLINE_CACHE_S:
                out[room] = cached[1]
            else:
                batch.append(room)
        if batch:
            async def compute() -> dict[str, int]:
                sets = await self.rooms.members_of_rooms(batch)
                online = await self.presence.online_users(sorted({u for users in sets.values() for u in users}))
                return {room: sum(1 for u in sets[room] if online.get(u)) for room in batch}

            out.update(await self._computed(batch, now, compute))
        if single:
            for room, count in zip(single, await asyncio.gather(*(self.online_count(r, members[r]) for r in single)),
                                   strict=True):
                out[room] = count
        return out

    async def who(self, room: str, limit: int) -> tuple[list[str], int]:
        if room == GENERAL:
            return await self.presence.online_everyone(limit)
        members = await self.rooms.members(room)
        online = await self.presence.online_users(members)
        users = sorted(u for u, up in online.items() if up)
        return users[:limit], len(users)

    async def summaries(self, user: UserId, metas: dict[str, RoomMeta],
                        positions: dict[str, str] | None = None,
                        known_seqs: dict[str, int] | None = None,
                        known: KnownFacts | None = None) -> list[dict[str, Any]]:
        """Room objects as in ``welcome``: with unread, member and online counts. ``known_seqs``:
        the seq at a room's position when the caller knows it (no Redis read for those);
        ``known``: member counts, stored roles and read markers the caller already read."""
        rooms = list(metas)
        if not rooms:
            return []
        # seq as of the position live delivery starts from, not as of the metadata read a moment
        # earlier: clients count unread and check continuity from it.
        seqs = dict(known_seqs or {})
        unknown = {r: p for r, p in (positions or {}).items() if r not in seqs}

        async def read_markers() -> tuple[list[Any], list[Any]]:
            if known is not None and all(room in known.markers for room in rooms):
                return [known.markers[r][0] for r in rooms], [known.markers[r][1] for r in rooms]
            # Read markers and mentions: the user's slot, one round trip.
            with unavailable_on_redis_errors("summaries"):
                pipe = self.redis.pipeline(transaction=False)
                pipe.hmget(self.keys.user_reads(user), rooms)
                pipe.hmget(self.keys.user_mentions(user), rooms)
                markers, mentioned = await pipe.execute()
            return list(markers), list(mentioned)

        async def counts() -> tuple[dict[str, int], list[int]]:
            if known is not None:
                members = {r: known.members[r] for r in rooms if r in known.members}
                self.rooms.remember_counts(members)
                missing = [r for r in rooms if r not in members]
                if missing:
                    members.update(await self.rooms.member_counts(missing))
            else:
                members = await self.rooms.member_counts(rooms)
            online = await self.online_counts(members)
            return members, [online[r] for r in rooms]

        async def seqs_at() -> dict[str, int]:
            return await self.streams.seqs_at(unknown) if unknown else {}

        # Independent reads, concurrently: one round trip of latency (two for uncached counts).
        (reads, mentioned), (members, online), found, (stored_roles, read_by) = await concurrently(
            read_markers(), counts(), seqs_at(),
            self._roles_and_receipts(user, metas, known.roles if known is not None else None))
        seqs.update(found)
        out = []
        for i, room in enumerate(rooms):
            meta = metas[room]
            if room in seqs:
                meta = dataclasses.replace(meta, seq=seqs[room])
            elif positions and positions.get(room) == "0-0":
                meta = dataclasses.replace(meta, seq=0)
            last_id = (positions or {}).get(room, meta.last_id)
            summary = room_summary(meta, last_id, unread_count(meta.seq, reads[i]), members[room], online[i])
            summary["mentions"] = mention_count(mentioned[i], parse_marker(reads[i])[1])
            summary["role"] = role_of(meta, user, stored_roles.get(room))
            if room in read_by:
                summary["read_by"] = [read_by[room]]
            out.append(summary)
        return out

    async def _roles_and_receipts(self, user: UserId, metas: dict[str, RoomMeta],
                                  known_roles: dict[str, Any] | None = None
                                  ) -> tuple[dict[str, Any], dict[str, dict[str, str]]]:
        """The user's stored role in each created room they do not own (unless ``known_roles``
        has it), and the other member's read marker in each direct room (``read_by``, so that a
        reloaded page can show "seen"): one pipeline, run alongside the summaries' other reads."""
        known_roles = known_roles or {}
        ask_roles = [r for r, m in metas.items() if m.kind in ROLE_KINDS and m.owner != user and r not in known_roles]
        others = {r: o for r in metas if metas[r].kind == "direct" and (o := dm_other(r, user)) is not None}
        if not ask_roles and not others:
            return dict(known_roles), {}
        with unavailable_on_redis_errors("summaries"):
            pipe = self.redis.pipeline(transaction=False)
            for room in ask_roles:
                pipe.hget(self.keys.room_roles(room), user)
            for room, other in others.items():
                pipe.hget(self.keys.user_reads(other), room)
            results = await pipe.execute()
        roles = {**known_roles, **dict(zip(ask_roles, results[:len(ask_roles)], strict=True))}
        read_by = {room: {"id": other, "read_id": parse_marker(raw)[0]}
                   for (room, other), raw in zip(others.items(), results[len(ask_roles):], strict=True)}
        return roles, read_by

    async def room_counts(self, fanout: Fanout) -> None:
        """Big rooms get throttled online counts instead of per-user presence events (a loop)."""
        last: dict[str, int] = {}
        while True:
            await asyncio.sleep(PRESENCE_COUNT_INTERVAL_S)
            rooms = [t for t in list(fanout.topics.values()) if t.kind == "room" and t.sinks]
            if not rooms:
                continue
            counts = await self.rooms.member_counts([t.name for t in rooms], max_age_s=PRESENCE_COUNT_INTERVAL_S)
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
