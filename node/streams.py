"""Room streams in Redis: creating rooms, appending messages atomically, history and replay.

Every command here touches the keys of one room only, which share the room's hash tag, so each
works unchanged on Redis Cluster. Appending is one Lua script: dedupe by ``cmid``, bump ``seq``,
``XADD`` with approximate ``MAXLEN`` trimming (and ``MINID`` by age), remember ``last_id`` -- all or nothing.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from redis.asyncio.cluster import RedisCluster

from .autopipe import AppendPipe
from .durable import DurableAppend
from .edits import LUA_NOTE_APPENDED, fill_holes
from .errors import Forbidden, NotFound
from .keys import Keys, RoomId, StreamId
from .protocol import MAX_STREAM_PART, entry_seq, stream_id_tuple
from .redisio import as_str, concurrently, unavailable_on_redis_errors
from .webhooks import Outbox, outbox_xadd

# KEYS: stream, meta, cmid-key, members.  ARGV: maxlen, user, name, text, cmid, kind, cmid_ttl,
# max_age_ms (0 = off), '1' if the cmid is the client's ('' if the node made it up), '1' if the
# author must be a member (checked here, atomically, when the node trusted its own cache).
# Webhooks: KEYS[5] the shard's outbox, ARGV[11] its maxlen ('0': off), ARGV[12] the room id
# (node.webhooks: the outbox references the new entry, written in the same step).
# Age trimming is relative to the new entry's id (Redis's clock, like the
# ids), so a node's clock never decides what is old. XADD takes one trim strategy, hence XTRIM.
# Every append carries a dedupe key: the client's cmid, or one the node made up, so that a
# command retried after a lost connection (see redisio.retry_policy) never appends twice.
# A repeated cmid rewrites its key's expiry (see node.durable: CHAT_REDIS_WAIT_REPLICAS).
APPEND_LUA = LUA_NOTE_APPENDED + """
local prev = redis.call('GET', KEYS[3])
if prev then
  -- A write replicated after the first append: a WAIT that follows covers that append too.
  redis.call('EXPIRE', KEYS[3], ARGV[7])
  return {0, prev}
end
if redis.call('HEXISTS', KEYS[2], 'epoch') == 0 then return {-1, ''} end
if ARGV[10] == '1' and redis.call('SISMEMBER', KEYS[4], ARGV[2]) == 0 then return {-2, ''} end
local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
local fields = {'f', ARGV[2], 'n', ARGV[3], 't', ARGV[4], 's', seq}
if ARGV[9] == '1' then fields[#fields + 1] = 'c'; fields[#fields + 1] = ARGV[5] end
if ARGV[6] ~= '' then fields[#fields + 1] = 'k'; fields[#fields + 1] = ARGV[6] end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(fields))
note_appended(KEYS[1], KEYS[2], id, ARGV[8])
redis.call('SET', KEYS[3], id .. ' ' .. seq, 'EX', ARGV[7])
""" + outbox_xadd("KEYS[5]", "ARGV[11]", "'r'", "ARGV[12]", "'i'", "id") + """
return {1, id .. ' ' .. seq}
"""

# KEYS: meta.  ARGV: epoch, kind, name, owner, created_ms.  Returns the (possibly existing) epoch.
ENSURE_ROOM_LUA = """
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch then return epoch end
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'kind', ARGV[2], 'name', ARGV[3],
           'owner', ARGV[4], 'created', ARGV[5], 'seq', 0, 'last_id', '0-0')
return ARGV[1]
"""

class NotMember(Forbidden):
    """The append script found the author not a member (the node's view was stale)."""


# How long a node-made dedupe key lives: longer than any retry of the command that wrote it.
RETRY_DEDUPE_TTL_S = 60

META_FIELDS = ("epoch", "kind", "name", "owner", "seq", "last_id")

# KEYS: meta, members, roles of each room.  ARGV: user.  For each room, what a session opening
# needs of it: its metadata (META_FIELDS), its member count and the user's stored role ('' if
# none). One call per slot instead of three commands per room (their encoding, parsing and
# bookkeeping in the client is most of what a hello costs the node).
ROOM_FACTS_LUA = """
local out = {}
for i = 1, #KEYS, 3 do
  out[#out + 1] = {redis.call('HMGET', KEYS[i], 'epoch', 'kind', 'name', 'owner', 'seq', 'last_id'),
                   redis.call('SCARD', KEYS[i + 1]), redis.call('HGET', KEYS[i + 2], ARGV[1]) or ''}
end
return out
"""


@dataclass(frozen=True, slots=True)
class RoomFacts:
    """What :meth:`RoomStreams.room_facts` read of one room."""

    meta: RoomMeta | None
    members: int  # SCARD of the member set (not meaningful for ``general``, a HyperLogLog)
    stored_role: str  # the user's role as stored for the room ('' if none)


def new_epoch() -> str:
    return secrets.token_urlsafe(6)


@dataclass(frozen=True, slots=True)
class RoomMeta:
    room: RoomId
    epoch: str
    kind: str
    name: str
    owner: str
    seq: int
    last_id: StreamId


@dataclass(frozen=True, slots=True)
class Appended:
    id: StreamId
    seq: int
    duplicate: bool
    # CHAT_REDIS_WAIT_REPLICAS > 0: whether that many replicas confirmed the append (None: off).
    durable: bool | None = None

    @property
    def ts(self) -> int:
        return int(self.id.partition("-")[0])


def room_summary(meta: RoomMeta, last_id: str, unread: int, members: int, online: int) -> dict[str, Any]:
    return {"id": meta.room, "name": meta.name, "kind": meta.kind, "epoch": meta.epoch,
            "last_id": last_id, "seq": meta.seq, "unread": unread,
            "members": members, "online": online}


def room_gap_event(meta: RoomMeta, last_id: str) -> dict[str, Any]:
    """Tells a client that it missed messages of a room it cannot be given: reload with history."""
    return {"type": "room", "change": "updated", "recovered": False,
            "room": room_summary(meta, last_id, 0, 0, 0)}



class RoomStreams:
    """Room data access for one node. Never holds state of its own besides the script handles."""

    def __init__(self, redis: Any, keys: Keys, *, maxlen: int, cmid_ttl_s: int,
                 max_age_s: float = 0.0, wait_replicas: int = 0, outbox: Outbox | None = None) -> None:
        self.redis = redis
        self.keys = keys
        # The webhook outbox the scripts write to (node.webhooks); maxlen 0: webhooks off.
        self.outbox = outbox if outbox is not None else Outbox(keys)
        self.maxlen = maxlen
        self.max_age_ms = int(max_age_s * 1000)  # CHAT_HISTORY_MAX_AGE; 0: no age trimming
        self.cmid_ttl_s = cmid_ttl_s
        self._append = redis.register_script(APPEND_LUA)
        # CHAT_REDIS_WAIT_REPLICAS: appends followed by WAIT on their connection (node.durable).
        self._durable = DurableAppend(redis, self._append, wait_replicas) if wait_replicas > 0 else None
        self._pipe = AppendPipe(redis, self._append)
        self._ensure = redis.register_script(ENSURE_ROOM_LUA)
        self._facts = redis.register_script(ROOM_FACTS_LUA)
        self._cluster = isinstance(redis, RedisCluster)  # scripts: one slot (shard) per call

    @property
    def ordered(self) -> bool:
        """Appends submitted in order are appended in order without waiting for each other (the
        auto-pipeline); not with CHAT_REDIS_WAIT_REPLICAS, whose WAIT follows each append."""
        return self._durable is None

    async def aclose(self) -> None:
        """At shutdown: the auto-pipeline, and the per-master clients of CHAT_REDIS_WAIT_REPLICAS."""
        await self._pipe.aclose()
        if self._durable is not None:
            await self._durable.aclose()

    async def ensure_room(self, room: str, kind: str, name: str, owner: str = "", created_ms: int = 0) -> str:
        """Create the room's metadata (and epoch) if missing; returns the epoch in force."""
        with unavailable_on_redis_errors("ensure_room"):
            epoch = await self._ensure(
                keys=[self.keys.room_meta(room)],
                args=[new_epoch(), kind, name, owner, created_ms],
            )
        return as_str(epoch)

    async def meta(self, room: str) -> RoomMeta | None:
        with unavailable_on_redis_errors("room_meta"):
            values = await self.redis.hmget(self.keys.room_meta(room), META_FIELDS)
        return self._meta(room, values)

    async def metas(self, rooms: list[str]) -> dict[str, RoomMeta | None]:
        """Metadata of many rooms in one pipeline (split per slot by the cluster client)."""
        if not rooms:
            return {}
        with unavailable_on_redis_errors("room_meta"):
            pipe = self.redis.pipeline(transaction=False)
            for room in rooms:
                pipe.hmget(self.keys.room_meta(room), META_FIELDS)
            results = await pipe.execute()
        return {room: self._meta(room, values) for room, values in zip(rooms, results, strict=True)}

    async def room_facts(self, rooms: list[str], user: str) -> dict[str, RoomFacts]:
        """:class:`RoomFacts` of many rooms for ``user``: one script call (one per shard on
        Redis Cluster, concurrently)."""
        if not rooms:
            return {}
        k = self.keys
        groups: dict[int, list[str]] = {}
        for room in rooms:
            groups.setdefault(k.room_shard(room) if self._cluster else 0, []).append(room)

        async def read(group: list[str]) -> list[Any]:
            keys = [key for room in group for key in (k.room_meta(room), k.room_members(room), k.room_roles(room))]
            return list(await self._facts(keys=keys, args=[user]))

        with unavailable_on_redis_errors("room_meta"):
            replies = await concurrently(*(read(group) for group in groups.values()))
        out: dict[str, RoomFacts] = {}
        for group, reply in zip(groups.values(), replies, strict=True):
            for room, (values, members, role) in zip(group, reply, strict=True):
                out[room] = RoomFacts(self._meta(room, values), int(members), as_str(role))
        return out

    @staticmethod
    def _meta(room: str, values: list[Any]) -> RoomMeta | None:
        if not values or values[0] is None:
            return None
        epoch, kind, name, owner, seq, last_id = (as_str(v) if v is not None else "" for v in values)
        return RoomMeta(RoomId(room), epoch, kind or "open", name or room, owner,
                        int(seq or 0), StreamId(last_id or "0-0"))

    async def append(self, room: str, user: str, name: str, text: str, cmid: str | None,
                     kind: str = "", check_member: bool = False) -> Appended:
        """Append one message; a repeated ``cmid`` returns the first result and appends nothing.

        Without a client ``cmid`` the node makes one up (kept briefly, never shown to clients):
        the pool retries a command whose connection broke, and the retry must not append twice.
        With ``check_member`` the script refuses (:class:`NotMember`) an author who is not a
        member of the room: the node may then skip its own membership round trip.
        """
        own = cmid or "~" + secrets.token_hex(8)
        keys = [
            self.keys.room_stream(room),
            self.keys.room_meta(room),
            self.keys.room_cmid(room, user, own),
            self.keys.room_members(room),
            self.outbox.key(room),
        ]
        args = [self.maxlen, user, name, text, own, kind,
                self.cmid_ttl_s if cmid else RETRY_DEDUPE_TTL_S, self.max_age_ms, "1" if cmid else "",
                "1" if check_member else "", self.outbox.arg, room]
        durable: bool | None = None
        with unavailable_on_redis_errors("append"):
            if self._durable is None:
                # Queued synchronously: appends submitted in order are appended in that order.
                status, payload = await self._pipe.submit(keys, args)
            else:
                (status, payload), durable = await self._durable(keys, args)
        if int(status) == -1:
            raise NotFound("no such room")
        if int(status) == -2:
            raise NotMember("not a member of the room")
        sid, _, seq = as_str(payload).partition(" ")
        return Appended(StreamId(sid), int(seq), duplicate=int(status) == 0, durable=durable)

    async def last_ids(self, rooms: list[str]) -> dict[str, StreamId]:
        """The newest entry id of each room's stream (``0-0`` if empty), one pipeline."""
        if not rooms:
            return {}
        with unavailable_on_redis_errors("last_id"):
            pipe = self.redis.pipeline(transaction=False)
            for room in rooms:
                pipe.xrevrange(self.keys.room_stream(room), "+", "-", count=1)
            results = await pipe.execute()
        out: dict[str, StreamId] = {}
        for room, entries in zip(rooms, results, strict=True):
            out[room] = StreamId(as_str(entries[0][0])) if entries else StreamId("0-0")
        return out

    async def history(self, room: str, *, before: str | None, after: str | None,
                      limit: int) -> tuple[list[tuple[bytes, dict[bytes, bytes]]], bool]:
        """A page of messages, oldest first, and whether more exist beyond it.

        ``before``/``after`` are exclusive. Without either, the newest ``limit`` messages.
        """
        key = self.keys.room_stream(room)
        # Nothing is before the first possible id or after the last: Redis refuses those
        # exclusive bounds ("invalid ID for the interval"), the answer is an empty page.
        if before is not None and stream_id_tuple(before) == (0, 0):
            return [], False
        if after is not None and stream_id_tuple(after) == (MAX_STREAM_PART, MAX_STREAM_PART):
            return [], False
        with unavailable_on_redis_errors("history"):
            if after is not None:
                entries = await self.redis.xrange(key, "(" + after, "+", count=limit + 1)
                more = len(entries) > limit
                return entries[:limit], more
            start = "(" + before if before is not None else "+"
            entries = await self.redis.xrevrange(key, start, "-", count=limit + 1)
        more = len(entries) > limit
        page = entries[:limit]
        page.reverse()
        return page, more

    async def replay_range(self, room: str, cursor: str, upto: str,
                           limit: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Entries from ``cursor`` (inclusive, to prove continuity) up to ``upto`` (inclusive).

        Returns at most ``limit + 2`` entries; :func:`node.resume.plan_replay` decides.
        """
        with unavailable_on_redis_errors("replay"):
            entries = await self.redis.xrange(self.keys.room_stream(room), cursor, upto, count=limit + 2)
        results = {room: entries}
        await fill_holes(self.redis, self.keys, {room: (cursor, upto)}, results)  # edits/deletes
        return results[room]

    async def replay_ranges(self, ranges: dict[str, tuple[str, str]],
                            limit: int) -> dict[str, list[tuple[bytes, dict[bytes, bytes]]]]:
        """:meth:`replay_range` of many rooms (room -> (cursor, upto)) in one pipeline."""
        if not ranges:
            return {}
        with unavailable_on_redis_errors("replay"):
            pipe = self.redis.pipeline(transaction=False)
            for room, (cursor, upto) in ranges.items():
                pipe.xrange(self.keys.room_stream(room), cursor, upto, count=limit + 2)
            results = await pipe.execute()
        out = dict(zip(ranges, results, strict=True))
        await fill_holes(self.redis, self.keys, ranges, out)  # cursors removed by edits/deletes
        return out

    async def seqs_at(self, positions: dict[str, str]) -> dict[str, int]:
        """The ``seq`` of the entry at each room's position (one pipelined XRANGE each), so that
        a room's ``seq`` and ``last_id`` describe the same message. Rooms whose entry is gone
        (trimmed) or at ``0-0`` are left out."""
        rooms = [room for room, sid in positions.items() if sid != "0-0"]
        if not rooms:
            return {}
        with unavailable_on_redis_errors("seq_at"):
            pipe = self.redis.pipeline(transaction=False)
            for room in rooms:
                pipe.xrange(self.keys.room_stream(room), positions[room], positions[room], count=1)
            results = await pipe.execute()
        return {room: entry_seq(entries[0][1])
                for room, entries in zip(rooms, results, strict=True) if entries}

    async def seq_at(self, room: str, sid: str, meta: RoomMeta) -> int:
        """The room's ``seq`` as of message ``sid``: exact even if ``sid`` was trimmed away."""
        if stream_id_tuple(sid) >= stream_id_tuple(meta.last_id):
            return meta.seq
        key = self.keys.room_stream(room)
        with unavailable_on_redis_errors("seq_at"):
            exact = await self.redis.xrange(key, sid, sid, count=1)
            if exact:
                return entry_seq(exact[0][1])
            after = await self.redis.xrange(key, "(" + sid, "+", count=1)
        if after:
            seq = after[0][1].get(b"s")  # an edit or delete entry's q counts no message of its own
            return max(0, int(seq) - 1) if seq is not None else entry_seq(after[0][1])
        return meta.seq
