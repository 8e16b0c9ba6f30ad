"""Presence: who is online, kept by TTLs in Redis so that a dead node needs no clean-up.

Per user (all keys on the user's shard tag, so each script touches one slot):

* ``user_sessions`` -- sorted set session id -> expiry (ms). A session is alive while its expiry
  is in the future; heartbeats push it forward.
* ``online_index[shard]`` -- sorted set user -> expiry (ms) of that shard's online users, used for
  ``who`` in the general room, online counts and the sweeper.

A heartbeat is two ZADDs and a PEXPIRE per session, whatever the number of rooms the user is in,
batched into one script per user shard. ``presence`` events are
emitted only on transitions: the first session coming (start returns 1) and the last one going
(end returns 1, or the sweeper finds the user expired because their node died).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

from .errors import RateLimited
from .keys import Keys
from .protocol import now_ms
from .redisio import as_str, concurrently, unavailable_on_redis_errors

# KEYS: sessions, online-index, user-meta.  ARGV: session, expiry_ms, now_ms, name, user,
# most live WebSocket sessions of the user (0: no limit). -1: refused (that many live already).
START_LUA = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local limit = tonumber(ARGV[6])
if limit > 0 and redis.call('ZSCORE', KEYS[1], ARGV[1]) == false then
  local live = 0
  for _, s in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if string.sub(s, 1, 2) ~= 'p:' then live = live + 1 end
  end
  if live >= limit then return -1 end
end
local before = redis.call('ZCARD', KEYS[1])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[1], 86400000)
local cur = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[5]) or '0')
if tonumber(ARGV[2]) > cur then redis.call('ZADD', KEYS[2], ARGV[2], ARGV[5]) end
redis.call('HSET', KEYS[3], 'name', ARGV[4])
if before == 0 then
  redis.call('HSET', KEYS[3], 'online_since', ARGV[3])
  return 1
end
return 0
"""

# The sessions key outlives its newest entry by far; entries expire by their scores.
SESSIONS_KEY_TTL_MS = 86_400_000

# KEYS: sessions, online-index, user-meta.  ARGV: session, now_ms, user
# Returns 0 if the user still has sessions, else the time (ms) they came online (-1 unknown).
END_LUA = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2])
local left = redis.call('ZCARD', KEYS[1])
if left == 0 then
  local removed = redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('HSET', KEYS[3], 'last_seen', ARGV[2])
  if removed == 0 then return 0 end
  return tonumber(redis.call('HGET', KEYS[3], 'online_since') or '-1')
end
local newest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('ZADD', KEYS[2], newest[2], ARGV[3])
return 0
"""

# KEYS: online-index.  ARGV: now_ms, batch, key prefix of the shard's user keys, sessions suffix,
# meta suffix (Keys.user_key_prefix: key shapes live in node.keys only).
# Removes the users whose every session expired and returns them: each such user is reported by
# exactly one caller, whichever node's sweeper gets there first.
SWEEP_LUA = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local gone = {}
for _, user in ipairs(expired) do
  local skey = ARGV[3] .. user .. ARGV[4]
  redis.call('ZREMRANGEBYSCORE', skey, '-inf', ARGV[1])
  local newest = redis.call('ZRANGE', skey, -1, -1, 'WITHSCORES')
  if newest[2] then
    redis.call('ZADD', KEYS[1], newest[2], user)
  else
    redis.call('ZREM', KEYS[1], user)
    redis.call('HSET', ARGV[3] .. user .. ARGV[5], 'last_seen', ARGV[1])
    gone[#gone + 1] = user
  end
end
return gone
"""


# KEYS: online-index of one user shard, then the sessions set of each pair.
# ARGV: expiry_ms, sessions-key TTL (ms), then session, user for each pair (same order as KEYS).
# One script per user shard and batch: a heartbeat of N local sessions costs the node about
# N/HEARTBEAT_BATCH round trips instead of 3N pipelined commands to encode and parse, which on a
# node with thousands of sessions was a stall of tens of milliseconds in the middle of fan-out.
# Only sessions Redis still has are refreshed (ZADD XX): a session that ended between the
# node's snapshot and this script must not be written back (it would show its user online for
# another TTL, then go offline a second time through the sweeper). Returns the positions (1-based)
# of the sessions not found, so the node can start the ones that are in fact still open.
HEARTBEAT_LUA = """
local expiry = ARGV[1]
local ttl = ARGV[2]
local missing = {}
for i = 2, #KEYS do
  local j = 1 + (i - 1) * 2
  if redis.call('ZADD', KEYS[i], 'XX', 'CH', expiry, ARGV[j]) == 1
     or redis.call('ZSCORE', KEYS[i], ARGV[j]) then
    redis.call('PEXPIRE', KEYS[i], ttl)
    redis.call('ZADD', KEYS[1], 'GT', expiry, ARGV[j + 1])
  else
    missing[#missing + 1] = i - 1
  end
end
return missing
"""

# Sessions per heartbeat script: small enough that neither the node (encoding) nor Redis (running
# it) blocks for more than a fraction of a millisecond.
HEARTBEAT_BATCH = 100
HEARTBEAT_CONCURRENCY = 8  # heartbeat scripts in flight at once



class Presence:
    def __init__(self, redis: Any, keys: Keys, ttl_s: int) -> None:
        self.redis = redis
        self.keys = keys
        self.ttl_ms = ttl_s * 1000
        self._start = redis.register_script(START_LUA)
        self._end = redis.register_script(END_LUA)
        self._sweep = redis.register_script(SWEEP_LUA)
        self._heartbeat = redis.register_script(HEARTBEAT_LUA)
        self.heartbeat_scripts = 0

    def _keys(self, user: str) -> list[str]:
        k = self.keys
        return [k.user_sessions(user), k.online_index(k.user_shard(user)), k.user_meta(user)]

    async def start(self, user: str, name: str, session: str, ttl_ms: int | None = None,
                    max_ws_sessions: int = 0) -> bool:
        """Register a session; True if it is the user's first live one (they came online).

        With ``max_ws_sessions`` (CHAT_MAX_CONNECTIONS_PER_USER) a new WebSocket session is
        refused (:class:`RateLimited`) when the user already has that many live ones on any node
        (poll sessions, ``p:...``, do not count): checked and added in one script, so two hellos
        racing on two nodes cannot both pass."""
        now = now_ms()
        with unavailable_on_redis_errors("presence"):
            first = int(await self._start(keys=self._keys(user),
                                          args=[session, now + (ttl_ms or self.ttl_ms), now, name, user,
                                                max_ws_sessions]))
        if first < 0:
            raise RateLimited(f"at most {max_ws_sessions} connections per user", limit="connections_per_user")
        return bool(first)

    async def heartbeat(self, sessions: list[tuple[str, str]], ttl_ms: int | None = None) -> list[tuple[str, str]]:
        """Refresh many (user, session) pairs: one script per user shard and batch of
        HEARTBEAT_BATCH, each two ZADDs and a PEXPIRE per session whatever the number of rooms
        the user is in. All keys of a batch share the shard's hash tag (Redis Cluster safe).
        Sessions Redis no longer has (ended, or expired and swept) are not recreated; they are
        returned. ``self.heartbeat_scripts`` counts the scripts run."""
        if not sessions:
            return []
        expiry = now_ms() + (ttl_ms or self.ttl_ms)
        k = self.keys
        by_shard: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for user, session in sessions:
            by_shard[k.user_shard(user)].append((user, session))
        missing: list[tuple[str, str]] = []
        # Several scripts in flight at once: a pass over tens of thousands of sessions must
        # finish well within the TTL even when each round trip is slow (a loaded Redis).
        inflight = asyncio.Semaphore(HEARTBEAT_CONCURRENCY)

        async def beat(index: str, batch: list[tuple[str, str]]) -> None:
            keys = [index] + [k.user_sessions(user) for user, _ in batch]
            args: list[Any] = [expiry, SESSIONS_KEY_TTL_MS]
            for user, session in batch:
                args += (session, user)
            async with inflight:
                gone = await self._heartbeat(keys=keys, args=args)
            self.heartbeat_scripts += 1
            missing.extend(batch[int(i) - 1] for i in gone or [])

        with unavailable_on_redis_errors("heartbeat"):
            await concurrently(*(beat(k.online_index(shard), pairs[i:i + HEARTBEAT_BATCH])
                                 for shard, pairs in by_shard.items()
                                 for i in range(0, len(pairs), HEARTBEAT_BATCH)))
        return missing

    async def end(self, user: str, session: str) -> int | None:
        """Drop a session. If it was the user's last one (they went offline), how long they had
        been online in ms (-1 if unknown); None if they are still online."""
        now = now_ms()
        with unavailable_on_redis_errors("presence"):
            since = int(await self._end(keys=self._keys(user), args=[session, now, user]))
        if since == 0:
            return None
        return -1 if since < 0 else now - since

    async def sweep(self, shard: int, batch: int = 500) -> list[str]:
        """Users of ``shard`` whose sessions all expired (their node died): now offline."""
        prefix = self.keys.user_key_prefix(shard)
        with unavailable_on_redis_errors("sweep"):
            gone = await self._sweep(keys=[self.keys.online_index(shard)],
                                     args=[now_ms(), batch, prefix, Keys.SESSIONS_SUFFIX, Keys.META_SUFFIX])
        return [as_str(u) for u in gone]

    async def online_users(self, users: list[str]) -> dict[str, bool]:
        """Which of ``users`` are online now (one ZMSCORE per user shard)."""
        if not users:
            return {}
        by_shard: dict[int, list[str]] = defaultdict(list)
        for user in users:
            by_shard[self.keys.user_shard(user)].append(user)
        now = now_ms()
        out: dict[str, bool] = {}
        with unavailable_on_redis_errors("presence"):
            pipe = self.redis.pipeline(transaction=False)
            shards = list(by_shard)
            for shard in shards:
                pipe.zmscore(self.keys.online_index(shard), by_shard[shard])
            results = await pipe.execute()
        for shard, scores in zip(shards, results, strict=True):
            for user, score in zip(by_shard[shard], scores, strict=True):
                out[user] = score is not None and float(score) > now
        return out

    async def online_everyone(self, limit: int) -> tuple[list[str], int]:
        """Online users of the whole cluster (the general room): up to ``limit`` ids, and the count."""
        now = now_ms()
        with unavailable_on_redis_errors("presence"):
            pipe = self.redis.pipeline(transaction=False)
            for shard in range(self.keys.shards):
                pipe.zrangebyscore(self.keys.online_index(shard), now, "+inf", start=0, num=limit)
                pipe.zcount(self.keys.online_index(shard), now, "+inf")
            results = await pipe.execute()
        users: list[str] = []
        count = 0
        for i in range(self.keys.shards):
            users.extend(as_str(u) for u in results[2 * i])
            count += int(results[2 * i + 1])
        users.sort()
        return users[:limit], count

    async def names(self, users: list[str]) -> dict[str, str]:
        """Display names last seen for ``users`` (one HGET each, pipelined)."""
        if not users:
            return {}
        with unavailable_on_redis_errors("presence"):
            pipe = self.redis.pipeline(transaction=False)
            for user in users:
                pipe.hget(self.keys.user_meta(user), "name")
            values = await pipe.execute()
        return {user: as_str(v) for user, v in zip(users, values, strict=True) if v is not None}

    async def status(self, user: str) -> tuple[bool, int | None]:
        """(online, last_seen ms or None)."""
        now = now_ms()
        with unavailable_on_redis_errors("presence"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.zcount(self.keys.user_sessions(user), now, "+inf")
            pipe.hget(self.keys.user_meta(user), "last_seen")
            live, last_seen = await pipe.execute()
        online = int(live) > 0
        return online, (None if online or last_seen is None else int(last_seen))
