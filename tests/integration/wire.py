"""Raw WebSocket helpers for the robustness tests: the test controls every frame.

Every wait here has a timeout, so a node that hangs fails the test instead of stalling it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import socket
import struct
import uuid
import weakref
from typing import Any

import aiohttp
import orjson
import pytest
import redis
from redis.crc import key_slot
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from node.client import ChatClient, ChatClientError

# Section 2.2 and 2.4 of the contract.
ERROR_CODES = {"bad_request", "unauthorized", "forbidden", "not_found", "conflict", "too_large",
               "rate_limited", "unavailable", "internal"}
CLOSE_CODES = {4001, 4002, 4003, 4500, 4501, 4502, 1009}


async def raw_connect(url: str, **kwargs: Any) -> ClientConnection:
    """A plain websockets connection: no hello, no keepalive pings, no compression."""
    options: dict[str, Any] = {"open_timeout": 5, "close_timeout": 2, "max_size": 2**24,
                               "compression": None, "ping_interval": None}
    options.update(kwargs)
    return await connect(url, **options)


async def send_json(ws: ClientConnection, frame: Any) -> None:
    await ws.send(orjson.dumps(frame).decode())


async def recv_json(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(raw, str), "the server sent a binary frame"
    frame = orjson.loads(raw)
    assert isinstance(frame, dict) and isinstance(frame.get("type"), str), frame
    return frame


# Frames read past while looking for another type, per connection: a live `message` event may
# legitimately arrive before the `reply` to the `send` that produced it, so nothing is dropped.
_SKIPPED: weakref.WeakKeyDictionary[ClientConnection, list[dict[str, Any]]] = weakref.WeakKeyDictionary()


async def next_of(ws: ClientConnection, kind: str, timeout: float = 5.0) -> dict[str, Any]:
    """The next frame of type ``kind``; frames of other types are kept for later calls."""
    skipped = _SKIPPED.setdefault(ws, [])
    for i, frame in enumerate(skipped):
        if frame["type"] == kind:
            return skipped.pop(i)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        frame = await recv_json(ws, max(0.01, deadline - loop.time()))
        if frame["type"] == kind:
            return frame
        skipped.append(frame)


async def next_reply(ws: ClientConnection, timeout: float = 5.0) -> dict[str, Any]:
    return await next_of(ws, "reply", timeout)


async def hello(ws: ClientConnection, user: str, **fields: Any) -> dict[str, Any]:
    await send_json(ws, {"type": "hello", "user": user, **fields})
    return await next_of(ws, "welcome")


async def close_code(ws: ClientConnection, timeout: float = 5.0) -> int:
    """Read (and drop) frames until the server closes; the close code it sent (1006: none)."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                await ws.recv()
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else 1006
    raise AssertionError("unreachable")


def assert_error(reply: dict[str, Any], code: str, ref: Any = None) -> None:
    """An error reply with the contract's ``code`` and, exactly, the given ``ref`` (or none)."""
    assert reply["type"] == "reply" and reply["ok"] is False, reply
    assert reply["error"]["code"] == code, reply
    assert isinstance(reply["error"].get("message"), str), reply
    if ref is None:
        assert "ref" not in reply, reply
    else:
        assert reply.get("ref") == ref and type(reply["ref"]) is type(ref), reply


async def assert_node_serves(urls: str | list[str], user: str | None = None) -> None:
    """A fresh client on the node can still chat: its send is acked and comes back to it."""
    user = user or "probe-" + uuid.uuid4().hex[:8]
    client = ChatClient(urls, user=user, reconnect=False)
    try:
        await asyncio.wait_for(client.start(), 10)
        text = "still alive " + uuid.uuid4().hex[:8]
        ack = await client.send("general", text, timeout=10)
        while True:
            event = await client.next_event("message", timeout=10)
            if event["id"] == ack["id"]:
                assert event["text"] == text and event["from"]["id"] == user
                return
    finally:
        await client.close()


async def metric(http_url: str, name: str) -> float:
    """The value of one unlabelled sample of the node's /metrics (0 if absent)."""
    async with aiohttp.ClientSession() as http, http.get(http_url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def op_count(http_url: str, op: str) -> float:
    """How many Redis calls (commands or pipelines) the node made for ``op`` so far."""
    return await metric(http_url, f'chatcluster_redis_command_duration_seconds_count{{op="{op}"}}')


# -- a WebSocket client over a bare socket (for a client that never reads) --------------------

def ws_handshake(host: str, port: int, rcvbuf: int | None = None, timeout: float = 5.0) -> socket.socket:
    """Open a socket, upgrade it to a WebSocket by hand, return it (blocking, with a timeout).

    With ``rcvbuf`` the receive buffer is set before connecting, so the TCP window stays small.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:  # byte by byte: leave every frame after the headers unread
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def masked_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """A client frame (masked, FIN set)."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + struct.pack("!H", n)
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + struct.pack("!Q", n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + body


def read_until_close(sock: socket.socket, timeout: float = 10.0) -> tuple[int | None, int]:
    """Read server frames until a close frame; returns (close code or None on EOF, text frames)."""
    sock.settimeout(timeout)
    buf = bytearray()
    frames = 0

    def need(n: int) -> bool:
        while len(buf) < n:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return False
            buf.extend(chunk)
        return True

    while True:
        if not need(2):
            return None, frames
        opcode, length = buf[0] & 0x0F, buf[1] & 0x7F
        offset = 2
        if length == 126:
            if not need(4):
                return None, frames
            length, offset = struct.unpack("!H", bytes(buf[2:4]))[0], 4
        elif length == 127:
            if not need(10):
                return None, frames
            length, offset = struct.unpack("!Q", bytes(buf[2:10]))[0], 10
        if not need(offset + length):
            return None, frames
        payload = bytes(buf[offset:offset + length])
        del buf[:offset + length]
        if opcode == 0x8:
            return (struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005), frames
        if opcode == 0x1:
            frames += 1


async def receive_until(client: ChatClient, room: str, last_id: str, within: float = 20.0) -> tuple[list[str], bool]:
    """The ids of ``room``'s messages a client gets until ``last_id`` arrives (or ``within``
    seconds pass), and whether it was told that some were lost (``recovered: false`` in a
    ``room`` event or a welcome)."""
    ids: list[str] = []
    reported = False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while last_id not in ids and loop.time() < deadline:
        try:
            event = await client.next_event(timeout=max(0.1, deadline - loop.time()))
        except TimeoutError:
            break
        if event["type"] == "message" and event["room"] == room:
            ids.append(event["id"])
        elif event["type"] == "room" and event.get("recovered") is False:
            reported = True
        elif event["type"] == "welcome" and event.get("recovered", {}).get(room) is False:
            reported = True
    return ids, reported


def master_port_of(port: int, key: str) -> int:
    """The port of the master serving ``key``'s slot, asked of the node on ``port``."""
    client = redis.Redis(port=port, socket_timeout=2)
    try:
        slot = key_slot(key.encode())
        for start, end, master, *_ in client.execute_command("CLUSTER SLOTS"):
            if start <= slot <= end:
                return int(master[1])
    finally:
        client.close()
    raise AssertionError("slot not covered")


# -- ChatClient helpers ---------------------------------------------------------------------------
async def until(client: ChatClient, predicate: Any, timeout: float = 10.0) -> dict[str, Any]:
    """The next event satisfying ``predicate`` (others are skipped)."""
    while True:
        event = await client.next_event(timeout=timeout)
        if predicate(event):
            return event


def room_of(welcome: dict[str, Any], room: str) -> dict[str, Any]:
    """The summary of ``room`` in a welcome frame's ``rooms``."""
    return next(r for r in welcome["rooms"] if r["id"] == room)


async def error_code(coro: Any) -> str:
    """The error code a command fails with (it must fail)."""
    with pytest.raises(ChatClientError) as info:
        await coro
    return str(info.value.code)
