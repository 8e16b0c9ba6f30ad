"""Cheap WebSocket load clients: a raw asyncio Protocol per connection, many per process.

Why not the ``websockets`` client: on a 2-core machine the load generator competes with the
node for CPU, so the per-frame cost on the receiving side must be a few microseconds. The
client here does the RFC 6455 handshake itself, sends one masked ``hello``, answers pings, and
parses only unmasked, unfragmented server text frames (all the node ever sends). Per frame it
does one ``orjson.loads``, a seq check and, for benchmark messages, one latency sample.

A worker process (:func:`worker_main`) owns a share of the clients and talks to the
orchestrator over a ``multiprocessing`` pipe with small dict commands:

* ``{"op": "connect", "target": T, "host": H, "port": P, "users": [...], "concurrency": C}``
  -> ``{"ok": n_connected, "failed": n, "welcomed": n}``
* ``{"op": "phase", "window": [start_us, end_us]}`` -> ``{"ok": True}`` (resets the counters)
* ``{"op": "report"}`` -> the counters and latency samples of the current phase
* ``{"op": "progress"}`` -> per-room highest seq seen by *every* client of that room
* ``{"op": "stop"}``
"""

from __future__ import annotations

import asyncio
import base64
import os
import resource
import threading
import time
from array import array
from typing import Any

import orjson

MAGIC_PREFIX = "~b"  # benchmark texts start with "~b<scheduled µs> "


def raise_nofile(want: int | None = None) -> int:
    """Raise this process's RLIMIT_NOFILE: the soft limit to the hard one, or, with ``want``,
    both to ``want`` (capped at ``/proc/sys/fs/nr_open``; raising the hard limit needs root).
    Children started afterwards (client workers, servers) inherit it. Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want is not None and want > hard:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                want = min(want, int(f.read()))
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (OSError, ValueError):
            pass  # no CAP_SYS_RESOURCE (a container may deny it even to root): the hard limit
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def mask_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (RFC 6455 5.3)."""
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    masked = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return head + key + masked


class Stats:
    """Counters shared by all clients of one worker for the current phase."""

    __slots__ = ("win_start", "win_end", "frames_in_window", "bytes_in_window", "latencies",
                 "late_frames", "gaps", "dups", "other_frames", "closed", "close_codes",
                 "handshake_close_codes")

    def __init__(self) -> None:
        self.reset(0, 0)
        self.handshake_close_codes: dict[int, int] = {}

    def reset(self, win_start: int, win_end: int) -> None:
        self.win_start = win_start  # µs, wall clock
        self.win_end = win_end
        self.frames_in_window = 0  # benchmark messages *received* inside the window
        self.bytes_in_window = 0
        self.latencies = array("q")  # µs, for messages *scheduled* inside the window
        self.late_frames = 0
        self.gaps = 0  # missing seqs seen (a jump forward)
        self.dups = 0  # seq not above the last one
        self.other_frames = 0
        self.closed = 0  # welcomed clients that were closed during this phase
        self.close_codes: dict[int, int] = {}


class Client(asyncio.Protocol):
    __slots__ = ("stats", "transport", "buf", "state", "user", "seqs", "connected", "welcomed",
                 "close_code", "key")

    def __init__(self, stats: Stats, user: str, connected: asyncio.Future[Client]) -> None:
        self.stats = stats
        self.user = user
        self.transport: Any = None
        self.buf = b""
        self.state = 0  # 0 handshake, 1 open, 2 closed
        self.seqs: dict[str, int] = {}
        self.connected = connected
        self.welcomed = False
        self.close_code = 0
        self.key = base64.b64encode(os.urandom(16)).decode()

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        host, port = transport.get_extra_info("peername")[:2]
        transport.write(
            (f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {self.key}\r\n"
             f"Sec-WebSocket-Version: 13\r\nUser-Agent: chatcluster-bench\r\n\r\n").encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state != 2:
            self.state = 2
            if self.welcomed:  # failed handshakes are retried and reported by connect()
                self.stats.closed += 1
        if not self.connected.done():
            self.connected.set_exception(ConnectionError(f"closed during handshake: {exc}"))

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
            self.buf = b""
        if self.state == 0:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            status = data[:data.find(b"\r\n")]
            if b" 101 " not in status + b" ":
                self.state = 2
                if not self.connected.done():
                    exc = ConnectionError(status.decode(errors="replace"))
                    for line in data[:end].split(b"\r\n")[1:]:
                        name, _, value = line.partition(b":")
                        if name.strip().lower() == b"retry-after" and value.strip().isdigit():
                            exc.retry_after = int(value.strip())  # type: ignore[attr-defined]
                    self.connected.set_exception(exc)
                self.transport.close()
                return
            self.state = 1
            self.hello()
            data = data[end + 4:]
            if not data:
                return
        self._frames(data)

    def hello(self) -> None:
        self.transport.write(mask_frame(1, orjson.dumps({"type": "hello", "user": self.user})))

    # -- frames -------------------------------------------------------------------------------
    def _frames(self, data: bytes) -> None:
        stats = self.stats
        now = time.time_ns() // 1000
        in_window = stats.win_start <= now < stats.win_end
        seqs = self.seqs
        pos = 0
        n = len(data)
        while n - pos >= 2:
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
            op = b0 & 0x0F
            if op != 1:
                self._control(op, data[start:end])
                continue
            event = self._event(data[start:end])
            if event is None:
                continue
            room = event["room"]
            seq = event["seq"]
            last = seqs.get(room)
            if last is not None and seq != last + 1:
                if seq <= last:
                    stats.dups += 1
                    continue
                stats.gaps += seq - last - 1
            seqs[room] = seq
            text = event["text"]
            if text.startswith(MAGIC_PREFIX):
                sched = int(text[2:text.index(" ")])
                if in_window:
                    stats.frames_in_window += 1
                    stats.bytes_in_window += ln
                if stats.win_start <= sched < stats.win_end:
                    stats.latencies.append(now - sched)
        if pos < n:
            self.buf = data[pos:]

    def _event(self, payload: bytes) -> Any:
        """The ``message`` event of a text frame, or None after handling any other frame."""
        event = orjson.loads(payload)
        if event.get("type") == "message":
            return event
        if event.get("type") == "welcome":
            self.welcomed = True
            if not self.connected.done():
                self.connected.set_result(self)
        else:
            self.stats.other_frames += 1
        return None

    def _control(self, op: int, payload: bytes) -> None:
        if op == 9:  # ping -> pong
            self.transport.write(mask_frame(10, payload))
        elif op == 8:  # close: echo it and drop the connection
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            codes = self.stats.close_codes if self.welcomed else self.stats.handshake_close_codes
            codes[self.close_code] = codes.get(self.close_code, 0) + 1
            if self.state == 1:
                self.transport.write(mask_frame(8, payload[:2]))
            self.state = 2
            if self.welcomed:
                self.stats.closed += 1
            self.transport.close()


class SioClient(Client):
    """The same client speaking Engine.IO v4 / Socket.IO v5 over WebSocket (the peers' protocol):
    ``GET /socket.io/?EIO=4&transport=websocket``, Engine.IO ``0{..}`` open -> Socket.IO ``40``
    connect -> ``42["join", room]`` per room, each acked by ``42["joined", room]`` (then the
    client counts as welcomed); pings ``2`` are answered ``3``; messages are
    ``42["message", {room, seq, text, ...}]``."""

    __slots__ = ("rooms", "pending_joins")

    def __init__(self, stats: Stats, user: str, connected: asyncio.Future[Client],
                 rooms: list[str]) -> None:
        super().__init__(stats, user, connected)
        self.rooms = rooms
        self.pending_joins = len(rooms)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        host, port = transport.get_extra_info("peername")[:2]
        transport.write(
            (f"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: {host}:{port}\r\n"
             f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {self.key}\r\n"
             f"Sec-WebSocket-Version: 13\r\nUser-Agent: chatcluster-bench\r\n\r\n").encode())

    def hello(self) -> None:
        pass  # Socket.IO: wait for the Engine.IO open packet

    def _event(self, payload: bytes) -> Any:
        kind = payload[:1]
        if payload[:2] == b"42":
            name, _, rest = payload[2:].partition(b",")
            if name == b'["message"':
                return orjson.loads(rest[:-1])
            if name == b'["joined"':
                self.pending_joins -= 1
                if self.pending_joins == 0:
                    self.welcomed = True
                    if not self.connected.done():
                        self.connected.set_result(self)
                return None
            self.stats.other_frames += 1
        elif kind == b"2":  # Engine.IO ping
            self.transport.write(mask_frame(1, b"3"))
        elif kind == b"0":  # Engine.IO open: connect to the default namespace
            self.transport.write(mask_frame(1, b"40"))
        elif payload[:2] == b"40":  # namespace connected: join the rooms
            if not self.rooms:
                self.pending_joins = 1
                self._event(b'42["joined",""]')
            for room in self.rooms:
                self.transport.write(mask_frame(1, b'42["join",' + orjson.dumps(room) + b"]"))
        elif payload[:2] in (b"41", b"44") or kind == b"1":
            self.stats.other_frames += 1
            self.transport.close()
        else:
            self.stats.other_frames += 1
        return None


class Worker:
    def __init__(self) -> None:
        self.stats = Stats()
        self.clients: dict[str, list[Client]] = {}  # target -> clients

    async def connect(self, target: str, host: str, port: int, users: list[str],
                      concurrency: int, dialect: str = "ws-json",
                      rooms: list[list[str]] | None = None, local_addrs: list[str] | None = None,
                      rate: float | None = None, attempts: int = 3) -> dict[str, Any]:
        """Connect ``users`` (``concurrency`` handshakes at a time). ``local_addrs``: client
        source addresses, used round-robin (each has its own ephemeral-port range, so one
        process can hold more than ~28,000 connections to one server port); ``rate``: at most
        this many connection starts per second; ``attempts``: tries per user (a refused
        upgrade with a Retry-After waits that long before the next)."""
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(concurrency)
        clients = self.clients.setdefault(target, [])
        failed = 0
        errors: dict[str, int] = {}
        t_start = loop.time()

        def factory(user: str, fut: asyncio.Future[Client], index: int) -> Client:
            if dialect == "sio":
                return SioClient(self.stats, user, fut, rooms[index] if rooms else [])
            return Client(self.stats, user, fut)

        local = [(addr, 0) for addr in local_addrs] if local_addrs else None

        async def one(index: int, user: str) -> None:
            nonlocal failed
            if rate:
                delay = t_start + index / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            async with sem:
                for attempt in range(attempts):
                    fut: asyncio.Future[Client] = loop.create_future()
                    try:
                        await loop.create_connection(
                            lambda fut=fut: factory(user, fut, index), host, port,
                            local_addr=local[index % len(local)] if local else None)
                        client = await asyncio.wait_for(fut, 30)
                        clients.append(client)
                        return
                    except (OSError, ConnectionError, TimeoutError) as exc:
                        key = type(exc).__name__ + ": " + str(exc)[:80]
                        errors[key] = errors.get(key, 0) + 1
                        retry_after = getattr(exc, "retry_after", None)
                        await asyncio.sleep(retry_after if retry_after is not None
                                            else 0.2 * (attempt + 1))
                failed += 1

        await asyncio.gather(*(one(i, u) for i, u in enumerate(users)))
        errors.update({f"close {k} during hello": v
                       for k, v in self.stats.handshake_close_codes.items()})
        self.stats.handshake_close_codes.clear()
        return {"ok": len(users) - failed, "failed": failed, "errors": errors}

    def progress(self) -> dict[str, Any]:
        """Per target and room, the lowest highest-seq over the clients of that room."""
        out: dict[str, dict[str, int]] = {}
        for target, clients in self.clients.items():
            rooms: dict[str, int] = {}
            for client in clients:
                if client.state != 1:
                    continue
                for room, seq in client.seqs.items():
                    prev = rooms.get(room)
                    rooms[room] = seq if prev is None else min(prev, seq)
            out[target] = rooms
        return out

    def report(self) -> dict[str, Any]:
        s = self.stats
        open_clients = sum(1 for cs in self.clients.values() for c in cs if c.state == 1)
        return {"frames_in_window": s.frames_in_window, "bytes_in_window": s.bytes_in_window,
                "latencies": s.latencies.tobytes(), "gaps": s.gaps, "dups": s.dups,
                "other_frames": s.other_frames, "closed": s.closed,
                "close_codes": dict(s.close_codes), "open": open_clients,
                "handshake_close_codes": dict(s.handshake_close_codes)}

    async def stop(self) -> None:
        for clients in self.clients.values():
            for c in clients:
                if c.transport is not None:
                    c.transport.abort()


def pipe_inbox(conn: Any) -> asyncio.Queue[Any]:
    """The messages of a multiprocessing pipe as an asyncio queue (call from the running loop);
    a closed pipe reads as ``{"op": "stop"}``, the last message."""
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[Any] = asyncio.Queue()

    def pump() -> None:
        # A thread, not loop.add_reader: the event loop would make the pipe non-blocking,
        # and large replies (latency samples) would then fail with EAGAIN.
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                msg = {"op": "stop"}
            loop.call_soon_threadsafe(inbox.put_nowait, msg)
            if msg["op"] == "stop":
                return

    threading.Thread(target=pump, daemon=True).start()
    return inbox


async def _serve_pipe(conn: Any) -> None:
    worker = Worker()
    inbox = pipe_inbox(conn)
    while True:
        msg = await inbox.get()
        op = msg["op"]
        if op == "connect":
            reply = await worker.connect(msg["target"], msg["host"], msg["port"], msg["users"],
                                         msg.get("concurrency", 100), msg.get("dialect", "ws-json"),
                                         msg.get("rooms"), msg.get("local_addrs"), msg.get("rate"),
                                         msg.get("attempts", 3))
        elif op == "phase":
            worker.stats.reset(*msg["window"])
            reply = {"ok": True}
        elif op == "report":
            reply = worker.report()
        elif op == "progress":
            reply = worker.progress()
        elif op == "disconnect":
            for c in worker.clients.pop(msg["target"], []):
                if c.transport is not None:
                    c.transport.abort()
            reply = {"ok": True}
        elif op == "stop":
            await worker.stop()
            conn.send({"ok": True})
            return
        else:
            reply = {"error": f"unknown op {op}"}
        conn.send(reply)


def run_worker(main: Any) -> None:
    """Run a client worker process's main coroutine on uvloop (when installed), with the file
    descriptor limit raised."""
    raise_nofile()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(main)


def worker_main(conn: Any) -> None:
    """Entry point of a client worker process."""
    run_worker(_serve_pipe(conn))


class WorkerPool:
    """Client worker processes, each driven over a pipe: ``target(conn, *args_of(i))``."""

    what = "client worker"

    def __init__(self, n: int, target: Any, name: str, args_of: Any = lambda i: ()) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.pipes: list[Any] = []
        self.procs: list[Any] = []
        for i in range(n):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=target, args=(child, *args_of(i)), name=f"{name}-{i}", daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def send(self, msgs: list[dict[str, Any]] | dict[str, Any]) -> None:
        if isinstance(msgs, dict):
            msgs = [msgs] * len(self.pipes)
        for pipe, msg in zip(self.pipes, msgs, strict=True):
            pipe.send(msg)

    def collect(self, timeout: float = 600) -> list[Any]:
        out = []
        for pipe in self.pipes:
            if not pipe.poll(timeout):
                raise TimeoutError(f"{self.what} did not answer")
            out.append(pipe.recv())
        return out

    def call_all(self, msgs: list[dict[str, Any]] | dict[str, Any], timeout: float = 600) -> list[Any]:
        self.send(msgs)
        return self.collect(timeout)

    def stop(self) -> None:
        try:
            self.call_all({"op": "stop"}, timeout=10)
        except Exception:
            pass
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
