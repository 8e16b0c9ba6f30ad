"""A kick racing the kicked user's send: the send was let through by the membership check
before the kick, and reaches the append after it. The append script checks the membership
again, so no message of the kicked user lands after the removal."""

from __future__ import annotations

import asyncio

from tests.integration.wire import hello, next_of, raw_connect

from .conftest import api, command, ws_url
from .test_session_races import messages_of


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


async def test_nothing_of_the_room_reaches_a_kicked_session_after_its_removed_event(inproc):
    """The session learns of the kick from its personal stream; the node puts its subscription
    in line with Redis later (``reconcile_room``, held here at its pause point). A message sent
    to the room meanwhile must not reach the session that was just told it is out."""
    node = await inproc()
    room = (await command(node, "ann", {"type": "create_room", "name": "k2", "visibility": "open"}))["room"]["id"]
    ws = await raw_connect(ws_url(node))
    await hello(ws, "bo")
    await command(node, "bo", {"type": "join", "room": room})
    await command(node, "ann", {"type": "send", "room": room, "text": "before"})
    assert [m["text"] for m in await messages_of(ws, room, 1)] == ["before"]
    gate = node.pauses.arm("reconcile.checked")
    await command(node, "ann", {"type": "kick", "room": room, "user": "bo"})
    while True:
        event = await next_of(ws, "room")
        if event["change"] == "removed" and event["room"]["id"] == room:
            break
    await gate.reached()  # the subscription's reconcile is held after reading Redis
    await command(node, "ann", {"type": "send", "room": room, "text": "after the kick"})
    await command(node, "ann", {"type": "send", "room": "general", "text": "marker"})
    event = await next_of(ws, "message")
    gate.release()
    assert (event["room"], event["text"]) == ("general", "marker")
