"""Fan-out: shard readers pull stream entries from Redis, each entry is encoded once per node
and its frame is queued to every local subscriber without awaiting any of them.

Pieces (the sockets' side, :class:`~node.sink.Sink` and its flusher, is in :mod:`node.sink`):

* :class:`Topic` -- a stream key with local subscribers (a room, or a user's personal stream),
  the id up to which this node has delivered it, and how to encode its entries.
* :class:`ShardReader` -- one task per virtual shard with topics: a blocking multi-key ``XREAD``
  (COUNT-batched) over all of that shard's topics. When a topic is added, the blocked read is
  interrupted with ``CLIENT UNBLOCK`` and re-armed with the new key, from the position the topic
  was created at, so adding a room never opens a gap.
* :class:`Fanout` -- the registry (key -> topic) and the owner of the readers.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import redisio
from .keys import Keys
from .metrics import METRICS
from .pauses import PausePoints
from .protocol import Entry, dumps, message_event, stream_id_tuple, ws_text_frame
from .sink import Flusher, Sink
from .streams import RoomMeta, room_gap_event
from .supervise import ThrottledLog

log = logging.getLogger("chatcluster.fanout")
_errors = ThrottledLog(log)

# An encoder turns one stream entry into a frame payload, or (payload, user to skip) for events
# that must not reach the author's own sessions (typing), or None to deliver nothing.
Encoder = Callable[["Topic", str, dict[bytes, bytes]], "bytes | tuple[bytes, str] | None"]


async def _never_unblocked(client_id: int) -> bool:
    return False


def _encode_message(topic: Topic, sid: str, fields: dict[bytes, bytes]) -> bytes:
    return dumps(message_event(topic.name, sid, fields))


def _deleted_between(entries: list[Entry], last: int, seq: int) -> bool:
    """Whether every seq strictly between ``last`` and ``seq`` is a message deleted (``XDEL``ed,
    see :mod:`node.edits`) whose delete entry is in ``entries``: a hole, not a trimmed gap.
    A delete lands after its message, so when the reader finds the message gone its delete is
    in the same read (unless that read hit CHAT_READ_COUNT: then this says gap, conservatively)."""
    missing = seq - last - 1
    deleted = {int(f[b"ds"]) for _, f in entries if b"ds" in f}
    return missing <= len(deleted) and all(s in deleted for s in range(last + 1, seq))


class Topic:
    """A stream key this node reads because local sessions subscribe to it."""

    __slots__ = ("key", "shard", "name", "pos", "sinks", "encoder", "epoch", "kind", "seq", "meta", "pins")

    def __init__(self, key: str, shard: int, name: str, pos: str, encoder: Encoder,
                 epoch: str, kind: str, seq: int = -1, meta: RoomMeta | None = None) -> None:
        self.key = key
        self.shard = shard
        self.name = name  # room id, or user id for a personal stream
        self.pos = pos  # the newest id delivered to this topic's sinks
        self.sinks: set[Sink] = set()
        self.encoder = encoder
        self.epoch = epoch
        self.kind = kind  # "room" or "personal"
        # Room topics: the seq of the message at ``pos`` (-1: unknown). Messages carry
        # consecutive seqs, so a jump means the reader fell behind the trimmed history and
        # entries were lost between two reads: the sinks are told (recovered: false).
        self.seq = seq
        self.meta = meta
        # Holders that keep the topic read with no sink (a polling client between two polls,
        # see node.poll.PollCache): the node's position stays known, so an idle poll needs
        # no Redis read to know nothing happened.
        self.pins = 0

    def deliver(self, entries: list[Entry], now_ms: float) -> int:
        """Encode each entry once and queue it to every sink. Returns the deliveries made."""
        delivered = 0
        pos_t = stream_id_tuple(self.pos)
        for raw_id, fields in entries:
            sid = raw_id.decode()
            sid_t = stream_id_tuple(sid)
            if sid_t <= pos_t:
                continue  # already delivered (the topic was re-created while a read was in flight)
            seq_raw = fields.get(b"s")
            if seq_raw is not None:
                seq = int(seq_raw)
                if 0 <= self.seq < seq - 1 and not _deleted_between(entries, self.seq, seq):
                    self._gap()
                self.seq = seq
            elif self.seq >= 0 and int(fields.get(b"ds", -1)) == self.seq + 1:
                self.seq += 1  # a delete of the message after ours: that seq is accounted for
            pos_t = sid_t
            self.pos = sid
            encoded = self.encoder(self, sid, fields)
            if encoded is None:
                continue
            if isinstance(encoded, tuple):
                payload, skip = encoded
                frame = ws_text_frame(payload)
                for sink in self.sinks:
                    if sink.owner != skip:
                        sink.push(frame)
                        delivered += 1
                continue
            frame = ws_text_frame(encoded)
            for sink in self.sinks:
                sink.push(frame)
            delivered += len(self.sinks)
            METRICS.delivery_latency.observe(max(0.0, now_ms - sid_t[0]) / 1000.0)
        return delivered

    def _gap(self) -> None:
        """Entries between ``pos`` and the next one were trimmed before this node read them."""
        METRICS.reader_gaps.inc()
        if self.meta is None:
            return
        log.warning("stream reader fell behind the trimmed history: entries lost to live delivery",
                    extra={"shard": self.shard})
        frame = ws_text_frame(dumps(room_gap_event(self.meta, self.pos)))
        for sink in self.sinks:
            sink.push(frame)


# Readers per shard: rooms (and the shard's ephemeral stream) in one lane, personal streams in
# another. A personal stream is written rarely but there is one per local user, so a shard's
# personal keys number hundreds on a busy node; in the rooms' XREAD they would be re-sent,
# packed and parsed after every room message (a fifth of the node's CPU at 250 msgs/s with
# 1,000 users). In their own lane they are re-armed only when a personal event arrives.
LANE_ROOMS = 0
LANE_PERSONAL = 1


def lane_of(topic: Topic) -> int:
    return LANE_PERSONAL if topic.kind == "personal" else LANE_ROOMS


class ShardReader:
    """Reads the topics of one virtual shard and lane with one blocking ``XREAD`` on its own
    connection."""

    def __init__(self, fanout: Fanout, shard: int, lane: int = LANE_ROOMS) -> None:
        self.fanout = fanout
        self.shard = shard
        self.lane = lane
        self.pause_point = "reader.rooms.before_read" if lane == LANE_ROOMS else "reader.personal.before_read"
        self.topics: dict[str, Topic] = {}
        self.client_id: int | None = None
        self.inflight: frozenset[str] | None = None
        self.wake = asyncio.Event()
        self.conn: Any = None
        self._xread = redisio.RawXread()
        self.stopped = False  # the node is stopping: end instead of reading again
        # CLIENT UNBLOCK must reach the Redis server the reader's connection is on.
        self.unblock: Callable[[int], Awaitable[Any]] = _never_unblocked
        self.failures = 0
        self.healthy = False
        # Age of the newest entry of the last read (0 after a read that timed out empty: caught
        # up). Exported as the max over readers at scrape time, so an idle shard never keeps a
        # stale lag from its last burst.
        self.lag = 0.0

    async def interrupt(self, key: str) -> None:
        """Make the reader re-arm its XREAD so that it includes ``key``.

        Loops until the read in flight includes the key, or no read is in flight: the reader
        may be between two reads when ``CLIENT UNBLOCK`` arrives, and then it did nothing.
        """
        self.wake.set()
        for _ in range(200):
            inflight = self.inflight
            if inflight is None or key in inflight or self.client_id is None:
                return
            try:
                unblocked = await self.unblock(self.client_id)
            except redisio.TRANSIENT:
                return  # the reader is reconnecting and will pick the key up
            if unblocked:
                return
            await asyncio.sleep(0.002)

    async def run(self) -> None:
        backoff = 0.05
        settings = self.fanout.settings
        while not self.stopped:
            if not self.topics:
                self.wake.clear()
                await self.wake.wait()
                continue
            try:
                if self.conn is None:
                    # After a failure the server may have changed (failover, slot moved): the
                    # factory re-resolves which server owns the shard's slot.
                    self.conn, self.unblock = await self.fanout.make_reader_conn(self.shard, self.failures > 0)
                    self.client_id = int(await self.conn.client_id())
                    if not self.healthy:
                        await self.fanout.on_reader_reconnect(self)
                    self.healthy = True
                if not self.topics:
                    continue  # the last topic went away while the connection was being opened
                self.wake.clear()
                await self.fanout.pauses.point(self.pause_point)
                streams = {key: topic.pos for key, topic in self.topics.items()}
                if not streams:
                    continue
                self.inflight = frozenset(streams)
                try:
                    result = await redisio.RawXread.call(
                        self.conn, self._xread.pack(streams, settings.read_count, settings.read_block_ms))
                finally:
                    self.inflight = None
                backoff = 0.05
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.stopped:
                    return  # its connection was closed under it (Fanout.stop)
                # Whatever Redis answered (gone, OOM, READONLY after a failover, a slot moved,
                # a script error): this reader reconnects (re-resolving the slot's server) and
                # goes on; it never ends the node.
                self.failures += 1
                METRICS.redis_errors.labels(op="xread").inc()
                if not isinstance(exc, (*redisio.TRANSIENT, *redisio.TOPOLOGY)):
                    METRICS.background_errors.labels(task="shard-reader").inc()
                _errors.error("shard reader", exc, shard=self.shard)
                self.healthy = False
                await self._drop_conn()
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 2.0)
                continue
            self.failures = 0
            if result:
                self.fanout.dispatch(self, result)
                if settings.read_linger_ms:
                    # Traffic is flowing: let entries accumulate so that the next XREAD brings
                    # several per room and each socket gets them in one write (the kernel cost
                    # of a socket write dominates fan-out). A read that was blocked waiting --
                    # an idle room's first message -- goes out at once.
                    await asyncio.sleep(settings.read_linger_ms / 1000.0)
            else:
                self.lag = 0.0

    async def stop(self) -> None:
        """End the reader now, even in the middle of a blocking read: its connection is closed
        under it (a cancellation that lands while redis-py's read times out can be lost, and
        the read would then go on blocking, with the node waiting for it)."""
        self.stopped = True
        self.wake.set()
        await self._drop_conn()

    async def _drop_conn(self) -> None:
        conn, self.conn, self.client_id = self.conn, None, None
        if conn is not None:
            try:
                await conn.aclose()
            except Exception:
                pass


class Fanout:
    """Registry of the topics with local subscribers, and owner of the shard readers.

    Call :meth:`run` once (it owns the reader tasks); :meth:`subscribe` from connection handlers.
    """

    def __init__(self, settings: Any, redis: Any, flusher: Flusher,
                 make_reader_conn: Callable[[int, bool], Awaitable[tuple[Any, Callable[[int], Awaitable[Any]]]]],
                 on_epoch_check: Callable[[ShardReader], Any] | None = None,
                 ephemeral: Callable[[int], Topic] | None = None, *,
                 keys: Keys | None = None, room_encoder: Encoder | None = None,
                 pauses: PausePoints | None = None) -> None:
        self.settings = settings
        self.keys = keys if keys is not None else Keys(settings.shards)
        self.room_encoder: Encoder = room_encoder if room_encoder is not None else _encode_message
        self.pauses = pauses if pauses is not None else PausePoints()
        self.redis = redis
        self.flusher = flusher
        self.make_reader_conn = make_reader_conn
        self.topics: dict[str, Topic] = {}
        self.readers: dict[tuple[int, int], ShardReader] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._ready = asyncio.Event()
        self._on_epoch_check = on_epoch_check
        self._ephemeral = ephemeral  # builds a shard's ephemeral-events topic
        # Topics kept after their last subscriber left (see unsubscribe): key -> its timer.
        self._lingering: dict[str, asyncio.TimerHandle] = {}
        self._linger_s = float(getattr(settings, "topic_linger_s", 0.0))
        self._linger_max = int(getattr(settings, "topic_linger_max", 0))

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self._ready.set()
            await asyncio.Event().wait()  # the task group lives until cancelled

    async def stop(self) -> None:
        """Stop every shard reader (the node is stopping)."""
        for timer in self._lingering.values():
            timer.cancel()
        self._lingering.clear()
        for reader in list(self.readers.values()):
            await reader.stop()

    def reader(self, shard: int, lane: int = LANE_ROOMS) -> ShardReader:
        reader = self.readers.get((shard, lane))
        if reader is None:
            if self._tg is None:
                raise RuntimeError("Fanout.run() is not running")
            reader = self.readers[(shard, lane)] = ShardReader(self, shard, lane)
            self._tg.create_task(reader.run(), name=f"shard-reader-{shard}-{lane}")
            METRICS.readers.set(len(self.readers))
        return reader

    def reader_of(self, topic: Topic) -> ShardReader:
        """The reader that reads ``topic`` (started if need be)."""
        return self.reader(topic.shard, lane_of(topic))

    def get(self, key: str) -> Topic | None:
        return self.topics.get(key)

    def add_topic(self, key: str, shard: int, name: str, pos: str, encoder: Encoder,
                  epoch: str, kind: str) -> tuple[Topic, bool]:
        """The topic for ``key``, created at ``pos`` if this node does not read it yet.

        Synchronous on purpose: the caller reads ``topic.pos`` right after, with no await in
        between, so the position it replays up to is exactly where live delivery starts.
        """
        topic = self.topics.get(key)
        if topic is not None:
            return topic, False
        return self.install(Topic(key, shard, name, pos, encoder, epoch, kind)), True

    def add_room_topic(self, room: str, meta: RoomMeta) -> tuple[Topic, bool]:
        """The topic of a room, created at the room's newest entry as ``meta`` says if this node
        does not read it yet. Synchronous, like :meth:`add_topic`."""
        key = self.keys.room_stream(room)
        topic = self.topics.get(key)
        if topic is not None:
            return topic, False
        return self.install(Topic(key, self.keys.room_shard(room), room, meta.last_id, self.room_encoder,
                                  meta.epoch, "room", meta.seq, meta)), True

    def install(self, topic: Topic) -> Topic:
        """Register a topic built by the caller (a subclass); returns the one in force."""
        existing = self.topics.get(topic.key)
        if existing is not None:
            return existing
        self.topics[topic.key] = topic
        reader = self.reader_of(topic)
        reader.topics[topic.key] = topic
        if topic.kind == "room" and self._ephemeral is not None:
            eph = self._ephemeral(topic.shard)
            if eph.key not in reader.topics:
                self.topics[eph.key] = eph
                reader.topics[eph.key] = eph
        return topic

    def unsubscribe(self, topic: Topic, sink: Sink) -> None:
        """``sink`` leaves ``topic``. The last one to leave a room or personal topic does not
        end the read at once: the topic lingers (CHAT_TOPIC_LINGER_S), so that the user's
        reload or reconnect -- the most common session there is -- finds its streams read:
        no reader is interrupted to add them, and their positions are known. Bounded by
        CHAT_TOPIC_LINGER_MAX; a lingering topic's entries go to nobody."""
        topic.sinks.discard(sink)
        if topic.sinks or self.topics.get(topic.key) is not topic:
            return
        lingering = self._lingering.pop(topic.key, None)
        if lingering is not None:  # left again while lingering: linger from now
            lingering.cancel()
            topic.pins -= 1
        if topic.pins:
            return
        if self._linger_s > 0 and len(self._lingering) < self._linger_max and topic.kind in ("room", "personal"):
            topic.pins += 1
            self._lingering[topic.key] = asyncio.get_running_loop().call_later(
                self._linger_s, self._linger_over, topic)
            return
        self.remove(topic)

    def lingering(self) -> float:
        """How many topics are read for nobody now, waiting for a reconnect (a gauge; a topic
        subscribed again keeps its timer, harmlessly, until it runs out)."""
        return float(sum(1 for key in self._lingering if (t := self.topics.get(key)) is not None and not t.sinks))

    def _linger_over(self, topic: Topic) -> None:
        if self._lingering.pop(topic.key, None) is not None:
            self.unpin(topic)

    def pin(self, topic: Topic) -> None:
        """Keep reading ``topic`` while nobody subscribes to it, until :meth:`unpin`."""
        topic.pins += 1

    def unpin(self, topic: Topic) -> None:
        topic.pins -= 1
        if topic.pins <= 0 and not topic.sinks and self.topics.get(topic.key) is topic:
            self.remove(topic)

    def remove(self, topic: Topic) -> None:
        self.topics.pop(topic.key, None)
        reader = self.readers.get((topic.shard, lane_of(topic)))
        if reader is None:
            return
        reader.topics.pop(topic.key, None)
        if topic.kind == "room" and not any(t.kind == "room" for t in reader.topics.values()):
            for key in [k for k, t in reader.topics.items() if t.kind == "ephemeral"]:
                reader.topics.pop(key, None)
                self.topics.pop(key, None)

    def dispatch(self, reader: ShardReader, result: list[Any]) -> None:
        """Deliver one XREAD result (runs synchronously: no socket is awaited)."""
        now_ms = time.time() * 1000.0
        delivered = 0
        entries_read = 0
        newest = 0.0
        for raw_key, entries in result:
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            topic = reader.topics.get(key)
            if topic is None or not entries:
                continue
            entries_read += len(entries)
            try:
                delivered += topic.deliver(entries, now_ms)
            except Exception as exc:
                # A bug in one topic's encoding (or its hook) must not stop the others, nor the
                # reader: the topic's position is past the entries it handled.
                METRICS.background_errors.labels(task="fanout-dispatch").inc()
                _errors.error("fan-out dispatch", exc, topic_kind=topic.kind)
            newest = max(newest, stream_id_tuple(topic.pos)[0])
        METRICS.entries_read.inc(entries_read)
        if delivered:
            METRICS.messages_delivered.inc(delivered)
        if newest:
            reader.lag = max(0.0, now_ms - newest) / 1000.0

    async def on_reader_reconnect(self, reader: ShardReader) -> None:
        if self._on_epoch_check is not None:
            await self._on_epoch_check(reader)

    def lag(self) -> float:
        """The stream reader lag of this node: the worst of its shard readers, in seconds."""
        return max((r.lag for r in self.readers.values() if r.topics), default=0.0)

    def healthy(self) -> bool:
        """No reader with topics is failing. A reader still opening its first connection (a
        shard's first local subscriber, a moment ago) is not failing: readiness must not flap
        each time the node starts reading a new shard."""
        return all(r.healthy or not r.topics or r.failures == 0 for r in self.readers.values())
