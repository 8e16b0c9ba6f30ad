"""Connection churn: WebSocket sessions arriving at a fixed rate, each held briefly, then closed.

    python loadtest/bench.py churn --target ours,naive --rates 50,100,200,400,800 \
        --duration 10 --hold 2 --workers 3 --json loadtest/results/churn-DATE.json

Open loop. Session *i* of a step is scheduled at ``t0 + i / rate``; it does TCP connect, the
WebSocket upgrade, ``hello`` (dev auth: ``{"type": "hello", "user": U}``; Socket.IO peers: the
Engine.IO open and namespace connect) and waits for ``welcome``; it then stays connected for
``--hold`` seconds and closes cleanly (close frame 1000, waits for the server's echo and for the
server to close the TCP connection). Arrivals and departures run at the same rate once the
warm-up (default ``--hold`` + 1 s) is over, so the measurement window is steady state.

Measured per step and target, over the window:

* **offered / achieved connects/s**: the schedule's rate / welcomes received inside the window
  divided by its length;
* **latency** from the session's *scheduled* start to its ``welcome`` (a generator or server
  backlog shows up as latency, no coordinated omission); also to the HTTP 101;
* **failures by kind** of the sessions scheduled inside the window: ``refused``, other connect
  errors (errno name), ``http 4xx/5xx`` (upgrade refused), ``close <code>`` (server closed before
  welcome), ``reset`` (TCP gone before welcome), ``timeout`` (no welcome within ``--timeout``);
  and after the welcome: ``server close <code>`` during the hold, ``dropped`` (TCP gone during the
  hold), ``no close echo`` / ``close timeout`` (our close not answered);
* **node CPU per session** (user+system over the window / sessions welcomed in the window: in
  steady state one connect + hello + hold + close each), next to the client processes' CPU;
* **Redis calls per session**: ``INFO commandstats`` deltas over the window, minus the idle rate
  measured before the sweep, / sessions welcomed (commands run inside Lua scripts are counted
  too, as Redis counts them), and the top commands;
* **node RSS and open file descriptors** before and after each step (after every session has
  closed and ``--settle`` seconds), and for ``ours`` the users still online in Redis after the
  drain (presence entries left behind). With ``--leak-check`` (default) the first rate is run
  again after the sweep, so the RSS after the same step can be compared.

A step *keeps up* if achieved >= 97 % of offered and p99 <= ``--p99-limit-ms``.

Users: each target gets a pool of users (``--users``, default: enough that a user's sessions
never overlap), used round-robin, so every session is a user coming online and going offline
(presence start and end, online/offline announcements after the node's 1 s debounce). Each user
is a member of ``--rooms-per-user`` seeded rooms of ``--room-size`` members, so those
announcements have rooms to go to. The node's per-IP cap is lifted by the harness's target env
(``CHAT_MAX_CONNECTIONS_PER_IP=0``); the per-user cap (20) is never reached; normal closes do not
count towards the abuse penalty box.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import errno
import math
import os
import time
from array import array
from typing import Any

import orjson
import psutil

from loadtest import stats
from loadtest.targets import TARGETS
from loadtest.wsclient import WorkerPool, mask_frame, pipe_inbox, run_worker

NAME = "churn"
HELP = "connection churn: open-loop connect+hello+close rate sweep (latency, CPU, Redis per session)"


def log(msg: str) -> None:
    import sys

    print(f"[churn {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def now_us() -> int:
    return time.time_ns() // 1000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rates", default="25,50,100,200,400,800",
                   help="new sessions per second to sweep, ascending (default 25,50,100,200,400,800)")
    p.add_argument("--warmup-step", type=float, default=5.0,
                   help="seconds of an unmeasured step at the first rate per target before the "
                        "sweep (the node's first users: general is still a small room; 0: none)")
    p.add_argument("--duration", type=float, default=10.0, help="measurement window per step (s)")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds of arrivals before the window (default --hold + 1)")
    p.add_argument("--hold", type=float, default=2.0, help="seconds each session stays connected")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="a session without welcome this long after its scheduled start fails")
    p.add_argument("--close-timeout", type=float, default=5.0,
                   help="seconds to wait for the server's close echo and TCP close")
    p.add_argument("--settle", type=float, default=2.0,
                   help="seconds after the last session closed before RSS/fds are taken")
    p.add_argument("--users", type=int, default=0,
                   help="user pool per target (default: max rate x (hold + 4 s), at least 1000)")
    p.add_argument("--rooms-per-user", type=int, default=1,
                   help="seeded rooms each pool user is a member of (besides general)")
    p.add_argument("--room-size", type=int, default=20, help="members per seeded room")
    p.add_argument("--session", choices=("plain", "fresh", "returning"), default="plain",
                   help="plain: connect + hello (Socket.IO: namespace connect) from a pool of "
                        "users, each in --rooms-per-user seeded rooms; fresh: a user never seen "
                        "before connects and joins one room (ours: hello + join; Socket.IO: "
                        "connect + emit join, acked); returning: a pool user in --rooms-per-user "
                        "rooms comes back (ours: hello with a current cursor for each room; "
                        "Socket.IO: connect + one join per room). Latency ends at the last answer")
    p.add_argument("--p99-limit-ms", type=float, default=200.0,
                   help="a step with a higher connect-to-welcome p99 does not keep up")
    p.add_argument("--retries", type=int, default=1,
                   help="retries of a step that did not keep up before the target stops")
    p.add_argument("--keep-going", action="store_true",
                   help="run every rate even after a target fell behind")
    p.add_argument("--no-leak-check", dest="leak_check", action="store_false",
                   help="do not run the first rate again after the sweep")
    p.add_argument("--idle-baseline", type=float, default=4.0,
                   help="seconds of idle Redis command rate measured before the sweep")
    p.set_defaults(workers=3)


# -- client side (runs in the churn client processes) ----------------------------------------------

class Run:
    """Counters of one worker for one step."""

    def __init__(self, w0: int, w1: int, hold: float, close_timeout: float) -> None:
        self.w0 = w0
        self.w1 = w1
        self.hold = hold
        self.close_timeout = close_timeout
        self.scheduled_in_window = 0
        self.started = 0
        self.welcomed = 0
        self.welcomed_in_window = 0
        self.closed_in_window = 0
        self.clean_closes = 0
        self.lat = array("q")  # sched -> welcome, µs, sessions scheduled in the window
        self.up_lat = array("q")  # sched -> HTTP 101
        self.fail: dict[str, int] = {}  # sessions scheduled in the window, before welcome
        self.fail_all: dict[str, int] = {}
        self.after: dict[str, int] = {}  # problems after welcome, all sessions
        self.frames_after_welcome = 0
        self.frame_types: dict[str, int] = {}  # frames after welcome by "type"
        self.max_start_lag_us = 0
        self.open = 0
        self.max_open = 0
        self.outstanding = 0
        self.all_done: asyncio.Future[None] | None = None
        self.scheduling = True

    def in_window(self, t: int) -> bool:
        return self.w0 <= t < self.w1

    def finished(self) -> None:
        self.outstanding -= 1
        if self.outstanding == 0 and not self.scheduling and self.all_done is not None \
                and not self.all_done.done():
            self.all_done.set_result(None)


class ChurnClient(asyncio.Protocol):
    """One session: upgrade, hello, welcome, hold, close. Outcome recorded once in ``run``."""

    def __init__(self, run: Run, sched: int, user: str, dialect: str,
                 joins: list[str] | None = None, cursors: dict[str, Any] | None = None) -> None:
        self.run = run
        self.sched = sched
        self.user = user
        self.dialect = dialect
        self.joins = joins or []  # rooms to join after welcome / namespace connect
        self.cursors = cursors  # ours: hello with these cursors (a returning user)
        self.pending = -1  # joins not yet answered (-1: none sent)
        self.transport: Any = None
        self.buf = b""
        self.state = 0  # 0 upgrading, 1 upgraded, 2 welcomed, 3 close sent, 4 done
        self.echoed = False
        self.task: asyncio.Task[Any] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.opened = False

    # outcome ------------------------------------------------------------------------------
    def _fail(self, kind: str) -> None:
        if self.state >= 4:
            return
        self.state = 4
        r = self.run
        if r.in_window(self.sched):
            r.fail[kind] = r.fail.get(kind, 0) + 1
        r.fail_all[kind] = r.fail_all.get(kind, 0) + 1
        self._end()

    def _problem(self, kind: str) -> None:
        if self.state >= 4:
            return
        self.state = 4
        self.run.after[kind] = self.run.after.get(kind, 0) + 1
        self._end()

    def _end(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.opened:
            self.opened = False
            self.run.open -= 1
        if self.transport is not None:
            self.transport.abort()
        self.run.finished()

    def on_timeout(self) -> None:
        if self.state >= 2:
            return
        if self.transport is None and self.task is not None:
            self.task.cancel()
            self._fail("timeout (tcp connect)")
        else:
            self._fail("timeout" if self.state == 1 else "timeout (upgrade)")

    # asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        if self.state >= 4:  # timed out while connecting
            transport.abort()
            return
        self.transport = transport
        self.opened = True
        r = self.run
        r.open += 1
        r.max_open = max(r.max_open, r.open)
        key = base64.b64encode(os.urandom(16)).decode()
        path = "/socket.io/?EIO=4&transport=websocket" if self.dialect == "sio" else "/ws"
        host, port = transport.get_extra_info("peername")[:2]
        transport.write(
            (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
             f"Sec-WebSocket-Version: 13\r\nUser-Agent: chatcluster-bench-churn\r\n\r\n").encode())

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.state < 2:
            self._fail("reset")
        elif self.state == 2:
            self._problem("dropped")
        elif self.state == 3:
            if self.echoed:
                self.state = 4
                r = self.run
                r.clean_closes += 1
                if r.in_window(now_us()):
                    r.closed_in_window += 1
                self._end()
            else:
                self._problem("no close echo")

    def data_received(self, data: bytes) -> None:
        if self.state >= 4:
            return
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if self.state == 0:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            status = data[:data.find(b"\r\n")].split(b" ")
            code = status[1].decode(errors="replace") if len(status) > 1 else "?"
            if code != "101":
                self._fail(f"http {code}")
                return
            self.state = 1
            if self.run.in_window(self.sched):
                self.run.up_lat.append(now_us() - self.sched)
            if self.dialect == "ws-json":
                hello: dict[str, Any] = {"type": "hello", "user": self.user}
                if self.cursors:
                    hello["cursors"] = self.cursors
                self.transport.write(mask_frame(1, orjson.dumps(hello)))
            data = data[end + 4:]
        self._frames(data)

    def _frames(self, data: bytes) -> None:
        pos = 0
        n = len(data)
        while n - pos >= 2 and self.state < 4:
            b0 = data[pos]
            ln = data[pos + 1] & 0x7F
            if ln == 126:
                if n - pos < 4:
                    break
                ln = (data[pos + 2] << 8) | data[pos + 3]
                start = pos + 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(data[pos + 2:pos + 10], "big")
                start = pos + 10
            else:
                start = pos + 2
            end = start + ln
            if end > n:
                break
            pos = end
            self._frame(b0 & 0x0F, data[start:end])
        if pos < n and self.state < 4:
            self.buf = data[pos:]

    def _frame(self, op: int, payload: bytes) -> None:
        if op in (0, 1, 2):
            if self.state == 1:
                self._before_welcome(payload)
            else:
                r = self.run
                r.frames_after_welcome += 1
                if self.dialect == "sio":
                    if payload == b"2":
                        self.transport.write(mask_frame(1, b"3"))
                    return
                i = payload.find(b'"type":"')
                kind = payload[i + 8:payload.find(b'"', i + 8)].decode() if i >= 0 else "?"
                r.frame_types[kind] = r.frame_types.get(kind, 0) + 1
        elif op == 9:
            self.transport.write(mask_frame(10, payload))
        elif op == 8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            if self.state == 3:
                self.echoed = True  # now the server closes the TCP connection
                if code != 1000:
                    self.run.after[f"echo {code}"] = self.run.after.get(f"echo {code}", 0) + 1
                return
            self.transport.write(mask_frame(8, payload[:2]))
            if self.state == 2:
                self._problem(f"server close {code}")
            else:
                self._fail(f"close {code}")

    def _before_welcome(self, payload: bytes) -> None:
        if self.dialect == "sio":
            if payload[:1] == b"0":  # Engine.IO open -> connect to the default namespace
                self.transport.write(mask_frame(1, b"40"))
                return
            if payload[:2] == b"40":
                if self.joins:
                    self._send_joins()
                else:
                    self._welcomed()
                return
            if payload[:10] == b'42["joined' and self.pending > 0:
                self.pending -= 1
                if self.pending == 0:
                    self._welcomed()
                return
            if payload[:2] == b"44":
                self._fail("sio connect error")
            return
        if self.pending >= 0:  # waiting for the join replies; replays, presence: skip
            if payload.startswith(b'{"type":"reply"'):
                frame = orjson.loads(payload)
                if not frame.get("ok"):
                    self._fail(f"join refused: {str(frame.get('error'))[:40]}")
                    return
                self.pending -= 1
                if self.pending == 0:
                    self._welcomed()
            return
        try:
            kind = orjson.loads(payload).get("type")
        except orjson.JSONDecodeError:
            kind = None
        if kind == "welcome":
            if self.joins:
                self._send_joins()
            else:
                self._welcomed()
        else:
            k = f"frame {kind} before welcome"
            self.run.after[k] = self.run.after.get(k, 0) + 1

    def _send_joins(self) -> None:
        """Join ``self.joins`` in one write; the session counts as welcomed once all answered."""
        if self.dialect == "sio":
            out = b"".join(mask_frame(1, b'42["join",' + orjson.dumps(room) + b"]")
                           for room in self.joins)
        else:
            out = b"".join(mask_frame(1, orjson.dumps({"type": "join", "room": room, "ref": k + 1}))
                           for k, room in enumerate(self.joins))
        self.pending = len(self.joins)
        self.transport.write(out)

    def _welcomed(self) -> None:
        t = now_us()
        self.state = 2
        r = self.run
        r.welcomed += 1
        if r.in_window(t):
            r.welcomed_in_window += 1
        if r.in_window(self.sched):
            r.lat.append(t - self.sched)
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(r.hold, self.begin_close)

    def begin_close(self) -> None:
        if self.state != 2 or self.transport is None:
            return
        if self.dialect == "sio":
            self.transport.write(mask_frame(1, b"41"))
        self.transport.write(mask_frame(8, (1000).to_bytes(2, "big")))
        self.state = 3
        self.timer = asyncio.get_running_loop().call_later(self.run.close_timeout, self._close_timeout)

    def _close_timeout(self) -> None:
        self.timer = None
        if self.state == 3:
            self._problem("close timeout" if self.echoed else "no close echo")


async def run_step(msg: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    r = Run(msg["w0"], msg["w1"], msg["hold"], msg["close_timeout"])
    r.all_done = loop.create_future()
    host, port, dialect = msg["host"], msg["port"], msg["dialect"]
    users: list[str] = msg["users"]
    rate, index, nw, t0, w1 = msg["rate"], msg["index"], msg["nworkers"], msg["t0"], msg["w1"]
    offset = msg.get("user_offset", 0)
    fresh = msg.get("session") == "fresh"
    join_rooms: list[str] = msg.get("join_rooms") or []
    user_rooms: list[list[str]] | None = msg.get("user_rooms")
    user_cursors: list[dict[str, Any]] | None = msg.get("user_cursors")
    timeout = msg["timeout"]

    async def connect(client: ChurnClient) -> None:
        try:
            await loop.create_connection(lambda: client, host, port)
        except asyncio.CancelledError:
            pass
        except ConnectionRefusedError:
            client._fail("refused")
        except OSError as exc:
            client._fail(errno.errorcode.get(exc.errno or 0, type(exc).__name__))

    i = index
    while True:
        sched = t0 + int(i * 1e6 / rate)
        if sched >= w1:
            break
        delay = sched - now_us()
        if delay > 0:
            await asyncio.sleep(delay / 1e6)
        lag = now_us() - sched
        r.max_start_lag_us = max(r.max_start_lag_us, lag)
        if fresh:  # a user never seen before: a new name each session
            user = f"{users[0]}n{offset + i}"
            joins = [join_rooms[(offset + i) % len(join_rooms)]] if join_rooms else None
            cursors = None
        else:
            k = (offset + i) % len(users)
            user = users[k]
            joins = user_rooms[k] if user_rooms and dialect == "sio" else None
            cursors = user_cursors[k] if user_cursors else None
        client = ChurnClient(r, sched, user, dialect, joins, cursors)
        r.started += 1
        r.outstanding += 1
        if r.in_window(sched):
            r.scheduled_in_window += 1
        client.timer = loop.call_later(max(0.0, (sched + timeout * 1e6 - now_us()) / 1e6),
                                       client.on_timeout)
        client.task = loop.create_task(connect(client))
        i += nw
    r.scheduling = False
    unfinished = 0
    if r.outstanding:
        deadline = w1 / 1e6 + timeout + r.hold + r.close_timeout + 2.0 - time.time()
        try:
            await asyncio.wait_for(asyncio.shield(r.all_done), max(0.1, deadline))
        except TimeoutError:
            unfinished = r.outstanding
    return {"scheduled_in_window": r.scheduled_in_window, "started": r.started,
            "welcomed": r.welcomed, "welcomed_in_window": r.welcomed_in_window,
            "closed_in_window": r.closed_in_window, "clean_closes": r.clean_closes,
            "lat": r.lat.tobytes(), "up_lat": r.up_lat.tobytes(), "fail": r.fail,
            "fail_all": r.fail_all, "after": r.after, "frames_after_welcome": r.frames_after_welcome,
            "frame_types": r.frame_types,
            "max_start_lag_ms": r.max_start_lag_us / 1000, "max_open": r.max_open,
            "unfinished": unfinished}


async def _serve(conn: Any) -> None:
    inbox = pipe_inbox(conn)
    while True:
        msg = await inbox.get()
        if msg["op"] == "stop":
            conn.send({"ok": True})
            return
        try:
            reply = await run_step(msg)
        except Exception as exc:  # reported to the orchestrator, which raises
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        conn.send(reply)


def churn_worker_main(conn: Any) -> None:
    run_worker(_serve(conn))


# -- orchestrator side ------------------------------------------------------------------------------

class ChurnWorkers(WorkerPool):
    what = "churn client worker"

    def __init__(self, n: int) -> None:
        super().__init__(n, churn_worker_main, "churn-clients")

    def collect(self, timeout: float = 600) -> list[Any]:
        out = super().collect(timeout)
        for reply in out:
            if "error" in reply:
                raise RuntimeError(f"churn client worker failed: {reply['error']}")
        return out

    def stop(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send({"op": "stop"})
            except OSError:
                pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()


def online_users(port: int, shards: int) -> int:
    """Users some node still lists as online (the online indexes, any expiry)."""
    from node.keys import Keys

    keys = Keys(shards)
    return sum(int(stats.redis_call(port, "ZCARD", keys.online_index(s))) for s in range(shards))


async def seed(redis_url: str, shards: int, rooms: dict[str, list[str]], users: list[str]) -> None:
    """Rooms and memberships written directly, as ``create_room``/``join`` would; the users
    counted as members of ``general`` (its HyperLogLog, as a first hello would), so that
    ``general`` is a big room from the start, as in any deployment past its first 200 users."""
    import redis.asyncio as aioredis

    from node.keys import Keys
    from node.streams import RoomStreams

    r = aioredis.Redis.from_url(redis_url)
    keys = Keys(shards)
    streams = RoomStreams(r, keys, maxlen=10000, cmid_ttl_s=86400)
    for i in range(0, len(users), 1000):
        await r.pfadd(keys.general_members(), *users[i:i + 1000])
    for room, members in rooms.items():
        await streams.ensure_room(room, "open", room, "", int(time.time() * 1000))
        if not members:
            continue
        pipe = r.pipeline(transaction=False)
        pipe.sadd(keys.room_members(room), *members)
        for user in members:
            pipe.sadd(keys.user_rooms(user), room)
        await pipe.execute()
    await r.aclose()


async def seed_cursors(redis_url: str, shards: int, rooms: list[str]) -> dict[str, dict[str, str]]:
    """One message appended to each room (a returning user's cursor must name an entry still in
    the stream); returns each room's current cursor ``{"epoch", "id"}``."""
    import redis.asyncio as aioredis

    from node.keys import Keys
    from node.streams import RoomStreams

    r = aioredis.Redis.from_url(redis_url)
    streams = RoomStreams(r, Keys(shards), maxlen=10000, cmid_ttl_s=86400)
    out: dict[str, dict[str, str]] = {}
    for room in rooms:
        appended = await streams.append(room, "seed", "Seed", "hello", None)
        meta = await streams.meta(room)
        assert meta is not None
        out[room] = {"epoch": meta.epoch, "id": str(appended.id)}
    await streams.aclose()
    await r.aclose()
    return out


def _merge(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in items:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def _rss_fds(pid: int) -> tuple[float, int]:
    p = psutil.Process(pid)
    return p.memory_info().rss / 2**20, p.num_fds()


class Scenario:
    name = NAME

    def __init__(self, args: argparse.Namespace, cluster: Any, workers: Any) -> None:
        self.args = args
        self.cluster = cluster
        self.bench_workers = workers  # the harness's idle WS client processes: CPU counted, unused
        self.rates = [float(r) for r in args.rates.split(",")]
        self.warmup = args.warmup if args.warmup is not None else args.hold + 1.0
        self.pool = args.users or max(1000, int(max(self.rates) * (args.hold + 4.0)))
        self.users: dict[str, list[str]] = {}
        self.user_rooms: dict[str, list[list[str]]] = {}
        self.user_cursors: dict[str, list[dict[str, Any]]] = {}
        self.join_rooms: dict[str, list[str]] = {}
        self.user_offset: dict[str, int] = {}
        self.rss0: dict[str, tuple[float, int]] = {}
        self.idle: dict[str, float] = {}
        self.idle_redis_cpu = 0.0
        self.workers: ChurnWorkers | None = None

    def setup(self) -> None:
        a = self.args
        for t_index, target in enumerate(self.cluster.servers):
            tag = f"ch{target[:1]}{t_index}"
            users = [f"{tag}u{j}" for j in range(self.pool)]
            self.users[target] = users
            ours = TARGETS[target].dialect == "ws-json"
            if a.session == "fresh":
                self.users[target] = [f"{tag}f"]  # the prefix of the new users' names
                n_rooms = max(1, math.ceil(self.pool / a.room_size))
                self.join_rooms[target] = [f"r-{tag}j{j:05d}" for j in range(n_rooms)]
                if ours:
                    asyncio.run(seed(self.cluster.redis_url, self.cluster.shards,
                                     {r: [] for r in self.join_rooms[target]}, []))
                log(f"{target}: fresh users, each joins one of {n_rooms} rooms")
                continue
            if a.session == "returning":
                n_rooms = max(1, math.ceil(self.pool * a.rooms_per_user / a.room_size))
                names = [f"r-{tag}{j:05d}" for j in range(n_rooms)]
                self.user_rooms[target] = [
                    [names[(j * a.rooms_per_user + k) % n_rooms] for k in range(a.rooms_per_user)]
                    for j in range(len(users))]
            if ours and a.rooms_per_user > 0:
                n_rooms = max(1, math.ceil(self.pool * a.rooms_per_user / a.room_size))
                rooms: dict[str, list[str]] = {f"r-{tag}{j:05d}": [] for j in range(n_rooms)}
                names = list(rooms)
                for j, user in enumerate(users):
                    for k in range(a.rooms_per_user):
                        rooms[names[(j * a.rooms_per_user + k) % n_rooms]].append(user)
                asyncio.run(seed(self.cluster.redis_url, self.cluster.shards,
                                 {r: sorted(set(m)) for r, m in rooms.items() if m}, users))
                log(f"{target}: {len(users)} users seeded into {n_rooms} rooms of ~{a.room_size}")
                if a.session == "returning":
                    cur = asyncio.run(seed_cursors(self.cluster.redis_url, self.cluster.shards, names))
                    self.user_cursors[target] = [{room: cur[room] for room in rooms_of}
                                                 for rooms_of in self.user_rooms[target]]
        self.workers = ChurnWorkers(a.workers)
        time.sleep(1.0)
        # Idle command rate of everything (every target idle): subtracted from each window.
        port = self.cluster.redis_port
        c0 = stats.commandstats(port)
        sampler = stats.CpuSampler({"redis": [self.cluster.redis.pid]})
        sampler.start()
        time.sleep(a.idle_baseline)
        cpu = sampler.stop()
        c1 = stats.commandstats(port)
        self.idle = {k: (c1.get(k, 0) - c0.get(k, 0)) / a.idle_baseline for k in c1}
        self.idle_redis_cpu = cpu["redis"] / a.idle_baseline
        log(f"idle: {sum(v for k, v in self.idle.items() if not k.startswith('usec:')):.1f} "
            f"Redis calls/s, Redis CPU {self.idle_redis_cpu:.1%}")
        for target, server in self.cluster.servers.items():
            self.rss0[target] = _rss_fds(server.pid)

    def step(self, target: str, rate: float, duration: float | None = None) -> dict[str, Any]:
        a = self.args
        assert self.workers is not None
        server = self.cluster.servers[target]
        port = self.cluster.redis_port
        rss_before, fds_before = _rss_fds(server.pid)
        t0 = now_us() + 500_000
        w0 = t0 + int(self.warmup * 1e6)
        d = duration if duration is not None else a.duration
        w1 = w0 + int(d * 1e6)
        nw = len(self.workers.pipes)
        self.workers.send([{
            "op": "step", "host": "127.0.0.1", "port": int(server.info["ws_port"]),
            "dialect": TARGETS[target].dialect, "users": self.users[target], "rate": rate,
            "index": i, "nworkers": nw, "t0": t0, "w0": w0, "w1": w1, "hold": a.hold,
            "timeout": a.timeout, "close_timeout": a.close_timeout,
            "user_offset": self.user_offset.get(target, 0), "session": a.session,
            "join_rooms": self.join_rooms.get(target), "user_rooms": self.user_rooms.get(target),
            "user_cursors": self.user_cursors.get(target)} for i in range(nw)])
        # The next step goes on with the next users of the pool (round-robin over steps too;
        # fresh users: never the same name twice).
        self.user_offset[target] = (self.user_offset.get(target, 0)
                                    + int(rate * (w1 - t0) / 1e6) + 1)
        if a.session != "fresh":
            self.user_offset[target] %= self.pool
        sampler = stats.CpuSampler({"node": [server.pid], "redis": [self.cluster.redis.pid],
                                    "clients": self.workers.pids + self.bench_workers.pids})
        time.sleep(max(0.0, (w0 - now_us()) / 1e6))
        c0 = stats.commandstats(port)
        sampler.start()
        time.sleep(max(0.0, (w1 - now_us()) / 1e6))
        cpu = sampler.stop()
        c1 = stats.commandstats(port)
        reports = self.workers.collect(a.timeout + a.hold + a.close_timeout + 30.0)
        t_drained = time.time()
        time.sleep(a.settle)
        rss_after, fds_after = _rss_fds(server.pid)
        online_after = (online_users(port, self.cluster.shards)
                        if target in ("ours", "patched") else None)
        lat = array("q")
        up = array("q")
        for rep in reports:
            lat.frombytes(rep["lat"])
            up.frombytes(rep["up_lat"])
        welcomed = sum(rep["welcomed_in_window"] for rep in reports)
        scheduled = sum(rep["scheduled_in_window"] for rep in reports)
        delta = {k: c1.get(k, 0) - c0.get(k, 0) - self.idle.get(k, 0.0) * d for k in c1}
        calls = {k: v for k, v in delta.items() if not k.startswith("usec:")}
        usec = sum(max(0.0, v) for k, v in delta.items() if k.startswith("usec:"))
        top = sorted(((k, v) for k, v in calls.items() if v > 0.5), key=lambda kv: -kv[1])
        node_cpu = cpu["node"]
        fail = _merge(rep["fail"] for rep in reports)
        res: dict[str, Any] = {
            "target": target, "rate": rate, "duration_s": d, "hold_s": a.hold,
            "scheduled_in_window": scheduled,
            "achieved_per_s": welcomed / d, "welcomed_in_window": welcomed,
            "closed_per_s": sum(rep["closed_in_window"] for rep in reports) / d,
            "failures": fail, "failed": sum(fail.values()),
            "failures_all": _merge(rep["fail_all"] for rep in reports),
            "after_welcome": _merge(rep["after"] for rep in reports),
            "unfinished": sum(rep["unfinished"] for rep in reports),
            "started": sum(rep["started"] for rep in reports),
            "clean_closes": sum(rep["clean_closes"] for rep in reports),
            "frames_after_welcome": sum(rep["frames_after_welcome"] for rep in reports),
            "frame_types_after_welcome": _merge(rep["frame_types"] for rep in reports),
            "max_open": sum(rep["max_open"] for rep in reports),
            "max_start_lag_ms": max(rep["max_start_lag_ms"] for rep in reports),
            **stats.percentiles_ms(lat),
            "upgrade_p50_ms": stats.percentiles_ms(up)["p50_ms"],
            "upgrade_p99_ms": stats.percentiles_ms(up)["p99_ms"],
            "node_cpu_util": node_cpu / d,
            "node_sys_share": cpu["node_sys"] / node_cpu if node_cpu > 0 else 0.0,
            "node_cpu_ms_per_session": node_cpu / welcomed * 1e3 if welcomed else None,
            "redis_cpu_util": cpu["redis"] / d,
            "redis_cpu_us_per_session": (max(0.0, cpu["redis"] - self.idle_redis_cpu * d)
                                         / welcomed * 1e6 if welcomed else None),
            "redis_calls_per_session": sum(calls.values()) / welcomed if welcomed else None,
            "redis_usec_per_session": usec / welcomed if welcomed else None,
            "redis_top": {k: round(v / welcomed, 3) for k, v in top[:12]} if welcomed else {},
            "clients_cpu_util": cpu["clients"] / d,
            "clients_cpu_ms_per_session": cpu["clients"] / welcomed * 1e3 if welcomed else None,
            "machine_busy_util": cpu["machine_busy"] / d,
            "other_cpu_util": max(0.0, cpu["machine_busy"] - node_cpu - cpu["redis"]
                                  - cpu["clients"]) / d,
            "rss_before_mib": rss_before, "rss_after_mib": rss_after,
            "rss_sweep_start_mib": self.rss0[target][0],
            "fds_before": fds_before, "fds_after": fds_after,
            "fds_sweep_start": self.rss0[target][1],
            "online_after": online_after,
            "drain_s": round(t_drained - w1 / 1e6, 2),
        }
        res["kept_up"] = bool(res["achieved_per_s"] >= 0.97 * rate and res["p99_ms"] is not None
                              and res["p99_ms"] <= a.p99_limit_ms)
        return res

    def run(self) -> dict[str, Any]:
        a = self.args
        targets = list(self.cluster.servers)
        steps: list[dict[str, Any]] = []
        peak: dict[str, float] = {}
        alive = set(targets)
        try:
            if a.warmup_step > 0:
                for target in targets:
                    res = self.step(target, self.rates[0], a.warmup_step)
                    res["label"] = "warmup"
                    steps.append(res)
                    log("warm-up (not in the tables): " + one_line(res))
            for rate in self.rates:
                for target in targets:
                    if target not in alive:
                        continue
                    res = self.step(target, rate)
                    for _ in range(a.retries):
                        if res["kept_up"]:
                            break
                        log(one_line(res) + " (retrying)")
                        res["retried"] = True
                        steps.append(res)
                        res = self.step(target, rate)
                    steps.append(res)
                    log(one_line(res))
                    if res["kept_up"]:
                        peak[target] = max(peak.get(target, 0.0), rate)
                    elif not a.keep_going:
                        alive.discard(target)
                if not alive:
                    break
            if a.leak_check:
                for target in targets:
                    res = self.step(target, self.rates[0])
                    res["label"] = "again"
                    steps.append(res)
                    log("again: " + one_line(res))
        finally:
            if self.workers is not None:
                self.workers.stop()
        return {"scenario": NAME, "steps": steps, "peak_rate": peak, "user_pool": self.pool,
                "warmup_s": self.warmup, "idle_redis_calls_per_s": {
                    k: round(v, 2) for k, v in self.idle.items() if v > 0 and not k.startswith("usec:")},
                "idle_redis_cpu_util": self.idle_redis_cpu}


# -- output -------------------------------------------------------------------------------------

_f = stats._f


def _fails(r: dict[str, Any]) -> str:
    items = {**r["failures"], **{f"{k} (after welcome)": v for k, v in r["after_welcome"].items()}}
    if r.get("unfinished"):
        items["unfinished"] = r["unfinished"]
    return ", ".join(f"{k} {v}" for k, v in sorted(items.items(), key=lambda kv: -kv[1])) or "0"


def one_line(r: dict[str, Any]) -> str:
    return (f"{r['target']:>5} {r['rate']:>5.0f}/s: achieved {r['achieved_per_s']:.1f}/s, "
            f"fail {_fails(r)}, p50/p99/p99.9 {_f(r['p50_ms'], 1)}/{_f(r['p99_ms'], 1)}/"
            f"{_f(r['p999_ms'], 1)} ms, node CPU {r['node_cpu_util']:.0%} "
            f"({_f(r['node_cpu_ms_per_session'], 2)} ms/session), Redis "
            f"{_f(r['redis_calls_per_session'], 1)} calls/session CPU {r['redis_cpu_util']:.0%}, "
            f"clients {r['clients_cpu_util']:.0%}, other {r['other_cpu_util']:.0%}, RSS "
            f"{r['rss_before_mib']:.0f}->{r['rss_after_mib']:.0f} MiB, fds {r['fds_before']}->"
            f"{r['fds_after']}, gen lag {r['max_start_lag_ms']:.0f} ms "
            f"{'OK' if r['kept_up'] else 'BEHIND'}")


def markdown(doc: dict[str, Any]) -> str:
    a = doc["args"]
    m = doc["machine"]
    lines = [f"Command: `{doc['command']}`", "",
             f"Machine: {m['nproc']} x {m['cpu_model']}, Python {m['python']}, websockets "
             f"{m['websockets']}, load average at start {m['loadavg_at_start']}. Node code: "
             f"{doc.get('node_commit', '?')}.", "",
             f"Each session: connect + upgrade + hello -> welcome, hold {a['hold']} s, close 1000. "
             f"{a['duration']} s window per step after {doc['warmup_s']} s of warm-up; "
             f"{a['workers']} client processes; user pool {doc['user_pool']:,} per target, "
             f"{a['rooms_per_user']} room(s) of {a['room_size']} per user. Latency is from the "
             f"scheduled start. Keeps up: achieved >= 97 % of offered and p99 <= "
             f"{a['p99_limit_ms']:.0f} ms.", "",
             "| target | offered /s | achieved /s | failures | p50 ms | p99 ms | p99.9 ms "
             "| 101 p50 ms | node CPU | node CPU ms/session | Redis calls/session "
             "| Redis CPU | Redis CPU µs/session | clients CPU | other CPU | node RSS MiB before → after "
             "| node fds before → after | kept up |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in doc["steps"]:
        if r.get("label") == "warmup":
            continue
        label = r["target"] + (" (again)" if r.get("label") == "again" else "") \
            + (" (retried)" if r.get("retried") else "")
        lines.append(
            f"| {label} | {r['rate']:,.0f} | {r['achieved_per_s']:,.1f} | {_fails(r)} "
            f"| {_f(r['p50_ms'], 1)} | {_f(r['p99_ms'], 1)} | {_f(r['p999_ms'], 1)} "
            f"| {_f(r['upgrade_p50_ms'], 1)} | {r['node_cpu_util']:.0%} "
            f"| {_f(r['node_cpu_ms_per_session'], 2)} | {_f(r['redis_calls_per_session'], 1)} "
            f"| {r['redis_cpu_util']:.0%} | {_f(r['redis_cpu_us_per_session'], 0)} "
            f"| {r['clients_cpu_util']:.0%} | {r['other_cpu_util']:.0%} "
            f"| {r['rss_before_mib']:.1f} → {r['rss_after_mib']:.1f} "
            f"| {r['fds_before']} → {r['fds_after']} | {'yes' if r['kept_up'] else 'no'} |")
    lines += ["", "Redis calls per session by command (window deltas minus the idle rate; "
              "commands inside Lua scripts included), at each target's highest rate kept up "
              "(else its first step):", ""]
    for target in dict.fromkeys(r["target"] for r in doc["steps"]):
        rows = [r for r in doc["steps"] if r["target"] == target and r.get("label") is None
                and not r.get("retried")]
        kept = [r for r in rows if r["kept_up"]]
        r = max(kept, key=lambda r: r["rate"]) if kept else (rows[0] if rows else None)
        if r is not None and r["redis_top"]:
            lines.append(f"* **{target}** at {r['rate']:,.0f}/s: "
                         + ", ".join(f"{k} {v:.2f}" for k, v in r["redis_top"].items()))
    peak = doc.get("peak_rate", {})
    if peak:
        lines += ["", "Highest rate kept up: " + ", ".join(f"{t} {v:,.0f}/s" for t, v in peak.items())]
    same = {}
    for r in doc["steps"]:
        if r.get("retried") or r.get("label") or not r["node_cpu_ms_per_session"]:
            continue
        same.setdefault(r["rate"], {})[r["target"]] = r["node_cpu_ms_per_session"]
    pairs = [(rate, v["ours"] / v["naive"]) for rate, v in sorted(same.items())
             if "ours" in v and "naive" in v]
    if pairs:
        lines += ["", "Node CPU per session, ours / naive (same rate, back to back): "
                  + ", ".join(f"{rate:,.0f}/s {x:.2f}×" for rate, x in pairs)]
    online = [(r["target"], r["rate"], r["online_after"]) for r in doc["steps"]
              if r.get("online_after") and r.get("label") != "warmup"]
    if online:
        lines += ["", "Users still listed online in Redis after a step's sessions all closed: "
                  + ", ".join(f"{t} {rate:,.0f}/s: {n}" for t, rate, n in online)]
    return "\n".join(lines)
