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
import threading
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
from loadtest.publisher import publisher_main, publisher_result  # noqa: E402
from loadtest.stats import commandstats, redis_info  # noqa: E402,F401
from loadtest.targets import TARGETS, _env_items  # noqa: E402
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
                dialect: str = "ws-json", rooms: list[list[str]] | None = None,
                **options: Any) -> dict[str, Any]:
        self.connect_start(target, port, users, concurrency, dialect, rooms, **options)
        return self.connect_collect(self.collect())

    def connect_start(self, target: str, port: int, users: list[str], concurrency: int,
                      dialect: str = "ws-json", rooms: list[list[str]] | None = None,
                      local_addrs: list[str] | None = None, rate: float | None = None,
                      attempts: int = 3) -> None:
        """Send the connect commands without waiting (``rate``: connects/s of all workers
        together); :meth:`connect_collect` the replies once :meth:`ready`."""
        n = len(self.pipes)
        self.send([{"op": "connect", "target": target, "host": "127.0.0.1", "port": port,
                    "users": users[i::n], "concurrency": concurrency, "dialect": dialect,
                    "rooms": rooms[i::n] if rooms is not None else None,
                    "local_addrs": local_addrs, "rate": rate / n if rate else None,
                    "attempts": attempts} for i in range(n)])

    def ready(self) -> bool:
        return all(pipe.poll() for pipe in self.pipes)

    @staticmethod
    def connect_collect(replies: list[dict[str, Any]]) -> dict[str, Any]:
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
        cpu = stats.sample_window(sampler, w0, w1)
        pub_result = publisher_result(parent, pub)
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
    """Idle connections on one server process: memory per connection, connect rate, and what
    they cost while idle (node CPU, Redis commands, event-loop lag), plus one probe client that
    connects and round-trips a message in the middle of the idle window.

    Past ~28,000 connections one client address runs out of ephemeral ports: ``--source-addrs``
    spreads the clients over 127.0.0.2..127.0.0.(N+1) (default: one address per 20,000
    connections), and ``--nofile`` raises RLIMIT_NOFILE of the harness (root), which the node,
    Redis and the client processes inherit."""

    name = "idle"

    def __init__(self, args: argparse.Namespace, cluster: Cluster, workers: Workers) -> None:
        self.args = args
        self.cluster = cluster
        self.workers = workers

    def setup(self) -> None:
        pass

    def source_addrs(self) -> list[str] | None:
        n = idle_source_addrs(self.args)
        return [f"127.0.0.{2 + i}" for i in range(n)] if n else None

    def run(self) -> dict[str, Any]:
        a = self.args
        results = []
        addrs = self.source_addrs()
        redis_port = self.cluster.redis_port
        for target, server in self.cluster.servers.items():
            proc = psutil.Process(server.pid)
            port = int(server.info["ws_port"])
            http_port = int(server.info.get("http_port") or 0)
            metrics = NodeMetrics(http_port) if http_port else None
            warm = [f"w{target}{i}" for i in range(a.warm_connections)]
            res = self.workers.connect(target + "-warm", port, warm, a.concurrency,
                                       local_addrs=addrs, attempts=a.attempts)
            time.sleep(a.settle)
            rss0 = proc.memory_info().rss
            redis_mem0 = int(redis_info(redis_port, "memory")["used_memory"])
            users = [f"i{target}{i}" for i in range(a.connections)]
            ramp: list[dict[str, Any]] = []
            cmd_r0 = commandstats(redis_port)
            wall_ramp0 = time.time()
            t = time.monotonic()
            cpu_ramp = stats.CpuSampler({"node": [server.pid], "redis": [self.cluster.redis.pid],
                                         "clients": self.workers.pids})
            cpu_ramp.start()
            self.workers.connect_start(target, port, users, a.concurrency, local_addrs=addrs,
                                       rate=a.ramp_rate or None, attempts=a.attempts)
            next_sample = t
            while not self.workers.ready():
                if time.monotonic() >= next_sample:
                    next_sample += a.ramp_sample_s
                    sample = {"t_s": round(time.monotonic() - t, 1),
                              "rss_mib": round(proc.memory_info().rss / 2**20, 1)}
                    if metrics is not None:
                        sample.update(metrics.scrape_summary())
                        sample.update(online_in_redis(redis_port, self.cluster.shards))
                    ramp.append(sample)
                    log(f"{target} ramp: {sample}")
                time.sleep(0.2)
            res = self.workers.connect_collect(self.workers.collect())
            connect_s = time.monotonic() - t
            wall_ramp1 = time.time()
            cpu_r = cpu_ramp.stop()
            cmd_r1 = commandstats(redis_port)
            log(f"{target}: {res['ok']} connected in {connect_s:.1f}s ({res['ok'] / connect_s:.0f}/s)"
                + (f", {res['failed']} failed" if res["failed"] else "")
                + (f", retried after: {res['errors']}" if res["errors"] else ""))
            time.sleep(a.settle)
            rss1 = proc.memory_info().rss
            # -- the idle window: CPU, Redis commands, loop lag, and a probe client midway --
            cmd0 = commandstats(redis_port)
            hb0 = metrics.scrape().get("chatcluster_presence_heartbeats_total") if metrics else None
            sampler = stats.CpuSampler({"node": [server.pid], "redis": [self.cluster.redis.pid],
                                        "clients": self.workers.pids})
            lag_samples: list[dict[str, float]] = []
            stop_scraper = threading.Event()

            w0 = time.monotonic()
            wall_w0 = time.time()
            sampler.start()
            scrape_thread = threading.Thread(
                target=metrics.sample_lag, args=(a.metrics_interval, stop_scraper, lag_samples,
                                                 lambda: online_in_redis(redis_port, self.cluster.shards)),
                daemon=True) if metrics else None
            if scrape_thread is not None:
                scrape_thread.start()
            probe: dict[str, Any] | None = None
            if a.probe and TARGETS[target].dialect == "ws-json":
                time.sleep(max(0.0, a.idle_seconds / 2 - 2))
                probe = asyncio.run(probe_client(port, a.probe_sends))
                log(f"{target} probe: {probe}")
            time.sleep(max(0.0, w0 + a.idle_seconds - time.monotonic()))
            cpu = sampler.stop()
            window = time.monotonic() - w0
            wall_w1 = time.time()
            stop_scraper.set()
            if scrape_thread is not None:
                scrape_thread.join(10)
            cmd1 = commandstats(redis_port)
            hb1 = metrics.scrape().get("chatcluster_presence_heartbeats_total") if metrics else None
            rss2 = proc.memory_info().rss
            full = proc.memory_full_info()
            redis_mem1 = int(redis_info(redis_port, "memory")["used_memory"])
            delta = {k: cmd1.get(k, 0) - cmd0.get(k, 0) for k in cmd1 if not k.startswith("usec:")}
            delta = {k: v for k, v in sorted(delta.items(), key=lambda kv: -kv[1]) if v > 0}
            usec = sum(cmd1.get(k, 0) - cmd0.get(k, 0) for k in cmd1 if k.startswith("usec:"))
            n_ok = max(1, res["ok"])
            r = {
                "target": target, "connections": res["ok"], "failed": res["failed"],
                "connect_errors": res["errors"], "source_addrs": addrs,
                "connect_s": connect_s, "connects_per_s": res["ok"] / connect_s,
                "ramp_cpu_s": {k: round(v, 1) for k, v in cpu_r.items()},
                "node_cpu_ms_per_connect": cpu_r["node"] / n_ok * 1e3,
                "rss_before_mib": rss0 / 2**20, "rss_at_connect_mib": rss1 / 2**20,
                "rss_after_mib": rss2 / 2**20,
                "kib_per_connection": (rss2 - rss0) / 1024 / n_ok,
                "kib_per_connection_at_connect": (rss1 - rss0) / 1024 / n_ok,
                "uss_after_mib": full.uss / 2**20,
                "node_fds": proc.num_fds(),
                "node_rlimit_nofile": list(proc.rlimit(psutil.RLIMIT_NOFILE)),
                "idle_window_s": window,
                "idle_cpu_util": cpu["node"] / window,
                "idle_node_sys_share": cpu["node_sys"] / cpu["node"] if cpu["node"] else 0.0,
                "idle_redis_cpu_util": cpu["redis"] / window,
                "idle_clients_cpu_util": cpu["clients"] / window,
                "idle_machine_busy_util": cpu["machine_busy"] / window,
                "redis_commands_per_s": sum(delta.values()) / window,
                "redis_commands": delta,
                "redis_command_usec_per_s": usec / window,
                "redis_used_memory_mib": redis_mem1 / 2**20,
                "redis_bytes_per_session": (redis_mem1 - redis_mem0) / n_ok,
                "heartbeats_in_window": (hb1 - hb0) if hb0 is not None and hb1 is not None else None,
                "loop_lag_ms": lag_samples,
                "loop_lag_ms_max": max((x["lag_ms"] for x in lag_samples), default=None),
                "loop_lag_ms_median": (sorted(x["lag_ms"] for x in lag_samples)[len(lag_samples) // 2]
                                       if lag_samples else None),
                "metrics_scrape_ms_max": max((x["scrape_ms"] for x in lag_samples), default=None),
                "ping_interval_s": float(_node_env().get("CHAT_PING_INTERVAL_S", 20.0)),
                "presence_ttl_s": float(_node_env().get("CHAT_PRESENCE_TTL", 30.0)),
                "probe": probe, "ramp": ramp,
                "ramp_redis": _ramp_redis(cmd_r0, cmd_r1, n_ok),
            }
            if a.gc_log:
                pauses = gc_pauses(os.path.join(self.cluster.logdir, f"{target}.log"))
                r["gc_ramp"] = _gc_summary([p for p in pauses if wall_ramp0 <= p["t"] < wall_ramp1])
                r["gc_idle_window"] = _gc_summary([p for p in pauses if wall_w0 <= p["t"] < wall_w1])
                log(f"{target}: GC pauses in the ramp {r['gc_ramp']['by_generation']}, in the idle "
                    f"window {r['gc_idle_window']['pauses']}")
            results.append(r)
            log(f"{target}: {r['connections']} idle connections, "
                f"{r['kib_per_connection']:.1f} KiB each (RSS {r['rss_before_mib']:.0f} -> "
                f"{r['rss_after_mib']:.0f} MiB), connect {r['connects_per_s']:.0f}/s, idle CPU "
                f"{r['idle_cpu_util']:.1%}, Redis {r['redis_commands_per_s']:.0f} cmds/s, "
                f"loop lag max {r['loop_lag_ms_max']} ms")
            if a.hold:
                log(f"{target}: holding the connections {a.hold:.0f}s more (node pid {server.pid})")
                time.sleep(a.hold)
            self.workers.call_all({"op": "disconnect", "target": target})
            self.workers.call_all({"op": "disconnect", "target": target + "-warm"})
        return {"scenario": "idle", "results": results}


def idle_source_addrs(args: argparse.Namespace) -> int:
    """Client source addresses of the idle scenario: ``--source-addrs``, or (-1) one per 20,000
    connections when there are more than 20,000 (one address has ~28,000 ephemeral ports)."""
    if args.source_addrs >= 0:
        return int(args.source_addrs)
    total = args.connections + args.warm_connections + 10
    return 0 if total <= 20000 else -(-total // 20000)


def _ramp_redis(before: dict[str, int], after: dict[str, int], connects: int) -> dict[str, Any]:
    """Redis commands of the ramp: per connect, and the shard readers' share (every hello's
    personal stream makes its reader re-arm XREAD with every personal stream of its shard)."""
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    calls = {k: v for k, v in delta.items() if not k.startswith("usec:") and v > 0}
    return {"commands_per_connect": sum(calls.values()) / connects,
            "xread_calls": calls.get("xread", 0),
            "xread_usec_per_call": delta.get("usec:xread", 0) / max(1, calls.get("xread", 0)),
            "client_unblock_calls": calls.get("client|unblock", 0),
            "redis_usec_per_connect": sum(v for k, v in delta.items() if k.startswith("usec:")) / connects,
            "xread_usec_share": delta.get("usec:xread", 0) / max(1, sum(
                v for k, v in delta.items() if k.startswith("usec:")))}


# Loaded into the node by the interpreter (``sitecustomize`` on its PYTHONPATH) with --gc-log:
# the node's code is untouched.
GC_LOG_SITECUSTOMIZE = '''"""Benchmark only: log full (generation 2) collections and any collection over 50 ms."""
import gc
import sys
import time

_start = [0.0]


def _gc_pause_log(phase, info):
    if phase == "start":
        _start[0] = time.perf_counter()
        return
    ms = (time.perf_counter() - _start[0]) * 1e3
    if info["generation"] == 2 or ms > 50:
        sys.stderr.write("GCPAUSE gen=%d ms=%.1f collected=%d t=%.3f\\n"
                         % (info["generation"], ms, info["collected"], time.time()))
        sys.stderr.flush()


gc.callbacks.append(_gc_pause_log)
'''


def gc_pauses(log_path: str) -> list[dict[str, Any]]:
    import re

    out = []
    with open(log_path, errors="replace") as f:
        for line in f:
            m = re.match(r"GCPAUSE gen=(\d) ms=([\d.]+) collected=(\d+) t=([\d.]+)", line)
            if m:
                out.append({"gen": int(m[1]), "ms": float(m[2]), "collected": int(m[3]),
                            "t": float(m[4])})
    return out


def _gc_summary(pauses: list[dict[str, Any]]) -> dict[str, Any]:
    by_gen: dict[str, dict[str, float]] = {}
    for p in pauses:
        g = by_gen.setdefault(f"gen{p['gen']}", {"n": 0, "max_ms": 0.0, "total_ms": 0.0})
        g["n"] += 1
        g["max_ms"] = max(g["max_ms"], p["ms"])
        g["total_ms"] = round(g["total_ms"] + p["ms"], 1)
    return {"logged": "full collections and any collection over 50 ms", "by_generation": by_gen,
            "pauses": [{"gen": p["gen"], "ms": p["ms"]} for p in pauses if p["ms"] > 100]}


def online_in_redis(redis_port: int, shards: int) -> dict[str, int]:
    """Users Redis holds as online (expiry in the future) and entries of the online indexes
    (expired ones included until the sweeper removes them), over every user shard."""
    from node.keys import Keys

    keys = Keys(shards)
    now = int(time.time() * 1000)
    online = entries = 0
    for shard in range(shards):
        key = keys.online_index(shard)
        online += int(stats.redis_call(redis_port, "ZCOUNT", key, now, "+inf"))
        entries += int(stats.redis_call(redis_port, "ZCARD", key))
    return {"online_in_redis": online, "online_index_entries": entries}


def _node_env() -> dict[str, str]:
    return _env_items(os.environ.get("CHATCLUSTER_BENCH_NODE_ENV", ""))


class NodeMetrics:
    """The node's /metrics, scraped over HTTP (Prometheus text format, unlabelled sums)."""

    def __init__(self, http_port: int) -> None:
        self.url = f"http://127.0.0.1:{http_port}/metrics"

    def scrape(self) -> dict[str, float]:
        import urllib.request

        with urllib.request.urlopen(self.url, timeout=10) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            labels = ""
            name = name_labels
            if "{" in name_labels:
                name, _, labels = name_labels.partition("{")
            try:
                v = float(value)
            except ValueError:
                continue
            out[name] = out.get(name, 0.0) + v
            if name == "chatcluster_handshakes_rejected_total":
                out[f"{name}{{{labels}"] = v
        return out

    def sample_lag(self, interval: float, stop: threading.Event, out: list[dict[str, float]],
                   extra: Callable[[], dict[str, Any]] | None = None) -> None:
        """Until ``stop``: every ``interval`` s, the loop-lag gauge, how long the scrape took,
        the presence heartbeats written so far, and ``extra()``."""
        t_start = time.monotonic()
        while not stop.wait(interval):
            t0 = time.perf_counter()
            try:
                m = self.scrape()
            except OSError:
                continue
            out.append({"t_s": round(time.monotonic() - t_start, 1),
                        "lag_ms": m.get("chatcluster_event_loop_lag_seconds", 0) * 1e3,
                        "scrape_ms": (time.perf_counter() - t0) * 1e3,
                        "heartbeats_total": m.get("chatcluster_presence_heartbeats_total", 0),
                        **(extra() if extra else {})})

    def scrape_summary(self) -> dict[str, Any]:
        try:
            m = self.scrape()
        except OSError as exc:
            return {"scrape_error": str(exc)[:80]}
        return {"open": int(m.get("chatcluster_connections_open", 0)),
                "heartbeats_total": int(m.get("chatcluster_presence_heartbeats_total", 0)),
                "loop_lag_ms": round(m.get("chatcluster_event_loop_lag_seconds", 0) * 1e3, 1),
                "hellos_in_progress": int(m.get("chatcluster_hellos_in_progress", 0)),
                "rejected": int(m.get("chatcluster_handshakes_rejected_total", 0))}


async def probe_client(port: int, sends: int) -> dict[str, Any]:
    """One extra client on a node full of idle connections: connect, hello, create a room, then
    ``sends`` messages one at a time, each timed to its ack (reply) and to its own echo."""
    import orjson
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    out: dict[str, Any] = {"refused": []}
    t0 = time.perf_counter()
    try:
        for _attempt in range(5):  # as a client would: a 503 is retried after its Retry-After
            t0 = time.perf_counter()  # latencies are of the attempt that got in
            try:
                ws = await connect(f"ws://127.0.0.1:{port}/ws", compression=None,
                                   open_timeout=30, ping_interval=None)
                break
            except InvalidStatus as exc:
                retry_after = int(exc.response.headers.get("Retry-After", "1"))
                out["refused"].append({"status": exc.response.status_code,
                                       "after_ms": round((time.perf_counter() - t0) * 1e3, 1),
                                       "retry_after_s": retry_after})
                await asyncio.sleep(retry_after)
        else:
            raise RuntimeError("refused 5 times")
        async with ws:
            out["upgrade_ms"] = (time.perf_counter() - t0) * 1e3
            await ws.send(orjson.dumps({"type": "hello", "user": "idle-probe"}).decode())
            while orjson.loads(await ws.recv())["type"] != "welcome":
                pass
            out["welcome_ms"] = (time.perf_counter() - t0) * 1e3
            t1 = time.perf_counter()
            await ws.send(orjson.dumps({"type": "create_room", "name": "idle-probe",
                                        "visibility": "open", "ref": "c"}).decode())
            while True:
                frame = orjson.loads(await ws.recv())
                if frame.get("ref") == "c":
                    room = frame["data"]["room"]["id"]
                    break
            out["create_room_ms"] = (time.perf_counter() - t1) * 1e3
            acks: list[float] = []
            echoes: list[float] = []
            for i in range(sends):
                text = f"probe {i}"
                ts = time.perf_counter()
                await ws.send(orjson.dumps({"type": "send", "room": room, "text": text,
                                            "ref": i}).decode())
                got_ack = got_echo = False
                while not (got_ack and got_echo):
                    frame = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
                    if frame.get("type") == "reply" and frame.get("ref") == i:
                        assert frame.get("ok"), frame
                        acks.append((time.perf_counter() - ts) * 1e3)
                        got_ack = True
                    elif frame.get("type") == "message" and frame.get("text") == text:
                        echoes.append((time.perf_counter() - ts) * 1e3)
                        got_echo = True
                await asyncio.sleep(0.2)
            out.update({"sends": sends, "ack_ms": [round(x, 2) for x in acks],
                        "echo_ms": [round(x, 2) for x in echoes],
                        "echo_ms_median": sorted(echoes)[len(echoes) // 2] if echoes else None,
                        "echo_ms_max": max(echoes, default=None),
                        "ack_ms_median": sorted(acks)[len(acks) // 2] if acks else None})
    except Exception as exc:  # reported, not fatal: the figures of the window still stand
        out["error"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


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
    i.add_argument("--source-addrs", type=int, default=-1,
                   help="spread client sockets over 127.0.0.2..127.0.0.(N+1), each with its own "
                        "ephemeral ports (default -1: one per 20,000 connections above 20,000; "
                        "0: the kernel's choice, 127.0.0.1)")
    i.add_argument("--nofile", type=int, default=0,
                   help="RLIMIT_NOFILE for the harness, node and clients (root; default: enough "
                        "for --connections, capped at /proc/sys/fs/nr_open)")
    i.add_argument("--ramp-rate", type=float, default=0.0,
                   help="most connects/s of all client processes together (0: as fast as "
                        "--concurrency handshakes per process allow)")
    i.add_argument("--attempts", type=int, default=3,
                   help="tries per connection (a 503's Retry-After is honoured between them)")
    i.add_argument("--ramp-sample-s", type=float, default=10.0,
                   help="node RSS and /metrics sampled this often during the ramp")
    i.add_argument("--metrics-interval", type=float, default=5.0,
                   help="/metrics (loop lag) scraped this often in the idle window")
    i.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                   help="midway through the idle window one extra client connects, creates a "
                        "room and round-trips messages (latency)")
    i.add_argument("--probe-sends", type=int, default=10)
    i.add_argument("--gc-log", action="store_true",
                   help="log the node's garbage-collection pauses (full collections and any over "
                        "50 ms, through a sitecustomize on its PYTHONPATH) and report them")
    i.add_argument("--hold", type=float, default=0.0,
                   help="keep the connections this many seconds after the idle window (to "
                        "profile the node from outside, e.g. py-spy)")
    i.add_argument("--node-env", default="",
                   help="extra K=V,K=V settings of the 'ours' node (CHAT_MAX_CONNECTIONS is "
                        "raised to fit --connections by default)")
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


def _prepare_idle(args: argparse.Namespace) -> None:
    """Idle scenario: file descriptors for the run (inherited by the node, Redis and the client
    processes) and node settings that let that many connections in."""
    total = args.connections + args.warm_connections
    want = args.nofile or (total + 10000 if total + 10000 > 20000 else 0)
    if want:
        got = raise_nofile(want)
        log(f"RLIMIT_NOFILE {got}")
        if got < want:
            # Raising the hard limit needs CAP_SYS_RESOURCE, which a container may not grant
            # even to root: the node then holds at most ~got - 300 sockets (Redis pool, listeners).
            log(f"WARNING: RLIMIT_NOFILE could not be raised to {want} (hard limit {got}; no "
                f"CAP_SYS_RESOURCE?): the node process can hold at most ~{got - 300} connections")
    env = _node_env()
    for item in filter(None, args.node_env.split(",")):
        k, _, v = item.partition("=")
        env[k.strip()] = v.strip()
    if args.gc_log:
        gcdir = tempfile.mkdtemp(prefix="chatcluster-gclog-")
        Path(gcdir, "sitecustomize.py").write_text(GC_LOG_SITECUSTOMIZE)
        env["PYTHONPATH"] = gcdir
    if total + 100 > 50000:  # the node's default CHAT_MAX_CONNECTIONS
        env.setdefault("CHAT_MAX_CONNECTIONS", str(total + 1000))
    os.environ["CHATCLUSTER_BENCH_NODE_ENV"] = ",".join(f"{k}={v}" for k, v in env.items())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    if args.scenario == "idle":
        _prepare_idle(args)
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
