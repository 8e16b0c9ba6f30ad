"""chatcluster benchmarks: open-loop fan-out, and idle-connection memory.

    python loadtest/bench.py fanout --room-size 100 --rooms 10 --rates 1000,2000,4000 \
        --duration 10 --target ours,naive --json out.json
    python loadtest/bench.py idle --connections 10000 --target ours

Pieces (one module each): :mod:`loadtest.targets` (servers to drive), :mod:`loadtest.wsclient`
(cheap client processes), :mod:`loadtest.publisher` (open-loop publisher), :mod:`loadtest.stats`
(CPU/RSS sampling, percentiles, tables), and the scenarios below, registered in ``SCENARIOS``.

Every target gets its own rooms and users in one shared Redis and its own client connections
in the same client processes; phases alternate between targets rate by rate, so a ratio
between targets is measured in one run, under the same background load.

Output: a JSON document (``--json``) and Markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make `loadtest` and `node` importable
    sys.path.insert(0, str(REPO))


def _node_source(argv: list[str]) -> dict[str, str]:
    """Where the benchmarked ``node`` package comes from (``--node-src``), set up before any
    ``node`` import so that this process, the servers and every child use the same code.

    ``git:REF`` (the default, ``git:HEAD``) exports that commit's ``node/`` to a temp dir, so
    uncommitted edits in the working tree (other people's work in progress) are not measured;
    ``.`` uses the working tree; any other value is a directory holding a ``node`` package.
    """
    import subprocess

    src = "git:HEAD"
    for i, arg in enumerate(argv):
        if arg == "--node-src" and i + 1 < len(argv):
            src = argv[i + 1]
        elif arg.startswith("--node-src="):
            src = arg.split("=", 1)[1]
    if src == ".":
        path = str(REPO)
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip() + " + working tree"
    elif src.startswith("git:"):
        ref = src[4:]
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", ref], capture_output=True,
                                text=True, check=True).stdout.strip()
        path = os.path.join(tempfile.gettempdir(), f"chatcluster-bench-src-{commit[:12]}")
        if not os.path.isdir(os.path.join(path, "node")):
            os.makedirs(path, exist_ok=True)
            archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "node"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", path], input=archive, check=True)
    else:
        path = os.path.abspath(src)
        commit = "directory " + path
    # loadtest itself always comes from this checkout; node from `path`.
    sys.path.insert(0, path)
    os.environ["CHATCLUSTER_BENCH_NODE_PATH"] = path
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [path, str(REPO), os.environ.get("PYTHONPATH")]))
    return {"node_src": src, "node_path": path, "node_commit": commit}


NODE_SOURCE = _node_source(sys.argv[1:])

import psutil  # noqa: E402

from loadtest import stats  # noqa: E402
from loadtest.publisher import publisher_main  # noqa: E402
from loadtest.stats import commandstats, redis_info  # noqa: E402,F401
from loadtest.targets import TARGETS  # noqa: E402
from loadtest.wsclient import WorkerPool, raise_nofile, worker_main  # noqa: E402
from node.embedded import Proc, start_redis  # noqa: E402

CTX = mp.get_context("spawn")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def now_us() -> int:
    return time.time_ns() // 1000


# -- shared infrastructure -------------------------------------------------------------------

class Workers(WorkerPool):
    """The client processes; each one holds a share of every target's connections."""

    def __init__(self, n: int) -> None:
        super().__init__(n, worker_main, "bench-clients")

    def connect(self, target: str, port: int, users: list[str], concurrency: int,
                dialect: str = "ws-json", rooms: list[list[str]] | None = None) -> dict[str, Any]:
        n = len(self.pipes)
        msgs = [{"op": "connect", "target": target, "host": "127.0.0.1", "port": port,
                 "users": users[i::n], "concurrency": concurrency, "dialect": dialect,
                 "rooms": rooms[i::n] if rooms is not None else None} for i in range(n)]
        replies = self.call_all(msgs)
        errors: dict[str, int] = {}
        for r in replies:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        return {"ok": sum(r["ok"] for r in replies), "failed": sum(r["failed"] for r in replies),
                "errors": errors}


class Cluster:
    """Redis plus one server process per target."""

    def __init__(self, targets: list[str], shards: int, logdir: str) -> None:
        self.shards = shards
        self.logdir = logdir
        self.redis = start_redis(log_path=os.path.join(logdir, "redis.log"))
        self.redis_url = self.redis.info["url"]
        self.redis_port = int(self.redis.info["port"])
        self.servers: dict[str, Proc] = {}
        for name in targets:
            self.servers[name] = TARGETS[name].start(
                self.redis_url, shards, os.path.join(logdir, f"{name}.log"))
            log(f"started {name}: pid {self.servers[name].pid} ws port "
                f"{self.servers[name].info['ws_port']}")

    def stop(self) -> None:
        for proc in self.servers.values():
            proc.stop()
        self.redis.stop()


async def seed_rooms(redis_url: str, shards: int, rooms: dict[str, list[str]],
                     kind: str = "open") -> None:
    """Create rooms and memberships directly in Redis, as ``create_room``/``join`` would."""
    import redis.asyncio as aioredis

    from node.keys import Keys
    from node.streams import RoomStreams

    r = aioredis.Redis.from_url(redis_url)
    keys = Keys(shards)
    streams = RoomStreams(r, keys, maxlen=10000, cmid_ttl_s=86400)
    for room, members in rooms.items():
        await streams.ensure_room(room, kind, room, "", int(time.time() * 1000))
        pipe = r.pipeline(transaction=False)
        pipe.sadd(keys.room_members(room), *members)
        for user in members:
            pipe.sadd(keys.user_rooms(user), room)
        await pipe.execute()
    await r.aclose()


# -- fan-out scenario --------------------------------------------------------------------------

class Fanout:
    name = "fanout"

    def __init__(self, args: argparse.Namespace, cluster: Cluster, workers: Workers) -> None:
        self.args = args
        self.cluster = cluster
        self.workers = workers
        self.rooms: dict[str, list[str]] = {}  # target -> room ids
        self.connect_errors: dict[str, dict[str, int]] = {}
        self.peer_seq: dict[str, dict[str, int]] = {}  # peers: the publisher counts seq itself

    def setup(self) -> None:
        a = self.args
        for t_index, target in enumerate(self.cluster.servers):
            tag = f"{target[:1]}{t_index}"
            if a.dm and a.room_size == 2:  # direct rooms: dm:<a>:<b>, a < b
                rooms = {f"dm:b{tag}u{j}x0:b{tag}u{j}x1": [f"b{tag}u{j}x0", f"b{tag}u{j}x1"]
                         for j in range(a.rooms)}
            else:
                rooms = {f"r-bench{tag}{j:04d}": [f"b{tag}u{j}x{k}" for k in range(a.room_size)]
                         for j in range(a.rooms)}
            dialect = TARGETS[target].dialect
            if dialect == "ws-json":
                asyncio.run(seed_rooms(self.cluster.redis_url, self.cluster.shards, rooms,
                                       kind="direct" if a.dm and a.room_size == 2 else "open"))
            self.rooms[target] = list(rooms)
            users = [u for members in rooms.values() for u in members]
            user_rooms = [[room] for room, members in rooms.items() for _ in members]
            t = time.monotonic()
            port = int(self.cluster.servers[target].info["ws_port"])
            res = self.workers.connect(target, port, users, a.concurrency, dialect,
                                       user_rooms if dialect == "sio" else None)
            log(f"{target}: {res['ok']} clients connected in {time.monotonic() - t:.1f}s"
                + (f", {res['failed']} failed" if res["failed"] else "")
                + (f", retried after: {res['errors']}" if res["errors"] else ""))
            self.connect_errors[target] = res["errors"]
            if res["failed"]:
                raise RuntimeError(f"{target}: {res['failed']} clients failed to connect")

    def phase(self, target: str, rate: float, duration: float) -> dict[str, Any]:
        a = self.args
        server = self.cluster.servers[target]
        rooms = self.rooms[target]
        t0 = now_us() + 1_000_000  # the publisher process needs a moment to start
        w0 = t0 + int(a.warmup * 1e6)
        w1 = w0 + int(duration * 1e6)
        self.workers.call_all({"op": "phase", "window": [w0, w1]})
        parent, child = CTX.Pipe()
        pub = CTX.Process(target=publisher_main, args=(child,), kwargs=dict(
            redis_host="127.0.0.1", redis_port=self.cluster.redis_port, shards=self.cluster.shards,
            rooms=rooms, rate=rate, t0_us=t0, t_end_us=w1, text_bytes=a.text_bytes,
            dialect="ours" if TARGETS[target].dialect == "ws-json" else target,
            seq_start=self.peer_seq.get(target)), daemon=True)
        pub.start()
        procs = {"node": [server.pid], "redis": [self.cluster.redis.pid],
                 "publisher": [pub.pid], "clients": self.workers.pids}
        sampler = stats.CpuSampler(procs)
        time.sleep(max(0.0, (w0 - now_us()) / 1e6))
        sampler.start()
        time.sleep(max(0.0, (w1 - now_us()) / 1e6))
        cpu = sampler.stop()
        if not parent.poll(30):
            raise RuntimeError("publisher did not finish")
        pub_result = parent.recv()
        pub.join(5)
        if "error" in pub_result:
            raise RuntimeError(f"publisher failed: {pub_result['error']}")
        self.peer_seq[target] = {**self.peer_seq.get(target, {}), **pub_result["last_seq"]}
        # Drain: wait until every client saw the last message of its room.
        caught_up, t_drain = self._drain(target, pub_result["last_seq"], a.drain_timeout)
        reports = self.workers.call_all({"op": "report"})
        lat = array("q")
        for r in reports:
            lat.frombytes(r["latencies"])
        frames = sum(r["frames_in_window"] for r in reports)
        scheduled = int(rate * duration)
        expected = scheduled * a.room_size
        node_cpu = cpu["node"]
        res = {
            "target": target, "rate_msgs": rate, "room_size": a.room_size, "rooms": a.rooms,
            "duration_s": duration,
            "offered_deliveries_per_s": rate * a.room_size,
            "deliveries_per_s": frames / duration,
            "deliveries_in_window": frames,
            "latency_samples": len(lat), "latency_expected": expected,
            "node_cpu_s": node_cpu,
            "node_cpu_util": node_cpu / duration,
            "node_sys_share": cpu["node_sys"] / node_cpu if node_cpu > 0 else 0.0,
            "clients_sys_share": cpu["clients_sys"] / cpu["clients"] if cpu["clients"] > 0 else 0.0,
            "node_cpu_us_per_delivery": (node_cpu / frames * 1e6) if frames else None,
            "deliveries_per_node_cpu_s": (frames / node_cpu) if node_cpu > 0 else None,
            "redis_cpu_util": cpu["redis"] / duration,
            "publisher_cpu_util": cpu["publisher"] / duration,
            "clients_cpu_util": cpu["clients"] / duration,
            "generator_cpu_util": (cpu["publisher"] + cpu["clients"]) / duration,
            "machine_busy_util": cpu["machine_busy"] / duration,
            "other_cpu_util": max(0.0, cpu["machine_busy"] - sum(
                cpu[k] for k in ("node", "redis", "publisher", "clients"))) / duration,
            "publisher_max_lag_ms": pub_result["max_lag_ms"],
            "published": pub_result["sent"],
            "caught_up": caught_up, "drain_s": t_drain,
            "gaps": sum(r["gaps"] for r in reports), "dups": sum(r["dups"] for r in reports),
            "closed": sum(r["closed"] for r in reports),
            "close_codes": _merge_counts(r["close_codes"] for r in reports),
            **stats.percentiles_ms(lat),
        }
        res["kept_up"] = bool(
            caught_up and res["closed"] == 0 and res["gaps"] == 0 and res["dups"] == 0
            and res["deliveries_per_s"] >= 0.97 * res["offered_deliveries_per_s"]
            and len(lat) >= 0.99 * expected
            and res["p99_ms"] is not None and res["p99_ms"] <= a.p99_limit_ms)
        return res

    def _drain(self, target: str, last_seq: dict[str, int], timeout: float) -> tuple[bool, float]:
        t = time.monotonic()
        while True:
            progress: dict[str, int] = {}
            for rep in self.workers.call_all({"op": "progress"}):
                for room, seq in rep.get(target, {}).items():
                    progress[room] = min(progress.get(room, seq), seq)
            if all(progress.get(room, 0) >= seq for room, seq in last_seq.items()):
                return True, time.monotonic() - t
            if time.monotonic() - t > timeout:
                return False, time.monotonic() - t
            time.sleep(0.05)

    def _settle(self, target: str, timeout: float = 60.0) -> None:
        """After a phase that fell behind: wait until the clients stop receiving."""
        t = time.monotonic()
        last = None
        while time.monotonic() - t < timeout:
            progress = self.workers.call_all({"op": "progress"})
            if progress == last:
                return
            last = progress
            time.sleep(1.0)

    def run(self) -> dict[str, Any]:
        a = self.args
        targets = list(self.cluster.servers)
        rates = [float(r) for r in a.rates.split(",")]
        sweep: list[dict[str, Any]] = []
        peak: dict[str, float] = {}
        alive = set(targets)
        for rate in rates:
            for target in targets:
                if target not in alive:
                    continue
                res = self.phase(target, rate, a.sweep_duration)
                for _ in range(a.sweep_retries):
                    if res["kept_up"]:
                        break
                    # On a shared machine one bad step can be someone else's burst: settle, retry.
                    log(stats.one_line(res) + " (retrying)")
                    res["retried"] = True
                    sweep.append(res)
                    self._settle(target)
                    res = self.phase(target, rate, a.sweep_duration)
                sweep.append(res)
                log(stats.one_line(res))
                if res["kept_up"]:
                    peak[target] = rate
                else:
                    alive.discard(target)
                    if not res["caught_up"]:  # let the backlog clear before the next phase
                        self._settle(target)
            if not alive:
                break
        measured: list[dict[str, Any]] = []
        for label, factor in (("peak", 1.0), ("half-peak", 0.5)):
            for rep in range(a.repeat):
                for target in targets:
                    if target not in peak:
                        continue
                    res = self.phase(target, peak[target] * factor, a.duration)
                    res["label"] = label
                    res["repeat"] = rep
                    measured.append(res)
                    log(f"{label} #{rep}: " + stats.one_line(res))
        summary = stats.summarize(measured, targets)
        return {"scenario": "fanout", "connect_errors": self.connect_errors, "sweep": sweep, "peak_rate_msgs": peak,
                "measured": measured, "summary": summary}


def _merge_counts(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in items:
        for k, v in d.items():
            out[str(k)] = out.get(str(k), 0) + v
    return out


# -- idle-connection memory scenario ------------------------------------------------------------

class Idle:
    name = "idle"

    def __init__(self, args: argparse.Namespace, cluster: Cluster, workers: Workers) -> None:
        self.args = args
        self.cluster = cluster
        self.workers = workers

    def setup(self) -> None:
        pass

    def run(self) -> dict[str, Any]:
        a = self.args
        results = []
        for target, server in self.cluster.servers.items():
            proc = psutil.Process(server.pid)
            port = int(server.info["ws_port"])
            warm = [f"w{target}{i}" for i in range(a.warm_connections)]
            res = self.workers.connect(target + "-warm", port, warm, a.concurrency)
            time.sleep(a.settle)
            rss0 = proc.memory_info().rss
            users = [f"i{target}{i}" for i in range(a.connections)]
            t = time.monotonic()
            res = self.workers.connect(target, port, users, a.concurrency)
            connect_s = time.monotonic() - t
            time.sleep(a.settle)
            rss1 = proc.memory_info().rss
            cpu0 = sum(proc.cpu_times()[:2])
            time.sleep(a.idle_seconds)
            cpu1 = sum(proc.cpu_times()[:2])
            rss2 = proc.memory_info().rss
            full = proc.memory_full_info()
            r = {
                "target": target, "connections": res["ok"], "failed": res["failed"],
                "connect_s": connect_s, "connects_per_s": res["ok"] / connect_s,
                "rss_before_mib": rss0 / 2**20, "rss_after_mib": rss2 / 2**20,
                "kib_per_connection": (rss2 - rss0) / 1024 / max(1, res["ok"]),
                "kib_per_connection_at_connect": (rss1 - rss0) / 1024 / max(1, res["ok"]),
                "uss_after_mib": full.uss / 2**20,
                "idle_cpu_util": (cpu1 - cpu0) / a.idle_seconds,
            }
            results.append(r)
            log(f"{target}: {r['connections']} idle connections, "
                f"{r['kib_per_connection']:.1f} KiB each (RSS {r['rss_before_mib']:.0f} -> "
                f"{r['rss_after_mib']:.0f} MiB), connect {r['connects_per_s']:.0f}/s")
            self.workers.call_all({"op": "disconnect", "target": target})
            self.workers.call_all({"op": "disconnect", "target": target + "-warm"})
        return {"scenario": "idle", "results": results}


# -- scaling: Redis work per message as nodes are added --------------------------------------------

class Scaling:
    """The same rooms and clients spread over 1, 2, 4 nodes: Redis commands and Redis CPU per
    published message, from ``INFO commandstats`` deltas and the Redis process's CPU time."""

    name = "scaling"

    def __init__(self, args: argparse.Namespace, cluster: Cluster, workers: Workers) -> None:
        self.args = args
        self.cluster = cluster
        self.workers = workers

    def setup(self) -> None:
        pass

    def run(self) -> dict[str, Any]:
        a = self.args
        results = []
        for n in [int(x) for x in a.nodes.split(",")]:
            nodes = [TARGETS["ours"].start(self.cluster.redis_url, self.cluster.shards,
                                           os.path.join(self.cluster.logdir, f"scale{n}-{i}.log"))
                     for i in range(n)]
            try:
                tag = f"s{n}"
                rooms = {f"r-scale{tag}{j:04d}": [f"sc{tag}u{j}x{k}" for k in range(a.room_size)]
                         for j in range(a.rooms)}
                asyncio.run(seed_rooms(self.cluster.redis_url, self.cluster.shards, rooms))
                users = [u for m in rooms.values() for u in m]
                for i, node in enumerate(nodes):  # client k of every room on node k % n
                    res = self.workers.connect(f"scale{n}-{i}", int(node.info["ws_port"]),
                                               users[i::n], a.concurrency)
                    if res["failed"]:
                        raise RuntimeError(f"scale {n}: {res['failed']} clients failed")
                time.sleep(1.0)
                # Idle window of the same length first: presence heartbeats and the readers'
                # blocking reads go on without messages; subtracted from the publishing window.
                idle0 = commandstats(self.cluster.redis_port)
                isampler = stats.CpuSampler({"redis": [self.cluster.redis.pid],
                                             "nodes": [p.pid for p in nodes]})
                isampler.start()
                time.sleep(a.duration + 1.0)
                icpu = isampler.stop()
                idle1 = commandstats(self.cluster.redis_port)
                idle = {k: idle1.get(k, 0) - idle0.get(k, 0) for k in idle1}
                stats0 = commandstats(self.cluster.redis_port)
                t0 = now_us() + 500_000
                parent, child = CTX.Pipe()
                pub = CTX.Process(target=publisher_main, args=(child,), kwargs=dict(
                    redis_host="127.0.0.1", redis_port=self.cluster.redis_port,
                    shards=self.cluster.shards, rooms=list(rooms), rate=a.rate, t0_us=t0,
                    t_end_us=t0 + int(a.duration * 1e6), text_bytes=a.text_bytes), daemon=True)
                sampler = stats.CpuSampler({"redis": [self.cluster.redis.pid],
                                            "nodes": [p.pid for p in nodes]})
                sampler.start()
                pub.start()
                if not parent.poll(a.duration + 30):
                    raise RuntimeError("publisher did not finish")
                pub_result = parent.recv()
                pub.join(5)
                time.sleep(1.0)  # let the nodes' readers go idle again
                cpu = sampler.stop()
                stats1 = commandstats(self.cluster.redis_port)
                sent = pub_result["sent"]
                delta = {k: stats1.get(k, 0) - stats0.get(k, 0) - idle.get(k, 0) for k in stats1}
                usec = {k[5:]: v for k, v in delta.items() if k.startswith("usec:")}
                delta = {k: v for k, v in sorted(delta.items(), key=lambda kv: -kv[1])
                         if v > 0 and not k.startswith("usec:")}
                # The publisher's own EVALSHA and the commands inside the script are the write
                # path (the same at any node count); the rest is the nodes' reading.
                write_cmds = {k: v for k, v in delta.items() if k in ("evalsha", "xadd", "hincrby",
                                                                       "hexists", "hset", "get", "set")}
                r = {"nodes": n, "published": sent, "rate": a.rate,
                     "commands": delta, "commands_per_msg": sum(delta.values()) / sent,
                     "read_commands_per_msg": (sum(delta.values()) - sum(write_cmds.values())) / sent,
                     "idle_commands": {k: v for k, v in idle.items() if v > 0},
                     "command_usec": usec,
                     "command_usec_per_msg": sum(max(0, v) for v in usec.values()) / sent,
                     "read_command_usec_per_msg": sum(max(0, v) for k, v in usec.items()
                                                      if k in ("xread", "xrange", "xrevrange")) / sent,
                     "redis_cpu_idle_s": icpu["redis"],
                     "redis_cpu_s": cpu["redis"],
                     "redis_cpu_us_per_msg": (cpu["redis"] - icpu["redis"]) / sent * 1e6,
                     "nodes_cpu_s": cpu["nodes"], "machine_busy_s": cpu["machine_busy"]}
                results.append(r)
                log(f"{n} node(s): {r['commands_per_msg']:.2f} Redis commands/msg "
                    f"({r['read_commands_per_msg']:.2f} reading), command time "
                    f"{r['command_usec_per_msg']:.1f} µs/msg, Redis CPU "
                    f"{r['redis_cpu_us_per_msg']:.1f} µs/msg; top: "
                    + ", ".join(f"{k} {v / sent:.2f}" for k, v in list(delta.items())[:6]))
                for i in range(n):
                    self.workers.call_all({"op": "disconnect", "target": f"scale{n}-{i}"})
            finally:
                for node in nodes:
                    node.stop()
        return {"scenario": "scaling", "results": results}


# -- the scenario registry ----------------------------------------------------------------------
#
# One registry for every scenario, whether its code lives in this file (fanout, idle, scaling) or
# in a module of its own (``loadtest/scenario_*.py``, found by name). A module provides ``NAME``,
# ``HELP``, ``add_arguments(parser)``, ``Scenario`` and ``markdown(doc)``, and may set
# ``OWN_CLUSTER = True``. ``Scenario(args, cluster, workers)`` gets the Redis and servers of
# ``--target`` and the harness's client processes, and has ``setup()`` and ``run() -> dict``
# (with a ``"scenario"`` key); an ``OWN_CLUSTER`` scenario gets ``Scenario(args, run_case)``
# instead, where ``run_case(argv) -> dict`` runs another scenario from its command line (own
# Redis, servers and clients each time) and returns its results document.

@dataclass(frozen=True)
class ScenarioSpec:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    Scenario: Any
    markdown: Callable[[dict[str, Any]], str]
    own_cluster: bool = False


SCENARIOS: dict[str, ScenarioSpec] = {}


def register(spec: ScenarioSpec) -> None:
    if spec.name in SCENARIOS:
        raise RuntimeError(f"scenario {spec.name!r} registered twice")
    SCENARIOS[spec.name] = spec


def _fanout_arguments(f: argparse.ArgumentParser) -> None:
    f.add_argument("--room-size", type=int, default=100)
    f.add_argument("--rooms", type=int, default=10)
    f.add_argument("--rates", default="250,500,1000,1500,2000,3000,4000",
                   help="messages/s (all rooms together) to sweep, ascending")
    f.add_argument("--sweep-duration", type=float, default=4.0, help="seconds per sweep step")
    f.add_argument("--duration", type=float, default=10.0,
                   help="measurement window of the peak and half-peak runs (s)")
    f.add_argument("--warmup", type=float, default=1.5, help="seconds before each window")
    f.add_argument("--repeat", type=int, default=3, help="peak/half-peak runs per target (median)")
    f.add_argument("--text-bytes", type=int, default=100)
    f.add_argument("--dm", action="store_true",
                   help="with --room-size 2: direct rooms (dm:a:b) instead of open rooms")
    f.add_argument("--p99-limit-ms", type=float, default=100.0,
                   help="a sweep step with a higher p99 counts as not keeping up")
    f.add_argument("--drain-timeout", type=float, default=5.0)
    f.add_argument("--sweep-retries", type=int, default=1,
                   help="retries of a sweep step that fell behind before giving up on a target")


def _scaling_arguments(sc: argparse.ArgumentParser) -> None:
    sc.add_argument("--nodes", default="1,2,4")
    sc.add_argument("--room-size", type=int, default=100)
    sc.add_argument("--rooms", type=int, default=10)
    sc.add_argument("--rate", type=float, default=300.0, help="messages/s")
    sc.add_argument("--duration", type=float, default=8.0)
    sc.add_argument("--text-bytes", type=int, default=100)
    sc.set_defaults(target="")


def _idle_arguments(i: argparse.ArgumentParser) -> None:
    i.add_argument("--connections", type=int, default=10000)
    i.add_argument("--warm-connections", type=int, default=200,
                   help="connected before the baseline RSS is taken")
    i.add_argument("--settle", type=float, default=3.0)
    i.add_argument("--idle-seconds", type=float, default=5.0)
    i.set_defaults(target="ours,naive", workers=4)


register(ScenarioSpec("fanout", "open-loop fan-out: rate sweep, peak, half-peak latency",
                      _fanout_arguments, Fanout, stats.markdown))
register(ScenarioSpec("scaling", "Redis commands and CPU per message at 1, 2, 4 nodes",
                      _scaling_arguments, Scaling, stats.markdown))
register(ScenarioSpec("idle", "node memory per idle connection", _idle_arguments, Idle,
                      stats.markdown))


def _load_scenario_modules() -> None:
    import importlib

    for path in sorted((REPO / "loadtest").glob("scenario_*.py")):
        module = importlib.import_module(f"loadtest.{path.stem}")
        if module.NAME in SCENARIOS:
            continue
        register(ScenarioSpec(module.NAME, module.HELP, module.add_arguments, module.Scenario,
                              module.markdown, bool(getattr(module, "OWN_CLUSTER", False))))


# -- CLI ------------------------------------------------------------------------------------------

def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import websockets

    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform(), "websockets": websockets.__version__,
            "mem_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "loadavg_at_start": os.getloadavg()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="loadtest/bench.py", description="chatcluster benchmarks")
    sub = parser.add_subparsers(dest="scenario", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--target", default="ours,naive",
                       help=f"comma-separated, of: {', '.join(TARGETS)} (default ours,naive)")
        p.add_argument("--workers", type=int, default=2, help="client processes (default 2)")
        p.add_argument("--concurrency", type=int, default=50,
                       help="concurrent handshakes per client process")
        p.add_argument("--shards", type=int, default=16)
        p.add_argument("--json", help="write the results here as JSON")
        p.add_argument("--plot", help="fan-out: write a PNG of latency against offered load here")
        p.add_argument("--logdir", help="server logs (default: a temp dir)")
        p.add_argument("--patched-src", help="directory with a patched `node` package, for the "
                       "'patched' target")
        p.add_argument("--patched-env", default="", help="K=V,K=V settings for the 'patched' target")
        p.add_argument("--node-src", default="git:HEAD",
                       help="node code to benchmark: git:REF (default git:HEAD, a clean export "
                            "of that commit), '.' (the working tree) or a directory")

    _load_scenario_modules()
    for name, spec in SCENARIOS.items():
        p = sub.add_parser(name, help=spec.help)
        common(p)
        spec.add_arguments(p)
    return parser.parse_args(argv)


def run_scenario(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Run one parsed scenario; returns its results document (nothing written)."""
    spec = SCENARIOS[args.scenario]
    info = machine_info()
    started = time.time()
    if spec.own_cluster:
        def run_case(argv: list[str]) -> dict[str, Any]:
            sub = parse_args(argv)
            return run_scenario(sub, "python -m loadtest.bench " + " ".join(argv))

        log(f"{command}\n  machine: {info['nproc']} x {info['cpu_model']}, Python {info['python']}, "
            f"load {info['loadavg_at_start']}")
        result = spec.Scenario(args, run_case).run()
    else:
        targets = [t.strip() for t in (args.target or "").split(",") if t.strip()]
        for t in targets:
            if t not in TARGETS:
                raise SystemExit(f"unknown target {t!r}; known: {', '.join(TARGETS)}")
        logdir = args.logdir or tempfile.mkdtemp(prefix="chatcluster-bench-")
        log(f"{command}\n  machine: {info['nproc']} x {info['cpu_model']}, Python {info['python']}, "
            f"load {info['loadavg_at_start']}; logs in {logdir}")
        cluster = Cluster(targets, args.shards, logdir)
        workers = Workers(args.workers)
        try:
            scenario = spec.Scenario(args, cluster, workers)
            scenario.setup()
            result = scenario.run()
        finally:
            workers.stop()
            cluster.stop()
    return {"command": command, "machine": info, "args": vars(args), **NODE_SOURCE,
            "wall_s": round(time.time() - started, 1), **result}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    if args.patched_src:
        os.environ["CHATCLUSTER_BENCH_PATCHED_SRC"] = os.path.abspath(args.patched_src)
    os.environ["CHATCLUSTER_BENCH_PATCHED_ENV"] = args.patched_env
    command = "python -m loadtest.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    doc = run_scenario(args, command)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str))
    if args.plot and doc["scenario"] == "fanout":
        stats.plot_fanout(doc, args.plot)
        log(f"plot: {args.plot}")
    print(SCENARIOS[args.scenario].markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
