"""Two nodes, one Redis: delivery across nodes, order, exactly once, and resume."""

from __future__ import annotations

import asyncio

import pytest

from node.client import ChatClient
from node.keys import Keys


async def collect(client: ChatClient, room: str, n: int, timeout: float = 20.0) -> list[dict]:
    got: list[dict] = []
    while len(got) < n:
        event = await client.next_event("message", timeout=timeout)
        if event["room"] == room:
            got.append(event)
    return got


async def test_message_crosses_nodes_in_order_exactly_once(start_nodes, clients):
    a, b = start_nodes(2)
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(b.ws_url, user="bob")
    sent = [await alice.send("general", f"m{i}") for i in range(50)]
    got = await collect(bob, "general", 50)
    assert [m["text"] for m in got] == [f"m{i}" for i in range(50)]
    assert [m["id"] for m in got] == [s["id"] for s in sent]
    assert [m["seq"] for m in got] == list(range(1, 51))
    # Nothing more arrives (no duplicates): a marker message is the very next event.
    await alice.send("general", "marker")
    assert (await bob.next_event("message"))["text"] == "marker"


async def test_same_cmid_publishes_once(start_nodes, clients):
    (a,) = start_nodes(1)
    alice = await clients(a.ws_url, user="alice")
    first = await alice.send("general", "once", cmid="abc-1")
    again = await alice.send("general", "once", cmid="abc-1")
    assert again["id"] == first["id"] and again["seq"] == first["seq"] and again.get("duplicate")
    page = await alice.history("general")
    assert [m["text"] for m in page["messages"]] == ["once"]


async def test_history_paging_is_exclusive_and_ordered(start_nodes, clients):
    (a,) = start_nodes(1)
    alice = await clients(a.ws_url, user="alice")
    ids = [(await alice.send("general", f"h{i}"))["id"] for i in range(12)]
    latest = await alice.history("general", limit=5)
    assert [m["id"] for m in latest["messages"]] == ids[-5:] and latest["more"]
    older = await alice.history("general", before=ids[-5], limit=5)
    assert [m["id"] for m in older["messages"]] == ids[-10:-5]
    newer = await alice.history("general", after=ids[1], limit=100)
    assert [m["id"] for m in newer["messages"]] == ids[2:] and not newer["more"]


async def test_resume_replays_exactly_the_gap_while_messages_keep_coming(start_nodes, clients):
    """A client reconnects (to the other node) with its cursor while a sender keeps sending:
    it must see every message once, in order, across the replay/live hand-over."""
    a, b = start_nodes(2)
    sender = await clients(a.ws_url, user="sender")
    reader = await clients(a.ws_url, user="reader")
    total = 300
    stop_at_disconnect = 100

    async def send_all() -> None:
        for i in range(total):
            await sender.send("general", f"s{i}")

    task = asyncio.create_task(send_all())
    got = await collect(reader, "general", stop_at_disconnect)
    await reader.close()
    # The cursor covers every frame the client received, including any still queued unread.
    got += [e for e in reader.drain_events() if e["type"] == "message"]
    cursors = {room: dict(c) for room, c in reader.cursors.items()}
    # Reconnect to node b with the cursor while sending continues.
    resumed = await clients(b.ws_url, user="reader", cursors=cursors)
    assert resumed.welcome["recovered"] == {"general": True}
    got += await collect(resumed, "general", total - len(got))
    await task
    texts = [m["text"] for m in got]
    assert texts == [f"s{i}" for i in range(total)]


async def test_unknown_epoch_is_not_recovered(start_nodes, clients):
    (a,) = start_nodes(1)
    alice = await clients(a.ws_url, user="alice")
    await alice.send("general", "x")
    late = await clients(a.ws_url, user="bob", cursors={"general": {"epoch": "nope", "id": "1-0"}})
    assert late.welcome["recovered"] == {"general": False}


async def test_gap_beyond_retention_is_not_recovered(start_nodes, clients, redis_client):
    (a,) = start_nodes(1)
    alice = await clients(a.ws_url, user="alice")
    first = await alice.send("general", "first")
    epoch = alice.welcome["rooms"][0]["epoch"]
    for i in range(5):
        await alice.send("general", f"n{i}")
    await redis_client.xtrim(Keys(16).room_stream("general"), maxlen=2, approximate=False)
    late = await clients(a.ws_url, user="bob", cursors={"general": {"epoch": epoch, "id": first["id"]}})
    assert late.welcome["recovered"] == {"general": False}


async def test_a_replay_too_big_for_the_buffer_is_not_recovered_instead_of_cut_off(start_nodes, clients):
    """A long absence in busy rooms must not overflow the returning client's buffer (4002 at
    every reconnect): rooms past the replay budget get recovered: false."""
    (a,) = start_nodes(1, CHAT_OUTBOUND_BUFFER_BYTES=16384)
    alice = await clients(a.ws_url, user="alice")
    cursor = {"epoch": alice.welcome["rooms"][0]["epoch"], "id": alice.welcome["rooms"][0]["last_id"]}
    for i in range(40):
        await alice.send("general", f"{i:03d} " + "y" * 500)
    back = await clients(a.ws_url, user="bob", cursors={"general": cursor}, reconnect=False)
    assert back.welcome["recovered"] == {"general": False}
    await alice.send("general", "still connected")
    event = await back.next_event("message")
    assert event["text"] == "still connected"


async def test_welcome_seq_matches_last_id_while_messages_flow(start_nodes, clients):
    a, b = start_nodes(2)
    sender = await clients(a.ws_url, user="sender")

    async def send_many() -> None:
        for i in range(150):
            await sender.send("general", f"w{i}")

    await sender.send("general", "w-first")  # every joiner's last_id is a real message
    task = asyncio.create_task(send_many())
    checked = 0
    for _ in range(5):
        if task.done():
            break  # no live message left to check against
        joiner = await clients(b.ws_url, user="joiner")
        room = joiner.welcome["rooms"][0]
        assert room["last_id"] != "0-0"
        if room["seq"] < 151:  # messages are still to come after this joiner's last_id
            first_live = await joiner.next_event("message")
            # The first live message is the one right after last_id: seq + 1.
            assert first_live["seq"] == room["seq"] + 1, (room, first_live)
            checked += 1
        await joiner.close()
    await task
    assert checked >= 1, "no joiner came while messages were being sent"


@pytest.mark.standalone_only
async def test_room_reads_do_not_carry_personal_streams(start_nodes, clients, redis_client):
    """Personal streams are read in their own lane: the XREAD that carries a room's messages
    names only room and ephemeral streams, never the inboxes of the node's users (which would
    be re-sent and parsed after every room message)."""
    (node,) = start_nodes(1)
    keys = Keys(16)
    users = [f"lane{i}" for i in range(40)]
    conns = [await clients(node.ws_url, user=u) for u in users]
    assert {keys.user_shard(u) for u in users} >= {keys.room_shard("general")}
    await redis_client.config_set("slowlog-max-len", 100_000)
    await redis_client.config_set("slowlog-log-slower-than", 0)
    await redis_client.slowlog_reset()
    await conns[0].request("send", room="general", text="hi", cmid="lane-1")
    for c in conns:
        while (await c.next_event(timeout=10))["type"] != "message":
            pass
    await redis_client.config_set("slowlog-log-slower-than", 10_000)
    general = keys.room_stream("general")
    reads = []
    for entry in await redis_client.slowlog_get(100_000):
        args = [a.decode() if isinstance(a, bytes) else str(a) for a in entry["command"].split()] \
            if isinstance(entry["command"], (bytes, str)) else list(entry["command"])
        if args and args[0].upper() == "XREAD" and general in args:
            reads.append(args)
    assert reads, "no XREAD of the general stream was logged"
    inboxes = {keys.user_inbox(u) for u in users}
    for args in reads:
        assert not inboxes.intersection(args), args
