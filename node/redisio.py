"""Redis clients and the boundary where Redis errors become :class:`~node.errors.Unavailable`."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from .errors import ChatError, Internal, Unavailable
from .metrics import METRICS

# Errors that mean "Redis is not reachable right now" rather than "the command is wrong".
TRANSIENT = (
    rexc.ConnectionError,
    rexc.TimeoutError,
    rexc.BusyLoadingError,
    rexc.TryAgainError,
    rexc.ClusterDownError,
    OSError,
)

Redis = aioredis.Redis | RedisCluster


# A shard reader talks to one server directly; these mean "the slot is served elsewhere now"
# (slot migrated, failover): re-resolve the owner and reconnect.
TOPOLOGY = (rexc.MovedError, rexc.AskError, rexc.ReadOnlyError)


# Error replies that mean "Redis cannot serve this now" rather than "this command is wrong":
# out of memory (maxmemory with noeviction), a failed background save (MISCONF), a replica after
# a failover (READONLY), a script running too long (BUSY), loading, cluster trouble. A request
# gets `unavailable`; a background loop backs off and tries again.
UNAVAILABLE_REPLIES = ("OOM", "MISCONF", "READONLY", "BUSY", "LOADING", "MASTERDOWN",
                       "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS", "NOSCRIPT")


def as_str(value: Any) -> str:
    """A Redis reply value (bytes, or a number) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def concurrently(*aws: Any) -> list[Any]:
    """Await independent Redis reads together (one round trip of latency) and return their
    results in order. All of them finish before the first error, if any, is raised: nothing is
    left running, and no failure goes unretrieved."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def is_cluster_url(url: str) -> bool:
    return url.startswith("redis+cluster://")


def retry_policy() -> Retry:
    """Retries of a command whose connection failed (a Redis restart leaves every pooled socket
    dead; a failover moves the server): three more tries within about half a second.

    Why retrying is safe here: every write the node makes is idempotent or deduplicated in Redis.
    Sets, hashes and sorted sets are written with SADD/HSET/ZADD (the same result twice); the
    read-marker script only moves forward; the append script dedupes on its ``cmid`` key, which
    the node makes up when the client gave none; personal events carry a dedupe token the same
    way. A typing or presence event may in the worst case be published twice; both are
    ephemeral and idempotent for a client (an indicator, a status).
    """
    return Retry(ExponentialWithJitterBackoff(cap=0.25, base=0.02), 3,
                 (rexc.ConnectionError, rexc.TimeoutError))


def connect(url: str, *, max_connections: int = 256) -> Any:
    """A shared client for commands (pooled). ``redis+cluster://`` gives a cluster client."""
    if is_cluster_url(url):
        return RedisCluster.from_url(
            "redis://" + url[len("redis+cluster://"):],
            max_connections=max_connections, retry=retry_policy(), socket_connect_timeout=2,
            socket_timeout=5, health_check_interval=10, socket_keepalive=True,
        )
    # A blocking pool: a burst of commands waits for a free connection instead of failing.
    # The health check pings a connection that sat idle for 10 s before reusing it, so a socket
    # a restarted Redis left dead is noticed before a command is written to it.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=5, socket_connect_timeout=2,
        socket_timeout=5, health_check_interval=10, socket_keepalive=True, retry=retry_policy(),
    )
    return aioredis.Redis(connection_pool=pool)


def unavailable_reply(exc: BaseException) -> bool:
    """An error reply meaning Redis cannot serve now (see :data:`UNAVAILABLE_REPLIES`)."""
    # redis-py strips the code of the replies it maps to a class of their own.
    if isinstance(exc, (rexc.OutOfMemoryError, rexc.ReadOnlyError, rexc.NoScriptError,
                        rexc.ClusterDownError, rexc.TryAgainError)):
        return True
    return isinstance(exc, rexc.ResponseError) and str(exc).startswith(UNAVAILABLE_REPLIES)


def is_transient(exc: BaseException) -> bool:
    """Redis is unreachable, moved (failover, slot migration) or refuses service for now: retry
    later, it is nobody's bug."""
    return (isinstance(exc, (*TRANSIENT, *TOPOLOGY)) or unavailable_reply(exc)
            or isinstance(exc, Unavailable) or isinstance(chat_error_of(exc), Unavailable))


def connect_server(host: str, port: int, block_ms: int, password: str | None = None) -> aioredis.Redis:
    """A dedicated connection to one server of a Redis Cluster (for a shard reader)."""
    return aioredis.Redis(host=host, port=port, password=password, single_connection_client=True,
                          socket_connect_timeout=2, socket_timeout=block_ms / 1000.0 + 10.0,
                          socket_keepalive=True)


def connect_dedicated(url: str, block_ms: int) -> aioredis.Redis:
    """One connection of its own for a blocking reader (standalone Redis).

    Its socket timeout must outlast the longest ``XREAD BLOCK`` (redis-py's default of 5 s
    would cut a 5 s block short and look like a lost Redis).
    """
    return aioredis.Redis.from_url(url, single_connection_client=True, socket_connect_timeout=2,
                                   socket_timeout=block_ms / 1000.0 + 10.0, socket_keepalive=True)


def resp_bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


class RawXread:
    """``XREAD COUNT c BLOCK b STREAMS k... id...`` on a dedicated connection, packed by hand.

    A shard reader re-issues its XREAD after every read, with every stream key of its shard:
    redis-py's generic packing (an encoder call per argument) made that the biggest cost of
    fan-out to many small rooms (docs/benchmarks.md). Keys are packed once and kept; only the
    ids are packed per call. The reply is returned in redis-py's shape,
    ``[(key, [(id, {field: value}), ...]), ...]`` or ``None`` on a timeout.
    """

    __slots__ = ("frags", "ids")

    def __init__(self) -> None:
        self.frags: dict[str, bytes] = {}
        # key -> (id, its packed form): most streams of a shard did not move since the last read
        self.ids: dict[str, tuple[str, bytes]] = {}

    def pack(self, streams: dict[str, str], count: int, block_ms: int) -> bytes:
        frags = self.frags
        ids = self.ids
        if len(frags) > 2 * len(streams) + 64:
            frags.clear()  # keys of topics that went away
            ids.clear()
        parts = [b"*%d\r\n$5\r\nXREAD\r\n$5\r\nCOUNT\r\n%s$5\r\nBLOCK\r\n%s$7\r\nSTREAMS\r\n"
                 % (6 + 2 * len(streams), resp_bulk(b"%d" % count), resp_bulk(b"%d" % block_ms))]
        for key in streams:
            frag = frags.get(key)
            if frag is None:
                frag = frags[key] = resp_bulk(key.encode())
            parts.append(frag)
        for key, sid in streams.items():
            packed = ids.get(key)
            if packed is None or packed[0] != sid:
                packed = ids[key] = (sid, resp_bulk(sid.encode()))
            parts.append(packed[1])
        return b"".join(parts)

    @staticmethod
    async def call(client: aioredis.Redis, packed: bytes) -> list[tuple[Any, list[Any]]] | None:
        """Send ``packed`` on the single connection of ``client`` (initialized by a first
        command) and read its reply. Errors are redis-py's (the caller reconnects on any)."""
        conn = client.connection
        if conn is None:
            raise rexc.ConnectionError("the reader's connection is not open")
        await conn.send_packed_command(packed, check_health=False)
        reply = await conn.read_response()
        if reply is None:
            return None
        # RESP3 answers a map (key -> entries), RESP2 a list of [key, entries] pairs.
        pairs = reply.items() if isinstance(reply, dict) else reply
        return [(key, [(sid, dict(zip(fields[::2], fields[1::2], strict=True)) if fields else {})
                       for sid, fields in entries])
                for key, entries in pairs]


# op -> (latency histogram child, error counter child). Ops are literals in the code (a small
# set); caching the children skips the label lookup per command, and creating the error child
# with the first command makes its series exist at 0 (so rate() and alerts see the first error).
_INSTRUMENTS: dict[str, tuple[Any, Any]] = {}


def _instruments(op: str) -> tuple[Any, Any]:
    found = _INSTRUMENTS.get(op)
    if found is None:
        found = _INSTRUMENTS[op] = (METRICS.redis_latency.labels(op=op), METRICS.redis_errors.labels(op=op))
    return found


def chat_error_of(exc: BaseException) -> ChatError | None:
    """The error a client gets for a Redis failure (``None``: not a Redis failure, a bug)."""
    if isinstance(exc, TRANSIENT):
        return Unavailable("Redis is unreachable, retry shortly")
    if isinstance(exc, rexc.ResponseError):
        if unavailable_reply(exc):
            return Unavailable("Redis refuses service for now, retry shortly")
        return Internal("internal error")
    if isinstance(exc, rexc.RedisError):
        return Internal("internal error")
    if (isinstance(exc, AttributeError) and "'NoneType' object has no attribute" in str(exc)) or (
            isinstance(exc, RuntimeError) and "unable to perform operation on" in str(exc)):
        # redis-py's cluster client (8.x) can fail a command during a failover with
        # "'NoneType' object has no attribute 'writelines'" or "unable to perform operation on
        # <TCPTransport closed=True>" (a connection it dropped meanwhile): Redis is in
        # transition, not our bug. Any other AttributeError or RuntimeError is a bug.
        return Unavailable("Redis is failing over, retry shortly")
    return None


@contextlib.contextmanager
def unavailable_on_redis_errors(op: str = "command") -> Iterator[None]:
    """Map Redis errors to :class:`Unavailable` (or ``internal``) and count them."""
    latency, errors = _instruments(op)
    start = time.perf_counter()
    try:
        yield
    except Exception as exc:
        mapped = chat_error_of(exc)
        if mapped is None:
            raise
        errors.inc()
        raise mapped from exc
    finally:
        latency.observe(time.perf_counter() - start)
