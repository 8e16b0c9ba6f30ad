"""Redis client libraries side by side on the node's command mix (issue 14, "Directions").

Starts its own redis-server on a free port and a real 3-master Redis Cluster (node.embedded), then
measures, for redis-py, coredis and valkey-glide, the calls the node makes, issued the way the
node issues them, as operations per CPU-second of this process (``time.process_time``: every
thread of the process, so glide's Rust threads count) and per wall second:

* ``append``: EVALSHA of a small script (XADD + INCR on two keys of one slot, the shape of
  node.streams' append), 64 appends in flight from one process, each library two ways:
  plain concurrent calls, and one ordered pipeline in flight at a time (redis-py: the node's own
  ``node.autopipe.AppendPipe``; coredis and glide: the same algorithm on their pipeline/Batch);
* ``hello``: a non-transactional pipeline of 12 mixed reads (HMGET, SMEMBERS, SCARD, GET,
  XREVRANGE COUNT 1, ZSCORE) on keys of one slot, 16 in flight;
* ``xread``: one multi-key XREAD of 20 streams of one slot (entries present, 2 per stream),
  4 readers each on a connection (client) of its own, one call in flight per reader, as the
  shard readers do; redis-py also with the node's hand-packed ``RawXread``;
* ``set``: SET key value EX 60 (the presence heartbeat), 64 in flight.

Each case runs ``--reps`` times with the libraries interleaved (A, B, C, A, B, C, ...); the
report gives the median and the spread. Every run checks its replies against values computed
from the data written (and so across libraries), plus probes that are not timed: appends in
submission order, the NOSCRIPT fallback after SCRIPT FLUSH, and whether a blocking XREAD on
the shared client delays other commands.

    python -m loadtest.redis_clients --out loadtest/results/redis-clients-<date>-<commit>.json

Needs the loadtest requirements (coredis, valkey-glide); a library that does not import is
reported as unavailable, not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from node import redisio
from node.autopipe import AppendPipe
from node.embedded import start_redis, start_redis_cluster

coredis: Any
glide: Any
try:
    import coredis
except Exception as exc:  # pragma: no cover - depends on the environment
    coredis = None
    COREDIS_ERROR = f"{type(exc).__name__}: {exc}"
else:
    COREDIS_ERROR = ""

try:
    import glide
except Exception as exc:  # pragma: no cover - depends on the environment
    glide = None
    GLIDE_ERROR = f"{type(exc).__name__}: {exc}"
else:
    GLIDE_ERROR = ""

# KEYS: stream, counter (one slot).  ARGV: maxlen, author, text.  The shape of the node's append
# (node.streams.APPEND_LUA: XADD with MAXLEN ~ and a counter in the same slot), not its semantics.
APPEND_LUA = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'f', ARGV[2], 't', ARGV[3])
local seq = redis.call('INCR', KEYS[2])
return {seq, id}
"""

TEXT = "x" * 100  # a message of ~100 B, as in the measurements
ROOMS = 256  # rooms the appends spread over
USERS = 64  # hello targets (one slot each)
STREAMS_PER_SHARD = 20  # keys of one shard reader's XREAD
READ_SHARDS = 4  # readers, one connection each
PRESENCE_KEYS = 1000
MAX_BATCH = 256  # as node.autopipe

CASES = ("append", "hello", "xread", "set")


# --- normalisation: every library's reply to one comparable shape -----------------------------

def norm(value: Any) -> Any:
    """A reply as plain lists, bytes, ints and floats, comparable across libraries."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, int, float)) or value is None:
        return value
    if isinstance(value, (set, frozenset)):
        return sorted(norm(v) for v in value)
    if isinstance(value, dict):
        return [[norm(k), norm(v)] for k, v in value.items()]
    if hasattr(value, "identifier") and hasattr(value, "field_values"):  # coredis StreamEntry
        return [norm(value.identifier), norm(dict(value.field_values))]
    if isinstance(value, (list, tuple)):
        return [norm(v) for v in value]
    return repr(value)


def norm_entries(value: Any) -> Any:
    """Stream entries (XREVRANGE) as ``[[id, [[field, value], ...]], ...]``: redis-py gives
    ``[(id, {f: v})]``, glide ``{id: [[f, v]]}``, coredis ``(StreamEntry, ...)``."""
    if isinstance(value, dict):
        return [[norm(k), norm(v)] for k, v in value.items()]
    return norm(value)


def norm_xread(value: Any) -> Any:
    """An XREAD reply as ``[[key, entries], ...]`` sorted by key (RESP2 list, RESP3 map)."""
    if value is None:
        return None
    pairs = value.items() if isinstance(value, dict) else value
    return sorted([norm(k), norm_entries(v)] for k, v in pairs)


def norm_ok(value: Any) -> Any:
    return b"OK" if value is True or value in ("OK", b"OK") else norm(value)


def is_noscript(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}"
    return "NoScript" in text or "NOSCRIPT" in text


# --- keys and data ------------------------------------------------------------------------------

def append_keys(tag: str, room: int) -> list[str]:
    return [f"{{bench:{tag}:r{room}}}:s", f"{{bench:{tag}:r{room}}}:n"]


def hello_keys(user: int) -> dict[str, str]:
    t = f"{{bench:u{user}}}"
    return {"meta": f"{t}:meta", "meta2": f"{t}:meta2", "rooms": f"{t}:rooms", "members": f"{t}:members",
            "cursor": f"{t}:cursor", "name": f"{t}:name", "stream": f"{t}:s", "stream2": f"{t}:s2",
            "online": f"{t}:online"}


META_FIELDS = ["epoch", "seq", "last_id", "name"]


def hello_commands(user: int) -> list[tuple[str, tuple[Any, ...]]]:
    """The 12 reads of one hello-like batch: (command, args)."""
    k = hello_keys(user)
    return [
        ("hmget", (k["meta"], META_FIELDS)),
        ("smembers", (k["rooms"],)),
        ("scard", (k["members"],)),
        ("get", (k["cursor"],)),
        ("xrevrange1", (k["stream"],)),
        ("zscore", (k["online"], f"s{user}")),
        ("hmget", (k["meta2"], META_FIELDS)),
        ("smembers", (k["members"],)),
        ("scard", (k["rooms"],)),
        ("get", (k["name"],)),
        ("xrevrange1", (k["stream2"],)),
        ("zscore", (k["online"], "nobody")),
    ]


def reader_keys(shard: int) -> list[str]:
    return [f"{{bench:shard{shard}}}:room{i}" for i in range(STREAMS_PER_SHARD)]


def seed(sync: Any) -> dict[str, Any]:
    """Write the read-only data of the hello and xread cases (redis-py, sync); returns what
    each read must answer, normalised, so that every library is checked against the data."""
    expected: dict[str, Any] = {"hello": {}, "xread": {}, "xread_from": {}}
    for user in range(USERS):
        k = hello_keys(user)
        sync.hset(k["meta"], mapping={"epoch": "e1", "seq": str(user), "last_id": "0-1", "name": f"room {user}"})
        sync.hset(k["meta2"], mapping={"epoch": "e2", "seq": "7", "name": "dm"})
        sync.sadd(k["rooms"], *[f"room{i}" for i in range(10)])
        sync.sadd(k["members"], *[f"user{i}" for i in range(user % 5 + 2)])
        sync.set(k["cursor"], f"1-{user}")
        sync.set(k["name"], f"User {user}")
        ids = [sync.xadd(k["stream"], {"f": f"u{i}", "t": TEXT}) for i in range(3)]
        sync.xadd(k["stream2"], {"f": "only", "t": "short"})
        sync.zadd(k["online"], {f"s{user}": 1000.5 + user})
        last = sync.xrevrange(k["stream"], count=1)
        last2 = sync.xrevrange(k["stream2"], count=1)
        assert last[0][0] == ids[-1]
        expected["hello"][user] = [
            [b"e1", str(user).encode(), b"0-1", f"room {user}".encode()],
            sorted(f"room{i}".encode() for i in range(10)),
            user % 5 + 2,
            f"1-{user}".encode(),
            norm(last),
            1000.5 + user,
            [b"e2", b"7", None, b"dm"],
            sorted(f"user{i}".encode() for i in range(user % 5 + 2)),
            10,
            f"User {user}".encode(),
            norm(last2),
            None,
        ]
    for shard in range(READ_SHARDS):
        streams: dict[str, str] = {}
        for key in reader_keys(shard):
            ids = [sync.xadd(key, {"f": f"author{i}", "t": TEXT}) for i in range(3)]
            streams[key] = ids[0].decode()
        expected["xread_from"][shard] = streams
        expected["xread"][shard] = norm_xread(sync.xread(streams, count=100))
    return expected


# --- a generic ordered batcher (node.autopipe.AppendPipe's algorithm for other libraries) -------

class OrderedBatcher:
    """Queue appends, send them in submission order as one pipeline per batch, one batch in
    flight at a time (what was queued meanwhile goes in the next), resend in order what a server
    answered NOSCRIPT after loading the script: node.autopipe.AppendPipe for coredis and glide."""

    def __init__(self, execute: Callable[[list[tuple[list[str], list[Any]]]], Awaitable[list[Any]]],
                 load: Callable[[], Awaitable[Any]]) -> None:
        self.execute = execute
        self.load = load
        self.queue: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self.task: asyncio.Task[None] | None = None
        self.batches = 0

    def submit(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queue.append((keys, args, fut))
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._drain())
        return fut

    async def _drain(self) -> None:
        while self.queue:
            batch, self.queue = self.queue[:MAX_BATCH], self.queue[MAX_BATCH:]
            self.batches += 1
            try:
                items = [(k, a) for k, a, _ in batch]
                results = await self.execute(items)
                if any(isinstance(r, BaseException) and is_noscript(r) for r in results):
                    await self.load()
                    again = [i for i, r in enumerate(results) if isinstance(r, BaseException) and is_noscript(r)]
                    for i, r in zip(again, await self.execute([items[i] for i in again]), strict=True):
                        results[i] = r
            except Exception as exc:
                results = [exc] * len(batch)
            for (_, _, fut), result in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)


# --- the libraries ------------------------------------------------------------------------------

@dataclass
class Topology:
    name: str  # "single" or "cluster"
    host: str
    port: int
    masters: list[tuple[str, int]]

    @property
    def cluster(self) -> bool:
        return self.name == "cluster"

    def sync_for_key(self, key: str) -> Any:
        """A plain sync client of the server that owns ``key`` (for checks and probes)."""
        if not self.cluster:
            return redis.Redis(host=self.host, port=self.port)
        rc = redis.cluster.RedisCluster(host=self.host, port=self.port)
        node = rc.get_node_from_key(key)
        rc.close()
        return redis.Redis(host=node.host, port=node.port)


class Lib:
    """One client library on one topology: the operations of each case."""

    name = ""
    variants: dict[str, list[str]] = {}  # case -> variant names this library runs

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.sha = ""

    async def open(self, stack: contextlib.AsyncExitStack) -> None: ...

    # append: plain call and the batcher
    async def append(self, keys: list[str], args: list[Any]) -> Any: raise NotImplementedError
    def submit(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]: raise NotImplementedError
    async def hello(self, user: int) -> list[Any]: raise NotImplementedError
    async def readers(self, stack: contextlib.AsyncExitStack, n: int, variant: str) -> list[Callable[[dict[str, str]], Awaitable[Any]]]:
        raise NotImplementedError
    async def set_ex(self, key: str, value: str) -> Any: raise NotImplementedError
    async def xread_block(self, key: str, block_ms: int) -> Any: raise NotImplementedError
    async def get(self, key: str) -> Any: raise NotImplementedError
    async def script_flush(self) -> None:
        for host, port in self.topo.masters:
            redis.Redis(host=host, port=port).script_flush()


class RedisPyShaped(Lib):
    """The plain commands, for the two clients that share redis-py's command API."""

    client: Any

    async def set_ex(self, key: str, value: str) -> Any:
        return await self.client.set(key, value, ex=60)

    async def xread_block(self, key: str, block_ms: int) -> Any:
        return await self.client.xread({key: "$"}, block=block_ms)

    async def get(self, key: str) -> Any:
        return await self.client.get(key)


class RedisPy(RedisPyShaped):
    name = "redis-py"
    variants = {"append": ["redis-py", "redis-py+AppendPipe"], "hello": ["redis-py"],
                "xread": ["redis-py", "redis-py+RawXread"], "set": ["redis-py"]}

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        # The node's own client factory: pool, retry, health check and timeouts as in production.
        url = (f"redis+cluster://{self.topo.host}:{self.topo.port}" if self.topo.cluster
               else f"redis://{self.topo.host}:{self.topo.port}/0")
        self.client = redisio.connect(url)
        stack.push_async_callback(self.client.aclose)
        self.script = self.client.register_script(APPEND_LUA)
        self.sha = self.script.sha
        await self.client.script_load(APPEND_LUA)
        self.pipe = AppendPipe(self.client, self.script)
        stack.push_async_callback(self.pipe.aclose)

    async def append(self, keys: list[str], args: list[Any]) -> Any:
        return await self.script(keys=keys, args=args)

    def submit(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        return self.pipe.submit(keys, args)

    async def hello(self, user: int) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for cmd, args in hello_commands(user):
            if cmd == "xrevrange1":
                pipe.xrevrange(args[0], count=1)
            else:
                getattr(pipe, cmd)(*args)
        return await pipe.execute()

    async def readers(self, stack: contextlib.AsyncExitStack, n: int, variant: str) -> list[Any]:
        out: list[Any] = []
        for shard in range(n):
            # A connection of its own to the server that owns the shard's slot, as node.fanout's
            # readers (redisio.connect_dedicated / connect_server).
            owner = self.topo.sync_for_key(reader_keys(shard)[0]).get_connection_kwargs()
            conn = redisio.connect_server(owner["host"], owner["port"], 5000)
            stack.push_async_callback(conn.aclose)
            await conn.ping()  # opens the single connection (RawXread needs it open)
            if variant == "redis-py+RawXread":
                raw = redisio.RawXread()

                async def raw_call(streams: dict[str, str], conn: Any = conn, raw: Any = raw) -> Any:
                    # The node's call (node.fanout): BLOCK is in the packed command; entries are
                    # present, so Redis answers at once.
                    return await redisio.RawXread.call(conn, raw.pack(streams, 100, 5000))
                out.append(raw_call)
            else:
                async def call(streams: dict[str, str], conn: Any = conn) -> Any:
                    return await conn.xread(streams, count=100)
                out.append(call)
        return out

class Coredis(RedisPyShaped):
    name = "coredis"
    variants = {"append": ["coredis", "coredis+pipeline"], "hello": ["coredis"], "xread": ["coredis"],
                "set": ["coredis"]}

    def _new(self, **kw: Any) -> Any:
        cls = coredis.RedisCluster if self.topo.cluster else coredis.Redis
        return cls(host=self.topo.host, port=self.topo.port, stream_timeout=10, connect_timeout=2, **kw)

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        # Its documented fast mode (most runtime validation off), to give it its best showing.
        coredis.Config.optimized = True
        self.client = await stack.enter_async_context(self._new())
        self.script = self.client.register_script(APPEND_LUA)
        self.sha = self.script.sha
        await self.client.script_load(APPEND_LUA)
        self.batcher = OrderedBatcher(self._exec_batch, lambda: self.client.script_load(APPEND_LUA))

    async def _exec_batch(self, items: list[tuple[list[str], list[Any]]]) -> list[Any]:
        async with self.client.pipeline(transaction=False, raise_on_error=False) as pipe:
            for keys, args in items:
                # evalsha, not the Script object: in a pipeline that adds a SCRIPT EXISTS round
                # trip per pipeline; NOSCRIPT is handled by the batcher, as AppendPipe does.
                pipe.evalsha(self.sha, keys, args)
        return list(pipe.results or ())

    async def append(self, keys: list[str], args: list[Any]) -> Any:
        return await self.script(keys, args)  # EVALSHA, SCRIPT LOAD and retry on NOSCRIPT

    def submit(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        return self.batcher.submit(keys, args)

    async def hello(self, user: int) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for cmd, args in hello_commands(user):
                if cmd == "xrevrange1":
                    pipe.xrevrange(args[0], "+", "-", count=1)
                elif cmd == "zscore":
                    pipe.zscore(args[0], args[1])
                else:
                    getattr(pipe, cmd)(*args)
        return list(pipe.results or ())

    async def readers(self, stack: contextlib.AsyncExitStack, n: int, variant: str) -> list[Any]:
        out = []
        for _ in range(n):
            client = await stack.enter_async_context(self._new(max_connections=1) if not self.topo.cluster
                                                     else self._new())

            async def call(streams: dict[str, str], client: Any = client) -> Any:
                return await client.xread(streams, count=100)
            out.append(call)
        return out

class Glide(Lib):
    name = "glide"
    variants = {"append": ["glide", "glide+Batch"], "hello": ["glide"], "xread": ["glide"], "set": ["glide"]}

    async def _new(self) -> Any:
        addr = [glide.NodeAddress(self.topo.host, self.topo.port)]
        # request_timeout: glide's default (250 ms) fails requests on a loaded 2-core machine.
        if self.topo.cluster:
            return await glide.GlideClusterClient.create(
                glide.GlideClusterClientConfiguration(addr, request_timeout=10000))
        return await glide.GlideClient.create(glide.GlideClientConfiguration(addr, request_timeout=10000))

    async def open(self, stack: contextlib.AsyncExitStack) -> None:
        self.client = await self._new()
        stack.push_async_callback(self.client.close)
        self.script = glide.Script(APPEND_LUA)
        self.sha = self.script.get_hash()
        self.batcher = OrderedBatcher(self._exec_batch, self._load)
        self.expiry = glide.ExpirySet(glide.ExpiryType.SEC, 60)

    async def _load(self) -> None:
        if self.topo.cluster:
            await self.client.custom_command(["SCRIPT", "LOAD", APPEND_LUA], glide.AllPrimaries())
        else:
            await self.client.custom_command(["SCRIPT", "LOAD", APPEND_LUA])

    def _batch(self) -> Any:
        return glide.ClusterBatch(is_atomic=False) if self.topo.cluster else glide.Batch(is_atomic=False)

    async def _exec_batch(self, items: list[tuple[list[str], list[Any]]]) -> list[Any]:
        # glide's Batch has no script command (invoke_script is a client method only): EVALSHA as
        # a custom command, NOSCRIPT handled by the batcher.
        batch = self._batch()
        sha = self.sha
        for keys, args in items:
            batch.custom_command(["EVALSHA", sha, str(len(keys)), *keys, *args])
        return list(await self.client.exec(batch, raise_on_error=False) or ())

    async def append(self, keys: list[str], args: list[Any]) -> Any:
        return await self.client.invoke_script(self.script, keys=keys, args=args)

    def submit(self, keys: list[str], args: list[Any]) -> asyncio.Future[Any]:
        return self.batcher.submit(keys, args)

    async def hello(self, user: int) -> list[Any]:
        batch = self._batch()
        for cmd, args in hello_commands(user):
            if cmd == "xrevrange1":
                batch.xrevrange(args[0], glide.MaxId(), glide.MinId(), count=1)
            else:
                getattr(batch, cmd)(*args)
        return list(await self.client.exec(batch, raise_on_error=True) or ())

    async def readers(self, stack: contextlib.AsyncExitStack, n: int, variant: str) -> list[Any]:
        out = []
        opts = glide.StreamReadOptions(count=100)
        for _ in range(n):
            client = await self._new()  # a client (one multiplexed connection per server) each
            stack.push_async_callback(client.close)

            async def call(streams: dict[str, str], client: Any = client) -> Any:
                return await client.xread(streams, opts)
            out.append(call)
        return out

    async def set_ex(self, key: str, value: str) -> Any:
        return await self.client.set(key, value, expiry=self.expiry)

    async def xread_block(self, key: str, block_ms: int) -> Any:
        return await self.client.xread({key: "$"}, glide.StreamReadOptions(block_ms=block_ms))

    async def get(self, key: str) -> Any:
        return await self.client.get(key)


ALL_LIBS: list[type[Lib]] = [RedisPy, Coredis, Glide]


def unavailable() -> dict[str, str]:
    out: dict[str, str] = {}
    if coredis is None:
        out["coredis"] = COREDIS_ERROR
    if glide is None:
        out["glide"] = GLIDE_ERROR
    return out


# --- measuring ------------------------------------------------------------------------------------

async def drive(total: int, concurrency: int, op: Callable[[int], Awaitable[Any]]) -> list[Any]:
    """Run ``op(i)`` for i in range(total), ``concurrency`` at a time; replies in order of i."""
    replies: list[Any] = [None] * total
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            replies[i] = await op(i)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, total))))
    return replies


async def timed(coro: Awaitable[Any]) -> tuple[Any, float, float]:
    gc.collect()
    c0, w0 = time.process_time(), time.perf_counter()
    result = await coro
    return result, time.process_time() - c0, time.perf_counter() - w0


@dataclass
class Config:
    append_ops: int = 15000
    hello_ops: int = 2000
    xread_ops: int = 2000
    set_ops: int = 15000
    reps: int = 3
    concurrency: int = 64
    hello_concurrency: int = 16
    readers: int = READ_SHARDS
    warmup: float = 0.1  # share of ops run untimed before each measured run


@dataclass
class Bench:
    topo: Topology
    cfg: Config
    expected: dict[str, Any]
    libs: dict[str, Lib] = field(default_factory=dict)
    readers: dict[str, list[Any]] = field(default_factory=dict)
    run_no: int = 0
    stack: contextlib.AsyncExitStack | None = None

    async def run_variant(self, case: str, variant: str, lib: Lib) -> dict[str, Any]:
        self.run_no += 1
        tag = f"{self.topo.name}{self.run_no}"
        cfg = self.cfg
        ok, problems = True, []
        if case == "append":
            n = cfg.append_ops
            call = lib.append if "+" not in variant else None

            def op_for(prefix: str) -> Callable[[int], Awaitable[Any]]:
                if call is not None:
                    return lambda i: call(append_keys(prefix, i % ROOMS), ["1000", f"a{i}", TEXT])
                return lambda i: lib.submit(append_keys(prefix, i % ROOMS), ["1000", f"a{i}", TEXT])

            await drive(max(1, int(n * cfg.warmup)), cfg.concurrency, op_for(tag + "w"))
            replies, cpu, wall = await timed(drive(n, cfg.concurrency, op_for(tag)))
            problems += check_appends(self.topo, tag, replies)
            sample = [norm(replies[0])[0], type(norm(replies[0])[1]).__name__] if replies else None
        elif case == "hello":
            n = cfg.hello_ops
            await drive(max(1, int(n * cfg.warmup)), cfg.hello_concurrency, lambda i: lib.hello(i % USERS))
            replies, cpu, wall = await timed(drive(n, cfg.hello_concurrency, lambda i: lib.hello(i % USERS)))
            for i in sorted({0, 1, n // 2, n - 1} & set(range(n))):
                got = [norm_entries(v) if j in (4, 10) else norm(v) for j, v in enumerate(replies[i])]
                if got != self.expected["hello"][i % USERS]:
                    problems.append(f"hello {i}: {got!r} != {self.expected['hello'][i % USERS]!r}")
            sample = [norm_entries(v) if j in (4, 10) else norm(v) for j, v in enumerate(replies[0])]
        elif case == "xread":
            n = cfg.xread_ops
            readers = self.readers.get(variant)
            if readers is None:
                assert self.stack is not None
                readers = self.readers[variant] = await lib.readers(self.stack, cfg.readers, variant)
            froms = self.expected["xread_from"]
            per = -(-n // len(readers))

            async def reader(r: int, count: int) -> list[Any]:
                return [await readers[r](froms[r]) for _ in range(count)]

            await asyncio.gather(*(reader(r, max(1, int(per * cfg.warmup))) for r in range(len(readers))))
            got_all, cpu, wall = await timed(asyncio.gather(*(reader(r, per) for r in range(len(readers)))))
            n = per * len(readers)
            for r, replies in enumerate(got_all):
                for i in sorted({0, len(replies) - 1}):
                    if norm_xread(replies[i]) != self.expected["xread"][r]:
                        problems.append(f"xread reader {r} call {i}: {norm_xread(replies[i])!r:.300}")
            sample = norm_xread(got_all[0][0])
        elif case == "set":
            n = cfg.set_ops
            op = lambda i: lib.set_ex(f"{{bench:p{i % PRESENCE_KEYS}}}:{tag}", f"node-1 {i}")  # noqa: E731
            await drive(max(1, int(n * cfg.warmup)), cfg.concurrency, op)
            replies, cpu, wall = await timed(drive(n, cfg.concurrency, op))
            bad = [r for r in replies if norm_ok(r) != b"OK"]
            if bad:
                problems.append(f"{len(bad)} SET replies not OK, e.g. {bad[0]!r}")
            key = f"{{bench:p7}}:{tag}"
            ttl = self.topo.sync_for_key(key).ttl(key)
            if not 0 < ttl <= 60:
                problems.append(f"TTL of {key} is {ttl}")
            sample = norm_ok(replies[0])
        else:
            raise ValueError(case)
        ok = not problems
        return {"case": case, "variant": variant, "lib": lib.name, "ops": n, "cpu_s": round(cpu, 4),
                "wall_s": round(wall, 4), "ops_per_cpu_s": round(n / cpu) if cpu > 0 else None,
                "ops_per_wall_s": round(n / wall) if wall > 0 else None, "correct": ok,
                "problems": problems[:5], "sample_reply": sample}


def check_appends(topo: Topology, tag: str, replies: list[Any]) -> list[str]:
    """Every append answered [seq, id]; per room the seqs are 1..n, the counter is n, the
    stream has n entries and the ids returned are the stream's ids."""
    problems: list[str] = []
    by_room: dict[int, list[Any]] = {}
    for i, reply in enumerate(replies):
        if isinstance(reply, BaseException) or not isinstance(reply, (list, tuple)) or len(reply) != 2:
            problems.append(f"append {i}: {reply!r:.200}")
            continue
        by_room.setdefault(i % ROOMS, []).append(norm(reply))
    for room, got in sorted(by_room.items())[:: max(1, ROOMS // 16)]:
        keys = append_keys(tag, room)
        sync: Any = topo.sync_for_key(keys[0])
        n = len(got)
        if sorted(seq for seq, _ in got) != list(range(1, n + 1)):
            problems.append(f"room {room}: seqs are not 1..{n}")
        if int(sync.get(keys[1]) or 0) != n or sync.xlen(keys[0]) != n:
            problems.append(f"room {room}: counter {sync.get(keys[1])!r}, xlen {sync.xlen(keys[0])}, sent {n}")
        if sorted(i for _, i in got) != sorted(e[0] for e in sync.xrange(keys[0])):
            problems.append(f"room {room}: ids returned are not the stream's")
        sync.close()
    return problems


# --- probes (not timed) ---------------------------------------------------------------------------

async def probe_order(topo: Topology, lib: Lib, variant: str, tag: str, n: int = 300) -> dict[str, Any]:
    """``n`` appends to one room submitted back to back (no await between them), as one
    connection sending fast: are they in the stream in submission order?"""
    keys = append_keys(tag, 0)
    if "+" in variant:
        futs = [lib.submit(keys, ["1000", f"{i}", "o"]) for i in range(n)]
    else:
        futs = [asyncio.ensure_future(lib.append(keys, ["1000", f"{i}", "o"])) for i in range(n)]
    await asyncio.gather(*futs)
    sync: Any = topo.sync_for_key(keys[0])
    order = [int(e[1][b"f"]) for e in sync.xrange(keys[0])]
    sync.close()
    inversions = sum(1 for a, b in zip(order, order[1:], strict=False) if b < a)
    return {"in_order": order == list(range(n)), "inversions": inversions, "appends": n}


async def probe_noscript(topo: Topology, lib: Lib, variant: str, tag: str) -> dict[str, Any]:
    """After SCRIPT FLUSH on every master, appends still succeed (EVALSHA, NOSCRIPT, load, retry)."""
    await lib.script_flush()
    keys = [append_keys(tag, room) for room in range(8)]
    try:
        if "+" in variant:
            replies = await asyncio.gather(*(lib.submit(k, ["1000", "a", "n"]) for k in keys))
        else:
            replies = await asyncio.gather(*(lib.append(k, ["1000", "a", "n"]) for k in keys))
        ok = all(norm(r)[0] == 1 for r in replies)
        return {"ok": ok, "replies": [norm(r)[0] for r in replies]}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


async def probe_blocking(lib: Lib, tag: str, block_ms: int = 400) -> dict[str, Any]:
    """A blocking XREAD on the library's shared client while 5 GETs (same server) go out on it:
    do the GETs wait for the block (one multiplexed connection) or not?"""
    key = f"{{bench:blk{tag}}}:s"
    getkey = f"{{bench:blk{tag}}}:g"
    blocked = asyncio.ensure_future(lib.xread_block(key, block_ms))
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    try:
        await asyncio.wait_for(asyncio.gather(*(lib.get(getkey) for _ in range(5))), 5)
        get_ms = (time.perf_counter() - t0) * 1000
        err = None
    except Exception as exc:
        get_ms, err = None, f"{type(exc).__name__}: {exc}"[:300]
    try:
        reply = await asyncio.wait_for(blocked, 5)
        block_err = None
    except Exception as exc:
        reply, block_err = None, f"{type(exc).__name__}: {exc}"[:300]
    return {"block_ms": block_ms, "gets_ms_during_block": None if get_ms is None else round(get_ms, 1),
            "gets_waited_for_block": None if get_ms is None else get_ms > block_ms / 2,
            "block_reply": norm_xread(reply), "error": err or block_err}


async def guarded(probe: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    """A probe's result, or the error it raised (a finding too: e.g. a pool that refuses)."""
    try:
        return await asyncio.wait_for(probe, 30)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def idle_cpu(seconds: float = 1.0) -> float:
    """CPU-seconds per second this process burns while every client is open and idle."""
    c0 = time.process_time()
    time.sleep(seconds)
    return round((time.process_time() - c0) / seconds, 4)


# --- one topology -----------------------------------------------------------------------------------

async def run_topology(topo: Topology, cfg: Config, libs: list[type[Lib]], cases: list[str],
                       log: Callable[[str], None]) -> dict[str, Any]:
    sync = redis.cluster.RedisCluster(host=topo.host, port=topo.port) if topo.cluster else \
        redis.Redis(host=topo.host, port=topo.port)
    expected = seed(sync)
    sync.close()
    out: dict[str, Any] = {"runs": [], "probes": {}, "errors": {}}
    async with contextlib.AsyncExitStack() as stack:
        bench = Bench(topo, cfg, expected, stack=stack)
        for cls in libs:
            lib = cls(topo)
            try:
                await lib.open(stack)
            except Exception as exc:
                out["errors"][cls.name] = f"open: {type(exc).__name__}: {exc}"[:500]
                continue
            bench.libs[cls.name] = lib
        for case in cases:
            variants = [(v, lib) for lib in bench.libs.values() for v in lib.variants.get(case, [])]
            if case == "xread":  # the readers' own connections, opened before any timing
                for v, lib in variants:
                    try:
                        bench.readers[v] = await lib.readers(stack, cfg.readers, v)
                    except Exception as exc:
                        out["errors"][f"{case}/{v}"] = f"{type(exc).__name__}: {exc}"[:500]
                variants = [(v, lib) for v, lib in variants if v in bench.readers]
            for rep in range(cfg.reps):
                for v, lib in variants:  # interleaved: A, B, C, A, B, C, ...
                    try:
                        row = await bench.run_variant(case, v, lib)
                    except Exception as exc:
                        row = {"case": case, "variant": v, "lib": lib.name, "correct": False,
                               "error": f"{type(exc).__name__}: {exc}"[:500]}
                    row["rep"] = rep
                    out["runs"].append(row)
                    log(f"{topo.name:7} {case:6} {v:22} rep {rep}: "
                        + (f"{row['ops_per_cpu_s']:>8} ops/CPU-s {row['ops_per_wall_s']:>8} ops/s"
                           f" correct={row['correct']}" if "error" not in row else row["error"]))
        out["idle_cpu_per_s_all_clients_open"] = idle_cpu()
        out["threads"] = threads()
        for lib in bench.libs.values():
            for v in lib.variants.get("append", []):
                tag = f"probe-{topo.name}-{v}"
                out["probes"][v] = {"order": await guarded(probe_order(topo, lib, v, tag)),
                                    "noscript": await guarded(probe_noscript(topo, lib, v, tag + "ns"))}
            out["probes"][lib.name + " blocking XREAD on shared client"] = await guarded(probe_blocking(lib, lib.name))
    out["summary"] = summarize(out["runs"])
    return out


def threads() -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return None


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    keyed: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in runs:
        keyed.setdefault((row["case"], row["variant"]), []).append(row)
    for (case, variant), rows in keyed.items():
        cpu = [r["ops_per_cpu_s"] for r in rows if r.get("ops_per_cpu_s")]
        wall = [r["ops_per_wall_s"] for r in rows if r.get("ops_per_wall_s")]
        med = statistics.median(cpu) if cpu else None
        out.setdefault(case, {})[variant] = {
            "median_ops_per_cpu_s": round(med) if med else None,
            "min_ops_per_cpu_s": min(cpu) if cpu else None, "max_ops_per_cpu_s": max(cpu) if cpu else None,
            "spread_pct": round(100 * (max(cpu) - min(cpu)) / med, 1) if med else None,
            "median_ops_per_wall_s": round(statistics.median(wall)) if wall else None,
            "runs": len(rows), "correct": all(r.get("correct") for r in rows) and bool(cpu),
        }
    return out


def table(doc: dict[str, Any]) -> str:
    lines = ["| topology | case | variant | median ops/CPU-s | min–max | spread | median ops/s (wall) | correct |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    for name, topo in doc["topologies"].items():
        for case, variants in topo["summary"].items():
            for v, s in variants.items():
                lines.append(f"| {name} | {case} | {v} | {s['median_ops_per_cpu_s']} | "
                             f"{s['min_ops_per_cpu_s']}–{s['max_ops_per_cpu_s']} | {s['spread_pct']}% | "
                             f"{s['median_ops_per_wall_s']} | {'yes' if s['correct'] else 'NO'} |")
    return "\n".join(lines)


def versions() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dist in ("redis", "hiredis", "coredis", "valkey-glide", "uvloop"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    import redis.utils

    out["redis_py_hiredis_available"] = bool(redis.utils.HIREDIS_AVAILABLE)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="results JSON (default loadtest/results/redis-clients-<date>-<commit>.json)")
    ap.add_argument("--topologies", default="single,cluster")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--libs", default="redis-py,coredis,glide")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every op count (e.g. 0.01 for a smoke run)")
    ap.add_argument("--replicas", type=int, default=0, help="replicas per master of the cluster")
    ap.add_argument("--no-uvloop", action="store_true")
    args = ap.parse_args(argv)

    cfg = Config(reps=args.reps)
    for name in ("append_ops", "hello_ops", "xread_ops", "set_ops"):
        setattr(cfg, name, max(8, int(getattr(cfg, name) * args.scale)))
    wanted = set(args.libs.split(","))
    missing = unavailable()
    libs = [cls for cls in ALL_LIBS if cls.name in wanted and cls.name not in missing]
    cases = [c for c in args.cases.split(",") if c]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    date = time.strftime("%Y-%m-%d")
    out_path = Path(args.out or f"loadtest/results/redis-clients-{date}-{commit}.json")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    doc: dict[str, Any] = {
        "scenario": "redis-clients", "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python -m loadtest.redis_clients " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"nproc": os.cpu_count(), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
                    "uptime_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()},
        "python": sys.version.split()[0], "loop": "asyncio" if args.no_uvloop else "uvloop",
        "versions": versions(), "unavailable": missing,
        "config": {**cfg.__dict__, "rooms": ROOMS, "users": USERS, "streams_per_xread": STREAMS_PER_SHARD,
                   "append_script": APPEND_LUA.strip(), "cluster": f"3 masters, {args.replicas} replicas"},
        "units": {"append": "appends (EVALSHA)", "hello": "pipelines of 12 reads", "xread": "XREAD calls of 20 keys",
                  "set": "SET EX calls"},
        "topologies": {},
    }

    async def run_all() -> None:
        for name in args.topologies.split(","):
            if name == "single":
                proc = start_redis(0)
                port = int(proc.info["port"])
                topo = Topology("single", "127.0.0.1", port, [("127.0.0.1", port)])
                stop: Callable[[], Any] = functools.partial(proc.stop, timeout=1)
            elif name == "cluster":
                cl = start_redis_cluster(3, args.replicas)
                topo = Topology("cluster", "127.0.0.1", cl.ports[0], [("127.0.0.1", p) for p in cl.ports[:3]])
                stop = cl.stop
            else:
                raise SystemExit(f"unknown topology {name}")
            try:
                doc["topologies"][name] = await run_topology(topo, cfg, libs, cases, log)
            finally:
                stop()

    if args.no_uvloop:
        asyncio.run(run_all())
    else:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run_all())
    doc["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["machine"]["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    doc["correct"] = all(s["correct"] for t in doc["topologies"].values() for c in t["summary"].values()
                         for s in c.values()) and not any(t["errors"] for t in doc["topologies"].values())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=1, default=repr) + "\n")
    print(table(doc))
    print(f"\nresults: {out_path}  correct: {doc['correct']}")
    return 0 if doc["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
