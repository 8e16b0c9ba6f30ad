"""What ``CHAT_REDIS_WAIT_REPLICAS`` costs per message: ack latency and CPU, WAIT 1 against 0.

Starts a real Redis Cluster (3 masters, 3 replicas, on this machine), waits until every replica
is online, then runs one node per setting, back to back and alternating (``--repeats`` times),
under the same open-loop load: ``--clients`` WebSocket clients, each in a room of its own
(spread over the shards, so over the masters), sending at ``--rate`` messages per second in
total for ``--seconds``. Latency is from each message's *scheduled* send time to its ack (no
coordinated omission). CPU is the node process's and all six redis-servers', per message, less
their idle CPU (measured for ``--idle`` seconds before each run); *other CPU* is the rest of the
machine's busy time over the run (other people's processes on a shared machine, the generator
excluded), as a share of all cores.

    .venv/bin/python -m loadtest.durability_cost --rate 400 --seconds 15 --repeats 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from typing import Any

import psutil
import redis

from node.client import ChatClient
from node.embedded import RedisClusterProcs, start_node, start_redis_cluster


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def machine_busy() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def wait_replicas_online(cluster: RedisClusterProcs, masters: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for port in cluster.ports[:masters]:
        client = redis.Redis(port=port)
        try:
            while not client.execute_command("ROLE")[2]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no online replica of {port}")
                time.sleep(0.2)
        finally:
            client.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run_one(url: str, wait: int, args: argparse.Namespace, redis_pids: list[int]) -> dict[str, Any]:
    env = {"CHAT_AUTH": "dev", "CHAT_HOST": "127.0.0.1", "CHAT_WS_PORT": "0", "CHAT_HTTP_PORT": "0",
           "CHAT_REDIS_URL": url, "CHAT_REDIS_WAIT_REPLICAS": str(wait), "CHAT_LOG_LEVEL": "WARNING",
           "CHAT_RATE_PER_S": "100000", "CHAT_RATE_BURST": "100000", "CHAT_ABUSE_CLOSES_MAX": "0",
           "CHAT_CREATE_ROOM_PER_MIN": "100000", "CHAT_CREATE_ROOM_BURST": "100000",
           "CHAT_NODE_ID": f"cost-w{wait}"}
    node = start_node(env, name=f"node-w{wait}")
    clients: list[ChatClient] = []
    try:
        ws = f"ws://127.0.0.1:{node.info['ws_port']}/ws"
        rooms: list[str] = []
        for i in range(1 if args.closed else args.clients):
            client = ChatClient(ws, user=f"u{wait}x{i}")
            await asyncio.wait_for(client.start(), 15)
            clients.append(client)
            reply = await client.request("create_room", name=f"cost {i}", visibility="closed")
            rooms.append(reply["room"]["id"])
        for client, room in zip(clients, rooms, strict=True):  # warm up: scripts, pools
            await client.send(room, "warm-up")
        latencies: list[float] = []
        durable: list[bool] = []
        n = args.closed if args.closed else int(args.rate * args.seconds)
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[None]] = []

        async def one(i: int, due: float) -> None:
            reply = await clients[i % len(clients)].send(rooms[i % len(rooms)], f"cost {i}", timeout=60)
            latencies.append(loop.time() - due)
            durable.append(bool(reply.get("durable", False)))

        # Idle cost (heartbeats, blocked readers, cluster bus) over a quiet second, subtracted
        # below so that the figures are per message.
        i0, node_idle0, redis_idle0 = loop.time(), cpu_seconds([node.pid]), cpu_seconds(redis_pids)
        await asyncio.sleep(args.idle)
        idle_wall = loop.time() - i0
        node_idle = (cpu_seconds([node.pid]) - node_idle0) / idle_wall
        redis_idle = (cpu_seconds(redis_pids) - redis_idle0) / idle_wall
        busy0, gen_cpu0 = machine_busy(), cpu_seconds([os.getpid()])
        node_cpu0, redis_cpu0 = cpu_seconds([node.pid]), cpu_seconds(redis_pids)
        t0 = loop.time() + 0.05
        if args.closed:  # one client, each send after the previous ack: the bare round trip
            await asyncio.sleep(0.05)
            for i in range(n):
                await one(i, loop.time())
        else:
            for i in range(n):
                due = t0 + i / args.rate
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i, due)))
            await asyncio.gather(*tasks)
        wall = loop.time() - t0
        node_cpu = cpu_seconds([node.pid]) - node_cpu0 - node_idle * wall
        redis_cpu = cpu_seconds(redis_pids) - redis_cpu0 - redis_idle * wall
        other = (machine_busy() - busy0 - node_cpu - redis_cpu - cpu_seconds([os.getpid()])
                 + gen_cpu0) / wall / psutil.cpu_count()
        return {"wait": wait, "messages": n, "wall_s": wall,
                "p50_ms": pct(latencies, 0.50) * 1000, "p99_ms": pct(latencies, 0.99) * 1000,
                "max_ms": max(latencies) * 1000,
                "node_cpu_us_per_msg": node_cpu / n * 1e6, "redis_cpu_us_per_msg": redis_cpu / n * 1e6,
                "durable_share": sum(durable) / n, "other_cpu_share": other}
    finally:
        for client in clients:
            await client.close()
        node.stop(timeout=5)


async def append_only(cluster: RedisClusterProcs, wait: int, n: int,
                      redis_pids: list[int]) -> dict[str, Any]:
    """The node's own append path (cluster client, script, and with ``wait`` the pipeline on
    the room master's client + WAIT), timed and its CPU (this process's) measured per call."""
    from node import redisio
    from node.keys import Keys
    from node.streams import RoomStreams

    client = redisio.connect(cluster.url)
    try:
        streams = RoomStreams(client, Keys(16), maxlen=10000, cmid_ttl_s=60, wait_replicas=wait)
        room = f"cost-append-{wait}-{time.monotonic_ns()}"
        await streams.ensure_room(room, "open", room)
        for i in range(50):  # warm up: script cache, pools
            await streams.append(room, "u", "U", f"warm {i}", f"w{i}")
        latencies: list[float] = []
        durable = 0
        me = psutil.Process()
        cpu0, rcpu0, t0 = me.cpu_times(), cpu_seconds(redis_pids), time.perf_counter()
        for i in range(n):
            start = time.perf_counter()
            appended = await streams.append(room, "u", "U", f"text {i}", f"c{i}")
            latencies.append(time.perf_counter() - start)
            durable += bool(appended.durable)
        wall = time.perf_counter() - t0
        cpu1 = me.cpu_times()
        node_cpu = cpu1.user + cpu1.system - cpu0.user - cpu0.system
        redis_cpu = cpu_seconds(redis_pids) - rcpu0
        if streams._durable is not None:
            await streams._durable.aclose()
    finally:
        await client.aclose()
    return {"wait": wait, "messages": n, "wall_s": wall, "p50_ms": pct(latencies, 0.5) * 1000,
            "p99_ms": pct(latencies, 0.99) * 1000, "max_ms": max(latencies) * 1000,
            "node_cpu_us_per_msg": node_cpu / n * 1e6, "redis_cpu_us_per_msg": redis_cpu / n * 1e6,
            "durable_share": durable / n, "other_cpu_share": float("nan")}


def redis_only(cluster: RedisClusterProcs, wait: int, n: int, redis_pids: list[int]) -> dict[str, Any]:
    """Appends to one room straight on its master with the node's script, each followed by
    ``WAIT wait 1000`` in the same pipeline (``wait`` 0: no WAIT)."""
    from redis.cluster import RedisCluster as SyncCluster

    from node.keys import Keys
    from node.streams import APPEND_LUA, ENSURE_ROOM_LUA

    keys = Keys(16)
    room = f"cost-redis-{wait}-{time.monotonic_ns()}"
    rc = SyncCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        rc.eval(ENSURE_ROOM_LUA, 1, keys.room_meta(room), "e1", "open", room, "", 0)
        node = rc.get_node_from_key(keys.room_stream(room))
    finally:
        rc.close()
    client = redis.Redis(host=node.host, port=node.port)
    try:
        sha = client.script_load(APPEND_LUA)
        latencies: list[float] = []
        i0, idle0 = time.perf_counter(), cpu_seconds(redis_pids)
        time.sleep(1.0)
        idle = (cpu_seconds(redis_pids) - idle0) / (time.perf_counter() - i0)
        cpu0 = cpu_seconds(redis_pids)
        t0 = time.perf_counter()
        for i in range(n):
            pipe = client.pipeline(transaction=False)
            pipe.evalsha(sha, 3, keys.room_stream(room), keys.room_meta(room),
                         keys.room_cmid(room, "u", f"c{i}"), 10000, "u", "U", f"text {i}", f"c{i}",
                         "", 60, 0, "1")
            if wait:
                pipe.execute_command("WAIT", wait, 1000)
            start = time.perf_counter()
            pipe.execute()
            latencies.append(time.perf_counter() - start)
        wall = time.perf_counter() - t0
        redis_cpu = cpu_seconds(redis_pids) - cpu0 - idle * wall
    finally:
        client.close()
    return {"wait": wait, "messages": n, "wall_s": wall, "p50_ms": pct(latencies, 0.5) * 1000,
            "p99_ms": pct(latencies, 0.99) * 1000, "max_ms": max(latencies) * 1000,
            "node_cpu_us_per_msg": float("nan"), "redis_cpu_us_per_msg": redis_cpu / n * 1e6,
            "durable_share": float(bool(wait)), "other_cpu_share": float("nan")}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=400.0, help="messages per second, all clients")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--idle", type=float, default=2.0, help="seconds of idle baseline per run")
    parser.add_argument("--closed", type=int, default=0,
                        help="instead of the open loop: this many sends, one after another, one client")
    parser.add_argument("--append-only", type=int, default=0,
                        help="instead: this many RoomStreams.append calls in this process, one after "
                             "another (the node's append path alone): its CPU and latency")
    parser.add_argument("--redis-only", type=int, default=0,
                        help="instead: this many appends straight to the room's master (EVALSHA, "
                             "or EVALSHA + WAIT in one pipeline), no node: what WAIT costs Redis")
    parser.add_argument("--waits", default="0,1", help="CHAT_REDIS_WAIT_REPLICAS values, in turn")
    args = parser.parse_args()
    waits = [int(w) for w in args.waits.split(",")]
    cluster = start_redis_cluster(3, 1)
    try:
        wait_replicas_online(cluster, 3)
        redis_pids = [p.pid for p in cluster.procs]
        rows: list[dict[str, Any]] = []
        for _ in range(args.repeats):
            for wait in waits:
                if args.append_only:
                    row = await append_only(cluster, wait, args.append_only, redis_pids)
                elif args.redis_only:
                    row = redis_only(cluster, wait, args.redis_only, redis_pids)
                else:
                    row = await run_one(cluster.url, wait, args, redis_pids)
                rows.append(row)
                print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      file=sys.stderr, flush=True)
        if args.append_only:
            load = (f"{args.append_only} appends one after another through RoomStreams.append in one "
                    "process (node CPU: that process)")
        elif args.redis_only:
            load = f"{args.redis_only} appends one after another, straight to Redis (no node)"
        elif args.closed:
            load = f"{args.closed} sends one after another, one client"
        else:
            load = f"{args.rate:g} msg/s, {args.clients} clients, {args.seconds:g} s"
        print(f"\n{load}; {args.repeats} runs per setting (medians)\n")
        print("| CHAT_REDIS_WAIT_REPLICAS | ack p50 | ack p99 | node CPU per message | "
              "Redis CPU per message (6 servers) | acks durable | other CPU (machine) |")
        print("|---|---|---|---|---|---|---|")
        for wait in waits:
            mine = [r for r in rows if r["wait"] == wait]

            def med(key: str, mine: list[dict[str, Any]] = mine) -> float:
                return statistics.median(r[key] for r in mine)

            durable = f"{med('durable_share'):.0%}" if wait else "(no field)"
            print(f"| {wait} | {med('p50_ms'):.2f} ms | {med('p99_ms'):.2f} ms | "
                  f"{med('node_cpu_us_per_msg'):.0f} µs | {med('redis_cpu_us_per_msg'):.0f} µs | {durable} | "
                  f"{med('other_cpu_share'):.0%} |")
    finally:
        cluster.stop()


if __name__ == "__main__":
    asyncio.run(main())
