"""Durable appends (``CHAT_REDIS_WAIT_REPLICAS``): the append script, then ``WAIT n timeout``
on the same connection, before a ``send`` is acknowledged.

Redis replicates asynchronously: a master that dies right after it acknowledged a write may
take the write with it, and the replica promoted in its place never had it. ``WAIT n timeout``
blocks until ``n`` replicas acknowledged every write made *on the connection it is sent on*,
so it must follow the append on that connection:

- single Redis: a non-transactional pipeline (``EVALSHA`` + ``WAIT``) on one pooled connection;
- Redis Cluster: the same pipeline on a pooled client of the master that owns the room's slot
  (every key of a room shares its hash tag). The cluster client routes one command at a time
  and sends a keyless ``WAIT`` to any node, so it cannot be used for this.

When ``WAIT`` counts fewer replicas than asked within the timeout the message is still appended
(Redis has no way to take it back): the ``send`` is acknowledged with ``durable: false`` and
``chatcluster_wait_replicas_short_total`` counts it. Such a message survives a failover unless
the master dies before its replicas caught up; the ack is never lost or held back for ever.

A server found short of replicas (a replica down, or a master just promoted whose old master
is gone) is not waited on again at once: for :data:`SHORT_HOLD_S` and for as long as ``ROLE``
(pipelined after the append instead of ``WAIT``) lists fewer online replicas than asked, its
appends are acknowledged ``durable: false`` without waiting, so a missing replica costs one
timeout, not one timeout per message.

Retries are safe: the append script dedupes on the message's ``cmid`` key (the node makes one
up when the client sent none), and on a repeated ``cmid`` it rewrites that key's expiry, a write
that is replicated after the first append's, so the ``WAIT`` that follows covers the first
append too (a ``WAIT`` on a connection that wrote nothing would return at once).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rexc
from prometheus_client import Counter
from redis.asyncio.cluster import RedisCluster

from .metrics import METRICS

# Longest wait for the replicas of one append (WAIT's timeout). A send is acknowledged after at
# most about this long even when no replica answers.
WAIT_TIMEOUT_MS = 1000
# After a short WAIT, a server is not waited on for at least this long (then: once ROLE lists
# enough online replicas).
SHORT_HOLD_S = 1.0
# How long one append keeps trying through a failover (connection refused, MOVED, a master not
# yet promoted) before the send gets `unavailable` (the client retries it with the same cmid).
FAILOVER_BUDGET_S = 10.0

WAIT_SHORT = Counter(
    "chatcluster_wait_replicas_short_total",
    "Appends acknowledged with durable: false: fewer than CHAT_REDIS_WAIT_REPLICAS replicas "
    "confirmed them within the WAIT timeout (or the server was known to be short of replicas)",
    registry=METRICS.registry)

# Error replies after which the slot map is re-read and the append tried again.
_REDIRECTS = ("MOVED", "ASK ", "READONLY", "CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN", "LOADING")

# Connection settings copied from the cluster client's node to a per-master client.
_KWARGS = ("username", "password", "credential_provider", "client_name", "encoding",
           "encoding_errors", "decode_responses", "socket_connect_timeout", "socket_keepalive",
           "socket_keepalive_options", "socket_read_size", "protocol")


class _Retry(Exception):
    """This attempt hit the topology (MOVED, a failover under way): re-resolve, try again."""


class _NoScript(Exception):
    """The server lacked the script; it is loaded now: try again at once."""


def _redirect(exc: BaseException) -> bool:
    return isinstance(exc, (rexc.MovedError, rexc.AskError, rexc.ReadOnlyError, rexc.TryAgainError,
                            rexc.ClusterDownError, rexc.BusyLoadingError)) or (
        isinstance(exc, rexc.ResponseError) and str(exc).startswith(_REDIRECTS))


class DurableAppend:
    """Runs the append script and ``WAIT replicas timeout`` on one connection.

    ``await durable(keys, args)`` returns ``(script result, durable)``. Redis errors other than
    the ones it rides out (see :data:`FAILOVER_BUDGET_S`) propagate to the caller, which maps
    them (``unavailable_on_redis_errors``).
    """

    def __init__(self, redis: Any, script: Any, replicas: int, timeout_ms: int = WAIT_TIMEOUT_MS,
                 max_connections: int = 256) -> None:
        self.redis = redis
        self.script = script  # a redis-py Script: .sha and .script
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.max_connections = max_connections
        self.cluster = isinstance(redis, RedisCluster)
        self._clients: dict[str, Any] = {}  # cluster: master name -> its pooled client
        self._short: dict[str, float] = {}  # server name -> when its WAIT came back short
        self._loaded: set[str] = set()  # servers the script was loaded on by this node
        self._refreshing: asyncio.Future[None] | None = None

    async def __call__(self, keys: list[str], args: list[Any]) -> tuple[Any, bool]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FAILOVER_BUDGET_S
        delay = 0.05
        while True:
            try:
                return await self._attempt(keys, args)
            except _NoScript:
                if loop.time() < deadline:
                    continue  # loaded now: again at once
            except _Retry:
                pass
            except (rexc.ConnectionError, rexc.TimeoutError, OSError, rexc.RedisClusterException):
                # Cluster: the master may be dead, or its slots not covered for a moment; wait
                # for its replica's promotion. Single Redis: `unavailable` at once, like any
                # command (the pool already retried).
                if not self.cluster:
                    raise
            if loop.time() >= deadline:
                raise rexc.ConnectionError("no master took the append within the failover budget")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
            if self.cluster:
                await self._refresh()

    async def _attempt(self, keys: list[str], args: list[Any]) -> tuple[Any, bool]:
        client, name = self._client_for(keys[0])
        if name not in self._loaded:  # else the first WAIT would be paid twice (NOSCRIPT, again)
            await client.script_load(self.script.script)
            self._loaded.add(name)
        short_since = self._short.get(name)
        pipe = client.pipeline(transaction=False)
        pipe.evalsha(self.script.sha, len(keys), *keys, *args)
        if short_since is None:
            pipe.execute_command("WAIT", self.replicas, self.timeout_ms)
        else:
            pipe.execute_command("ROLE")
        result, check = await pipe.execute(raise_on_error=False)
        if isinstance(result, rexc.NoScriptError):
            # Scripts are not replicated: a promoted replica, or a restarted server, lacks it.
            # Its WAIT still ran; if short, this server lacks replicas: do not wait again.
            if short_since is None and isinstance(check, int) and check < self.replicas:
                self._short[name] = time.monotonic()
            await client.script_load(self.script.script)
            raise _NoScript
        if isinstance(result, BaseException):
            if self.cluster and _redirect(result):
                raise _Retry
            raise result
        if short_since is None:
            # WAIT refused (a proxy or service that does not allow it): the message is stored,
            # so it is acked, not durable; the server is then treated as short of replicas.
            durable = not isinstance(check, BaseException) and int(check) >= self.replicas
            if not durable:
                self._short[name] = time.monotonic()
        else:
            durable = False
            online = len(check[2]) if isinstance(check, list) and len(check) > 2 \
                and check[0] in (b"master", "master") else 0
            if online >= self.replicas and time.monotonic() - short_since >= SHORT_HOLD_S:
                del self._short[name]  # the next append waits again
        if not durable:
            WAIT_SHORT.inc()
        return result, durable

    def _client_for(self, key: str) -> tuple[Any, str]:
        if not self.cluster:
            return self.redis, "redis"
        node = self.redis.get_node_from_key(key)
        client = self._clients.get(node.name)
        if client is None:
            kwargs = {k: v for k, v in node.connection_kwargs.items()
                      if k in _KWARGS or k.startswith("ssl")}
            # The socket must outlast the WAIT it carries; health checks notice dead sockets.
            kwargs["socket_timeout"] = max(5.0, self.timeout_ms / 1000 + 5.0)
            pool = aioredis.BlockingConnectionPool(
                connection_class=node.connection_class, host=node.host, port=node.port,
                max_connections=self.max_connections, timeout=5, health_check_interval=10, **kwargs)
            client = self._clients[node.name] = aioredis.Redis(connection_pool=pool)
        return client, node.name

    async def _refresh(self) -> None:
        """Re-read the slot map (a failover, a moved slot), once for all the appends that
        need it at the same time; drop the clients of former masters."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._reread())
        await asyncio.shield(self._refreshing)

    async def _reread(self) -> None:
        try:
            await self.redis.nodes_manager.initialize()
        except Exception:  # the cluster is still electing: the next attempt tries again
            return
        masters = {node.name for node in self.redis.get_primaries()}
        for name in [n for n in self._clients if n not in masters]:
            client = self._clients.pop(name)
            self._short.pop(name, None)
            self._loaded.discard(name)
            try:
                await client.aclose()
            except Exception:
                pass

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            try:
                await client.aclose()
            except Exception:
                pass
