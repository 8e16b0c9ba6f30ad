"""Delivery when a reader falls behind, membership is learnt late, polls meet new rooms, and
the node drains: the suspected items of issue 12, each forced."""

from __future__ import annotations

import asyncio

from tests.integration.wire import hello, next_of, raw_connect

from .conftest import api, command, until, ws_url
from .reader import reader_held
from .test_session_races import messages_of


async def test_a_reader_behind_the_trimmed_history_tells_its_sessions(inproc, redis_client):
    """Entries trimmed before the shard reader read them: the session must be told
    (room updated, recovered: false), not skip them silently."""
    # The reader is held before its next read: after it read "wake", or before (it may have
    # been on its way round already, and then "wake" is trimmed with the rest).
    node, ws, gate = await reader_held(inproc)
    for i in range(10):
        await command(node, "bo", {"type": "send", "room": "general", "text": f"m{i + 1}"})
    await redis_client.xtrim(node.keys.room_stream("general"), maxlen=3, approximate=False)
    gate.release()
    texts: list[str] = []
    gaps = 0
    while "m10" not in texts:
        frame = await next_of(ws, "message") if gaps else await next_of(ws, "room")
        if frame["type"] == "room":
            assert frame["recovered"] is False and frame["room"]["id"] == "general"
            gaps += 1
        else:
            texts.append(frame["text"])
    assert texts in (["m8", "m9", "m10"], ["wake", "m8", "m9", "m10"]), texts
    await ws.close()


async def test_a_late_membership_past_the_replay_limit_says_recovered_false(inproc):
    """A room added to a live session after more messages than CHAT_REPLAY_LIMIT: the client
    must be told to reload it, not be given nothing."""
    node = await inproc(CHAT_REPLAY_LIMIT=2)
    ws = await raw_connect(ws_url(node))
    await hello(ws, "cal")
    gate = node.pauses.arm("reconcile.checked")
    room = (await command(node, "dee", {"type": "create_room", "name": "z", "visibility": "closed",
                                        "members": ["cal"]}))["room"]["id"]
    await gate.reached()
    for i in range(5):
        await command(node, "dee", {"type": "send", "room": room, "text": f"x{i}"})
    gate.release()
    while True:
        event = await next_of(ws, "room")
        if event.get("recovered") is False:
            break
    assert event["room"]["id"] == room
    sent = await command(node, "dee", {"type": "send", "room": room, "text": "live"})
    assert (await messages_of(ws, room, 1))[0]["id"] == sent["id"]
    await ws.close()


async def test_a_poll_gets_the_messages_of_a_room_it_was_just_added_to(inproc):
    node = await inproc()
    status, session = await api(node, "/api/v1/session", {}, "eli")
    assert status == 200
    room = (await command(node, "fay", {"type": "create_room", "name": "p", "visibility": "closed",
                                        "members": ["eli"]}))["room"]["id"]
    sent = [await command(node, "fay", {"type": "send", "room": room, "text": f"p{i}"}) for i in range(2)]
    status, polled = await api(node, "/api/v1/poll", {"cursors": session["cursors"],
                                                       "personal": session["personal"] | {"id": session["personal"]["last_id"]},
                                                       "wait_ms": 0}, "eli")
    assert status == 200, polled
    got = [e["id"] for e in polled["events"] if e["type"] == "message" and e["room"] == room]
    assert got == [s["id"] for s in sent]
    assert any(e["type"] == "room" and e["room"]["id"] == room for e in polled["events"])
    assert polled["cursors"][room]["id"] == sent[-1]["id"]


async def test_drain_answers_waiting_long_polls_at_once(inproc):
    node = await inproc(CHAT_DRAIN_SECONDS=1)
    poll = asyncio.create_task(api(node, "/api/v1/poll", {"wait_ms": 25000}, "gil"))
    await until(lambda: node.poller.waiting.get("gil", 0) == 1)
    drain = asyncio.create_task(node.drain())
    status, body = await asyncio.wait_for(poll, 5)  # not the 25 s of the poll
    assert status == 200 and body["events"] == []
    await asyncio.wait_for(drain, 10)
