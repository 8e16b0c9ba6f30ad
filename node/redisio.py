"""Redis clients and the boundary where Redis errors become :class:`~node.errors.Unavailable`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc
from redis.asyncio.cluster import RedisCluster

from .errors import Unavailable
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


def is_cluster_url(url: str) -> bool:
    return url.startswith("redis+cluster://")


def connect(url: str, *, max_connections: int = 256) -> Any:
    """A shared client for commands (pooled). ``redis+cluster://`` gives a cluster client."""
    if is_cluster_url(url):
        return RedisCluster.from_url(
            "redis://" + url[len("redis+cluster://"):],
            max_connections=max_connections,
        )
    # A blocking pool: a burst of commands waits for a free connection instead of failing.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=5, socket_connect_timeout=2,
        health_check_interval=15, socket_keepalive=True,
    )
    return aioredis.Redis(connection_pool=pool)


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


# op -> (latency histogram child, error counter child). Ops are literals in the code (a small
# set); caching the children skips the label lookup per command, and creating the error child
# with the first command makes its series exist at 0 (so rate() and alerts see the first error).
_INSTRUMENTS: dict[str, tuple[Any, Any]] = {}


def _instruments(op: str) -> tuple[Any, Any]:
    found = _INSTRUMENTS.get(op)
    if found is None:
        found = _INSTRUMENTS[op] = (METRICS.redis_latency.labels(op=op), METRICS.redis_errors.labels(op=op))
    return found


@contextlib.contextmanager
def unavailable_on_redis_errors(op: str = "command") -> Iterator[None]:
    """Map transient Redis errors to :class:`Unavailable` and count them."""
    latency, errors = _instruments(op)
    start = time.perf_counter()
    try:
        yield
    except TRANSIENT as exc:
        errors.inc()
        raise Unavailable("Redis is unreachable, retry shortly") from exc
    except rexc.ResponseError as exc:
        errors.inc()
        if "LOADING" in str(exc) or "MASTERDOWN" in str(exc) or "CLUSTERDOWN" in str(exc):
            raise Unavailable("Redis is not ready, retry shortly") from exc
        raise
    finally:
        latency.observe(time.perf_counter() - start)


@contextlib.asynccontextmanager
async def timed(op: str) -> AsyncIterator[None]:
    with unavailable_on_redis_errors(op):
        yield
