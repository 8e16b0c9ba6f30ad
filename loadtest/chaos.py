"""Chaos soak: mixed traffic on 3 nodes behind HAProxy while a fault injector breaks things.

    python -m loadtest.chaos --minutes 10            # one Redis (AOF, appendfsync always)
    python -m loadtest.chaos --minutes 10 --cluster  # a real 3-master/3-replica Redis Cluster

What runs (everything on 127.0.0.1, every port picked free, everything stopped at the end):

* Redis: one server with ``appendonly yes`` + ``appendfsync always`` (a restart keeps every
  acknowledged write), or with ``--cluster`` a 3x2 Redis Cluster (``start_redis_cluster``);
* 3 nodes (``start_node``) behind a real HAProxy rendered from ``deploy/haproxy.cfg``
  (``tests/ops/haproxy.py``); a replacement node takes the ports of the one it replaces, so it
  lands in the same HAProxy server slot;
* traffic through HAProxy: WebSocket users (``ChatClient``) sending in ``general``, in a few
  created rooms and in DMs; alerts injected with ``POST /api/v1/alerts``; HTTP long-polling
  users (``/api/v1/session`` + ``/api/v1/poll``, sending with ``/api/v1/command``); WebSocket
  users that reload (the client is closed and a new one resumes with the old one's cursors),
  besides the reconnects the faults cause;
* a fault injector that every ``--fault-min``..``--fault-max`` seconds (20-40, seeded) does one
  of: ``redis_restart`` (SIGKILL Redis, start it again on the same port and data dir),
  ``node_kill`` (SIGKILL a node, start a replacement), ``client_kill`` (``CLIENT KILL TYPE
  normal``), ``maxmemory`` (``CONFIG SET maxmemory 1`` with ``noeviction`` for a few seconds),
  and with ``--cluster`` ``failover`` (SIGKILL a master; its replica takes over; the old
  master is started again and rejoins as a replica). After each fault it waits (bounded) until
  every node answers ``/readyz`` 200 again, and records the node log lines of level ERROR or
  worse (and tracebacks) written since the previous fault.

Checks at the end (after traffic stops and every session caught up or a deadline passed):

* ``nodes``: no node process died except those the injector killed; every current node is
  alive and answers ``/healthz``;
* ``sequences``: for every session and room, the messages received are exactly the room's
  history (fetched with ``history``, paging with ``before``) after the position where the
  session's view of the room started, in order, once each. A ``recovered: false`` (in a
  ``welcome`` or a ``room`` event) starts a new segment at the position it gives: messages
  between the last one received before it and that position are *reported* losses, not
  failures;
* ``acks``: every acknowledged ``send`` is in history, unless its room was reported
  ``recovered: false`` to its sender; no message text is in history twice (a retried send
  appended twice);
* ``alerts``: every acknowledged alert reached each recipient's session exactly once (a user's
  alerts across reconnects and reloads, keyed by alert id), unless that session was told
  ``personal.recovered: false``; no alert id arrives twice.

The result is printed and written as JSON (``--out``, default
``loadtest/results/chaos-<date>-<single|cluster>-<minutes>m.json``); the exit status is 0 only
if every check passed.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import copy
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `python loadtest/chaos.py` as well as `python -m loadtest.chaos`
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from node.client import ChatClient, ChatClientError, Closed, ConnectionLost  # noqa: E402
from node.embedded import Proc, start_node, start_redis, start_redis_cluster  # noqa: E402
from node.protocol import stream_id_tuple  # noqa: E402
from tests.ops.haproxy import HAProxy, NodePorts, server_states, start_haproxy  # noqa: E402

SINGLE_KINDS = ("redis_restart", "node_kill", "client_kill", "maxmemory")
CLUSTER_KINDS = ("failover", "node_kill", "client_kill", "maxmemory")
SLOTS = ("node1", "node2", "node3")  # the server slots of deploy/haproxy.cfg
API_KEY = "chaos-api-key"
CLUSTER_EXTRA = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-node-timeout", "1000", "--cluster-replica-validity-factor", "0",
                 "--appendonly", "no"]
PERSIST_EXTRA = ["--appendonly", "yes", "--appendfsync", "always"]

NODE_ENV = {
    "CHAT_AUTH": "dev",
    "CHAT_HOST": "127.0.0.1",
    "CHAT_LOG_FORMAT": "json",
    "CHAT_API_KEY": API_KEY,
    "CHAT_JWT_SECRET": "chaos-jwt-secret",
    "CHAT_DRAIN_SECONDS": "1",
    # Every client comes from 127.0.0.1 (through HAProxy): per-IP and per-connection limits off.
    "CHAT_RATE_PER_S": "100000",
    "CHAT_RATE_BURST": "100000",
    "CHAT_HTTP_RATE_PER_S": "1000000",
    "CHAT_HTTP_RATE_BURST": "1000000",
    "CHAT_MAX_CONNECTIONS_PER_IP": "100000",
    "CHAT_ABUSE_CLOSES_MAX": "0",
    # Background loops (heartbeats every TTL/3, the sweeper) write often, so that every
    # maxmemory window and every Redis restart hits them, not only the requests.
    "CHAT_PRESENCE_TTL": "6",
    # History is the reference of the checks: never trim it during a run.
    "CHAT_HISTORY_MAXLEN": "1000000",
}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def id_ms(sid: str) -> int:
    return int(sid.split("-", 1)[0])


@dataclass
class ChaosConfig:
    duration_s: float = 600.0
    cluster: bool = False
    seed: int = 1
    fault_min_s: float = 20.0
    fault_max_s: float = 40.0
    kinds: tuple[str, ...] = ()
    max_faults: int = 0  # > 0: the faulty phase ends after this many faults (or duration_s)
    ws_users: int = 12
    pollers: int = 3
    rooms: int = 3
    dms: int = 4
    send_interval_s: tuple[float, float] = (0.3, 0.9)
    poll_send_interval_s: tuple[float, float] = (2.0, 4.0)
    alert_interval_s: tuple[float, float] = (1.0, 2.5)
    reload_interval_s: tuple[float, float] = (3.0, 8.0)
    maxmemory_hold_s: tuple[float, float] = (3.0, 6.0)
    settle_s: float = 90.0  # longest wait for sessions to catch up at the end
    recover_s: float = 45.0  # longest wait for every node to be ready after a fault
    workdir: Path | None = None
    out: Path | None = None
    command: str = ""
    quiet: bool = False

    def fault_kinds(self) -> tuple[str, ...]:
        return self.kinds or (CLUSTER_KINDS if self.cluster else SINGLE_KINDS)


class Log:
    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[chaos {time.monotonic() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# -- infrastructure ------------------------------------------------------------------------------

@dataclass
class NodeSlot:
    name: str
    ports: NodePorts
    proc: Proc
    log_path: Path
    generation: int = 1
    killed: list[dict[str, Any]] = field(default_factory=list)  # by the injector
    died: list[dict[str, Any]] = field(default_factory=list)  # by themselves

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"


class Infra:
    """Redis (single or cluster), three nodes and HAProxy, with the fault primitives."""

    def __init__(self, cfg: ChaosConfig, workdir: Path, log: Log) -> None:
        self.cfg, self.workdir, self.log = cfg, workdir, log
        self.redis: Proc | None = None
        self.redis_dir = ""
        self.cluster_procs: list[Proc] = []
        self.slots: dict[str, NodeSlot] = {}
        self.lb: HAProxy | None = None
        self.redis_url = ""
        self.log_offsets: dict[Path, int] = {}
        self.replacing: set[str] = set()

    # Redis ---------------------------------------------------------------------------------
    def start_redis(self) -> None:
        if self.cfg.cluster:
            cluster = start_redis_cluster(3, 1, log_dir=str(self.workdir))
            self.cluster_procs = list(cluster.procs)
            self.redis_url = cluster.url
            return
        self.redis_dir = str(self.workdir / "redis-data")
        os.makedirs(self.redis_dir, exist_ok=True)
        self.redis = start_redis(0, persist_dir=self.redis_dir, extra=PERSIST_EXTRA,
                                 log_path=str(self.workdir / "redis.log"))
        self.redis_url = self.redis.info["url"]

    def redis_procs(self) -> list[Proc]:
        return list(self.cluster_procs) if self.cfg.cluster else [p for p in [self.redis] if p]

    def admin(self, proc: Proc) -> Any:
        return aioredis.Redis(host="127.0.0.1", port=int(proc.info["port"]), socket_timeout=5,
                              socket_connect_timeout=2)

    async def redis_call(self, proc: Proc, *args: Any) -> Any:
        client = self.admin(proc)
        try:
            return await client.execute_command(*args)
        finally:
            await client.aclose()

    # Nodes ---------------------------------------------------------------------------------
    def _start_node(self, name: str, generation: int, ports: NodePorts | None) -> Proc:
        env = {**NODE_ENV, "CHAT_REDIS_URL": self.redis_url, "CHAT_NODE_ID": f"{name}-g{generation}",
               "CHAT_WS_PORT": str(ports.ws if ports else 0), "CHAT_HTTP_PORT": str(ports.http if ports else 0)}
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "ab") as f:
            f.write(f'{{"chaos": "start {name} generation {generation}"}}\n'.encode())
        return start_node(env, name=f"{name}-g{generation}", log_path=str(log_path))

    async def start(self) -> None:
        await asyncio.to_thread(self.start_redis)
        procs = await asyncio.gather(*(asyncio.to_thread(self._start_node, n, 1, None) for n in SLOTS))
        for name, proc in zip(SLOTS, procs, strict=True):
            ports = NodePorts(int(proc.info["ws_port"]), int(proc.info["http_port"]))
            self.slots[name] = NodeSlot(name, ports, proc, self.workdir / f"{name}.log")
        self.lb = await asyncio.to_thread(start_haproxy, {n: s.ports for n, s in self.slots.items()}, self.workdir)
        await self.wait_lb_up(30)

    async def wait_lb_up(self, within: float) -> bool:
        assert self.lb is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        async with aiohttp.ClientSession() as http:
            while loop.time() < deadline:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, KeyError):
                    async with http.get(self.lb.stats_url, timeout=aiohttp.ClientTimeout(total=2)) as r:
                        states = server_states(await r.text())
                    if all(states[(b, n)]["status"] == "UP" for n in SLOTS for b in ("ws", "http")):
                        return True
                await asyncio.sleep(0.1)  # polling HAProxy's view, with a deadline
        return False

    async def replace_node(self, name: str) -> None:
        slot = self.slots[name]
        slot.generation += 1
        slot.proc = await asyncio.to_thread(self._start_node, name, slot.generation, slot.ports)

    def stop(self) -> None:
        if self.lb is not None:
            self.lb.proc.stop(timeout=2)
        for slot in self.slots.values():
            slot.proc.stop(timeout=5)
        for proc in self.redis_procs():
            proc.stop(timeout=2)

    async def ready(self, slot: NodeSlot, http: aiohttp.ClientSession, path: str = "/readyz") -> bool:
        try:
            async with http.get(slot.http_url + path, timeout=aiohttp.ClientTimeout(total=2)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def wait_all_ready(self, within: float) -> float | None:
        """Seconds until every node answered /readyz 200 (None: not within ``within``)."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with aiohttp.ClientSession() as http:
            while loop.time() - t0 < within:
                oks = await asyncio.gather(*(self.ready(s, http) for s in self.slots.values()))
                if all(oks):
                    return round(loop.time() - t0, 2)
                await asyncio.sleep(0.2)  # polling readiness, with a deadline
        return None

    def new_log_lines(self, limit: int = 12) -> list[str]:
        """Node log lines of level ERROR/CRITICAL (or tracebacks) since the last call."""
        out: list[str] = []
        for slot in self.slots.values():
            path = slot.log_path
            with contextlib.suppress(OSError), open(path, "rb") as f:
                f.seek(self.log_offsets.get(path, 0))
                data = f.read()
                self.log_offsets[path] = f.tell()
            for raw in data.decode(errors="replace").splitlines():
                try:
                    line = json.loads(raw)
                except ValueError:
                    line = None
                if isinstance(line, dict):
                    bad = line.get("level") in ("error", "critical") or "exc" in line
                    exc = str(line.get("exc", "")).strip().splitlines()
                    # Our frames (where it was raised from) and the exception itself.
                    frames = [x.strip().replace('File "', "").replace('", line ', ":")
                              for x in exc if "/node/" in x and "File" in x][-4:]
                    text = f"{line.get('node')} {line.get('level')} {line.get('msg')}" + \
                        (f" | {' < '.join(reversed(frames))} | {exc[-1].strip()}" if exc else "")
                else:
                    bad = "Traceback" in raw or "Error" in raw
                    text = raw
                if bad and len(out) < limit:
                    out.append(f"{slot.name}: {text[:500]}")
        return out


# -- fault injector ------------------------------------------------------------------------------

class Injector:
    def __init__(self, cfg: ChaosConfig, infra: Infra, log: Log, rng: random.Random) -> None:
        self.cfg, self.infra, self.log, self.rng = cfg, infra, log, rng
        self.faults: list[dict[str, Any]] = []
        self.counts: Counter[str] = Counter()
        self.t0_ms = now_ms()
        self.kill_order: list[str] = []

    def last_fault_before(self, at_ms: int) -> dict[str, Any] | None:
        before = [f for f in self.faults if f["at_ms"] <= at_ms]
        return {k: before[-1][k] for k in ("n", "kind", "detail", "at_s")} if before else None

    def schedule(self, kinds: tuple[str, ...]) -> Any:
        """Kinds in seeded shuffled rounds, so each kind comes as often as the others."""
        while True:
            batch = list(kinds)
            self.rng.shuffle(batch)
            yield from batch

    async def run(self, stop: asyncio.Event) -> None:
        kinds = self.schedule(self.cfg.fault_kinds())
        self.infra.new_log_lines()  # start-up lines do not count against the first fault
        while not stop.is_set():
            if self.cfg.max_faults and len(self.faults) >= self.cfg.max_faults:
                return
            wait = self.rng.uniform(self.cfg.fault_min_s, self.cfg.fault_max_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)  # the fault schedule
            if stop.is_set():
                return
            await self.inject(next(kinds))

    async def inject(self, kind: str) -> None:
        n = len(self.faults) + 1
        at = now_ms()
        entry: dict[str, Any] = {"n": n, "kind": kind, "at_ms": at, "at_s": round((at - self.t0_ms) / 1000, 1)}
        self.log(f"fault {n}: {kind}")
        entry["detail"] = "in progress"
        self.faults.append(entry)  # a node death during the fault is blamed on it
        try:
            async with asyncio.timeout(90):
                entry["detail"] = await getattr(self, f"_{kind}")()
        except Exception as exc:  # a fault that could not be injected is reported, not fatal
            entry["detail"] = f"injection failed: {type(exc).__name__}: {exc}"
            entry["injection_failed"] = True
        entry["recovered_s"] = await self.infra.wait_all_ready(self.cfg.recover_s)
        entry["node_errors"] = self.infra.new_log_lines()
        self.log(f"fault {n}: {kind} {entry['detail']} -> ready after {entry['recovered_s']} s"
                 + (f", {len(entry['node_errors'])} error lines" if entry["node_errors"] else ""))
        if not entry.get("injection_failed"):
            self.counts[kind] += 1

    # Faults ------------------------------------------------------------------------------
    async def _redis_restart(self) -> str:
        infra = self.infra
        assert infra.redis is not None
        port = int(infra.redis.info["port"])
        await asyncio.to_thread(kill9, infra.redis)
        t0 = time.monotonic()
        infra.redis = await asyncio.to_thread(
            start_redis, port, persist_dir=infra.redis_dir, extra=PERSIST_EXTRA,
            log_path=str(infra.workdir / "redis.log"))
        return f"redis on {port} SIGKILLed and restarted on its AOF in {time.monotonic() - t0:.2f} s"

    async def _node_kill(self) -> str:
        infra = self.infra
        # Slots in seeded shuffled rounds: every node (and its clients) gets its turn.
        if not self.kill_order:
            self.kill_order = list(SLOTS)
            self.rng.shuffle(self.kill_order)
        name = self.kill_order.pop()
        slot = infra.slots[name]
        infra.replacing.add(name)
        try:
            await asyncio.to_thread(kill9, slot.proc)
            slot.killed.append({"generation": slot.generation, "exit": slot.proc.popen.returncode,
                                "pid": slot.proc.pid})
            t0 = time.monotonic()
            await infra.replace_node(name)
        finally:
            infra.replacing.discard(name)
        return f"{name} generation {slot.generation - 1} SIGKILLed, replacement ready in {time.monotonic() - t0:.2f} s"

    async def _client_kill(self) -> str:
        killed = []
        for proc in self.infra.redis_procs():
            if proc.alive():
                killed.append(int(await self.infra.redis_call(proc, "CLIENT", "KILL", "TYPE", "normal")))
        return f"CLIENT KILL TYPE normal killed {killed} connections"

    async def _maxmemory(self) -> str:
        procs = [p for p in self.infra.redis_procs() if p.alive()]
        hold = self.rng.uniform(*self.cfg.maxmemory_hold_s)
        saved = []
        for proc in procs:
            policy = await self.infra.redis_call(proc, "CONFIG", "GET", "maxmemory-policy")
            limit = await self.infra.redis_call(proc, "CONFIG", "GET", "maxmemory")
            saved.append((proc, config_value(policy), config_value(limit)))
        try:
            for proc, _, _ in saved:
                await self.infra.redis_call(proc, "CONFIG", "SET", "maxmemory-policy", "noeviction")
                await self.infra.redis_call(proc, "CONFIG", "SET", "maxmemory", "1")
            await asyncio.sleep(hold)  # the length of the fault
        finally:
            for proc, policy, limit in saved:
                with contextlib.suppress(Exception):
                    await self.infra.redis_call(proc, "CONFIG", "SET", "maxmemory", limit)
                    await self.infra.redis_call(proc, "CONFIG", "SET", "maxmemory-policy", policy)
        return f"maxmemory 1 (noeviction) on {len(saved)} server(s) for {hold:.1f} s"

    async def _failover(self) -> str:
        infra = self.infra
        roles = {}
        for proc in infra.cluster_procs:
            with contextlib.suppress(Exception):
                role = await infra.redis_call(proc, "ROLE")
                roles[proc.info["port"]] = role[0].decode() if isinstance(role[0], bytes) else role[0]
        masters = [p for p in infra.cluster_procs if roles.get(p.info["port"]) == "master"]
        victim = self.rng.choice(masters)
        port = int(victim.info["port"])
        myid = (await infra.redis_call(victim, "CLUSTER", "MYID")).decode()
        replicas = [p for p in infra.cluster_procs if p is not victim and roles.get(p.info["port"]) == "slave"]
        await asyncio.to_thread(kill9, victim)
        t0 = time.monotonic()
        # The replica of the victim is promoted (cluster-node-timeout 1 s + election).
        promoted = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while loop.time() < deadline and promoted is None:
            for proc in replicas:
                with contextlib.suppress(Exception):
                    role = await infra.redis_call(proc, "ROLE")
                    if role[0] in (b"master", "master"):
                        promoted = proc
            await asyncio.sleep(0.1)  # polling the cluster's state, with a deadline
        took = time.monotonic() - t0
        ok = False
        while loop.time() < deadline and promoted is not None:
            with contextlib.suppress(Exception):
                info = (await infra.redis_call(promoted, "CLUSTER", "INFO")).decode()
                if "cluster_state:ok" in info:
                    ok = True
                    break
            await asyncio.sleep(0.1)  # polling the cluster's state, with a deadline
        # The old master comes back empty and rejoins as a replica of the new one, so that
        # every master has a replica again for the next failover.
        new = await asyncio.to_thread(start_redis, port, persist_dir=victim.info["dir"], extra=CLUSTER_EXTRA,
                                      log_path=str(infra.workdir / f"redis-{port}.log"))
        infra.cluster_procs[infra.cluster_procs.index(victim)] = new
        rejoined = False
        while loop.time() < deadline + 30:
            with contextlib.suppress(Exception):
                role = await infra.redis_call(new, "ROLE")
                if role[0] in (b"slave", "slave") and role[3] in (b"connected", "connected"):
                    rejoined = True
                    break
            await asyncio.sleep(0.2)  # polling the cluster's state, with a deadline
        return (f"master {port} ({myid[:8]}) SIGKILLed; replica "
                f"{promoted.info['port'] if promoted else 'NONE'} promoted in {took:.2f} s, "
                f"cluster_state ok: {ok}; old master rejoined as replica: {rejoined}")


def config_value(reply: Any) -> str:
    """The value of a one-parameter ``CONFIG GET`` (redis-py answers a dict or a list)."""
    value = next(iter(reply.values())) if isinstance(reply, dict) else reply[1]
    return value.decode() if isinstance(value, bytes) else str(value)


def code_version() -> dict[str, Any]:
    """The commit the nodes run, and the files of node/ changed in the working tree."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                                  timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"),
            "node_uncommitted": [ln[3:] for ln in git("status", "--porcelain", "--", "node").splitlines()]}


def kill9(proc: Proc) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.popen.wait(10)


# -- sessions --------------------------------------------------------------------------------------

@dataclass
class Segment:
    start: str | None  # the id after which this session's view of the room starts
    reason: str
    at_ms: int
    ids: list[str] = field(default_factory=list)


class Recorder:
    """What one logical session (one user, across reconnects and reloads) received."""

    def __init__(self, user: str, transport: str) -> None:
        self.user, self.transport = user, transport
        self.segments: dict[str, list[Segment]] = {}
        self.resets: dict[str, list[int]] = {}  # room -> when recovered:false was received
        self.personal_resets: list[int] = []
        self.alerts: Counter[str] = Counter()
        self.welcomes = 0
        self.received = 0
        self.anomalies: list[str] = []

    def _segment(self, room: str, start: str | None, reason: str) -> None:
        self.segments.setdefault(room, []).append(Segment(start, reason, now_ms()))
        if reason.startswith("recovered false"):
            self.resets.setdefault(room, []).append(now_ms())

    def last_id(self, room: str) -> str | None:
        for seg in reversed(self.segments.get(room, [])):
            if seg.ids:
                return seg.ids[-1]
            if seg.start is not None:
                return seg.start
        return None

    def record(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind == "message":
            room = ev.get("room", "")
            if room not in self.segments:
                self.anomalies.append(f"message {ev.get('id')} of {room} before the room was known")
                self._segment(room, None, "unknown start")
            self.segments[room][-1].ids.append(ev["id"])
            self.received += 1
        elif kind == "welcome":
            self.welcomes += 1
            recovered = ev.get("recovered") or {}
            for room in ev.get("rooms", []):
                rid = room["id"]
                if rid not in self.segments:
                    self._segment(rid, room.get("last_id"), "first welcome")
                elif recovered.get(rid) is False:
                    self._segment(rid, room.get("last_id"), "recovered false (welcome)")
            personal = ev.get("personal")
            if isinstance(personal, dict) and personal.get("recovered") is False:
                self.personal_resets.append(now_ms())
        elif kind == "room" and isinstance(ev.get("room"), dict):
            room = ev["room"]
            rid = room.get("id", "")
            if ev.get("recovered") is False:
                self._segment(rid, room.get("last_id"), f"recovered false (room {ev.get('change')})")
            elif ev.get("change") == "added" and rid not in self.segments:
                self._segment(rid, room.get("last_id"), "room added")
        elif kind == "alert":
            self.alerts[ev.get("id", "")] += 1


class TracingClient(ChatClient):
    """A ChatClient that remembers how each of its connections ended: the close frame received
    and the one sent, and which side closed first. A 1011 the node sent is a node error; a
    1011 the client sent (its keepalive ping got no pong in time) echoed by the node is not."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.close_log: list[dict[str, Any]] = []

    async def _session(self) -> None:
        try:
            await super()._session()
        finally:
            ws = self._ws
            if ws is not None:
                proto = ws.protocol
                rcvd, sent = proto.close_rcvd, proto.close_sent
                self.close_log.append({
                    "rcvd": [rcvd.code, rcvd.reason[:60]] if rcvd else None,
                    "sent": [sent.code, sent.reason[:60]] if sent else None,
                    "by": "node" if proto.close_rcvd_then_sent else "client" if sent else "network"})


class WsUser:
    def __init__(self, user: str, url: str, log: Log) -> None:
        self.user, self.url, self.log = user, url, log
        self.rec = Recorder(user, "ws")
        self.client: TracingClient | None = None
        self.consumer: asyncio.Task[None] | None = None
        self.reloads = 0
        self.close_codes: Counter[str] = Counter()  # of every client this session used
        self.seen_closes = 0  # ends of the current client's connections already looked at
        self.pending_closes: list[dict[str, Any]] = []  # of replaced clients, not looked at yet
        self.lock = asyncio.Lock()

    def _new_client(self, cursors: Any = None, personal: Any = None) -> TracingClient:
        return TracingClient(self.url, user=self.user, cursors=cursors, personal=personal,
                          backoff_min=0.05, backoff_max=2.0, ping_interval=5.0, ping_timeout=10.0)

    async def _consume(self, client: ChatClient) -> None:
        while True:
            ev = await client.events.get()
            if ev.get("type") == "_swap":
                return
            self.rec.record(ev)

    async def start(self) -> None:
        client = self._new_client()
        self.client = client
        self.consumer = asyncio.get_running_loop().create_task(self._consume(client))
        await asyncio.wait_for(client.start(), 60)

    async def reload(self) -> None:
        """Close the client and resume with a new one from its cursors (a page reload)."""
        async with self.lock:
            old = self.client
            assert old is not None and self.consumer is not None
            await old.close()
            self.close_codes.update(str(c) for c in old.close_codes)
            cursors, personal = copy.deepcopy(old.cursors), copy.deepcopy(old.personal)
            old.events.put_nowait({"type": "_swap"})
            await asyncio.wait_for(self.consumer, 30)
            new = self._new_client(cursors, personal)
            self.pending_closes += old.close_log[self.seen_closes:]  # no await from here to the swap
            self.seen_closes = 0
            self.client = new
            self.consumer = asyncio.get_running_loop().create_task(self._consume(new))
            self.reloads += 1
            started = asyncio.get_running_loop().create_task(new.start())
        with contextlib.suppress(TimeoutError, Closed):
            await asyncio.wait_for(asyncio.shield(started), 60)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client.events.put_nowait({"type": "_swap"})
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.consumer, 10)

    async def request(self, kind: str, timeout: float = 60, **fields: Any) -> dict[str, Any]:
        """A command retried (bounded) across reconnects and reloads."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            client = self.client
            assert client is not None
            try:
                return await client.request(kind, timeout=min(10, max(0.5, deadline - loop.time())), **fields)
            except (ConnectionLost, TimeoutError, Closed, ChatClientError) as exc:
                if isinstance(exc, ChatClientError) and exc.code in ("bad_request", "forbidden", "not_found"):
                    raise
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.2)


class PollUser:
    def __init__(self, user: str, http_url: str, log: Log) -> None:
        self.user, self.base, self.log = user, http_url, log
        self.rec = Recorder(user, "poll")
        self.headers = {"Authorization": f"Bearer dev:{user}", "Content-Type": "application/json"}
        self.cursors: dict[str, Any] = {}
        self.personal: dict[str, Any] | None = None
        self.session = ""
        self.polls = 0
        self.errors: Counter[str] = Counter()

    async def _post(self, http: aiohttp.ClientSession, path: str, body: dict[str, Any],
                    timeout: float) -> tuple[int, Any]:
        async with http.post(self.base + path, json=body, headers=self.headers,
                             timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            raw = await r.read()
        try:
            return r.status, json.loads(raw)
        except ValueError:  # HAProxy's own error page (503 when no node is up)
            return (r.status if r.status != 200 else 599), {}

    def _cursors_from(self, cursors: dict[str, Any]) -> None:
        for room, cursor in cursors.items():
            if room not in self.rec.segments:
                self.rec._segment(room, cursor.get("id"), "first cursor")
        self.cursors = cursors

    async def start(self, http: aiohttp.ClientSession) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while True:
            try:
                status, body = await self._post(http, "/api/v1/session", {"name": self.user}, 15)
                if status == 200:
                    for ev in body.get("events", []):
                        self.rec.record(ev)
                    self._cursors_from(body["cursors"])
                    self.personal = {"epoch": body["personal"]["epoch"], "id": body["personal"]["last_id"]}
                    self.session = body.get("session", "")
                    return
                self.errors[f"session {status}"] += 1
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self.errors[f"session {type(exc).__name__}"] += 1
            if loop.time() >= deadline:
                raise RuntimeError(f"{self.user}: no polling session within 60 s: {dict(self.errors)}")
            await asyncio.sleep(0.5)

    async def poll_once(self, http: aiohttp.ClientSession, wait_ms: int) -> bool:
        """One poll; True if it returned events. Errors are counted and the poll is repeated
        later with the same cursors."""
        body = {"cursors": self.cursors, "personal": self.personal, "wait_ms": wait_ms,
                "interval_ms": 1000, "focused": True, "session": self.session}
        try:
            status, resp = await self._post(http, "/api/v1/poll", body, wait_ms / 1000 + 15)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self.errors[f"poll {type(exc).__name__}"] += 1
            await asyncio.sleep(0.3)
            return False
        if status != 200:
            self.errors[f"poll {status}"] += 1
            await asyncio.sleep(0.3)
            return False
        self.polls += 1
        for ev in resp.get("events", []):
            self.rec.record(ev)
        self._cursors_from(resp["cursors"])
        self.personal = resp["personal"]
        return bool(resp.get("events"))

    async def run(self, http: aiohttp.ClientSession, stop: asyncio.Event, wait_ms: int = 3000) -> None:
        while not stop.is_set():
            await self.poll_once(http, wait_ms)

    async def command(self, http: aiohttp.ClientSession, frame: dict[str, Any]) -> tuple[int, Any]:
        return await self._post(http, "/api/v1/command", frame, 15)


# -- the run ----------------------------------------------------------------------------------------

@dataclass
class Ack:
    user: str
    room: str
    text: str
    id: str
    at_ms: int


class Chaos:
    def __init__(self, cfg: ChaosConfig) -> None:
        self.cfg = cfg
        self.log = Log(cfg.quiet)
        self.rng = random.Random(cfg.seed)
        self.traffic_rng = random.Random(cfg.seed + 1)
        self.run_id = uuid.uuid4().hex[:6]
        self.ws: list[WsUser] = []
        self.pollers: list[PollUser] = []
        self.members: dict[str, list[str]] = {}  # room -> users
        self.send_rooms: dict[str, list[str]] = {}  # user -> rooms it sends in
        self.acks: list[Ack] = []
        self.sent = 0
        self.unacked: list[dict[str, Any]] = []
        self.send_errors: Counter[str] = Counter()
        self.alerts_acked: list[dict[str, Any]] = []
        self.alerts_failed: Counter[str] = Counter()
        self.alerts_sent = 0
        self.node_deaths: list[dict[str, Any]] = []
        self.closes: list[dict[str, Any]] = []

    # setup -----------------------------------------------------------------------------------
    async def setup(self, infra: Infra, http: aiohttp.ClientSession) -> None:
        assert infra.lb is not None
        cfg = self.cfg
        self.ws = [WsUser(f"c{self.run_id}w{i:02d}", infra.lb.ws_url, self.log) for i in range(cfg.ws_users)]
        self.pollers = [PollUser(f"c{self.run_id}p{i}", infra.lb.http_url, self.log) for i in range(cfg.pollers)]
        await asyncio.gather(*(u.start() for u in self.ws))
        everyone = [u.user for u in self.ws] + [p.user for p in self.pollers]
        self.members["general"] = everyone
        for u in everyone:
            self.send_rooms[u] = ["general"]
        rng = self.rng
        for i in range(cfg.rooms):
            owner = self.ws[i % len(self.ws)]
            others = rng.sample([u.user for u in self.ws if u is not owner], min(4, len(self.ws) - 1))
            data = await owner.request("create_room", name=f"chaos room {i}",
                                       visibility="closed" if i % 2 else "open", members=others)
            rid = data["room"]["id"]
            self.members[rid] = [owner.user, *others]
            for u in self.members[rid]:
                self.send_rooms[u].append(rid)
        pairs: list[tuple[str, str]] = []
        if self.pollers:
            pairs.append((self.ws[0].user, self.pollers[0].user))
        while len(pairs) < cfg.dms:
            a, b = rng.sample([u.user for u in self.ws], 2)
            if (a, b) not in pairs and (b, a) not in pairs:
                pairs.append((a, b))
        by_user = {u.user: u for u in self.ws}
        for a, b in pairs:
            data = await by_user[a].request("dm", user=b)
            rid = data["room"]["id"]
            self.members[rid] = [a, b]
            self.send_rooms[a].append(rid)
            self.send_rooms[b].append(rid)
        # Pollers open their sessions once every room exists: their first cursors are the
        # start of their view of each room.
        await asyncio.gather(*(p.start(http) for p in self.pollers))
        # Every WebSocket user knows every room of theirs (welcome or `room added`).
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while loop.time() < deadline:
            if all(r in u.rec.segments for u in self.ws for r in self.send_rooms[u.user]):
                break
            await asyncio.sleep(0.1)  # waiting for events, with a deadline
        self.log(f"setup: {len(self.ws)} WebSocket users, {len(self.pollers)} pollers, "
                 f"rooms {sorted(self.members)}")

    # traffic ---------------------------------------------------------------------------------
    async def ws_sender(self, u: WsUser, stop: asyncio.Event) -> None:
        rng = random.Random(hash((self.cfg.seed, u.user)))
        n = 0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            room = rng.choice(self.send_rooms[u.user])
            text = f"{u.user}-{n}"
            cmid = f"{u.user}-{n}"
            n += 1
            self.sent += 1
            deadline = loop.time() + 60
            while True:
                client = u.client
                assert client is not None
                try:
                    reply = await client.request("send", timeout=min(10.0, max(0.5, deadline - loop.time())),
                                                 room=room, text=text, cmid=cmid)
                    self.acks.append(Ack(u.user, room, text, reply["id"], now_ms()))
                    break
                except (ConnectionLost, TimeoutError, Closed, ChatClientError) as exc:
                    key = exc.code if isinstance(exc, ChatClientError) else type(exc).__name__
                    self.send_errors[f"ws {key}"] += 1
                    if loop.time() >= deadline:
                        self.unacked.append({"user": u.user, "room": room, "text": text, "last_error": key})
                        break
                    await asyncio.sleep(0.1 + rng.random() * 0.2)  # retry pacing
            await asyncio.sleep(rng.uniform(*self.cfg.send_interval_s))  # the send rate

    async def poll_sender(self, p: PollUser, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        rng = random.Random(hash((self.cfg.seed, p.user)))
        n = 0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(*self.cfg.poll_send_interval_s))  # the send rate
            room = rng.choice(self.send_rooms[p.user])
            text = f"{p.user}-{n}"
            cmid = f"{p.user}-{n}"
            n += 1
            self.sent += 1
            deadline = loop.time() + 60
            while True:
                key = ""
                try:
                    status, reply = await p.command(http, {"type": "send", "ref": n, "room": room,
                                                           "text": text, "cmid": cmid})
                    if status == 200 and reply.get("ok"):
                        self.acks.append(Ack(p.user, room, text, reply["data"]["id"], now_ms()))
                        break
                    key = f"{status} {(reply.get('error') or {}).get('code') if isinstance(reply, dict) else ''}"
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    key = type(exc).__name__
                self.send_errors[f"http {key}"] += 1
                if loop.time() >= deadline:
                    self.unacked.append({"user": p.user, "room": room, "text": text, "last_error": key})
                    break
                await asyncio.sleep(0.2 + rng.random() * 0.3)  # retry pacing

    async def alerter(self, infra: Infra, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        assert infra.lb is not None
        rng = self.traffic_rng
        everyone = [u.user for u in self.ws] + [p.user for p in self.pollers]
        n = 0
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(*self.cfg.alert_interval_s))  # the alert rate
            to = rng.sample(everyone, rng.randint(1, min(3, len(everyone))))
            token = f"alert-{self.run_id}-{n}"
            n += 1
            self.alerts_sent += 1
            try:
                async with http.post(infra.lb.http_url + "/api/v1/alerts",
                                     json={"to": to, "kind": "chaos", "title": token, "data": {"token": token}},
                                     headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=aiohttp.ClientTimeout(total=10)) as r:
                    body = await r.json(content_type=None)
                    if r.status == 200:
                        self.alerts_acked.append({"id": body["id"], "to": to, "token": token, "at_ms": now_ms()})
                    else:
                        self.alerts_failed[f"{r.status} {(body.get('error') or {}).get('code')}"] += 1
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                self.alerts_failed[type(exc).__name__] += 1

    async def reloader(self, stop: asyncio.Event) -> None:
        rng = self.traffic_rng
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), rng.uniform(*self.cfg.reload_interval_s))  # reload rate
            if stop.is_set():
                return
            u = rng.choice(self.ws)
            try:
                await u.reload()
            except Exception as exc:  # a reload that failed is a finding, not a crash of the soak
                self.send_errors[f"reload {type(exc).__name__}"] += 1

    def note_closes(self, injector: Injector) -> None:
        """When each WebSocket close code other than the client's own 1000 was seen, and after
        which fault (a 1011 is a failure: the node hit an unexpected error)."""
        for u in self.ws:
            client = u.client
            if client is None:
                continue
            ends = u.pending_closes + client.close_log[u.seen_closes:]
            u.pending_closes = []
            u.seen_closes = len(client.close_log)
            for end in ends:
                if end["by"] == "client" and end["sent"] and end["sent"][0] == 1000:
                    continue  # a reload
                at = now_ms()
                self.closes.append({"user": u.user, **end, "at_s": round((at - injector.t0_ms) / 1000, 1),
                                    "after_fault": injector.last_fault_before(at)})

    async def monitor(self, infra: Infra, injector: Injector, stop: asyncio.Event) -> None:
        """Notices nodes that died by themselves, records them and starts a replacement; notes
        the close codes the clients saw."""
        while not stop.is_set():
            self.note_closes(injector)
            for name, slot in infra.slots.items():
                if name in infra.replacing or slot.proc.alive():
                    continue
                if slot.killed and slot.killed[-1]["pid"] == slot.proc.pid:
                    # Killed by the injector, whose replacement failed to start: try again.
                    slot.killed[-1]["replacement_retried"] = True
                    infra.replacing.add(name)
                    try:
                        await infra.replace_node(name)
                    except Exception as exc:
                        self.log(f"replacement of {name} failed: {exc}")
                    finally:
                        infra.replacing.discard(name)
                    continue
                at = now_ms()
                raw = await asyncio.to_thread(slot.log_path.read_bytes)
                tail = raw.decode(errors="replace").splitlines()[-80:]
                # The frames of our code and the exception, from the traceback that ended it.
                cause = [ln.strip() for ln in tail if "/node/" in ln or "Error" in ln or "Exception" in ln]
                death = {"slot": name, "generation": slot.generation, "exit": slot.proc.popen.returncode,
                         "at_s": round((at - injector.t0_ms) / 1000, 1),
                         "after_fault": injector.last_fault_before(at), "cause": cause[-12:],
                         "log_tail": tail[-20:]}
                self.node_deaths.append(death)
                slot.died.append(death)
                self.log(f"NODE DIED: {name} generation {slot.generation} exit {death['exit']}")
                infra.replacing.add(name)
                try:
                    await infra.replace_node(name)
                except Exception as exc:
                    self.log(f"replacement of {name} failed: {exc}")
                finally:
                    infra.replacing.discard(name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)  # polling process state

    # end -----------------------------------------------------------------------------------
    async def newest_ids(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        by_user = {u.user: u for u in self.ws}
        for room, users in self.members.items():
            owner = next(by_user[m] for m in users if m in by_user)
            data = await owner.request("history", room=room, limit=1, timeout=30)
            out[room] = data["messages"][-1]["id"] if data["messages"] else None
        return out

    def caught_up(self, newest: dict[str, str | None]) -> bool:
        acked_alerts = self.alerts_acked
        for rec, user in [(u.rec, u.user) for u in self.ws] + [(p.rec, p.user) for p in self.pollers]:
            for room, users in self.members.items():
                top = newest[room]
                if user not in users or top is None:
                    continue
                last = rec.last_id(room)
                if last is None or stream_id_tuple(last) < stream_id_tuple(top):
                    return False
            for alert in acked_alerts:
                if user in alert["to"] and rec.alerts[alert["id"]] == 0 and not rec.personal_resets:
                    return False
        return True

    async def settle(self) -> tuple[bool, float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        newest: dict[str, str | None] = {}
        while loop.time() - t0 < self.cfg.settle_s:
            try:
                newest = await self.newest_ids()
            except Exception:
                await asyncio.sleep(0.5)
                continue
            if self.caught_up(newest):
                return True, round(loop.time() - t0, 1)
            await asyncio.sleep(0.5)  # polling the sessions' progress, with a deadline
        return False, round(loop.time() - t0, 1)

    async def full_history(self, room: str) -> list[dict[str, Any]]:
        by_user = {u.user: u for u in self.ws}
        owner = next(by_user[m] for m in self.members[room] if m in by_user)
        out: list[dict[str, Any]] = []
        before = None
        for _ in range(100_000):
            fields: dict[str, Any] = {"room": room, "limit": 100}
            if before:
                fields["before"] = before
            data = await owner.request("history", timeout=60, **fields)
            page = data["messages"]
            out.extend(reversed(page))
            if not page or not data.get("more"):
                break
            before = page[0]["id"]
        out.reverse()
        return out

    def check(self, histories: dict[str, list[dict[str, Any]]], injector: Injector) -> dict[str, Any]:
        failures: list[str] = []
        examples: list[dict[str, Any]] = []
        lost = duplicated = reported_lost = out_of_order = redelivered = resets_seen = 0
        sessions = 0
        hist_ids = {room: [m["id"] for m in msgs] for room, msgs in histories.items()}
        for rec, user in [(u.rec, u.user) for u in self.ws] + [(p.rec, p.user) for p in self.pollers]:
            sessions += 1
            for a in rec.anomalies[:5]:
                failures.append(f"{user}: {a}")
            for room, segs in rec.segments.items():
                if room not in hist_ids:
                    continue
                ids = hist_ids[room]
                tuples = [stream_id_tuple(i) for i in ids]
                seen: set[str] = set()
                for k, seg in enumerate(segs):
                    counts = Counter(seg.ids)
                    dups = [i for i, c in counts.items() if c > 1]
                    if dups:  # twice within one segment: never excused
                        duplicated += sum(counts[i] - 1 for i in dups)
                        examples.append({"check": "sequences", "what": "duplicated", "user": user,
                                         "transport": rec.transport, "room": room, "segment": k,
                                         "segment_reason": seg.reason, "ids": dups[:5],
                                         "after_fault": injector.last_fault_before(id_ms(dups[0]))})
                    again = [i for i in counts if i in seen]
                    if again:  # delivered before a recovered:false and again after it: reported
                        redelivered += len(again)
                        examples.append({"check": "sequences", "what": "redelivered after recovered:false",
                                         "user": user, "transport": rec.transport, "room": room,
                                         "segment": k, "segment_reason": seg.reason, "ids": again[:5],
                                         "after_fault": injector.last_fault_before(seg.at_ms)})
                    seen.update(counts)
                    if k > 0:
                        resets_seen += 1
                        examples.append({"check": "info", "what": "recovered:false", "user": user,
                                         "transport": rec.transport, "room": room, "segment": k,
                                         "reason": seg.reason, "start": seg.start,
                                         "previous_last": (segs[k - 1].ids or [segs[k - 1].start or ""])[-1],
                                         "after_fault": injector.last_fault_before(seg.at_ms)})
                    final = k == len(segs) - 1
                    lo = 0 if seg.start is None else bisect.bisect_right(tuples, stream_id_tuple(seg.start))
                    if final:
                        hi = len(ids)
                    elif seg.ids:
                        hi = bisect.bisect_right(tuples, stream_id_tuple(seg.ids[-1]))
                    else:
                        hi = lo
                    expected = ids[lo:hi]
                    got = list(dict.fromkeys(seg.ids))
                    got_set, expected_set = set(got), set(expected)
                    if got != sorted(got, key=stream_id_tuple):
                        out_of_order += 1
                        examples.append({"check": "sequences", "what": "out of order", "user": user,
                                         "room": room, "segment": k})
                    missing = [i for i in expected if i not in got_set]
                    extra = [i for i in got if i not in expected_set]
                    if missing:
                        lost += len(missing)
                        examples.append({"check": "sequences", "what": "missing", "user": user,
                                         "transport": rec.transport, "room": room, "segment": k,
                                         "segment_reason": seg.reason, "count": len(missing),
                                         "first": missing[:5],
                                         "after_fault": injector.last_fault_before(id_ms(missing[0]))})
                    if extra:
                        examples.append({"check": "sequences", "what": "received but not in history "
                                         "(or before the segment start)", "user": user, "room": room,
                                         "segment": k, "ids": extra[:5],
                                         "after_fault": injector.last_fault_before(id_ms(extra[0]))})
                        failures.append(f"{user} {room}: {len(extra)} received ids outside the expected range")
                    if not final:
                        # Between this segment's end and the next start: reported by recovered:false.
                        nxt = segs[k + 1]
                        if nxt.start is not None:
                            gap_end = bisect.bisect_right(tuples, stream_id_tuple(nxt.start))
                            reported_lost += max(0, gap_end - hi)
        # Acked sends are in history; no text twice.
        ack_lost = 0
        ack_reported = 0
        by_id = {room: set(ids) for room, ids in hist_ids.items()}
        recs = {u.user: u.rec for u in self.ws} | {p.user: p.rec for p in self.pollers}
        for ack in self.acks:
            if ack.id in by_id.get(ack.room, set()):
                continue
            resets = [t for t in recs[ack.user].resets.get(ack.room, []) if t >= ack.at_ms - 1000]
            if resets:
                ack_reported += 1
            else:
                ack_lost += 1
                if ack_lost <= 5:
                    examples.append({"check": "acks", "what": "acked send not in history", "user": ack.user,
                                     "room": ack.room, "id": ack.id, "text": ack.text,
                                     "after_fault": injector.last_fault_before(ack.at_ms)})
        ack_ids = Counter((a.room, a.id) for a in self.acks)
        ack_id_dups = sum(1 for c in ack_ids.values() if c > 1)
        text_dups = 0
        for room, msgs in histories.items():
            texts = Counter(m.get("text") for m in msgs)
            d = [t for t, c in texts.items() if c > 1]
            text_dups += len(d)
            if d:
                examples.append({"check": "acks", "what": "text appended twice", "room": room, "texts": d[:5]})
        # Alerts: exactly once per recipient session.
        a_expected = a_delivered = a_lost = a_dup = a_reported = 0
        for alert in self.alerts_acked:
            for user in alert["to"]:
                a_expected += 1
                times = recs[user].alerts[alert["id"]]
                if times == 1:
                    a_delivered += 1
                elif times == 0:
                    if recs[user].personal_resets:
                        a_reported += 1
                    else:
                        a_lost += 1
                        if a_lost <= 5:
                            examples.append({"check": "alerts", "what": "alert not delivered", "user": user,
                                             "alert": alert["id"], "transport": recs[user].transport,
                                             "after_fault": injector.last_fault_before(alert["at_ms"])})
        for user, rec in recs.items():
            for aid, c in rec.alerts.items():
                if c > 1:
                    a_dup += c - 1
                    examples.append({"check": "alerts", "what": "alert delivered twice", "user": user,
                                     "alert": aid, "count": c, "transport": rec.transport})
        if lost:
            failures.append(f"sequences: {lost} messages missing from sessions without recovered:false")
        if duplicated:
            failures.append(f"sequences: {duplicated} messages received twice")
        if out_of_order:
            failures.append(f"sequences: {out_of_order} segments out of order")
        if ack_lost:
            failures.append(f"acks: {ack_lost} acknowledged sends not in history (not reported lost)")
        if ack_id_dups:
            failures.append(f"acks: {ack_id_dups} ids acknowledged to two different sends")
        if text_dups:
            failures.append(f"acks: {text_dups} texts appended twice")
        if a_lost:
            failures.append(f"alerts: {a_lost} deliveries missing")
        if a_dup:
            failures.append(f"alerts: {a_dup} deliveries duplicated")
        return {
            "failures": failures,
            "examples": [e for e in examples if e["check"] != "info"][:40] + \
            [e for e in examples if e["check"] == "info"][:20],
            "sessions_checked": sessions,
            "messages": {"sent": self.sent, "acked": len(self.acks), "unacked": len(self.unacked),
                         "in_history": sum(len(v) for v in hist_ids.values()),
                         "received": sum(r.received for r in recs.values()),
                         "lost": lost, "duplicated": duplicated, "reported_lost": reported_lost,
                         "redelivered_after_recovered_false": redelivered,
                         "acked_not_in_history": ack_lost, "acked_reported_lost": ack_reported,
                         "texts_appended_twice": text_dups, "out_of_order_segments": out_of_order},
            "alerts": {"injected": self.alerts_sent, "acked": len(self.alerts_acked),
                       "failed_posts": dict(self.alerts_failed), "deliveries_expected": a_expected,
                       "delivered": a_delivered, "lost": a_lost, "duplicated": a_dup, "reported_lost": a_reported},
            "recovered_false": {"room_resets": sum(len(v) for r in recs.values() for v in r.resets.values()),
                                "personal_resets": sum(len(r.personal_resets) for r in recs.values())},
        }

    def per_session(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for u in self.ws:
            out[u.user] = {"transport": "ws", "received": u.rec.received, "welcomes": u.rec.welcomes,
                           "reloads": u.reloads, "alerts": sum(u.rec.alerts.values()),
                           "close_codes": dict(u.close_codes + Counter(str(c) for c in (u.client.close_codes if u.client else []))),
                           "segments": {r: len(s) for r, s in u.rec.segments.items() if len(s) > 1}}
        for p in self.pollers:
            out[p.user] = {"transport": "poll", "received": p.rec.received, "polls": p.polls,
                           "alerts": sum(p.rec.alerts.values()), "errors": dict(p.errors),
                           "segments": {r: len(s) for r, s in p.rec.segments.items() if len(s) > 1}}
        return out

    async def node_check(self, infra: Infra) -> list[str]:
        failures = []
        async with aiohttp.ClientSession() as http:
            for name, slot in infra.slots.items():
                if not slot.proc.alive():
                    failures.append(f"nodes: {name} generation {slot.generation} is not running at the end "
                                    f"(exit {slot.proc.popen.returncode})")
                elif not await infra.ready(slot, http, "/healthz"):
                    failures.append(f"nodes: {name} does not answer /healthz at the end")
        for death in self.node_deaths:
            failures.append(f"nodes: {death['slot']} generation {death['generation']} died by itself "
                            f"(exit {death['exit']}) at {death['at_s']} s, after fault "
                            f"{(death['after_fault'] or {}).get('kind')}")
        if infra.lb is not None and not infra.lb.proc.alive():
            failures.append("nodes: HAProxy died")
        return failures

    # main ----------------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        cfg = self.cfg
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="chatcluster-chaos-"))
        workdir.mkdir(parents=True, exist_ok=True)
        infra = Infra(cfg, workdir, self.log)
        injector = Injector(cfg, infra, self.log, self.rng)
        result: dict[str, Any] = {"command": cfg.command, "started_at": started, "seed": cfg.seed,
                                  "redis": "cluster 3x2" if cfg.cluster else "single (AOF, appendfsync always)",
                                  "duration_s": cfg.duration_s, "workdir": str(workdir),
                                  "fault_interval_s": [cfg.fault_min_s, cfg.fault_max_s],
                                  "code": await asyncio.to_thread(code_version)}
        tasks: list[asyncio.Task[Any]] = []
        stop_faults, stop_traffic, stop_polls, stop_monitor = (asyncio.Event() for _ in range(4))
        http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        try:
            async with asyncio.timeout(cfg.duration_s + cfg.settle_s + 600):
                self.log(f"starting Redis ({result['redis']}), 3 nodes and HAProxy in {workdir}")
                await infra.start()
                await self.setup(infra, http)
                loop = asyncio.get_running_loop()
                spawn = loop.create_task
                tasks += [spawn(self.ws_sender(u, stop_traffic)) for u in self.ws]
                tasks += [spawn(self.poll_sender(p, http, stop_traffic)) for p in self.pollers]
                tasks += [spawn(p.run(http, stop_polls)) for p in self.pollers]
                tasks += [spawn(self.alerter(infra, http, stop_traffic)), spawn(self.reloader(stop_traffic)),
                          spawn(self.monitor(infra, injector, stop_monitor))]
                fault_task = spawn(injector.run(stop_faults))
                t_start = loop.time()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(fault_task), cfg.duration_s)  # the soak's length
                stop_faults.set()
                await fault_task  # the fault in progress ends (and recovers) first
                self.log("faults stopped; traffic stops")
                stop_traffic.set()
                traffic = [t for t in tasks[:len(self.ws) + len(self.pollers)]] + tasks[-3:-1]
                done, pending = await asyncio.wait(traffic, timeout=90)
                for t in done:
                    if t.exception() is not None:
                        result.setdefault("task_errors", []).append(repr(t.exception()))
                for t in pending:
                    t.cancel()
                result["traffic_s"] = round(loop.time() - t_start, 1)
                settled, settle_s = await self.settle()
                result["settled"], result["settle_s"] = settled, settle_s
                self.log(f"settled: {settled} after {settle_s} s")
                stop_polls.set()
                stop_monitor.set()
                await asyncio.wait(tasks, timeout=30)
                histories = {room: await self.full_history(room) for room in self.members}
                checked = self.check(histories, injector)
                failures = await self.node_check(infra) + checked.pop("failures")
                self.note_closes(injector)
                close_codes: Counter[str] = Counter()
                for v in self.per_session().values():
                    close_codes.update(v.get("close_codes", {}))
                node_1011 = [c for c in self.closes if c["by"] == "node" and (c["rcvd"] or [0])[0] == 1011]
                if node_1011:
                    failures.append(f"closes: {len(node_1011)} WebSocket connections closed 1011 by the node "
                                    "(unexpected server error; an outage must give unavailable + 1013), "
                                    f"first after fault {(node_1011[0]['after_fault'] or {}).get('kind')}")
                keepalive = [c for c in self.closes if c["by"] == "client" and (c["sent"] or [0])[0] == 1011]
                if keepalive:
                    result["client_keepalive_timeouts"] = len(keepalive)
                if not settled:
                    failures.append(f"settle: sessions had not caught up after {settle_s} s")
                result.update({
                    "passed": not failures,
                    "failures": failures,
                    "faults": dict(injector.counts),
                    "faults_injected": sum(injector.counts.values()),
                    "fault_log": [{k: v for k, v in f.items() if k != "at_ms"} for f in injector.faults],
                    "node_deaths": self.node_deaths,
                    "node_kills": {n: s.killed for n, s in infra.slots.items()},
                    "sessions": {"ws": len(self.ws), "poll": len(self.pollers),
                                 "ws_reloads": sum(u.reloads for u in self.ws),
                                 "ws_welcomes": sum(u.rec.welcomes for u in self.ws),
                                 "polls": sum(p.polls for p in self.pollers),
                                 "poll_errors": dict(sum((p.errors for p in self.pollers), Counter()))},
                    "send_errors": dict(self.send_errors),
                    "close_codes": dict(close_codes),
                    "closes": self.closes[:200],
                    "per_session": self.per_session(),
                    **checked,
                })
        except BaseException as exc:
            result["passed"] = False
            import traceback

            result.setdefault("failures", []).append(f"the soak itself failed: {type(exc).__name__}: {exc}")
            result["traceback"] = traceback.format_exc().splitlines()[-12:]
            self.log("".join(traceback.format_exc()))
            result["faults"] = dict(injector.counts)
            result["fault_log"] = [{k: v for k, v in f.items() if k != "at_ms"} for f in injector.faults]
            result["node_deaths"] = self.node_deaths
            if not isinstance(exc, Exception):
                raise
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.gather(*(u.close() for u in self.ws), return_exceptions=True)
            await http.close()
            await asyncio.to_thread(infra.stop)
            result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            if cfg.out is not None:
                cfg.out.parent.mkdir(parents=True, exist_ok=True)
                cfg.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        return result


async def run_chaos(cfg: ChaosConfig) -> dict[str, Any]:
    return await Chaos(cfg).run()


def summary(result: dict[str, Any]) -> str:
    m = result.get("messages", {})
    a = result.get("alerts", {})
    lines = [
        f"chaos soak: {'PASSED' if result.get('passed') else 'FAILED'} ({result.get('redis')}, "
        f"{result.get('traffic_s', '?')} s of traffic, seed {result.get('seed')})",
        f"faults injected: {result.get('faults_injected', 0)} {result.get('faults', {})}",
        f"sessions checked: {result.get('sessions_checked', 0)} {result.get('sessions', {})}",
        f"messages: sent {m.get('sent')}, acked {m.get('acked')}, in history {m.get('in_history')}, "
        f"received {m.get('received')}, lost {m.get('lost')}, duplicated {m.get('duplicated')}, "
        f"reported lost (recovered:false) {m.get('reported_lost')}, redelivered after recovered:false "
        f"{m.get('redelivered_after_recovered_false')}, acked not in history {m.get('acked_not_in_history')}",
        f"alerts: acked {a.get('acked')}, deliveries {a.get('delivered')}/{a.get('deliveries_expected')}, "
        f"lost {a.get('lost')}, duplicated {a.get('duplicated')}",
        f"node deaths (not injected): {len(result.get('node_deaths', []))}",
    ]
    lines += [f"FAIL: {f}" for f in result.get("failures", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.chaos", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="length of the faulty traffic phase")
    p.add_argument("--cluster", action="store_true", help="a 3-master/3-replica Redis Cluster")
    p.add_argument("--seed", type=int, default=1, help="seed of the fault schedule")
    p.add_argument("--fault-min", type=float, default=20.0, help="shortest pause between faults (s)")
    p.add_argument("--fault-max", type=float, default=40.0, help="longest pause between faults (s)")
    p.add_argument("--kinds", default="", help="comma-separated fault kinds (default: all that apply)")
    p.add_argument("--faults", type=int, default=0, help="end the faulty phase after this many faults "
                   "(default: run --minutes)")
    p.add_argument("--ws-users", type=int, default=12)
    p.add_argument("--pollers", type=int, default=3)
    p.add_argument("--workdir", default="", help="logs and Redis data (default: a new temp dir)")
    p.add_argument("--out", default="", help="result JSON (default: loadtest/results/chaos-...json)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    mode = "cluster" if args.cluster else "single"
    out = Path(args.out) if args.out else \
        REPO / "loadtest" / "results" / f"chaos-{time.strftime('%Y-%m-%d')}-{mode}-{args.minutes:g}m.json"
    kinds = tuple(k for k in args.kinds.split(",") if k)
    valid = CLUSTER_KINDS + SINGLE_KINDS
    if any(k not in valid for k in kinds):
        p.error(f"--kinds: choose among {sorted(set(valid))}")
    cfg = ChaosConfig(duration_s=args.minutes * 60, cluster=args.cluster, seed=args.seed,
                      fault_min_s=args.fault_min, fault_max_s=args.fault_max, kinds=kinds, max_faults=args.faults,
                      ws_users=args.ws_users, pollers=args.pollers,
                      workdir=Path(args.workdir) if args.workdir else None, out=out,
                      command="python -m loadtest.chaos " + " ".join(sys.argv[1:] if argv is None else argv),
                      quiet=args.quiet)
    result = asyncio.run(run_chaos(cfg))
    print(summary(result))
    print(f"result: {out}")
    return 0 if result.get("passed") else 1


if __name__ == "__main__":
    sys.exit(main())
