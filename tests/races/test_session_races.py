"""Opening a session while the user's rooms change, closing one while it is being set up:
each interleaving is forced at a pause point of the node (see conftest.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from node.protocol import now_ms
from tests.integration.wire import hello, next_of, raw_connect, send_json

from .conftest import api, command, until, ws_url


async def messages_of(ws: Any, room: str, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while len(got) < n:
        event = await next_of(ws, "message", timeout)
        if event["room"] == room:
            got.append(event)
    return got


async def test_a_dm_opened_while_the_session_opens_is_delivered(inproc):
    """Issue 12 #8: the rooms of the session are read, then (before the personal stream is
    joined) another user opens a DM with it and sends two messages. The `room added` event must
    be applied to the session, and both messages must arrive."""
    node = await inproc()
    gate = node.pauses.arm("session.rooms_read")
    ws = await raw_connect(ws_url(node))
    await send_json(ws, {"type": "hello", "user": "pat"})
    await gate.reached()
    dm = (await command(node, "bob", {"type": "dm", "user": "pat"}))["room"]["id"]
    sent = [await command(node, "bob", {"type": "send", "room": dm, "text": f"hi {i}"}) for i in range(2)]
    gate.release()
    welcome = await next_of(ws, "welcome")
    got = await messages_of(ws, dm, 2)
    assert [m["id"] for m in got] == [s["id"] for s in sent]
    assert dm not in {r["id"] for r in welcome["rooms"]}  # it came as a live membership change
    await ws.close()


async def test_a_topic_is_never_rebuilt_at_the_start_of_history(inproc):
    """Issue 12 #5: the last local subscriber of a room leaves while a hello is between reading
    the room and joining its topic. The topic must start at the room's end, not at 0-0 (which
    replays the whole history live, as duplicates). Without lingering topics (or when a
    topic's linger ends at that moment: CHAT_TOPIC_LINGER_S)."""
    node = await inproc(CHAT_TOPIC_LINGER_S=0)
    first = await raw_connect(ws_url(node))
    await hello(first, "amy")
    old = [await command(node, "amy", {"type": "send", "room": "general", "text": f"old {i}"}) for i in range(5)]
    key = node.keys.room_stream("general")
    gate = node.pauses.arm("session.rooms_read")
    second = await raw_connect(ws_url(node))
    await send_json(second, {"type": "hello", "user": "ben"})
    await gate.reached()
    await first.close()
    await until(lambda: node.fanout.get(key) is None)
    gate.release()
    welcome = await next_of(second, "welcome")
    general = next(r for r in welcome["rooms"] if r["id"] == "general")
    assert general["last_id"] == old[-1]["id"]
    new = await command(node, "amy", {"type": "send", "room": "general", "text": "new"})
    got = await messages_of(second, "general", 1)
    assert got[0]["id"] == new["id"], "history was delivered again as live messages"
    await second.close()


async def test_a_session_closed_while_presence_restarts_it_is_not_a_ghost(inproc, redis_client):
    """Issue 12 #6: the heartbeat finds a session Redis lost and starts it again; the session
    closes meanwhile. It must not be put back among the node's sessions (online for ever)."""
    node = await inproc()
    ws = await raw_connect(ws_url(node))
    welcome = await hello(ws, "gus")
    sid = welcome["session"]
    await redis_client.zrem(node.keys.user_sessions("gus"), sid)  # Redis lost the session
    gate = node.pauses.arm("presence.started")
    beat = asyncio.create_task(node.online.heartbeat_once())
    await gate.reached()
    await ws.close()
    await until(lambda: sid not in node.online.local)
    await until(lambda: not any(c.caller and c.caller.session_id == sid for c in node.ws.connections))
    gate.release()
    await asyncio.wait_for(beat, 10)
    assert sid not in node.online.local
    live = await redis_client.zrangebyscore(node.keys.user_sessions("gus"), now_ms(), "+inf")
    assert live == [], "the closed session is still online"


async def test_a_membership_change_applied_after_close_does_not_leak_a_topic(inproc):
    """Issue 12 #6: a `room added` event is being applied to a session when it closes. The dead
    session must not be subscribed again (the node would read that room for ever)."""
    node = await inproc()
    ws = await raw_connect(ws_url(node))
    await hello(ws, "hal")
    gate = node.pauses.arm("reconcile.checked")
    room = (await command(node, "ivy", {"type": "create_room", "name": "x", "visibility": "closed",
                                        "members": ["hal"]}))["room"]["id"]
    await gate.reached()
    await ws.close()
    await until(lambda: not node.ws.connections)
    done = node.pauses.arm("reconcile.done", hold=False)
    gate.release()
    await done.reached()
    assert node.fanout.get(node.keys.room_stream(room)) is None, "a closed session's topic leaked"


async def test_a_long_poll_does_not_break_a_websocket_session_of_the_same_user(inproc):
    """Issue 12 #4: a long poll creates the user's personal topic; a WebSocket session opened
    on the same node afterwards must still get membership changes applied."""
    node = await inproc()
    poll = asyncio.create_task(api(node, "/api/v1/poll", {"wait_ms": 8000}, "kim"))
    await until(lambda: node.poller.waiting.get("kim", 0) == 1)
    ws = await raw_connect(ws_url(node))
    await hello(ws, "kim")
    room = (await command(node, "lou", {"type": "create_room", "name": "y", "visibility": "closed",
                                        "members": ["kim"]}))["room"]["id"]
    added = await next_of(ws, "room")
    assert added["room"]["id"] == room
    sent = await command(node, "lou", {"type": "send", "room": room, "text": "hello kim"})
    got = await messages_of(ws, room, 1)
    assert got[0]["id"] == sent["id"]
    await ws.close()
    await asyncio.wait_for(poll, 10)


async def test_a_future_personal_cursor_of_a_poll_does_not_hide_events(inproc):
    """Issue 12 #4: a poll's personal cursor from the future must not become the position of
    the personal topic other sessions on the node read."""
    node = await inproc()
    status, session = await api(node, "/api/v1/session", {}, "max")
    assert status == 200
    future = {"epoch": session["personal"]["epoch"], "id": "99999999999999-0"}
    poll = asyncio.create_task(api(node, "/api/v1/poll", {"wait_ms": 8000, "personal": future}, "max"))
    await until(lambda: node.poller.waiting.get("max", 0) == 1)
    ws = await raw_connect(ws_url(node))
    await hello(ws, "max")
    status, _ = await api(node, "/api/v1/alerts", {"to": ["max"], "kind": "email", "title": "t"}, server=True)
    assert status == 200
    alert = await next_of(ws, "alert")
    assert alert["title"] == "t"
    await ws.close()
    await asyncio.wait_for(poll, 10)


async def test_personal_events_past_the_limit_keep_the_newest(inproc):
    """Issue 12 #3: more personal events wait than CHAT_PERSONAL_MAXLEN. The newest must be
    delivered, and the welcome must say what was left out (recovered: false)."""
    node = await inproc(CHAT_PERSONAL_MAXLEN=5)
    for i in range(20):
        status, _ = await api(node, "/api/v1/alerts", {"to": ["ned"], "kind": "email", "title": f"a{i}"},
                              server=True)
        assert status == 200
    ws = await raw_connect(ws_url(node))
    welcome = await hello(ws, "ned")
    titles = [(await next_of(ws, "alert"))["title"] for _ in range(5)]
    assert titles == [f"a{i}" for i in range(15, 20)]
    assert welcome["personal"]["recovered"] is False
    await ws.close()
    # The next login has nothing more to replay.
    ws = await raw_connect(ws_url(node))
    welcome = await hello(ws, "ned")
    assert welcome["personal"]["recovered"] is True
    status, _ = await api(node, "/api/v1/alerts", {"to": ["ned"], "kind": "email", "title": "next"}, server=True)
    assert (await next_of(ws, "alert"))["title"] == "next"
    await ws.close()


async def test_a_reconnect_finds_its_streams_still_read_and_gets_exactly_the_gap(inproc):
    """CHAT_TOPIC_LINGER_S: when the last local session of a room leaves, the node goes on
    reading the room (and the user's personal stream) for a while, so that a reload finds them
    read: no shard reader is interrupted to add them, and the messages sent meanwhile come
    once, in order, from the client's cursor."""
    node = await inproc(CHAT_TOPIC_LINGER_S=60)
    ws = await raw_connect(ws_url(node))
    welcome = await hello(ws, "liz")
    cursors = {r["id"]: {"epoch": r["epoch"], "id": r["last_id"]} for r in welcome["rooms"]}
    key = node.keys.room_stream("general")
    await ws.close()
    await until(lambda: node.fanout.lingering() == 2)  # general and liz's personal stream
    topic = node.fanout.get(key)
    assert topic is not None and not topic.sinks
    missed = [await command(node, "max", {"type": "send", "room": "general", "text": f"away {i}"})
              for i in range(3)]
    await until(lambda: topic.pos == missed[-1]["id"])  # still read, by nobody
    interrupts: list[str] = []
    for reader in node.fanout.readers.values():
        def spy(key: str, original: Any = reader.interrupt) -> Any:
            interrupts.append(key)
            return original(key)
        reader.interrupt = spy  # type: ignore[method-assign]
    again = await raw_connect(ws_url(node))
    welcome = await hello(again, "liz", cursors=cursors)
    assert welcome["recovered"]["general"] is True
    got = await messages_of(again, "general", 3)
    assert [m["id"] for m in got] == [m["id"] for m in missed]
    assert interrupts == [] and node.fanout.get(key) is topic and topic.sinks
    assert node.fanout.lingering() == 0
    new = await command(node, "max", {"type": "send", "room": "general", "text": "back"})
    assert [m["id"] for m in await messages_of(again, "general", 1)] == [new["id"]]
    await again.close()


async def test_a_lingering_topic_is_no_longer_read_when_its_linger_ends(inproc):
    node = await inproc(CHAT_TOPIC_LINGER_S=0.2)
    ws = await raw_connect(ws_url(node))
    await hello(ws, "kit")
    key = node.keys.room_stream("general")
    reader = node.fanout.reader_of(node.fanout.topics[key])
    await ws.close()
    await until(lambda: node.fanout.get(key) is None)
    assert node.fanout.lingering() == 0 and key not in reader.topics


async def test_presence_transitions_of_one_window_share_one_entry_per_shard(inproc, redis_client):
    """Transitions a node announces within PRESENCE_BATCH_S go out as one ``presences`` entry
    per shard (every node's reader of the shard wakes once for all of them), and each reaches
    the room's members as its own presence event."""
    node = await inproc()
    watcher = await raw_connect(ws_url(node))
    await hello(watcher, "wes")
    eph = node.keys.shard_ephemeral(node.keys.room_shard("general"))
    await asyncio.gather(*(node.ephemeral.presence(["general"], user, user.upper(), "online")
                           for user in ("xia", "yul", "zed")))
    ours = [f for _, f in await redis_client.xrange(eph) if f.get(b"u") != b"wes"]  # (wes's own may come)
    assert [f[b"k"] for f in ours] == [b"presences"]
    seen = []
    while len(seen) < 3:
        event = await next_of(watcher, "presence")
        if event["user"]["id"] != "wes":
            seen.append((event["room"], event["user"], event["status"]))
    assert seen == [("general", {"id": u, "name": u.upper()}, "online") for u in ("xia", "yul", "zed")]
    await node.ephemeral.presence(["general"], "ann", "Ann", "offline")  # alone: a plain entry
    assert [f for _, f in await redis_client.xrange(eph) if f.get(b"u") == b"ann"] == [
        {b"k": b"presence", b"r": b"general", b"u": b"ann", b"n": b"Ann", b"s": b"offline"}]
    await watcher.close()


async def test_a_hellos_online_counts_cost_two_reads_whatever_its_rooms(inproc):
    """The online counts of a hello's small rooms are computed together: one read of their
    member sets, one of those members' presence (not two reads per room), and they are right."""
    node = await inproc()
    rooms = [(await command(node, "own", {"type": "create_room", "name": f"c{i}", "visibility": "closed",
                                          "members": ["uma", "vic"]}))["room"]["id"] for i in range(4)]
    vic = await raw_connect(ws_url(node))
    await hello(vic, "vic")
    calls: list[str] = []
    def spying(name: str) -> Any:
        original = getattr(node.rooms, name)

        def spy(*args: Any) -> Any:
            calls.append(name)
            return original(*args)
        return spy

    for name in ("members", "members_of_rooms"):
        setattr(node.rooms, name, spying(name))
    node.summaries._online_cache.clear()
    uma = await raw_connect(ws_url(node))
    welcome = await hello(uma, "uma")
    assert calls == ["members_of_rooms"]
    online = {r["id"]: r["online"] for r in welcome["rooms"]}
    assert [online[room] for room in rooms] == [2, 2, 2, 2]  # uma and vic; the owner is not here
    await uma.close()
    await vic.close()
