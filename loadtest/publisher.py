"""Open-loop publisher: appends messages straight into Redis with the node's own append script.

Publishing directly to Redis (not through a node's WebSocket ``send``) keeps the node's
measured CPU to the fan-out alone: reading the streams, encoding once, writing to sockets.

The schedule is fixed before the first send: message ``i`` is due at ``t0 + i / rate`` and
goes to room ``i % len(rooms)``. The publisher sends every due message in one pipelined write
of ``EVALSHA`` commands (raw RESP over a blocking socket, so the generator stays cheap), reads
the replies, and sleeps until the next due time. If it falls behind, messages go out late but
keep their scheduled time in the text, so the latency measured by the receivers includes the
lateness (no coordinated omission).

Text layout (``text_bytes`` long, ASCII): ``~b<scheduled µs since the epoch> xxxx...``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from typing import Any

from node.keys import Keys
from node.streams import APPEND_LUA

from .wsclient import MAGIC_PREFIX


def _cmd(*args: bytes | str | int) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class RespReader:
    """Just enough RESP2 parsing for the append script's replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.pos = 0

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n", self.pos)
            if i >= 0:
                line = self.buf[self.pos:i]
                self.pos = i + 2
                return line
            self._fill()

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("redis closed the connection")
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0

    def read(self) -> Any:
        line = self._line()
        t, rest = line[:1], line[1:]
        if t == b":":
            return int(rest)
        if t == b"+":
            return rest
        if t == b"-":
            raise RuntimeError(rest.decode())
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) - self.pos < n + 2:
                self._fill()
            data = self.buf[self.pos:self.pos + n]
            self.pos += n + 2
            return data
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self.read() for _ in range(n)]
        raise RuntimeError(f"bad RESP: {line[:40]!r}")


def make_text(sched_us: int, text_bytes: int) -> str:
    head = f"{MAGIC_PREFIX}{sched_us} "
    return head + "x" * max(0, text_bytes - len(head))


class PeerEncoder:
    """Commands that publish one message the way a peer's own server-side emit does.

    ``pysio``: python-socketio's ``AsyncRedisManager.emit(..., room=R)`` = ``PUBLISH socketio
    <json emit dict>`` (the dict as in ``AsyncPubSubManager.emit``). ``nodesio``: another
    Socket.IO server's ``io.to(R).emit(...)`` through ``@socket.io/redis-streams-adapter`` =
    ``XADD socket.io MAXLEN ~ 10000 * uid nsp type data`` with a ``BROADCAST`` (type 3) entry.
    The payload is the same message object the node sends (room, id, seq, ts, from, text), with
    a per-room ``seq`` counted here, so the clients check order and loss the same way.
    """

    def __init__(self, dialect: str, seq_start: dict[str, int] | None = None) -> None:
        self.dialect = dialect
        self.seq: dict[str, int] = dict(seq_start or {})  # continues from the previous phase
        self.n = 0

    def command(self, room: str, text: str) -> bytes:
        import orjson

        seq = self.seq.get(room, 0) + 1
        self.seq[room] = seq
        self.n += 1
        ts = time.time_ns() // 1_000_000
        msg = {"room": room, "id": f"{ts}-{self.n}", "seq": seq, "ts": ts,
               "from": {"id": "pub", "name": "Publisher"}, "text": text}
        if self.dialect == "pysio":
            payload = orjson.dumps({"method": "emit", "event": "message", "data": [msg],
                                    "binary": False, "namespace": "/", "room": room,
                                    "skip_sid": None, "callback": None, "host_id": "bench-publisher"})
            return _cmd("PUBLISH", "socketio", payload)
        if self.dialect == "nodesio":
            data = orjson.dumps({"packet": {"type": 2, "data": ["message", msg], "nsp": "/"},
                                 "opts": {"rooms": [room], "except": [], "flags": {}}})
            return _cmd("XADD", "socket.io", "MAXLEN", "~", 10000, "*", "uid", "bench-publisher",
                        "nsp", "/", "type", "3", "data", data)
        raise ValueError(f"unknown dialect {self.dialect}")


def publish_peer(sock: socket.socket, reader: RespReader, dialect: str, rooms: list[str],
                 rate: float, t0_us: int, t_end_us: int, text_bytes: int,
                 seq_start: dict[str, int] | None) -> dict[str, Any]:
    """The same open-loop schedule as :func:`publish`, in a peer's wire format."""
    enc = PeerEncoder(dialect, seq_start)
    interval_us = 1e6 / rate
    n_rooms = len(rooms)
    i = sent = batches = 0
    max_lag_us = 0
    while True:
        now = time.time_ns() // 1000
        due = []
        while True:
            sched = t0_us + int(i * interval_us)
            if sched > now or sched >= t_end_us:
                break
            max_lag_us = max(max_lag_us, now - sched)
            due.append(enc.command(rooms[i % n_rooms], make_text(sched, text_bytes)))
            i += 1
        if due:
            sock.sendall(b"".join(due))
            for _ in due:
                reader.read()
            sent += len(due)
            batches += 1
        next_sched = t0_us + int(i * interval_us)
        if next_sched >= t_end_us:
            break
        delay = (next_sched - time.time_ns() // 1000) / 1e6
        if delay > 0:
            time.sleep(delay)
    sock.close()
    return {"sent": sent, "batches": batches, "max_lag_ms": max_lag_us / 1000,
            "last_seq": dict(enc.seq)}


def publish(redis_host: str, redis_port: int, shards: int, rooms: list[str], rate: float,
            t0_us: int, t_end_us: int, text_bytes: int = 100, maxlen: int = 10000,
            dialect: str = "ours", seq_start: dict[str, int] | None = None) -> dict[str, Any]:
    """Publish at ``rate`` msgs/s from ``t0_us`` until ``t_end_us`` (wall clock, µs)."""
    keys = Keys(shards)
    sock = socket.create_connection((redis_host, redis_port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = RespReader(sock)
    if dialect != "ours":
        return publish_peer(sock, reader, dialect, rooms, rate, t0_us, t_end_us, text_bytes,
                            seq_start)
    sha = hashlib.sha1(APPEND_LUA.encode()).hexdigest()
    sock.sendall(_cmd("SCRIPT", "LOAD", APPEND_LUA))
    assert reader.read().decode() == sha
    # The node's append script: KEYS stream, meta, cmid-key, members; ARGV maxlen, user, name,
    # text, cmid, kind, cmid_ttl, max_age_ms, client-cmid flag, check-member flag. Every append
    # carries its own dedupe key (as the node's made-up cmids do; one fixed key per room would
    # make every later append a "duplicate" of the first), kept 60 s like the node's.
    # Per room: the constant parts around the per-message cmid key and text.
    head: dict[str, bytes] = {}
    mid: dict[str, bytes] = {}
    cmid_base: dict[str, str] = {}

    def bulk(parts: list[Any]) -> bytes:
        encoded = [a if isinstance(a, bytes) else str(a).encode() for a in parts]
        return b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in encoded)

    for i, room in enumerate(rooms):
        user = f"pub{i}"
        head[room] = b"*17\r\n" + bulk([b"EVALSHA", sha, 4, keys.room_stream(room), keys.room_meta(room)])
        mid[room] = bulk([keys.room_members(room), maxlen, user, "Publisher"])
        cmid_base[room] = keys.room_cmid(room, user, "~p")
    tail = bulk(["", "", 60, 0, "", ""])  # cmid '', kind '', ttl, max_age 0 (off), flags off
    run_tag = f"{os.getpid()}.{t0_us}"
    interval_us = 1e6 / rate
    n_rooms = len(rooms)
    i = 0
    sent = 0
    max_lag_us = 0
    last_seq: dict[str, int] = {}
    batches = 0
    while True:
        now = time.time_ns() // 1000
        due = []
        while True:
            sched = t0_us + int(i * interval_us)
            if sched > now or sched >= t_end_us:
                break
            room = rooms[i % n_rooms]
            text = make_text(sched, text_bytes).encode()
            max_lag_us = max(max_lag_us, now - sched)
            ck = f"{cmid_base[room]}{run_tag}.{i}".encode()
            due.append((room, head[room] + b"$%d\r\n%s\r\n" % (len(ck), ck) + mid[room]
                        + b"$%d\r\n%s\r\n" % (len(text), text) + tail))
            i += 1
        if due:
            sock.sendall(b"".join(cmd for _, cmd in due))
            for room, _ in due:
                status, payload = reader.read()
                if status != 1:
                    raise RuntimeError(f"append failed: {status} {payload!r}")
                last_seq[room] = int(payload.split(b" ")[1])
            sent += len(due)
            batches += 1
        next_sched = t0_us + int(i * interval_us)
        if next_sched >= t_end_us:
            break
        delay = (next_sched - time.time_ns() // 1000) / 1e6
        if delay > 0:
            time.sleep(delay)
    sock.close()
    return {"sent": sent, "batches": batches, "max_lag_ms": max_lag_us / 1000, "last_seq": last_seq}


def publisher_result(parent: Any, pub: Any, timeout_s: float = 30.0) -> dict[str, Any]:
    """The result a publisher process sent back through ``parent`` (raises if it failed)."""
    if not parent.poll(timeout_s):
        raise RuntimeError("publisher did not finish")
    result: dict[str, Any] = parent.recv()
    pub.join(5)
    if "error" in result:
        raise RuntimeError(f"publisher failed: {result['error']}")
    return result


def publisher_main(conn: Any, **kwargs: Any) -> None:
    """Process entry point: publish, then send the summary back over ``conn``."""
    try:
        conn.send(publish(**kwargs))
    except Exception as exc:  # reported to the orchestrator, which fails the run
        conn.send({"error": repr(exc)})
