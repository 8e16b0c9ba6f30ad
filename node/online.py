"""The node's side of presence: its local sessions, their heartbeats, the sweeper of sessions
whose node died, and the online/offline announcements (debounced, so that reloads and clients
in a reconnect loop never flood rooms). The Redis scripts are in :mod:`node.presence`.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

from .auth import Identity
from .config import Settings
from .ephemeral import Ephemeral
from .errors import ChatError, RateLimited
from .keys import Keys, UserId
from .metrics import METRICS
from .pauses import PausePoints
from .presence import Presence
from .redisio import concurrently, unavailable_on_redis_errors
from .rooms import Rooms
from .summaries import PRESENCE_COUNT_INTERVAL_S
from .supervise import Jobs

PRESENCE_DEBOUNCE_S = 1.0
COUNTED_FOR_S = 600.0
RESTART_CONCURRENCY = 16  # sessions Redis lost, started again at once
MAX_COUNTED = 100_000


class Online:
    def __init__(self, settings: Settings, redis: Any, keys: Keys, presence: Presence, rooms: Rooms,
                 ephemeral: Ephemeral, jobs: Jobs, pauses: PausePoints) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self.presence = presence
        self.rooms = rooms
        self.ephemeral = ephemeral
        self.jobs = jobs
        self.pauses = pauses
        self.local: dict[str, tuple[str, str]] = {}  # WebSocket session id -> (user id, name)
        # WebSocket session id -> the rooms the session is subscribed to now (its announcements
        # go to those: no read of the user's rooms per presence transition)
        self._rooms_of: dict[str, Callable[[], list[str]]] = {}
        self._counted: dict[str, float] = {}  # user -> when last added to the general room's count

    async def started(self, user: UserId, name: str, session: str, ws: bool,
                      ttl_ms: int | None = None, rooms: Callable[[], list[str]] | None = None) -> None:
        """Register a session in presence. A WebSocket session is a local session (kept alive by
        this node's heartbeats) from before the first await, so that :meth:`ended`, whenever it
        runs, removes it; if it ended while this ran, it is ended again here (the end may have
        reached Redis before the start did). ``rooms``: the session's rooms as it knows them
        (read when its online announcement goes out)."""
        if ws:
            self.local[session] = (user, name)
            if rooms is not None:
                self._rooms_of[session] = rooms
        async def count_member() -> None:
            # The general room's member count (a HyperLogLog of every user seen): once per user
            # and node per COUNTED_FOR_S is plenty, not at every poll and hello.
            now = time.monotonic()
            if now - self._counted.get(user, -COUNTED_FOR_S) < COUNTED_FOR_S:
                return
            with unavailable_on_redis_errors("session"):
                await self.redis.pfadd(self.keys.general_members(), user)
            if len(self._counted) >= MAX_COUNTED:
                self._counted.clear()
            self._counted[user] = now

        # Two slots (the general room's counter, the user's presence): concurrently.
        limit = self.settings.max_connections_per_user if ws else 0
        _, first = await concurrently(count_member(), self.presence.start(user, name, session, ttl_ms, limit))
        await self.pauses.point("presence.started")
        if ws and session not in self.local:
            await self.presence.end(user, session)
            return
        if first:
            self.jobs.spawn(self._announce_online(user, name, session if ws else None), "presence-online")

    async def ended(self, user: UserId, name: str, session: str, rooms: list[str] | None = None) -> None:
        """A session ended. ``rooms``: the rooms it was subscribed to (its offline announcement
        goes to those; without them the user's rooms are read)."""
        self.local.pop(session, None)
        self._rooms_of.pop(session, None)
        try:
            online_ms = await self.presence.end(user, session)
        except ChatError:
            return  # Redis is down: the session expires by its TTL
        # A user online for less than the debounce never announced "online": stay quiet.
        if online_ms is not None and (online_ms < 0 or online_ms >= PRESENCE_DEBOUNCE_S * 1000):
            self.jobs.spawn(self._announce(user, name, "offline", rooms), "presence-offline")

    async def poll_heartbeat(self, identity: Identity, session: str, next_poll_ms: int) -> None:
        """A poll keeps the user online until a little after the next poll is due."""
        await self.started(identity.user, identity.name, "p:" + session, False,
                           ttl_ms=next_poll_ms + self.settings.presence_ttl * 1000)

    async def _announce_online(self, user: str, name: str, session: str | None) -> None:
        """Debounced: a session that is gone within PRESENCE_DEBOUNCE_S (a reload, a client in a
        reconnect loop) announces nothing, so churn never floods rooms with presence events.
        A WebSocket session still open here proves the user online (its end has not run, so
        its presence entry is there) and knows its rooms: nothing to read."""
        await asyncio.sleep(PRESENCE_DEBOUNCE_S)
        rooms_of = self._rooms_of.get(session) if session is not None and session in self.local else None
        if rooms_of is not None:
            await self._announce(user, name, "online", rooms_of())
            return
        online, _ = await self.presence.status(user)
        if online:
            await self._announce(user, name, "online")

    async def _announce(self, user: str, name: str, status: str, known: list[str] | None = None) -> None:
        """Presence event to the user's rooms (``known``, or read) that are small enough for
        per-user events. Whether a room is small is advisory: a count this node read in the
        last PRESENCE_COUNT_INTERVAL_S does (the hellos of the room's members read them)."""
        rooms = known or await self.rooms.user_rooms(UserId(user))  # (every session is in general)
        counts = await self.rooms.member_counts(list(rooms), max_age_s=PRESENCE_COUNT_INTERVAL_S)
        small: list[str] = [r for r in rooms if counts.get(r, 0) <= self.settings.presence_room_limit]
        # The cached online counts are not dropped here: a count costs O(members) to compute,
        # and under session churn every transition would make every hello recompute it. They
        # are advisory and at most ONLINE_CACHE_S old; clients follow presence events anyway.
        await self.ephemeral.presence(small, user, name, status)

    async def heartbeats(self) -> None:
        """Loop: refresh the local sessions every third of the presence TTL."""
        interval = max(1.0, self.settings.presence_ttl / 3)
        while True:
            await asyncio.sleep(interval)
            await self.heartbeat_once()

    async def heartbeat_once(self) -> None:
        """Refresh every local session's TTL: O(1) Redis work per session, whatever its rooms."""
        sessions = [(user, sid) for sid, (user, _) in self.local.items()]
        missing = await self.presence.heartbeat(sessions)
        METRICS.presence_heartbeats.inc(len(sessions))
        # Sessions Redis no longer has although they are still open here: the node was stalled
        # past the TTL (or Redis lost them) and the sweeper took the user offline. Start them
        # again (announcing the user online if that is a transition). Ended sessions are never
        # refreshed: the heartbeat only touches live entries, and started() ends a session that
        # closed while it ran.
        restarts = asyncio.Semaphore(RESTART_CONCURRENCY)  # many at once after a long stall

        async def restart(sid: str) -> None:
            local = self.local.get(sid)
            if local is None:
                return
            async with restarts:
                try:
                    await self.started(UserId(local[0]), local[1], sid, True)
                except RateLimited:
                    pass  # the user has as many sessions elsewhere now; this one stays unlisted

        await concurrently(*(restart(sid) for _, sid in missing))

    async def sweeper(self) -> None:
        """Loop: users whose sessions all expired (their node died) go offline, announced once."""
        interval = max(1.0, min(5.0, self.settings.presence_ttl / 6))
        while True:
            await asyncio.sleep(interval * (0.5 + random.random()))
            for shard in range(self.keys.shards):
                gone = await self.presence.sweep(shard)
                if not gone:
                    continue
                names = await self.presence.names(gone)
                for user in gone:
                    self.jobs.spawn(self._announce(user, names.get(user, user), "offline"), "presence-sweep")
