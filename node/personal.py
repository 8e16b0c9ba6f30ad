"""Personal streams: one capped stream per user for alerts, room membership events and
read-marker sync, with its own epoch and a "delivered up to" marker.

Entries store the event JSON (without ``pid``) in field ``d``; the event sent to clients is that
JSON with ``"pid": <stream id>`` added, which is the client's personal cursor. ``pdel`` in the
user's metadata is the newest personal id delivered to any session: a ``hello`` without a
personal cursor replays after it, so an alert sent while the user was offline arrives at the
next login exactly once.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import orjson

from .fanout import Entry, Topic
from .keys import Keys
from .protocol import stream_id_tuple
from .redisio import as_str, unavailable_on_redis_errors
from .streams import new_epoch

# KEYS: inbox, user-meta, dedupe-key.  ARGV: maxlen, json, new-epoch, dedupe ttl (s).
# The dedupe key makes a publish retried after a lost connection (redisio.retry_policy) return
# the first entry's id instead of appending the event twice.
PUBLISH_LUA = """
local prev = redis.call('GET', KEYS[3])
if prev then return prev end
if redis.call('HEXISTS', KEYS[2], 'pepoch') == 0 then redis.call('HSET', KEYS[2], 'pepoch', ARGV[3]) end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'd', ARGV[2])
redis.call('SET', KEYS[3], id, 'EX', ARGV[4])
return id
"""
PUBLISH_DEDUPE_TTL_S = 60

# KEYS: inbox, user-meta, optional user-rooms.  ARGV: new-epoch.
# Returns {epoch, pdel, last_id} and, with the rooms key, the user's rooms.
OPEN_LUA = """
local epoch = redis.call('HGET', KEYS[2], 'pepoch')
if not epoch then epoch = ARGV[1]; redis.call('HSET', KEYS[2], 'pepoch', epoch) end
local pdel = redis.call('HGET', KEYS[2], 'pdel') or '0-0'
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local last_id = '0-0'
if last[1] then last_id = last[1][1] end
if not KEYS[3] then return {epoch, pdel, last_id} end
local rooms = redis.call('SMEMBERS', KEYS[3])
if not KEYS[4] then return {epoch, pdel, last_id, rooms} end
local asked = {'general'}
for _, room in ipairs(rooms) do if room ~= 'general' then asked[#asked + 1] = room end end
return {epoch, pdel, last_id, rooms, asked, redis.call('HMGET', KEYS[4], unpack(asked)),
        redis.call('HMGET', KEYS[5], unpack(asked))}
"""

# KEYS: user-meta.  ARGV: id.  Moves pdel forward only.
DELIVERED_LUA = """
local cur = redis.call('HGET', KEYS[1], 'pdel')
if cur then
  local cm, cs = string.match(cur, '(%d+)-(%d+)')
  local nm, ns = string.match(ARGV[1], '(%d+)-(%d+)')
  cm, cs, nm, ns = tonumber(cm), tonumber(cs), tonumber(nm), tonumber(ns)
  if nm < cm or (nm == cm and ns <= cs) then return 0 end
end
redis.call('HSET', KEYS[1], 'pdel', ARGV[1])
return 1
"""



def personal_payload(sid: str, fields: dict[bytes, bytes]) -> bytes | None:
    """The client frame of one personal entry: its JSON with ``pid`` spliced in."""
    data = fields.get(b"d")
    if not data or not data.endswith(b"}"):
        return None
    return data[:-1] + b',"pid":"' + sid.encode() + b'"}'


class PersonalTopic(Topic):
    """A user's personal stream on this node: delivered like any topic, then ``after`` is called
    with the delivered events (membership changes to apply to the user's local sessions, and
    the "delivered up to" marker to move)."""

    __slots__ = ("after",)

    def __init__(self, key: str, shard: int, user: str, pos: str, epoch: str,
                 after: Any) -> None:
        super().__init__(key, shard, user, pos, _encode_personal, epoch, "personal")
        self.after = after

    def deliver(self, entries: list[Entry], now_ms: float) -> int:
        before = self.pos
        delivered = super().deliver(entries, now_ms)
        fresh = [(sid.decode(), fields) for sid, fields in entries
                 if stream_id_tuple(sid.decode()) > stream_id_tuple(before)]
        if fresh:
            self.after(self, fresh)
        return delivered


def _encode_personal(topic: Topic, sid: str, fields: dict[bytes, bytes]) -> bytes | None:
    return personal_payload(sid, fields)


class PersonalStreams:
    def __init__(self, redis: Any, keys: Keys, maxlen: int = 500) -> None:
        self.redis = redis
        self.keys = keys
        self.maxlen = maxlen
        self._publish = redis.register_script(PUBLISH_LUA)
        self._open = redis.register_script(OPEN_LUA)
        self._delivered = redis.register_script(DELIVERED_LUA)

    def _publish_call(self, user: str, payload: bytes) -> Any:
        keys = self.keys
        return self._publish(
            keys=[keys.user_inbox(user), keys.user_meta(user), keys.user_publish_dedupe(user, secrets.token_hex(8))],
            args=[self.maxlen, payload, new_epoch(), PUBLISH_DEDUPE_TTL_S])

    async def publish(self, user: str, event: dict[str, Any]) -> str:
        """Append an event (``type`` alert/room/unread...) to the user's personal stream."""
        with unavailable_on_redis_errors("personal"):
            sid = await self._publish_call(user, orjson.dumps(event))
        return as_str(sid)

    async def publish_many(self, users: list[str], event: dict[str, Any]) -> dict[str, str]:
        payload = orjson.dumps(event)

        async def one(user: str) -> Any:
            return await self._publish_call(user, payload)

        # Concurrent script calls rather than a pipeline: each user's keys are in its own slot.
        out: dict[str, str] = {}
        with unavailable_on_redis_errors("personal"):
            for i in range(0, len(users), 100):
                chunk = users[i:i + 100]
                ids = await asyncio.gather(*(one(u) for u in chunk))
                out.update({user: as_str(sid) for user, sid in zip(chunk, ids, strict=True)})
        return out

    async def open_with_rooms(self, user: str) -> tuple[str, str, str, list[str]]:
        """(epoch, delivered-up-to id, newest id) of the user's personal stream, and the user's
        rooms (the set, unordered) in the same step: both are the user's keys, so one script
        reads them at one instant. A membership change is
        written before its personal event, so a change missing from these rooms has its event
        after the newest id returned."""
        with unavailable_on_redis_errors("personal"):
            epoch, pdel, last_id, rooms = await self._open(
                keys=[self.keys.user_inbox(user), self.keys.user_meta(user), self.keys.user_rooms(user)],
                args=[new_epoch()])
        return as_str(epoch), as_str(pdel), as_str(last_id), [as_str(r) for r in rooms]

    async def open_for_session(self, user: str) -> tuple[str, str, str, list[str], dict[str, tuple[Any, Any]]]:
        """:meth:`open_with_rooms`, and the user's read marker and mentions of each of those rooms
        and ``general`` (room -> (raw marker, raw mentions)): what a welcome's unread and mention
        counts need, in the same script (all the user's keys)."""
        k = self.keys
        with unavailable_on_redis_errors("personal"):
            epoch, pdel, last_id, rooms, asked, reads, mentions = await self._open(
                keys=[k.user_inbox(user), k.user_meta(user), k.user_rooms(user), k.user_reads(user),
                      k.user_mentions(user)],
                args=[new_epoch()])
        markers = {as_str(room): (read, mentioned) for room, read, mentioned in zip(asked, reads, mentions, strict=True)}
        return as_str(epoch), as_str(pdel), as_str(last_id), [as_str(r) for r in rooms], markers

    async def mark_delivered(self, user: str, sid: str) -> None:
        with unavailable_on_redis_errors("personal"):
            await self._delivered(keys=[self.keys.user_meta(user)], args=[sid])

    async def range_after(self, user: str, after: str, upto: str,
                          limit: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Entries strictly after ``after`` up to ``upto`` inclusive, at most ``limit``."""
        if stream_id_tuple(after) >= stream_id_tuple(upto):
            return []
        with unavailable_on_redis_errors("personal"):
            return await self.redis.xrange(self.keys.user_inbox(user), "(" + after, upto, count=limit)

    async def newest_between(self, user: str, after: str, upto: str,
                             limit: int) -> tuple[list[tuple[bytes, dict[bytes, bytes]]], bool]:
        """The newest ``limit`` entries strictly after ``after`` up to ``upto``, oldest first,
        and whether that is all of them: False if more were waiting, or if entries after
        ``after`` may have been trimmed from the stream before anyone got them."""
        if stream_id_tuple(after) >= stream_id_tuple(upto):
            return [], True
        key = self.keys.user_inbox(user)
        with unavailable_on_redis_errors("personal"):
            pipe = self.redis.pipeline(transaction=False)
            pipe.xrevrange(key, upto, "(" + after, count=limit + 1)
            pipe.xinfo_stream(key)
            newest, info = await pipe.execute()
        complete = len(newest) <= limit
        entries = newest[:limit]
        entries.reverse()
        first = info.get("first-entry") if isinstance(info, dict) else None
        added, length = info.get("entries-added"), info.get("length")
        if first and added is not None and length is not None and int(added) > int(length):
            # Entries were trimmed (the oldest go first): any after the marker were lost.
            # The marker's own entry being the one just before the first retained one cannot be
            # told apart from a loss: the answer is then conservatively "incomplete".
            if stream_id_tuple(as_str(first[0])) > stream_id_tuple(after):
                complete = False
        return entries, complete

    async def first_id(self, user: str) -> str | None:
        with unavailable_on_redis_errors("personal"):
            first = await self.redis.xrange(self.keys.user_inbox(user), "-", "+", count=1)
        return as_str(first[0][0]) if first else None
