"""Ephemeral room events (typing, presence, read receipts): never in history, never replayed.

They travel through one short capped stream per virtual shard (``Keys.shard_ephemeral``), which
every node already reads in the same ``XREAD`` as that shard's room streams. That gives typing
and presence across nodes with no Pub/Sub connection, and it works on Redis Cluster: the typing
throttle key, the room and the shard's ephemeral stream share one hash tag, so the throttle and
the append are one script in one slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from .fanout import Entry, Topic
from .keys import Keys
from .metrics import METRICS
from .protocol import ws_text_frame
from .redisio import unavailable_on_redis_errors

EPH_MAXLEN = 2000
# Presence transitions announced by a node within this window share one entry per shard.
PRESENCE_BATCH_S = 0.05

# KEYS: gate, eph.  ARGV: interval_ms, room, user, name, maxlen.  1 if published, 0 if throttled.
TYPING_LUA = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'k', 'typing', 'r', ARGV[2], 'u', ARGV[3], 'n', ARGV[4])
return 1
"""


# KEYS: members, receipt gate, eph.  ARGV: kind, receipts room limit, room, user, name, read_id,
# maxlen, gate ttl (ms).  1 if published; 0 if the room is too big or the marker was announced.
RECEIPT_LUA = """
if ARGV[1] ~= 'direct' and redis.call('SCARD', KEYS[1]) > tonumber(ARGV[2]) then return 0 end
if redis.call('GET', KEYS[2]) == ARGV[6] then return 0 end
redis.call('SET', KEYS[2], ARGV[6], 'PX', ARGV[8])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'k', 'receipt', 'r', ARGV[3], 'u', ARGV[4], 'n', ARGV[5],
           'i', ARGV[6])
return 1
"""
RECEIPT_GATE_MS = 600_000


class EphemeralTopic(Topic):
    """The shard's ephemeral stream: each entry is routed to the local sinks of its room(s).

    ``route(room)`` returns the room's topic on this node, if any.
    """

    __slots__ = ("route",)

    def __init__(self, key: str, shard: int, pos: str, route: Callable[[str], Topic | None]) -> None:
        super().__init__(key, shard, f"eph:{shard}", pos, _no_encoder, "", "ephemeral")
        self.route = route

    def deliver(self, entries: list[Entry], now_ms: float) -> int:
        delivered = 0
        for raw_id, fields in entries:
            self.pos = raw_id.decode()
            if fields.get(b"k") == b"presences":  # a node's batch: [[rooms, user, name, status], ...]
                try:
                    batch = orjson.loads(fields.get(b"p", b"[]"))
                except orjson.JSONDecodeError:
                    continue
                for item in batch if isinstance(batch, list) else ():
                    if isinstance(item, list) and len(item) == 4 and all(isinstance(x, str) for x in item):
                        rooms, user, name, status = item
                        delivered += self._deliver(b"presence", rooms, user, name, {"status": status})
                continue
            delivered += self._deliver(fields.get(b"k", b""), fields.get(b"r", b"").decode(),
                                       fields.get(b"u", b"").decode(), fields.get(b"n", b"").decode(),
                                       {"status": fields.get(b"s", b"").decode(),
                                        "read_id": fields.get(b"i", b"").decode()})
        if delivered:
            METRICS.messages_delivered.inc(delivered)
        return delivered

    def _deliver(self, kind: bytes, rooms: str, user: str, name: str, extra: dict[str, str]) -> int:
        delivered = 0
        for room in rooms.split(","):
            topic = self.route(room)
            if topic is None or not topic.sinks:
                continue
            if kind == b"typing":
                event: dict[str, Any] = {"type": "typing", "room": room, "user": {"id": user, "name": name}}
                skip = user  # never echoed to the typist's own sessions
            elif kind == b"presence":
                event = {"type": "presence", "room": room, "user": {"id": user, "name": name},
                         "status": extra["status"]}
                skip = ""
            elif kind == b"receipt":
                event = {"type": "receipt", "room": room, "user": {"id": user, "name": name},
                         "read_id": extra["read_id"]}
                skip = user  # never for one's own reads
            else:
                continue
            frame = ws_text_frame(orjson.dumps(event))
            for sink in topic.sinks:
                if sink.owner != skip and sink.takes_ephemeral:
                    sink.push(frame)
                    delivered += 1
        return delivered


def _no_encoder(topic: Topic, sid: str, fields: dict[bytes, bytes]) -> None:
    return None


def start_position() -> str:
    """Where a node starts reading a shard's ephemeral stream: now (nothing old is replayed)."""
    return f"{int(time.time() * 1000)}-0"


class Ephemeral:
    def __init__(self, redis: Any, keys: Keys, typing_interval_ms: int) -> None:
        self.redis = redis
        self.keys = keys
        self.typing_interval_ms = typing_interval_ms
        self._typing = redis.register_script(TYPING_LUA)
        self._receipt = redis.register_script(RECEIPT_LUA)
        self._presences: list[tuple[list[str], str, str, str]] | None = None  # the batch filling now
        self._presences_sent: asyncio.Future[None] | None = None

    async def typing(self, room: str, user: str, name: str) -> bool:
        """Publish a typing event unless the user typed in this room within the interval."""
        with unavailable_on_redis_errors("typing"):
            published = await self._typing(
                keys=[self.keys.room_typing_gate(room, user), self.keys.shard_ephemeral(self.keys.room_shard(room))],
                args=[self.typing_interval_ms, room, user, name, EPH_MAXLEN],
            )
        return bool(int(published))

    async def receipt(self, room: str, kind: str, user: str, name: str, read_id: str, room_limit: int) -> bool:
        """Tell the room's other members that ``user`` read up to ``read_id``: ``direct`` rooms
        and rooms of at most ``room_limit`` members (CHAT_RECEIPTS_ROOM_LIMIT), each marker once.
        Never in ``general``."""
        if kind == "general":
            return False
        k = self.keys
        with unavailable_on_redis_errors("receipt"):
            published = await self._receipt(
                keys=[k.room_members(room), k.room_receipt_gate(room, user), k.shard_ephemeral(k.room_shard(room))],
                args=[kind, room_limit, room, user, name, read_id, EPH_MAXLEN, RECEIPT_GATE_MS],
            )
        return bool(int(published))

    async def presence(self, rooms: list[str], user: str, name: str, status: str) -> None:
        """Announce a presence transition to ``rooms``; returns once it is in Redis.

        The node's transitions of one PRESENCE_BATCH_S window go out together, one entry per
        shard in one pipeline: under session churn every node's shard readers then wake once
        per batch instead of once per user and shard. A lone transition is written as a plain
        ``presence`` entry, a batch as ``presences`` (older nodes skip that kind)."""
        if not rooms:
            return
        if self._presences is not None and self._presences_sent is not None:
            self._presences.append((rooms, user, name, status))
            await asyncio.shield(self._presences_sent)
            return
        batch = self._presences = [(rooms, user, name, status)]
        sent = self._presences_sent = asyncio.get_running_loop().create_future()
        try:
            try:
                await asyncio.sleep(PRESENCE_BATCH_S)
            finally:
                self._presences = self._presences_sent = None
            await self._write_presences(batch)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                sent.cancel()
            else:
                sent.set_exception(exc)
                sent.exception()  # retrieved: every waiter gets it, nobody logs it as lost
            raise
        sent.set_result(None)

    async def _write_presences(self, batch: list[tuple[list[str], str, str, str]]) -> None:
        by_shard: dict[int, list[list[str]]] = {}
        for rooms, user, name, status in batch:
            mine: dict[int, list[str]] = {}
            for room in rooms:
                mine.setdefault(self.keys.room_shard(room), []).append(room)
            for shard, shard_rooms in mine.items():
                by_shard.setdefault(shard, []).append([",".join(shard_rooms), user, name, status])
        with unavailable_on_redis_errors("presence_event"):
            pipe = self.redis.pipeline(transaction=False)
            for shard, items in by_shard.items():
                fields: dict[str, str | bytes]
                if len(items) == 1:
                    fields = {"k": "presence", "r": items[0][0], "u": items[0][1], "n": items[0][2],
                              "s": items[0][3]}
                else:
                    fields = {"k": "presences", "p": orjson.dumps(items)}
                pipe.xadd(self.keys.shard_ephemeral(shard), fields, maxlen=EPH_MAXLEN, approximate=True)
            await pipe.execute()
