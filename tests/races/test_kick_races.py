"""A kick racing the kicked user's send: the send was let through by the membership check
before the kick, and reaches the append after it. The append script checks the membership
again, so no message of the kicked user lands after the removal."""

from __future__ import annotations

import asyncio

from .conftest import api, command


async def test_a_send_checked_before_a_kick_is_refused_after_it(inproc):
    node = await inproc()
    room = (await command(node, "ann", {"type": "create_room", "name": "k", "visibility": "open"}))["room"]["id"]
    await command(node, "bo", {"type": "join", "room": room})
    gate = node.pauses.arm("send.checked")
    # Over HTTP: no live session, so the node checks the membership before the append.
    send = asyncio.create_task(api(node, "/api/v1/command", {"type": "send", "room": room, "text": "late"}, "bo"))
    await gate.reached()
    await command(node, "ann", {"type": "kick", "room": room, "user": "bo"})
    gate.release()
    status, reply = await send
    assert status == 403 and reply["error"]["code"] == "forbidden", reply
    history = await command(node, "ann", {"type": "history", "room": room})
    assert [m["text"] for m in history["messages"]] == []
