"""Polling load: HTTP polling clients of one node against WebSocket clients of the same node.

    python loadtest/bench.py polling --target ours --pollers 1000 --rooms 10 --rates 10,50,200

P polling clients (``POST /api/v1/session`` once, then ``POST /api/v1/poll`` in a loop, as in
PROTOCOL.md section 3) in ``--rooms`` rooms, while the open-loop publisher (:mod:`loadtest.publisher`)
appends messages to those rooms at fixed rates. Two polling modes:

* ``long``: every poll carries ``wait_ms`` (``--wait-ms``); the client polls again as soon as a
  response arrives (the node's answer comes when an entry arrives or ``wait_ms`` passes);
* ``long-paced``: long polls, but the client sleeps ``next_poll_ms`` between them, as the
  browser library (``chatcluster.js`` with ``pollWaitMs``) does;
* ``short``: ``wait_ms`` 0; the client sleeps ``next_poll_ms`` of the previous response (the
  node's decaying interval) before the next poll.

In the same run, P WebSocket clients (the bench's own client workers) in other rooms of the
same size get the same message rate: the comparison row. The pollers are stopped while the
WebSocket phase runs (long polls are woken by one extra message per room, so that no waiting
poll is left behind on the node).

An idle phase per mode (pollers, no messages) shows the request rate the decay leaves.

Measured per step, over the window only: delivered message events/s, end-to-end latency from
the scheduled send time (p50/p99/p99.9), HTTP requests/s (by start time) and per delivered
event, node CPU per delivered event and per request, Redis commands per request (``INFO
commandstats`` deltas, the publisher's own append commands left out), non-200 statuses,
lost/duplicate messages per room (``seq``), and the generator's CPU next to the node's.

The node is restarted by this scenario with the per-IP HTTP rate limit lifted (every bench
client comes from 127.0.0.1): ``CHAT_HTTP_RATE_PER_S``/``CHAT_HTTP_RATE_BURST``, plus ``--node-env``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from array import array
from typing import Any

import orjson

from loadtest import stats
from loadtest.targets import TARGETS
from loadtest.wsclient import MAGIC_PREFIX, WorkerPool, pipe_inbox, run_worker

NAME = "polling"
HELP = "HTTP polling clients (long and short polls) vs WebSocket clients of the same node"

# The publisher's append script and the commands inside it: the write path, not the polls.
WRITE_COMMANDS = ("evalsha", "xadd", "hincrby", "hexists", "hset", "set", "script|load", "script")
DEFAULT_NODE_ENV = "CHAT_HTTP_RATE_PER_S=1000000,CHAT_HTTP_RATE_BURST=1000000"



def take_message(st: Any, c: Any, e: dict[str, Any], arrive: float) -> None:
    """Count one received message of a poller: duplicates, gaps (by seq), deliveries and the
    latency of messages scheduled in the window (their text starts with MAGIC_PREFIX)."""
    seq = e["seq"]
    if seq <= c.last_seq:
        st.dups += 1
        return
    if seq > c.last_seq + 1:
        st.gaps += seq - c.last_seq - 1
    c.last_seq = seq
    if st.w0 <= arrive < st.w1:
        st.delivered += 1
    text = e.get("text", "")
    if text.startswith(MAGIC_PREFIX):
        sched = int(text[len(MAGIC_PREFIX):text.index(" ")])
        if st.w0 <= sched < st.w1:
            st.latencies.append(arrive - sched)

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pollers", type=int, default=1000, help="polling clients (and as many "
                   "WebSocket clients for the comparison)")
    p.add_argument("--rooms", type=int, default=10, help="rooms the clients are spread over")
    p.add_argument("--rates", default="10,50,200", help="messages/s in all rooms together, a sweep")
    p.add_argument("--modes", default="long,long-paced,short",
                   help="polling modes: long, long-paced, short (see the module docstring)")
    p.add_argument("--wait-ms", type=int, default=20000, help="wait_ms of a long poll")
    p.add_argument("--duration", type=float, default=10.0, help="measurement window (s)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds before each window")
    p.add_argument("--idle-seconds", type=float, default=30.0,
                   help="idle phase per mode: pollers, no messages (0: skip)")
    p.add_argument("--idle-bucket", type=float, default=5.0, help="idle request rate per this many s")
    p.add_argument("--no-ws", action="store_true", help="skip the WebSocket comparison")
    p.add_argument("--poll-workers", type=int, default=2, help="polling client processes")
    p.add_argument("--text-bytes", type=int, default=100)
    p.add_argument("--drain-timeout", type=float, default=10.0)
    p.add_argument("--node-env", default="", help="extra K=V,K=V settings for the node "
                   f"(always: {DEFAULT_NODE_ENV})")
    p.set_defaults(target="ours")


def now_us() -> int:
    return time.time_ns() // 1000


def log(msg: str) -> None:
    print(f"[polling {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- polling client process ----------------------------------------------------------------------

class PollStats:
    def __init__(self) -> None:
        self.reset(0, 0, 1.0)

    def reset(self, w0: int, w1: int, bucket_s: float) -> None:
        self.w0, self.w1, self.bucket_us = w0, w1, int(bucket_s * 1e6)
        self.requests = 0  # started inside the window
        self.buckets: dict[int, int] = {}
        self.delivered = 0  # message events that arrived inside the window
        self.latencies = array("q")  # for messages scheduled inside the window
        self.statuses: dict[str, int] = {}  # non-200 inside or outside the window, and exceptions
        self.gaps = self.dups = self.other_events = self.empty = 0
        self.next_poll_sum = 0
        self.responses = 0


class PollClient:
    __slots__ = ("user", "room", "headers", "cursors", "personal", "session", "interval",
                 "last_seq", "in_flight")

    def __init__(self, user: str, room: str) -> None:
        self.user = user
        self.room = room
        self.headers = {"Authorization": f"Bearer dev:{user}", "Content-Type": "application/json"}
        self.cursors: Any = {}
        self.personal: Any = None
        self.session = ""
        self.interval = 0
        self.last_seq = 0
        self.in_flight = False


class PollWorker:
    def __init__(self, url: str, clients: list[tuple[str, str]]) -> None:
        import aiohttp

        self.url = url
        self.clients = [PollClient(u, r) for u, r in clients]
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30))
        self.stats = PollStats()
        self.tasks: list[asyncio.Task[None]] = []
        self.stopping = False

    def _bad(self, key: str) -> None:
        self.stats.statuses[key] = self.stats.statuses.get(key, 0) + 1

    async def sessions(self, concurrency: int) -> dict[str, Any]:
        sem = asyncio.Semaphore(concurrency)
        failed = 0

        async def one(c: PollClient) -> None:
            nonlocal failed
            async with sem:
                for attempt in range(3):
                    try:
                        async with self.http.post(self.url + "/api/v1/session", headers=c.headers,
                                                  data=orjson.dumps({"name": c.user})) as resp:
                            raw = await resp.read()
                            if resp.status == 200:
                                w = orjson.loads(raw)
                                c.cursors = w["cursors"]
                                c.personal = {"epoch": w["personal"]["epoch"],
                                              "id": w["personal"]["last_id"]}
                                c.session = w["session"]
                                for room in w["rooms"]:
                                    if room.get("id") == c.room and "seq" in room:
                                        c.last_seq = int(room["seq"])
                                return
                            self._bad(f"session {resp.status}")
                    except Exception as exc:  # counted and retried
                        self._bad(f"session {type(exc).__name__}")
                    await asyncio.sleep(0.2 * (attempt + 1))
                failed += 1

        await asyncio.gather(*(one(c) for c in self.clients))
        return {"ok": len(self.clients) - failed, "failed": failed, "errors": dict(self.stats.statuses)}

    async def _run(self, c: PollClient, mode: str, wait_ms: int, stagger_s: float) -> None:
        st = self.stats
        url = self.url + "/api/v1/poll"
        await asyncio.sleep(random.uniform(0, stagger_s))
        c.interval = 0
        while not self.stopping:
            body = {"cursors": c.cursors, "personal": c.personal,
                    "wait_ms": 0 if mode == "short" else wait_ms,
                    "interval_ms": c.interval, "focused": True, "session": c.session}
            t = now_us()
            if st.w0 <= t < st.w1:
                st.requests += 1
            b = (t - st.w0) // st.bucket_us if st.w0 <= t else -1
            st.buckets[b] = st.buckets.get(b, 0) + 1
            c.in_flight = True
            try:
                async with self.http.post(url, data=orjson.dumps(body), headers=c.headers) as resp:
                    status = resp.status
                    raw = await resp.read()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                c.in_flight = False
                self._bad(f"{type(exc).__name__} {str(exc)[:50]}".strip())
                await asyncio.sleep(1.0)
                continue
            c.in_flight = False
            arrive = now_us()
            if status != 200:
                self._bad(str(status))
                await asyncio.sleep(1.0)
                continue
            data = orjson.loads(raw)
            st.responses += 1
            events = data["events"]
            if not events:
                st.empty += 1
            for e in events:
                if e.get("type") != "message" or e.get("room") != c.room:
                    st.other_events += 1
                    continue
                take_message(st, c, e, arrive)
            c.cursors, c.personal, c.interval = data["cursors"], data["personal"], data["next_poll_ms"]
            st.next_poll_sum += c.interval
            if mode != "long":  # short and long-paced honour next_poll_ms, as chatcluster.js does
                await asyncio.sleep(c.interval / 1000.0)

    def start(self, mode: str, wait_ms: int, window: list[int], bucket_s: float,
              stagger_s: float) -> None:
        self.stats.reset(window[0], window[1], bucket_s)
        self.stopping = False
        self.tasks = [asyncio.create_task(self._run(c, mode, wait_ms, stagger_s)) for c in self.clients]

    async def stop_polling(self, timeout: float) -> dict[str, Any]:
        """No new polls; polls in flight may finish (until ``timeout``), sleepers are cancelled."""
        self.stopping = True
        if not self.tasks:
            return {"cut": 0}
        for task, c in zip(self.tasks, self.clients, strict=True):
            if not c.in_flight:
                task.cancel()
        _, pending = await asyncio.wait(self.tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        self.tasks = []
        return {"cut": len(pending)}

    def progress(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.clients:
            out[c.room] = min(out.get(c.room, c.last_seq), c.last_seq)
        return out

    def report(self) -> dict[str, Any]:
        s = self.stats
        return {"requests": s.requests, "buckets": dict(s.buckets), "delivered": s.delivered,
                "latencies": s.latencies.tobytes(), "statuses": dict(s.statuses), "gaps": s.gaps,
                "dups": s.dups, "other_events": s.other_events, "empty": s.empty,
                "responses": s.responses, "next_poll_sum": s.next_poll_sum}


class EioPollWorker(PollWorker):
    """Socket.IO peers over the Engine.IO 4 polling transport (long polls, sticky sessions):
    handshake ``GET ?EIO=4&transport=polling``, ``POST 40`` (namespace), ``POST 42["join",R]``,
    then ``GET`` in a loop (the server holds it until it has packets or its ping is due; packets
    are separated by 0x1e); a ping ``2`` is answered with ``POST 3``. A request is one GET."""

    def _q(self, c: PollClient) -> str:
        return f"{self.url}/socket.io/?EIO=4&transport=polling&sid={c.session}"

    async def _get(self, c: PollClient) -> list[bytes]:
        async with self.http.get(self._q(c)) as resp:
            raw = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"GET {resp.status}")
        return raw.split(b"\x1e")

    async def _post(self, c: PollClient, body: bytes) -> None:
        async with self.http.post(self._q(c), data=body,
                                  headers={"Content-Type": "text/plain;charset=UTF-8"}) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"POST {resp.status}")

    async def sessions(self, concurrency: int) -> dict[str, Any]:
        sem = asyncio.Semaphore(concurrency)
        failed = 0

        async def one(c: PollClient) -> None:
            nonlocal failed
            async with sem:
                for attempt in range(3):
                    try:
                        async with self.http.get(self.url + "/socket.io/?EIO=4&transport=polling") as resp:
                            raw = await resp.read()
                        if resp.status != 200 or raw[:1] != b"0":
                            self._bad(f"session {resp.status}")
                            continue
                        c.session = orjson.loads(raw[1:])["sid"]
                        await self._post(c, b"40")
                        joined = connected = False
                        for _ in range(20):
                            for pkt in await self._get(c):
                                if pkt[:2] == b"40" and not connected:
                                    connected = True
                                    await self._post(c, b'42["join",' + orjson.dumps(c.room) + b"]")
                                elif pkt[:10] == b'42["joined':
                                    joined = True
                                elif pkt == b"2":
                                    await self._post(c, b"3")
                            if joined:
                                return
                        self._bad("session: no joined")
                    except Exception as exc:  # counted and retried
                        self._bad(f"session {type(exc).__name__}")
                    await asyncio.sleep(0.2 * (attempt + 1))
                failed += 1

        await asyncio.gather(*(one(c) for c in self.clients))
        return {"ok": len(self.clients) - failed, "failed": failed, "errors": dict(self.stats.statuses)}

    async def _run(self, c: PollClient, mode: str, wait_ms: int, stagger_s: float) -> None:
        st = self.stats
        await asyncio.sleep(random.uniform(0, stagger_s))
        while not self.stopping:
            t = now_us()
            if st.w0 <= t < st.w1:
                st.requests += 1
            b = (t - st.w0) // st.bucket_us if st.w0 <= t else -1
            st.buckets[b] = st.buckets.get(b, 0) + 1
            c.in_flight = True
            try:
                packets = await self._get(c)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                c.in_flight = False
                self._bad(f"{type(exc).__name__} {str(exc)[:50]}".strip())
                await asyncio.sleep(1.0)
                continue
            c.in_flight = False
            arrive = now_us()
            st.responses += 1
            got = False
            for pkt in packets:
                if pkt == b"2":
                    asyncio.ensure_future(self._post(c, b"3"))
                    continue
                if pkt[:12] != b'42["message"':
                    st.other_events += 1
                    continue
                got = True
                e = orjson.loads(pkt[2:])[1]
                take_message(st, c, e, arrive)
            if not got:
                st.empty += 1


async def _serve(conn: Any, url: str, clients: list[tuple[str, str]], dialect: str = "ws-json") -> None:
    inbox = pipe_inbox(conn)
    worker = EioPollWorker(url, clients) if dialect == "sio" else PollWorker(url, clients)
    while True:
        msg = await inbox.get()
        op = msg["op"]
        reply: Any
        if op == "sessions":
            reply = await worker.sessions(msg.get("concurrency", 50))
        elif op == "start":
            worker.start(msg["mode"], msg["wait_ms"], msg["window"], msg.get("bucket_s", 1.0),
                         msg.get("stagger_s", 1.0))
            reply = {"ok": True}
        elif op == "halt":  # no new polls; the ones in flight go on
            worker.stopping = True
            reply = {"ok": True}
        elif op == "stop_polling":
            reply = await worker.stop_polling(msg.get("timeout", 5.0))
        elif op == "report":
            reply = worker.report()
        elif op == "progress":
            reply = worker.progress()
        elif op == "stop":
            await worker.stop_polling(1.0)
            await worker.http.close()
            conn.send({"ok": True})
            return
        else:
            reply = {"error": f"unknown op {op}"}
        conn.send(reply)


def poll_worker_main(conn: Any, url: str, clients: list[tuple[str, str]],
                     dialect: str = "ws-json") -> None:
    run_worker(_serve(conn, url, clients, dialect))


class PollWorkers(WorkerPool):
    what = "polling worker"

    def __init__(self, n: int, url: str, clients: list[tuple[str, str]],
                 dialect: str = "ws-json") -> None:
        super().__init__(n, poll_worker_main, "bench-pollers",
                         lambda i: (url, clients[i::n], dialect))


def _merge(dicts: Any) -> dict[Any, int]:
    out: dict[Any, int] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


# -- the scenario ------------------------------------------------------------------------------

class Scenario:
    def __init__(self, args: argparse.Namespace, cluster: Any, workers: Any) -> None:
        self.args = args
        self.cluster = cluster
        self.workers = workers
        targets = list(cluster.servers)
        if len(targets) != 1 or targets[0] not in ("ours", "patched", "pysio", "nodesio"):
            raise SystemExit("polling: give exactly one target: ours, patched, or a Socket.IO "
                             "peer (pysio, nodesio: Engine.IO polling; naive has no polling)")
        self.target = targets[0]
        self.sio = TARGETS[self.target].dialect == "sio"
        if self.sio:
            args.no_ws = True  # the comparison row is ours only
            if args.modes != "long":
                log("Socket.IO peers: Engine.IO polling is long polling; --modes long")
                args.modes = "long"
        self.peer_seq: dict[str, int] = {}
        self.pollers: PollWorkers | None = None
        self.poll_rooms: list[str] = []
        self.ws_rooms: list[str] = []
        self.node_env: dict[str, str] = {}

    # setup ---------------------------------------------------------------------------------
    def _restart_node(self) -> None:
        """The node again, with the per-IP HTTP limits lifted (and ``--node-env``)."""
        from loadtest.targets import _ours_env, start_ready_process

        env = _ours_env(self.cluster.redis_url, self.cluster.shards)
        src = None
        items = []
        if self.target == "patched":
            src = os.environ["CHATCLUSTER_BENCH_PATCHED_SRC"]
            items += os.environ.get("CHATCLUSTER_BENCH_PATCHED_ENV", "").split(",")
        items += DEFAULT_NODE_ENV.split(",") + self.args.node_env.split(",")
        for item in filter(None, items):
            k, _, v = item.partition("=")
            env[k.strip()] = v.strip()
            self.node_env[k.strip()] = v.strip()
        self.cluster.servers[self.target].stop()
        log_path = os.path.join(self.cluster.logdir, f"{self.target}-polling.log")
        self.cluster.servers[self.target] = start_ready_process(
            self.target, [sys.executable, "-m", "node", "node"], env, log_path, src=src)
        info = self.cluster.servers[self.target].info
        log(f"restarted {self.target} with {self.node_env}: pid "
            f"{self.cluster.servers[self.target].pid}, http port {info['http_port']}")

    def setup(self) -> None:
        from loadtest.bench import seed_rooms

        a = self.args
        if self.sio:
            self._setup_sio()
            return
        self._restart_node()
        server = self.cluster.servers[self.target]
        size = max(1, a.pollers // a.rooms)
        poll_rooms = {f"r-pollp{j:04d}": [f"pp{j}x{k}" for k in range(size)] for j in range(a.rooms)}
        ws_rooms = {f"r-pollw{j:04d}": [f"pw{j}x{k}" for k in range(size)] for j in range(a.rooms)}
        asyncio.run(seed_rooms(self.cluster.redis_url, self.cluster.shards, {**poll_rooms, **ws_rooms}))
        self.poll_rooms, self.ws_rooms, self.room_size = list(poll_rooms), list(ws_rooms), size
        clients = [(u, room) for room, members in poll_rooms.items() for u in members]
        url = f"http://127.0.0.1:{server.info['http_port']}"
        self.pollers = PollWorkers(a.poll_workers, url, clients)
        t = time.monotonic()
        replies = self.pollers.call_all({"op": "sessions", "concurrency": 50})
        ok = sum(r["ok"] for r in replies)
        failed = sum(r["failed"] for r in replies)
        log(f"{ok} polling sessions in {time.monotonic() - t:.1f}s"
            + (f", {failed} failed: {_merge(r['errors'] for r in replies)}" if failed else ""))
        if failed:
            raise RuntimeError(f"{failed} polling sessions failed")
        if not a.no_ws:
            users = [u for members in ws_rooms.values() for u in members]
            t = time.monotonic()
            res = self.workers.connect("ws", int(server.info["ws_port"]), users, a.concurrency)
            log(f"{res['ok']} WebSocket clients connected in {time.monotonic() - t:.1f}s")
            if res["failed"]:
                raise RuntimeError(f"{res['failed']} WebSocket clients failed to connect")

    def _setup_sio(self) -> None:
        """Socket.IO peer: rooms are names only; each poller joins its room after connecting."""
        a = self.args
        server = self.cluster.servers[self.target]
        size = max(1, a.pollers // a.rooms)
        self.poll_rooms = [f"r-pollp{j:04d}" for j in range(a.rooms)]
        self.room_size = size
        clients = [(f"pp{j}x{k}", room) for j, room in enumerate(self.poll_rooms) for k in range(size)]
        url = f"http://127.0.0.1:{server.info['ws_port']}"
        self.pollers = PollWorkers(a.poll_workers, url, clients, "sio")
        t = time.monotonic()
        replies = self.pollers.call_all({"op": "sessions", "concurrency": 50})
        ok = sum(r["ok"] for r in replies)
        failed = sum(r["failed"] for r in replies)
        log(f"{ok} Engine.IO polling sessions (connected, joined) in {time.monotonic() - t:.1f}s"
            + (f", {failed} failed: {_merge(r['errors'] for r in replies)}" if failed else ""))
        if failed:
            raise RuntimeError(f"{failed} polling sessions failed")

    # phases --------------------------------------------------------------------------------
    def _publish(self, rooms: list[str], rate: float, t0: int, t_end: int) -> tuple[Any, Any]:
        from loadtest.bench import CTX
        from loadtest.publisher import publisher_main

        parent, child = CTX.Pipe()
        peer = dict(dialect=self.target, seq_start=self.peer_seq) if self.sio else {}
        pub = CTX.Process(target=publisher_main, args=(child,), kwargs=dict(
            redis_host="127.0.0.1", redis_port=self.cluster.redis_port, shards=self.cluster.shards,
            rooms=rooms, rate=rate, t0_us=t0, t_end_us=t_end, text_bytes=self.args.text_bytes,
            **peer), daemon=True)
        pub.start()
        return pub, parent

    def _wake_long_polls(self) -> None:
        """One message per polling room, so that every waiting long poll returns now."""
        from loadtest.publisher import publish

        t0 = now_us()
        n = len(self.poll_rooms)
        publish("127.0.0.1", self.cluster.redis_port, self.cluster.shards, self.poll_rooms,
                rate=n * 100.0, t0_us=t0, t_end_us=t0 + 10_000, text_bytes=self.args.text_bytes)

    def _stop_pollers(self, mode: str) -> int:
        assert self.pollers is not None
        if self.sio:  # an Engine.IO long poll returns at the next ping (25 s): cut it
            cut = sum(r["cut"] for r in self.pollers.call_all({"op": "stop_polling", "timeout": 0.2}))
            return cut
        if mode != "short":
            self.pollers.call_all({"op": "halt"})
            self._wake_long_polls()
        cut = sum(r["cut"] for r in self.pollers.call_all({"op": "stop_polling", "timeout": 10.0}))
        if cut:
            log(f"{cut} polls still in flight were cut off")
        return cut

    def _drain(self, kind: str, last_seq: dict[str, int], timeout: float) -> tuple[bool, float]:
        t = time.monotonic()
        while True:
            progress: dict[str, int] = {}
            if kind == "ws":
                replies = [r.get("ws", {}) for r in self.workers.call_all({"op": "progress"})]
            else:
                assert self.pollers is not None
                replies = self.pollers.call_all({"op": "progress"})
            for rep in replies:
                for room, seq in rep.items():
                    progress[room] = min(progress.get(room, seq), seq)
            if all(progress.get(room, 0) >= seq for room, seq in last_seq.items()):
                return True, time.monotonic() - t
            if time.monotonic() - t > timeout:
                return False, time.monotonic() - t
            time.sleep(0.05)

    def phase(self, kind: str, mode: str, rate: float, duration: float, warmup: float,
              bucket_s: float = 1.0) -> dict[str, Any]:
        """kind "poll" (mode long/short) or "ws"; rate 0: idle (no publisher)."""

        a = self.args
        server = self.cluster.servers[self.target]
        rooms = self.ws_rooms if kind == "ws" else self.poll_rooms
        t0 = now_us() + 1_000_000
        w0 = t0 + int(warmup * 1e6)
        w1 = w0 + int(duration * 1e6)
        gen_pids: list[int] = []
        if kind == "ws":
            self.workers.call_all({"op": "phase", "window": [w0, w1]})
            gen_pids = self.workers.pids
        else:
            assert self.pollers is not None
            self.pollers.call_all({"op": "start", "mode": mode, "wait_ms": a.wait_ms,
                                   "window": [w0, w1], "bucket_s": bucket_s, "stagger_s": 1.0})
            gen_pids = self.pollers.pids
        pub = parent = None
        if rate > 0:
            pub, parent = self._publish(rooms, rate, t0, w1)
        groups = {"node": [server.pid], "redis": [self.cluster.redis.pid], "clients": gen_pids,
                  "publisher": [pub.pid] if pub is not None and pub.pid else []}
        sampler = stats.CpuSampler(groups)
        time.sleep(max(0.0, (w0 - now_us()) / 1e6))
        cs0 = stats.commandstats(self.cluster.redis_port)
        sampler.start()
        time.sleep(max(0.0, (w1 - now_us()) / 1e6))
        cpu = sampler.stop()
        cs1 = stats.commandstats(self.cluster.redis_port)
        pub_result: dict[str, Any] = {"sent": 0, "last_seq": {}, "max_lag_ms": 0.0}
        if pub is not None and parent is not None:
            from loadtest.publisher import publisher_result
            pub_result = publisher_result(parent, pub)
            if self.sio:
                self.peer_seq.update(pub_result["last_seq"])
        caught_up, drain_s = self._drain(kind, pub_result["last_seq"], a.drain_timeout)
        delta = {k: cs1.get(k, 0) - cs0.get(k, 0) for k in cs1}
        calls = {k: v for k, v in delta.items() if not k.startswith("usec:") and v > 0}
        write = sum(v for k, v in calls.items() if k in WRITE_COMMANDS)
        read_calls = dict(sorted(((k, v) for k, v in calls.items() if k not in WRITE_COMMANDS),
                                 key=lambda kv: -kv[1]))
        scheduled = int(rate * duration)
        res: dict[str, Any] = {
            "transport": "websocket" if kind == "ws" else f"poll-{mode}", "mode": mode,
            "rate_msgs": rate, "clients": self.room_size * len(rooms), "rooms": len(rooms),
            "room_size": self.room_size, "duration_s": duration,
            "offered_events_per_s": rate * self.room_size,
            "published": pub_result["sent"], "publisher_max_lag_ms": pub_result["max_lag_ms"],
            "caught_up": caught_up, "drain_s": drain_s,
            "node_cpu_s": cpu["node"], "node_cpu_util": cpu["node"] / duration,
            "node_sys_share": cpu["node_sys"] / cpu["node"] if cpu["node"] > 0 else 0.0,
            "redis_cpu_util": cpu["redis"] / duration,
            "clients_cpu_util": cpu["clients"] / duration,
            "publisher_cpu_util": cpu["publisher"] / duration,
            "generator_cpu_util": (cpu["clients"] + cpu["publisher"]) / duration,
            "machine_busy_util": cpu["machine_busy"] / duration,
            "other_cpu_util": max(0.0, cpu["machine_busy"] - sum(
                cpu[k] for k in ("node", "redis", "publisher", "clients"))) / duration,
            "redis_commands": sum(calls.values()), "redis_write_commands": write,
            "redis_read_commands": sum(read_calls.values()), "redis_top": dict(list(read_calls.items())[:8]),
        }
        lat = array("q")
        if kind == "ws":
            reports = self.workers.call_all({"op": "report"})
            for r in reports:
                lat.frombytes(r["latencies"])
            delivered = sum(r["frames_in_window"] for r in reports)
            res.update({"requests": None, "gaps": sum(r["gaps"] for r in reports),
                        "dups": sum(r["dups"] for r in reports),
                        "errors": {f"close {k}": v for k, v in
                                   _merge(r["close_codes"] for r in reports).items()}})
        else:
            assert self.pollers is not None
            self._stop_pollers(mode)
            reports = self.pollers.call_all({"op": "report"})
            for r in reports:
                lat.frombytes(r["latencies"])
            delivered = sum(r["delivered"] for r in reports)
            requests = sum(r["requests"] for r in reports)
            responses = sum(r["responses"] for r in reports)
            buckets = _merge(r["buckets"] for r in reports)
            n_buckets = max(1, int(round(duration / bucket_s)))
            res.update({
                "requests": requests, "requests_per_s": requests / duration,
                "requests_per_delivered": requests / delivered if delivered else None,
                "requests_per_published": requests / pub_result["sent"] if pub_result["sent"] else None,
                "node_cpu_us_per_request": cpu["node"] / requests * 1e6 if requests else None,
                "redis_commands_per_request": sum(read_calls.values()) / requests if requests else None,
                "redis_top_per_request": {k: v / requests for k, v in list(read_calls.items())[:8]}
                if requests else {},
                "empty_responses": sum(r["empty"] for r in reports),
                "mean_next_poll_ms": sum(r["next_poll_sum"] for r in reports) / responses
                if responses else None,
                "requests_per_s_by_bucket": [buckets.get(i, 0) / bucket_s for i in range(n_buckets)],
                "gaps": sum(r["gaps"] for r in reports), "dups": sum(r["dups"] for r in reports),
                "other_events": sum(r["other_events"] for r in reports),
                "errors": _merge(r["statuses"] for r in reports),
            })
        res.update({
            "delivered": delivered, "delivered_per_s": delivered / duration,
            "latency_samples": len(lat), "latency_expected": scheduled * self.room_size,
            "node_cpu_us_per_delivered": cpu["node"] / delivered * 1e6 if delivered else None,
            "redis_read_commands_per_delivered": sum(read_calls.values()) / delivered if delivered else None,
            **stats.percentiles_ms(lat),
        })
        if rate > 0:
            res["complete"] = bool(caught_up and res["gaps"] == 0 and res["dups"] == 0
                                   and len(lat) >= 0.99 * res["latency_expected"])
        log(_one_line(res))
        return res

    def run(self) -> dict[str, Any]:
        a = self.args
        rates = [float(x) for x in a.rates.split(",") if x.strip()]
        modes = [m.strip() for m in a.modes.split(",") if m.strip()]
        for m in modes:
            if m not in ("long", "long-paced", "short"):
                raise SystemExit(f"unknown polling mode {m!r}")
        results = []
        idle = []
        try:
            # Idle first: after an overloaded step, pollers would still be working off a backlog.
            if a.idle_seconds > 0:
                for mode in modes:
                    idle.append(self.phase("poll", mode, 0, a.idle_seconds, 0.0, a.idle_bucket))
                if not a.no_ws:
                    idle.append(self.phase("ws", "-", 0, a.idle_seconds, 0.0))
            for rate in rates:
                if not a.no_ws:
                    results.append(self.phase("ws", "-", rate, a.duration, a.warmup))
                for mode in modes:
                    results.append(self.phase("poll", mode, rate, a.duration, a.warmup))
        finally:
            if self.pollers is not None:
                self.pollers.stop()
        return {"scenario": NAME, "target": self.target, "node_env": self.node_env,
                "pollers": a.pollers, "room_size": self.room_size, "rooms": a.rooms,
                "wait_ms": a.wait_ms, "results": results, "idle": idle}


# -- output ----------------------------------------------------------------------------------

_f = stats._f


def _errors(r: dict[str, Any]) -> str:
    e = r.get("errors") or {}
    return ", ".join(f"{k}: {v}" for k, v in sorted(e.items())) or "0"


def _one_line(r: dict[str, Any]) -> str:
    return (f"{r['transport']:>10} {r['rate_msgs']:>5.0f} msg/s: {r['delivered_per_s']:>8,.0f} ev/s, "
            f"req/s {_f(r.get('requests_per_s'), 0)}, node CPU {r['node_cpu_util']:.0%} "
            f"({_f(r['node_cpu_us_per_delivered'], 0)} µs/ev, {_f(r.get('node_cpu_us_per_request'), 0)} µs/req), "
            f"Redis cmds/req {_f(r.get('redis_commands_per_request'), 1)}, p50/p99/p99.9 "
            f"{_f(r['p50_ms'], 1)}/{_f(r['p99_ms'], 1)}/{_f(r['p999_ms'], 1)} ms, gen CPU "
            f"{r['generator_cpu_util']:.0%}, gaps {r['gaps']} dups {r['dups']}, errors {_errors(r)}")


def _baseline(doc: dict[str, Any]) -> float | None:
    """Redis commands/s of the idle WebSocket phase: what goes on under every phase."""
    for r in doc.get("idle", []):
        if r["transport"] == "websocket":
            return r["redis_read_commands"] / r["duration_s"]
    return None


def _net(r: dict[str, Any], base: float | None) -> str:
    if base is None or not r.get("requests"):
        return ""
    return f" ({(r['redis_read_commands'] - base * r['duration_s']) / r['requests']:.1f})"


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"Command: `{doc['command']}`", "",
             f"Machine: {m['nproc']} x {m['cpu_model']}, Python {m['python']}, load average at "
             f"start {m['loadavg_at_start']}; node `{doc.get('node_commit', '')}`, node env "
             f"{doc.get('node_env')}; {doc['pollers']} clients per transport in {doc['rooms']} rooms "
             f"of {doc['room_size']}, long polls wait_ms {doc['wait_ms']}", "",
             "### Delivery at fixed message rates (same node, same run)", "",
             "| transport | msgs/s | offered ev/s | delivered ev/s | p50 ms | p99 ms | p99.9 ms "
             "| HTTP req/s | req per delivered ev | node CPU | node µs per delivered ev "
             "| node µs per req | Redis cmds per req (net) | Redis cmds per delivered ev | Redis CPU "
             "| generator CPU | other CPU | non-200 / errors | lost / dup | complete |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    base = _baseline(doc)
    for r in doc["results"]:
        lines.append(
            f"| {r['transport']} | {r['rate_msgs']:,.0f} | {r['offered_events_per_s']:,.0f} "
            f"| {r['delivered_per_s']:,.0f} | {_f(r['p50_ms'], 1)} | {_f(r['p99_ms'], 1)} "
            f"| {_f(r['p999_ms'], 1)} | {_f(r.get('requests_per_s'), 0)} "
            f"| {_f(r.get('requests_per_delivered'), 2)} | {r['node_cpu_util']:.0%} "
            f"| {_f(r['node_cpu_us_per_delivered'], 0)} | {_f(r.get('node_cpu_us_per_request'), 0)} "
            f"| {_f(r.get('redis_commands_per_request'), 1)}{_net(r, base)} "
            f"| {_f(r['redis_read_commands_per_delivered'], 2)} | {r['redis_cpu_util']:.0%} "
            f"| {r['generator_cpu_util']:.0%} | {r['other_cpu_util']:.0%} | {_errors(r)} "
            f"| {r['gaps']} / {r['dups']} "
            f"| {'yes' if r.get('complete') else 'no'} |")
    if doc.get("idle"):
        lines += ["", "### Idle: the same clients, no messages", "",
                  "| transport | seconds | HTTP req/s | req/s over time (buckets) | mean next_poll_ms "
                  "| node CPU | node µs per req | Redis cmds/s | Redis cmds per req (net) | generator CPU "
                  "| non-200 / errors |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in doc["idle"]:
            buckets = " / ".join(f"{x:,.0f}" for x in r.get("requests_per_s_by_bucket", []))
            lines.append(
                f"| {r['transport']} | {r['duration_s']:.0f} | {_f(r.get('requests_per_s'), 0)} "
                f"| {buckets or '-'} | {_f(r.get('mean_next_poll_ms'), 0)} | {r['node_cpu_util']:.1%} "
                f"| {_f(r.get('node_cpu_us_per_request'), 0)} "
                f"| {r['redis_read_commands'] / r['duration_s']:,.0f} "
                f"| {_f(r.get('redis_commands_per_request'), 1)}{_net(r, base)} "
                f"| {r['generator_cpu_util']:.0%} "
                f"| {_errors(r)} |")
    if base is not None:
        lines += ["", f"(net): minus the node's background Redis traffic measured in the idle "
                  f"WebSocket phase ({base:,.0f} commands/s: shard readers, session heartbeats of "
                  "the connected WebSocket clients), which runs under every phase."]
    top = [r for r in doc["results"] if r.get("redis_top_per_request")]
    if top:
        lines += ["", "Redis commands per request (top, first step of each polling mode): "]
        seen = set()
        for r in top:
            if r["transport"] in seen:
                continue
            seen.add(r["transport"])
            lines.append(f"- {r['transport']} at {r['rate_msgs']:,.0f} msgs/s: " + ", ".join(
                f"{k} {v:.2f}" for k, v in r["redis_top_per_request"].items()))
    return "\n".join(lines)
