"""Room quotas are enforced inside Redis, for every user a command adds (issue 12 #7)."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.integration.wire import close_code, raw_connect, recv_json, send_json

from .conftest import api, command, ws_url


async def refused(node, user, frame):
    status, reply = await api(node, "/api/v1/command", frame, user)
    assert status == 400 and reply["ok"] is False, reply
    return reply["error"]["message"]


async def test_rooms_per_user_holds_for_every_member_added(inproc, redis_client):
    node = await inproc(CHAT_MAX_ROOMS_PER_USER=2, CHAT_CREATE_ROOM_BURST=100)
    for i in range(2):
        await command(node, "bob", {"type": "create_room", "name": f"b{i}", "visibility": "open"})
    room = (await command(node, "amy", {"type": "create_room", "name": "a", "visibility": "closed"}))["room"]["id"]
    assert "bob is in as many" in await refused(node, "amy", {"type": "invite", "room": room, "user": "bob"})
    created = await command(node, "amy", {"type": "create_room", "name": "c", "visibility": "closed",
                                          "members": ["bob", "cat"]})
    assert created["not_added"] == ["bob"]
    assert "bob is in as many" in await refused(node, "cat", {"type": "dm", "user": "bob"})
    assert await redis_client.scard(node.keys.user_rooms("bob")) == 2
    assert await redis_client.scard(node.keys.user_rooms("cat")) == 1  # no half-made DM


async def test_a_join_held_after_the_checks_cannot_pass_the_room_cap(inproc, redis_client):
    """The interleaving of two joins: one is held after the node's own checks, the other fills
    the room meanwhile; the held one must then be refused (the cap is checked where it adds)."""
    node = await inproc(CHAT_MAX_ROOM_MEMBERS=2)
    room = (await command(node, "own", {"type": "create_room", "name": "r", "visibility": "open"}))["room"]["id"]
    gate = node.pauses.arm("rooms.before_add")
    held = asyncio.create_task(api(node, "/api/v1/command", {"type": "join", "room": room}, "first"))
    await gate.reached()
    node.pauses.disarm("rooms.before_add")  # the second join goes straight through
    await command(node, "second", {"type": "join", "room": room})
    gate.release()
    status, reply = await asyncio.wait_for(held, 10)
    assert status == 400 and "full" in reply["error"]["message"], reply
    assert await redis_client.scard(node.keys.room_members(room)) == 2
    assert not await redis_client.sismember(node.keys.user_rooms("first"), room)


async def test_hellos_racing_cannot_pass_the_per_user_cap_together(inproc):
    """CHAT_MAX_CONNECTIONS_PER_USER is counted and added by one script: five hellos of one
    user at once, on two nodes, give exactly one session."""
    nodes = [await inproc(CHAT_MAX_CONNECTIONS_PER_USER=1) for _ in range(2)]
    conns = [await raw_connect(ws_url(nodes[i % 2])) for i in range(5)]
    await asyncio.gather(*(send_json(ws, {"type": "hello", "user": "solo", "ref": i}) for i, ws in enumerate(conns)))

    async def outcome(ws: Any) -> str:
        frame = await recv_json(ws, 10)
        if frame["type"] == "welcome":
            return "welcome"
        assert frame["type"] == "reply" and frame["error"]["code"] == "rate_limited", frame
        assert await close_code(ws) == 4003
        return "refused"

    results = await asyncio.gather(*(outcome(ws) for ws in conns))
    assert sorted(results) == ["refused"] * 4 + ["welcome"], results
    for ws in conns:
        await ws.close()
