"""Abuse limits on live nodes: connections per IP (HTTP 429 at the handshake) and per user across
the cluster (error + close 4003), rooms per user, members per room, create_room rate, HTTP body
size and per-IP request rate; each reported in welcome.limits and counted in
chatcluster_rate_limited_total{limit=...}."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest
from websockets.exceptions import InvalidStatus

from node.client import ChatClientError

from ..integration.wire import (
    assert_node_serves,
    close_code,
    hello,
    next_reply,
    raw_connect,
    recv_json,
    send_json,
)


async def rate_limited(http_url: str, limit: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(http_url + "/metrics") as response:
        text = await response.text()
    match = re.search(rf'^chatcluster_rate_limited_total{{limit="{limit}"}} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def eventually(check, within: float = 10.0):
    """Retry ``check`` (an async callable returning a truthy value) until it passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = await check()
        if result:
            return result
        assert loop.time() < deadline, "condition never became true"
        await asyncio.sleep(0.05)


async def test_connections_per_user_cluster_wide_and_per_ip(start_nodes):
    a, b = start_nodes(2, CHAT_MAX_CONNECTIONS_PER_USER=2, CHAT_MAX_CONNECTIONS_PER_IP=4)
    first, second = await raw_connect(a.ws_url), await raw_connect(b.ws_url)
    welcome = await hello(first, "tabby")
    assert welcome["limits"]["max_connections_per_user"] == 2
    assert welcome["limits"]["max_connections_per_ip"] == 4
    await hello(second, "tabby")
    # The third session of the user, on either node: an error reply, then close 4003.
    third = await raw_connect(a.ws_url)
    await send_json(third, {"type": "hello", "ref": "h3", "user": "tabby"})
    reply = await next_reply(third)
    assert reply["ok"] is False and reply["error"]["code"] == "rate_limited" and reply["ref"] == "h3"
    assert await close_code(third) == 4003
    assert await rate_limited(a.http_url, "connections_per_user") == 1
    # Another user is not affected; when a tab closes, the user may connect again.
    await assert_node_serves(a.ws_url)
    await first.close()

    async def reconnects():
        ws = await raw_connect(a.ws_url)
        await send_json(ws, {"type": "hello", "user": "tabby"})
        first = await recv_json(ws)
        if first["type"] == "welcome":
            return ws
        assert first["error"]["code"] == "rate_limited"  # the closed tab is not gone yet
        await ws.close()
        return None

    again = await eventually(reconnects)
    await again.close()

    # Per IP on node b: `second` is one; three more handshakes fill it, the fifth gets 429.
    held = [await raw_connect(b.ws_url) for _ in range(3)]
    with pytest.raises(InvalidStatus) as refused:
        await raw_connect(b.ws_url)
    assert refused.value.response.status_code == 429
    assert refused.value.response.headers.get("Retry-After")
    assert await rate_limited(b.http_url, "connections_per_ip") == 1
    # Node a counts its own connections: it still accepts this address.
    await assert_node_serves(a.ws_url)
    await held[0].close()

    async def accepted():
        try:
            return await raw_connect(b.ws_url)
        except InvalidStatus:
            return None

    held[0] = await eventually(accepted)
    for ws in [second, *held]:
        await ws.close()


async def test_rooms_per_user_and_members_per_room(start_nodes, clients):
    (a,) = start_nodes(1, CHAT_MAX_ROOMS_PER_USER=3, CHAT_MAX_ROOM_MEMBERS=3)
    owner = await clients(a.ws_url, user="owner")
    assert owner.welcome["limits"]["max_rooms_per_user"] == 3
    assert owner.welcome["limits"]["max_room_members"] == 3
    # Members per closed room: the creator plus two.
    with pytest.raises(ChatClientError) as exc:
        await owner.request("create_room", name="Big", visibility="closed", members=["b", "c", "d"])
    assert exc.value.code == "bad_request"
    room = (await owner.request("create_room", name="Small", visibility="closed", members=["b"]))["room"]
    await owner.request("invite", room=room["id"], user="c")
    with pytest.raises(ChatClientError) as exc:
        await owner.request("invite", room=room["id"], user="d")
    assert exc.value.code == "bad_request" and "full" in exc.value.message
    assert await rate_limited(a.http_url, "room_members") == 2
    # Rooms per user: two more rooms fill the owner's quota; a third, a join or a new dm fails.
    await owner.request("create_room", name="Two", visibility="open")
    other = await clients(a.ws_url, user="other")
    open_room = (await other.request("create_room", name="Lobby", visibility="open"))["room"]
    await owner.request("create_room", name="Three", visibility="closed")
    for attempt in (
        owner.request("create_room", name="Four", visibility="open"),
        owner.request("join", room=open_room["id"]),
        owner.request("dm", user="someone-new"),
    ):
        with pytest.raises(ChatClientError) as exc:
            await attempt
        assert exc.value.code == "bad_request" and "at most 3 rooms" in exc.value.message
    assert await rate_limited(a.http_url, "rooms_per_user") == 3
    # Leaving a room frees a place.
    await owner.request("leave", room=room["id"])
    await owner.request("join", room=open_room["id"])


async def test_create_room_rate_per_user_over_ws_and_http(start_nodes, clients):
    (a,) = start_nodes(1, CHAT_CREATE_ROOM_PER_MIN=0.001, CHAT_CREATE_ROOM_BURST=2)
    maker = await clients(a.ws_url, user="maker")
    assert maker.welcome["limits"]["create_room_burst"] == 2
    for i in range(2):
        await maker.request("create_room", name=f"R{i}", visibility="open")
    with pytest.raises(ChatClientError) as exc:
        await maker.request("create_room", name="R2", visibility="open")
    assert exc.value.code == "rate_limited"
    async with aiohttp.ClientSession() as http:
        r = await http.post(a.http_url + "/api/v1/command",
                            json={"type": "create_room", "ref": 9, "name": "R3", "visibility": "open"},
                            headers={"Authorization": "Bearer dev:maker"})
        body = await r.json()
        assert r.status == 429 and body["error"]["code"] == "rate_limited" and body["ref"] == 9
        # Someone else still may.
        r = await http.post(a.http_url + "/api/v1/command",
                            json={"type": "create_room", "name": "Mine", "visibility": "open"},
                            headers={"Authorization": "Bearer dev:someone"})
        assert r.status == 200
    assert await rate_limited(a.http_url, "create_room") == 2
    # Other commands are not affected.
    await maker.send("general", "still chatting")


async def test_http_body_size_and_request_rate_per_ip(start_nodes):
    (a,) = start_nodes(1, CHAT_HTTP_RATE_PER_S=0.01, CHAT_HTTP_RATE_BURST=8,
                       CHAT_HTTP_MAX_BODY_BYTES=2048, CHAT_MAX_FRAME_BYTES=1024)
    dev = {"Authorization": "Bearer dev:poller"}

    async def chunks(n: int):
        for _ in range(n):
            yield b" " * 512

    async with aiohttp.ClientSession() as http:
        statuses = []
        # 1: a poll within the limit; 2-4: bodies over it (declared, chunked, command over the frame limit).
        r = await http.post(a.http_url + "/api/v1/poll", json={"wait_ms": 0}, headers=dev)
        statuses.append(r.status)
        for url, data in (("/api/v1/poll", b"{" + b" " * 3000 + b"}"),
                          ("/api/v1/session", chunks(8)),
                          ("/api/v1/command", b'{"type":"ping","pad":"' + b"x" * 1100 + b'"}')):
            r = await http.post(a.http_url + url, data=data, headers=dev)
            assert r.status == 413 and (await r.json())["error"]["code"] == "too_large", url
            statuses.append(r.status)
        # 5-8 pass, the 9th is refused with Retry-After; health and metrics never are.
        for _ in range(4):
            r = await http.post(a.http_url + "/api/v1/command", json={"type": "ping"}, headers=dev)
            statuses.append(r.status)
        r = await http.post(a.http_url + "/api/v1/command", json={"type": "ping"}, headers=dev)
        assert r.status == 429 and (await r.json())["error"]["code"] == "rate_limited"
        assert int(r.headers["Retry-After"]) >= 1
        assert statuses == [200, 413, 413, 413, 200, 200, 200, 200]
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await http.get(a.http_url + path)).status == 200
    assert await rate_limited(a.http_url, "http_body_bytes") == 3
    assert await rate_limited(a.http_url, "http_requests_per_ip") == 1
    # The WebSocket side is not limited by the HTTP bucket.
    await assert_node_serves(a.ws_url)


async def test_frame_text_and_depth_limits_are_counted(start_nodes):
    (a,) = start_nodes(1, CHAT_MAX_FRAME_BYTES=1024, CHAT_MAX_TEXT_CHARS=20, CHAT_MAX_JSON_DEPTH=5)
    ws = await raw_connect(a.ws_url)
    welcome = await hello(ws, "sizer")
    limits = welcome["limits"]
    assert (limits["max_frame_bytes"], limits["max_text_chars"], limits["max_json_depth"]) == (1024, 20, 5)

    def nested(levels: int) -> object:  # a frame whose deepest value sits at level `levels`
        deep: object = "x"
        for _ in range(levels - 2):
            deep = [deep]
        return deep

    await send_json(ws, {"type": "ping", "ref": "ok", "x": nested(5)})
    assert "error" not in await next_reply(ws)
    await send_json(ws, {"type": "ping", "ref": "d", "x": nested(6)})
    reply = await next_reply(ws)
    assert reply["error"]["code"] == "bad_request" and reply["ref"] == "d"
    await send_json(ws, {"type": "send", "ref": "t", "room": "general", "text": "y" * 21})
    assert (await next_reply(ws))["error"]["code"] == "too_large"
    await send_json(ws, {"type": "send", "ref": "f", "room": "general", "text": "z" * 2000})
    assert await close_code(ws) == 1009
    for limit in ("json_depth", "text_chars", "frame_bytes"):
        await eventually(lambda limit=limit: _at_least(a.http_url, limit, 1))


async def _at_least(url: str, limit: str, n: float) -> bool:
    return await rate_limited(url, limit) >= n


async def _metric(http_url: str, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(http_url + "/metrics") as response:
        text = await response.text()
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def test_long_polls_per_user_are_capped(start_nodes):
    """CHAT_MAX_POLLS_PER_USER long polls of one user may wait at once on a node; the next gets
    429 rate_limited at once (counted), other users are unaffected, and a freed slot is reusable."""
    (a,) = start_nodes(1, CHAT_MAX_POLLS_PER_USER=2)

    async def call(http, user: str, path: str, body: dict) -> tuple[int, dict]:
        async with http.post(a.http_url + path, json=body, headers={"Authorization": f"Bearer dev:{user}"}) as r:
            return r.status, await r.json()

    async with aiohttp.ClientSession() as http:
        status, welcome = await call(http, "hog", "/api/v1/session", {})
        assert status == 200 and welcome["limits"]["max_polls_per_user"] == 2
        body = {"cursors": welcome["cursors"], "wait_ms": 20000, "session": welcome["session"]}
        waiting = [asyncio.create_task(call(http, "hog", "/api/v1/poll", body)) for _ in range(2)]
        await eventually(lambda: _at_least_metric(a.http_url, "chatcluster_polls_waiting", 2))
        status, reply = await call(http, "hog", "/api/v1/poll", body)
        assert status == 429 and reply["error"]["code"] == "rate_limited", reply
        assert await rate_limited(a.http_url, "polls_per_user") == 1
        # A short poll (wait_ms 0) and another user's long poll are not limited.
        status, _ = await call(http, "hog", "/api/v1/poll", {**body, "wait_ms": 0})
        assert status == 200
        status, other = await call(http, "other", "/api/v1/session", {})
        other_poll = asyncio.create_task(call(http, "other", "/api/v1/poll", {
            "cursors": other["cursors"], "wait_ms": 20000, "session": other["session"]}))
        await eventually(lambda: _at_least_metric(a.http_url, "chatcluster_polls_waiting", 3))
        # A message wakes the waiting polls; their slots are free again.
        sender = await raw_connect(a.ws_url)
        await hello(sender, "sender")
        await send_json(sender, {"type": "send", "ref": "m", "room": "general", "text": "wake up"})
        woken = [await asyncio.wait_for(task, 15) for task in (*waiting, other_poll)]
        for status, woke in woken:
            assert status == 200 and any(e.get("text") == "wake up" for e in woke["events"]), woke
        await eventually(lambda: _zero_metric(a.http_url, "chatcluster_polls_waiting"))
        again = asyncio.create_task(call(http, "hog", "/api/v1/poll", {**body, "cursors": woken[0][1]["cursors"]}))
        await eventually(lambda: _at_least_metric(a.http_url, "chatcluster_polls_waiting", 1))
        again.cancel()


async def _at_least_metric(url: str, name: str, n: float) -> bool:
    return await _metric(url, name) >= n


async def _zero_metric(url: str, name: str) -> bool:
    return await _metric(url, name) == 0
