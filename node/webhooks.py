"""Webhooks (protocol 5.3): the per-shard outbox the room scripts write, and its delivery.

**The outbox.** With ``CHAT_WEBHOOK_URL`` set, every script that changes a room appends one
entry to its shard's outbox stream (:meth:`Keys.webhook_outbox`, same hash tag as the room's
keys, so Redis Cluster allows it) in the same step as the change: a change is in the outbox if
and only if it happened. An entry of a room stream is referenced, not copied (``r`` room, ``i``
stream id): it is read at delivery time, so a message deleted before its delivery (its entry
XDELed with its text) is never sent, and no text is kept in a second place. A membership change
carries its fields (``r`` room, ``m`` change, ``u`` user, ``b`` by). With webhooks off the
scripts are told ``maxlen = '0'`` and write nothing.

Convention for a script (see :func:`outbox_xadd`): take the outbox key as one more ``KEYS``
entry (``Outbox.key(room)``) and ``Outbox.arg`` as one more ``ARGV`` entry, and add the line
``outbox_xadd("KEYS[n]", "ARGV[m]", "'r'", "<room>", "'i'", "id")`` after the ``XADD`` of
the room entry. That is one ``XADD`` in the script, no extra round trip.

**Delivery.** One node at a time delivers a shard's outbox: the holder of the shard's lease
(``SET NX PX``, renewed every second, or every third of ``CHAT_WEBHOOK_LEASE`` if shorter). It reads the outbox after the
shard's cursor (kept in Redis), POSTs the entries one by one -- in order per shard, hence per
room -- retrying each with backoff until a 2xx or until it is older than
``CHAT_WEBHOOK_MAX_AGE``, and moves the cursor past it (only while it still holds the lease) and
trims what is delivered. A node that dies stops renewing; its leases expire and other nodes take
them over from the cursor: the entry in flight is sent again, with the same ``delivery`` id (at
least once). Each node takes free leases up to its fair share of the shards (shards divided by
the live delivering nodes) and gives back what it holds beyond it.

Nothing here is on the chat path: a slow or failing endpoint only delays the shard's webhook
worker. Workers are at most one per shard, the HTTP client has its own connection pool
(bounded) and timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import random
import secrets
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from .keys import Keys
from .metrics import METRICS
from .protocol import dumps, message_event
from .redisio import as_str
from .supervise import ThrottledLog

log = logging.getLogger("chatcluster.webhooks")

SIGNATURE_HEADER = "X-Chat-Signature"
MEMBER_CHANGES = ("joined", "invited", "left", "kicked")
BATCH = 100  # outbox entries read per XRANGE
IDLE_POLL_S = 0.2  # how often an idle worker looks for new entries
BACKOFF_MIN_S = 0.5
TICK_MAX_S = 1.0
MAX_ANSWER_BYTES = 65536  # of a webhook response body, read and ignored
RESOLVE_CHUNK = 20  # events read from the room streams per round trip
RESOLVED_FRESH_S = 1.0  # an event read longer ago than this is read again before it is sent
ADVANCE_EVERY_S = 0.5  # the cursor moves at least this often while events go out
STOP_WAIT_S = 2.0
BACKOFF_MAX_S = 60.0


# -- the outbox convention (pure) -------------------------------------------------------------
def outbox_xadd(key: str, maxlen: str, *fields: str) -> str:
    """One Lua statement appending an outbox entry when webhooks are on (``maxlen`` not '0').

    ``key``, ``maxlen`` and ``fields`` are Lua expressions (``"KEYS[5]"``, ``"ARGV[11]"``,
    ``"'r'"``, ``"ARGV[12]"``, ``"'i'"``, ``"id"``)."""
    # A caller that passes no such argument (an older script call) writes nothing.
    return (f"if ({maxlen} or '0') ~= '0' then redis.call('XADD', {key}, 'MAXLEN', '~', {maxlen}, "
            f"'*', {', '.join(fields)}) end")


@dataclass(frozen=True, slots=True)
class Outbox:
    """What a room script needs to write the outbox: the key and the ``maxlen`` argument."""

    keys: Keys
    maxlen: int = 0  # 0: webhooks off, the scripts write nothing

    @property
    def enabled(self) -> bool:
        return self.maxlen > 0

    @property
    def arg(self) -> str:
        return str(self.maxlen)

    def key(self, room: str) -> str:
        return self.keys.webhook_outbox(self.keys.room_shard(room))


# -- pure core --------------------------------------------------------------------------------
def sign(secret: str, body: bytes) -> str:
    """The ``X-Chat-Signature`` value of a body: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def delivery_id(shard: int, outbox_id: str) -> str:
    """Unique per event and the same on every retry, whichever node sends it."""
    return f"s{shard}-{outbox_id}"


def backoff_s(attempt: int) -> float:
    """Delay before retry ``attempt`` (0-based): exponential with jitter, capped."""
    return min(BACKOFF_MAX_S, BACKOFF_MIN_S * 2 ** min(attempt, 16)) * (0.5 + random.random() / 2)


def fair_share(shards: int, nodes: int) -> int:
    return math.ceil(shards / max(1, nodes))


def id_ms(stream_id: str) -> int:
    return int(stream_id.partition("-")[0])


def member_event(fields: dict[bytes, bytes], outbox_id: str) -> dict[str, Any]:
    """The ``member`` event (our extension, docs/protocol.md) of a membership outbox entry."""
    event: dict[str, Any] = {
        "type": "member",
        "room": fields[b"r"].decode(),
        "user": fields.get(b"u", b"").decode(),
        "change": fields[b"m"].decode(),
        "ts": id_ms(outbox_id),
    }
    by = fields.get(b"b", b"").decode()
    if by:
        event["by"] = by
    return event


def room_entry_event(room: str, sid: str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """The event of a room stream entry, as a live client gets it (``message``; edit and delete
    entries become ``edit``/``delete`` events where :func:`node.protocol.message_event` does)."""
    return message_event(room, sid, fields)


# -- Redis scripts ----------------------------------------------------------------------------
# KEYS: lease.  ARGV: holder, ttl ms.  1 if the lease was ours and is extended.
RENEW_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: lease.  ARGV: holder.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS: lease, cursor, outbox.  ARGV: holder, outbox id.  Moves the cursor past a delivered (or
# dropped) entry, only while the caller holds the lease (a node that lost it moves nothing), and
# trims the delivered entries (approximately: whole macro nodes).
ADVANCE_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('XTRIM', KEYS[3], 'MINID', '~', ARGV[2])
return 1
"""


class LeaseLost(Exception):
    """The worker's lease expired or was taken: it stops, the new holder goes on."""


class Webhooks:
    """Delivers the outboxes of the shards this node leases. ``run`` for the node's life."""

    def __init__(self, settings: Any, redis: Any, keys: Keys, errors: ThrottledLog) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self.errors = errors
        self.url: str = settings.webhook_url
        self._secret: str = settings.webhook_secret
        self.lease_ms = int(settings.webhook_lease_s * 1000)
        # Renew, rebalance and take over at least every second (cheap: a few scripts per tick).
        self.tick_s = min(TICK_MAX_S, settings.webhook_lease_s / 3)
        self.holder = f"{settings.node_id}/{secrets.token_hex(4)}"
        self._renew = redis.register_script(RENEW_LUA)
        self._release = redis.register_script(RELEASE_LUA)
        self._advance = redis.register_script(ADVANCE_LUA)
        self._valid_until: dict[int, float] = {}  # shard -> monotonic time the lease surely lasts
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._heads: dict[int, int] = {}  # shard -> ms of the entry being delivered
        self._session: aiohttp.ClientSession | None = None

    @property
    def held(self) -> list[int]:
        return sorted(self._workers)

    def lag(self) -> float:
        """Seconds: age of the oldest entry being delivered on this node (0: caught up)."""
        if not self._heads:
            return 0.0
        return max(0.0, time.time() - min(self._heads.values()) / 1000)

    async def run(self) -> None:
        """Hold leases and run one worker per leased shard; never returns (cancel to stop)."""
        timeout = aiohttp.ClientTimeout(total=self.settings.webhook_timeout_s)
        connector = aiohttp.TCPConnector(limit=self.keys.shards, ttl_dns_cache=60)
        METRICS.webhook_lag.set_function(self.lag)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector,
                                         headers={"User-Agent": "chatcluster-webhooks"}) as session:
            self._session = session
            try:
                while True:
                    started = time.monotonic()
                    try:
                        await self._tick()
                    except Exception as exc:
                        METRICS.background_errors.labels(task="webhooks").inc()
                        self.errors.error("webhooks", exc)
                    pause = self.tick_s - (time.monotonic() - started)
                    await asyncio.sleep(max(0.05, pause))
            finally:
                workers = list(self._workers.values())
                self._workers.clear()
                self._heads.clear()
                for task in workers:
                    task.cancel()
                if workers:
                    await asyncio.wait(workers, timeout=STOP_WAIT_S)
                with contextlib.suppress(Exception):
                    await asyncio.shield(self._release_all())

    async def _release_all(self) -> None:
        """At shutdown: the others take this node's shards over now, not when leases expire."""
        await self.redis.zrem(self.keys.webhook_nodes(), self.settings.node_id)
        for shard in list(self._valid_until):
            await self._release(keys=[self.keys.webhook_lease(shard)], args=[self.holder])
        self._valid_until.clear()

    async def _tick(self) -> None:
        """Renew what is held, give back what is beyond the fair share, take free shards."""
        now_ms = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=False)
        nodes_key = self.keys.webhook_nodes()
        pipe.zadd(nodes_key, {self.settings.node_id: now_ms + self.lease_ms})
        pipe.zremrangebyscore(nodes_key, "-inf", now_ms)
        pipe.zcard(nodes_key)
        _, _, nodes = await pipe.execute()
        share = fair_share(self.keys.shards, int(nodes))
        for shard in list(self._workers):
            started = time.monotonic()
            ok = await self._renew(keys=[self.keys.webhook_lease(shard)], args=[self.holder, self.lease_ms])
            if ok:
                self._valid_until[shard] = started + self.lease_ms / 1000
            else:
                log.warning("webhook lease lost", extra={"shard": shard})
                await self._stop_worker(shard)
        for shard in self.held[share:]:  # a node joined: give its share back
            await self._stop_worker(shard)
            await self._release(keys=[self.keys.webhook_lease(shard)], args=[self.holder])
        free = [shard for shard in range(self.keys.shards) if shard not in self._workers]
        random.shuffle(free)
        for shard in free:
            if len(self._workers) >= share:
                break
            started = time.monotonic()
            if await self.redis.set(self.keys.webhook_lease(shard), self.holder, nx=True, px=self.lease_ms):
                self._valid_until[shard] = started + self.lease_ms / 1000
                self._workers[shard] = asyncio.create_task(self._worker(shard), name="webhooks")
        METRICS.webhook_shards.set(len(self._workers))

    async def _stop_worker(self, shard: int) -> None:
        task = self._workers.pop(shard, None)
        self._heads.pop(shard, None)
        self._valid_until.pop(shard, None)
        if task is not None:
            task.cancel()
            # Bounded: a cancellation swallowed by a library call ends the worker at its next
            # turn anyway (it is no longer registered), and must not hold up the lease loop.
            await asyncio.wait([task], timeout=STOP_WAIT_S)

    def _check_lease(self, shard: int, need_s: float = 0.0) -> None:
        """Raise :class:`LeaseLost` unless the lease surely lasts ``need_s`` more seconds."""
        if self._valid_until.get(shard, 0.0) - time.monotonic() <= need_s:
            raise LeaseLost()

    async def _worker(self, shard: int) -> None:
        """Deliver the shard's outbox in order while the lease is ours; failures back off."""
        backoff = 0
        me = asyncio.current_task()
        while self._workers.get(shard) is me:
            try:
                await self._drain(shard)
                backoff = 0
            except LeaseLost:
                self._heads.pop(shard, None)
                # The lease may come back at the next tick (a slow renewal): wait for it.
                await asyncio.sleep(IDLE_POLL_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._heads.pop(shard, None)
                METRICS.background_errors.labels(task="webhooks").inc()
                self.errors.error("webhooks", exc, shard=shard)
                await asyncio.sleep(min(5.0, 0.1 * 2 ** backoff))
                backoff = min(backoff + 1, 6)

    async def _drain(self, shard: int) -> None:
        outbox = self.keys.webhook_outbox(shard)
        while True:
            self._check_lease(shard)
            raw_cursor = await self.redis.get(self.keys.webhook_cursor(shard))
            cursor = as_str(raw_cursor) if raw_cursor else ""
            # From the cursor's own entry, which proves nothing was trimmed after it: the
            # cursor's trimming (MINID) keeps it, only the cap (MAXLEN, from the oldest) takes it.
            entries = await self.redis.xrange(outbox, cursor or "-", "+", count=BATCH + 1)
            if cursor and entries:
                if as_str(entries[0][0]) == cursor:
                    entries = entries[1:]
                else:
                    METRICS.webhook_outbox_overflows.inc()
                    log.warning("webhook outbox overflowed: undelivered events lost", extra={"shard": shard})
            if not entries:
                self._heads.pop(shard, None)
                await asyncio.sleep(IDLE_POLL_S)
                continue
            await self._send_batch(shard, [(as_str(raw_id), fields) for raw_id, fields in entries])
            self._heads.pop(shard, None)

    async def _send_batch(self, shard: int, entries: list[tuple[str, dict[bytes, bytes]]]) -> None:
        """Send entries in order. Their events are read a chunk at a time (one round trip) and
        re-read when older than RESOLVED_FRESH_S (a message deleted meanwhile is not sent); the
        cursor moves every ADVANCE_EVERY_S and at the end (a node that dies re-sends at most
        that much: at least once)."""
        done = ""
        advanced_at = time.monotonic()
        i = 0
        while i < len(entries):
            chunk = entries[i:i + RESOLVE_CHUNK]
            resolved_at = time.monotonic()
            events = await self._resolve_many(chunk)
            for (oid, fields), event in zip(chunk, events, strict=True):
                if time.monotonic() - resolved_at > RESOLVED_FRESH_S:
                    break  # read the rest again
                self._heads[shard] = id_ms(oid)
                await self._deliver(shard, oid, fields, event)
                done = oid
                i += 1
                if time.monotonic() - advanced_at >= ADVANCE_EVERY_S:
                    await self._advance_to(shard, done)
                    advanced_at = time.monotonic()
        if done:
            await self._advance_to(shard, done)

    async def _advance_to(self, shard: int, oid: str) -> None:
        k = self.keys
        moved = await self._advance(keys=[k.webhook_lease(shard), k.webhook_cursor(shard), k.webhook_outbox(shard)],
                                    args=[self.holder, oid])
        if not moved:
            raise LeaseLost()

    async def _resolve_many(self, entries: list[tuple[str, dict[bytes, bytes]]]) -> list[dict[str, Any] | None]:
        """The event of each outbox entry (None: its room entry is gone, deleted or trimmed)."""
        refs = [(oid, fields) for oid, fields in entries if b"m" not in fields]
        found: dict[str, list[Any]] = {}
        if refs:
            pipe = self.redis.pipeline(transaction=False)
            for _, fields in refs:
                sid = fields[b"i"].decode()
                pipe.xrange(self.keys.room_stream(fields[b"r"].decode()), sid, sid, count=1)
            found = {oid: result for (oid, _), result in zip(refs, await pipe.execute(), strict=True)}
        out: list[dict[str, Any] | None] = []
        for oid, fields in entries:
            if b"m" in fields:
                out.append(member_event(fields, oid))
            elif found[oid]:
                out.append(room_entry_event(fields[b"r"].decode(), fields[b"i"].decode(), found[oid][0][1]))
            else:
                out.append(None)
        return out

    async def _deliver(self, shard: int, oid: str, fields: dict[bytes, bytes],
                       event: dict[str, Any] | None) -> None:
        """POST one entry until it is accepted (2xx) or too old; raises LeaseLost to stop. A
        retry reads the event again: deleted meanwhile, it is not sent any more."""
        max_age_ms = self.settings.webhook_max_age_s * 1000
        timeout_s = self.settings.webhook_timeout_s
        attempt = 0
        assert self._session is not None
        while True:
            if attempt > 0:
                (event,) = await self._resolve_many([(oid, fields)])
            if event is None:
                METRICS.webhook_deliveries.labels(result="gone").inc()
                return
            body = dumps({"event": event, "delivery": delivery_id(shard, oid)})
            headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self._secret, body)}
            left_ms = id_ms(oid) + max_age_ms - time.time() * 1000
            if left_ms <= 0:
                METRICS.webhook_deliveries.labels(result="dropped").inc()
                log.warning("webhook event dropped (max age)", extra={"shard": shard, "attempts": attempt})
                return
            # The request ends (or times out) before the lease can expire: another node never
            # sends the next entry while this one may still be on its way.
            self._check_lease(shard, timeout_s)
            started = time.monotonic()
            status = 0
            try:
                # No redirects (a 3xx is a failure: the URL is configured, not discovered). A
                # short answer is read so the connection is kept for the next event; a longer
                # one is not buffered (the connection is closed instead).
                async with self._session.post(self.url, data=body, headers=headers,
                                              allow_redirects=False) as response:
                    status = response.status
                    await response.content.read(MAX_ANSWER_BYTES)
            except (aiohttp.ClientError, TimeoutError):
                status = 0
            METRICS.webhook_attempt_duration.observe(time.monotonic() - started)
            if 200 <= status < 300:
                METRICS.webhook_deliveries.labels(result="delivered").inc()
                return
            METRICS.webhook_deliveries.labels(result="retried").inc()
            await asyncio.sleep(max(0.0, min(backoff_s(attempt), left_ms / 1000)))
            attempt += 1
