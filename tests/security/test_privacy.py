"""Privacy over every transport: naming a closed or direct room one is not in -- in a command
over HTTP or WebSocket, a poll or session cursor, a hello resume cursor, a where or rooms query --
answers exactly like naming a room that does not exist, and leaks nothing about it."""

from __future__ import annotations

from typing import Any

import aiohttp

from ..integration.wire import hello, next_reply, raw_connect, recv_json, send_json

EVE = {"Authorization": "Bearer dev:eve"}


def commands(room: str, msg_id: str) -> list[dict[str, Any]]:
    """Every command that names a room, with plausible arguments."""
    return [
        {"type": "send", "room": room, "text": "let me in"},
        {"type": "send", "room": room, "text": "hi", "cmid": "c-1"},
        {"type": "send", "room": room, "text": "/who"},
        {"type": "send", "room": "general", "text": f"/join {room}"},
        {"type": "history", "room": room},
        {"type": "history", "room": room, "after": "0-0", "limit": 100},
        {"type": "history", "room": room, "before": msg_id},
        {"type": "history", "room": room, "after": msg_id, "limit": 1},
        {"type": "join", "room": room},
        {"type": "leave", "room": room},
        {"type": "invite", "room": room, "user": "eve"},
        {"type": "invite", "room": room, "user": "alice"},
        {"type": "who", "room": room},
        {"type": "who", "room": room, "limit": 5},
        {"type": "read", "room": room, "id": msg_id},
        {"type": "read", "room": room, "id": "0-0"},
        {"type": "typing", "room": room, "ref": "t"},
    ]


async def test_outsider_http_and_ws_matrix(start_nodes, clients):
    a, b = start_nodes(2)
    alice = await clients(a.ws_url, user="alice")
    await clients(a.ws_url, user="bob")
    closed = (await alice.request("create_room", name="Board", visibility="closed", members=["bob"]))["room"]
    secret = await alice.send(closed["id"], "board secret")
    direct = (await alice.request("dm", user="bob"))["room"]
    dm_secret = await alice.send(direct["id"], "dm secret")
    ghosts = {closed["id"]: "r-doesnotexist", direct["id"]: "dm:alice:nobody"}
    ids = {closed["id"]: secret["id"], direct["id"]: dm_secret["id"]}

    async with aiohttp.ClientSession() as http:
        async def post(path: str, body: Any) -> tuple[int, Any]:
            async with http.post(b.http_url + path, json=body, headers=EVE) as r:
                return r.status, await r.json()

        # 1. /api/v1/command: every command, real room vs ghost, same status and body.
        for real, ghost in ghosts.items():
            for frame_real, frame_ghost in zip(commands(real, ids[real]), commands(ghost, ids[real]), strict=True):
                got_real, got_ghost = await post("/api/v1/command", frame_real), await post("/api/v1/command", frame_ghost)
                assert got_real == got_ghost, (frame_real, got_real, got_ghost)
                assert got_real[0] in (200, 400, 403, 404), got_real
                assert "secret" not in str(got_real)

        # 2. The same matrix over a WebSocket on the other node.
        ws = await raw_connect(a.ws_url)
        await hello(ws, "eve")
        for real, ghost in ghosts.items():
            for frame_real, frame_ghost in zip(commands(real, ids[real]), commands(ghost, ids[real]), strict=True):
                replies = []
                for frame in (frame_real, frame_ghost):
                    await send_json(ws, {**frame, "ref": "p"})
                    replies.append(await next_reply(ws))
                assert replies[0] == replies[1], (frame_real, replies)
        await ws.close()

        # 3. Poll and session cursors for the rooms: nothing about them, same as for ghosts.
        def cursors(rooms: list[str]) -> dict[str, Any]:
            return {r: {"epoch": closed["epoch"], "id": "0-0"} for r in rooms}

        for path, extra in (("/api/v1/poll", {"wait_ms": 0}), ("/api/v1/session", {})):
            _, real = await post(path, {"cursors": cursors(list(ghosts)), **extra})
            _, ghost = await post(path, {"cursors": cursors(list(ghosts.values())), **extra})
            for body in (real, ghost):
                assert set(body["cursors"]) == {"general"}, body
                assert "secret" not in str(body) and closed["id"] not in str(body) and direct["id"] not in str(body)
            assert real["events"] == ghost["events"]
            assert real["cursors"] == ghost["cursors"]
            if path.endswith("session"):
                assert real["rooms"] == ghost["rooms"] and real["recovered"] == ghost["recovered"]

        # 4. where and rooms (any query) show nothing of them.
        _, where = await post("/api/v1/command", {"type": "where", "user": "alice"})
        assert where["data"]["rooms"] == ["general"]
        _, where_bob = await post("/api/v1/command", {"type": "where", "user": "bob"})
        assert where_bob["data"]["rooms"] == ["general"]
        for query in (None, "board", "Board", closed["id"], "dm:", "alice", "r-"):
            frame = {"type": "rooms", **({"query": query} if query else {})}
            _, listed = await post("/api/v1/command", frame)
            assert {r["id"] for r in listed["data"]["rooms"]} <= {"general"}, (query, listed)

    # 5. hello resume cursors: the same welcome as with ghost cursors, no replay.
    welcomes = []
    for rooms in (list(ghosts), list(ghosts.values())):
        ws = await raw_connect(b.ws_url)
        welcome = await hello(ws, "eve", cursors=cursors(rooms))
        welcomes.append((welcome["recovered"], [r["id"] for r in welcome["rooms"]]))
        await send_json(ws, {"type": "ping", "ref": "fence"})
        while (frame := await recv_json(ws))["type"] != "reply":
            assert frame["type"] != "message", frame  # nothing replayed before the fence
        assert frame["ref"] == "fence"
        await ws.close()
    assert welcomes[0] == welcomes[1] == ({}, ["general"])
