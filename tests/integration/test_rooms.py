"""Rooms across two nodes: create, join, leave, invite, direct rooms, listing, and privacy."""

from __future__ import annotations

import pytest

from node.client import ChatClientError

from .wire import error_code, until


async def test_open_room_lifecycle_across_nodes(start_nodes, clients):
    a, b = start_nodes(2)
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(b.ws_url, user="bob")
    room = (await alice.request("create_room", name="Lunch plans", visibility="open"))["room"]
    assert room["kind"] == "open" and room["members"] == 1 and room["id"].startswith("r-")
    listed = (await bob.request("rooms"))["rooms"]
    assert room["id"] in [r["id"] for r in listed]
    assert [r for r in listed if r["id"] == room["id"]][0]["member"] is False
    # Bob cannot write before joining, then joins and chats with Alice across nodes.
    assert await error_code(bob.send(room["id"], "hi")) == "forbidden"
    joined = (await bob.request("join", room=room["id"]))["room"]
    assert joined["members"] == 2
    await alice.send(room["id"], "pizza?")
    got = await until(bob, lambda e: e["type"] == "message" and e["room"] == room["id"])
    assert got["text"] == "pizza?" and got["from"]["id"] == "alice"
    await bob.send(room["id"], "yes")
    got = await until(alice, lambda e: e["type"] == "message" and e["from"]["id"] == "bob")
    assert got["text"] == "yes" and got["room"] == room["id"]
    # Leaving stops delivery; the room query finds it by name.
    await bob.request("leave", room=room["id"])
    bob.drain_events()
    await alice.send(room["id"], "still there?")
    await alice.send("general", "marker")
    event = await until(bob, lambda e: e["type"] == "message")
    assert event["room"] == "general" and event["text"] == "marker"
    found = (await bob.request("rooms", query="lunch"))["rooms"]
    assert [r["id"] for r in found] == [room["id"]]
    assert await error_code(bob.request("leave", room="general")) == "bad_request"


async def test_closed_room_invite_reaches_every_session_of_the_invitee(start_nodes, clients):
    a, b = start_nodes(2)
    alice = await clients(a.ws_url, user="alice")
    bob_a = await clients(a.ws_url, user="bob")
    bob_b = await clients(b.ws_url, user="bob")
    room = (await alice.request("create_room", name="Secret", visibility="closed"))["room"]
    await alice.request("invite", room=room["id"], user="bob")
    for session in (bob_a, bob_b):
        event = await until(session, lambda e: e["type"] == "room")
        assert event["change"] == "added" and event["room"]["id"] == room["id"] and event["by"] == "alice"
    # Both of Bob's sessions, on both nodes, now receive the room's messages live.
    sent = await alice.send(room["id"], "welcome bob")
    for session in (bob_a, bob_b):
        got = await until(session, lambda e: e["type"] == "message" and e["room"] == room["id"])
        assert got["id"] == sent["id"]
    # A new session of Bob sees the room in its welcome.
    bob_c = await clients(b.ws_url, user="bob")
    assert room["id"] in [r["id"] for r in bob_c.welcome["rooms"]]


async def test_direct_room_is_deterministic_and_has_two_members(start_nodes, clients):
    a, b = start_nodes(2)
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(b.ws_url, user="bob")
    room = (await alice.request("dm", user="bob"))["room"]
    assert room["id"] == "dm:alice:bob" and room["kind"] == "direct" and room["members"] == 2
    event = await until(bob, lambda e: e["type"] == "room")
    assert event["room"]["id"] == "dm:alice:bob"
    again = (await bob.request("dm", user="alice"))["room"]
    assert again["id"] == room["id"] and again["epoch"] == room["epoch"]
    await bob.send("dm:alice:bob", "psst")
    got = await until(alice, lambda e: e["type"] == "message" and e["from"]["id"] == "bob")
    assert got["text"] == "psst"
    assert await error_code(alice.request("leave", room="dm:alice:bob")) == "bad_request"
    assert await error_code(alice.request("dm", user="alice")) == "bad_request"


async def test_outsider_learns_nothing_about_closed_and_direct_rooms(start_nodes, clients):
    """Every way to name a room one is not in answers exactly like a room that does not exist."""
    a, b = start_nodes(2)
    alice = await clients(a.ws_url, user="alice")
    await clients(a.ws_url, user="bob")
    closed = (await alice.request("create_room", name="Board", visibility="closed"))["room"]
    first = await alice.send(closed["id"], "board secret")
    direct = (await alice.request("dm", user="bob"))["room"]
    await alice.send(direct["id"], "dm secret")
    ghost = "r-doesnotexist"
    eve = await clients(b.ws_url, user="eve")

    async def outcome(coro):
        try:
            return ("ok", await coro)
        except ChatClientError as exc:
            return (exc.code, exc.message)

    for room in (closed["id"], direct["id"]):
        for probe in (
            lambda r: eve.send(r, "let me in"),
            lambda r: eve.history(r),
            lambda r: eve.history(r, after="0-0"),
            lambda r: eve.history(r, before=first["id"]),
            lambda r: eve.request("who", room=r),
            lambda r: eve.request("join", room=r),
            lambda r: eve.request("leave", room=r),
            lambda r: eve.request("read", room=r, id=first["id"]),
            lambda r: eve.request("invite", room=r, user="eve"),
        ):
            assert await outcome(probe(room)) == await outcome(probe(ghost)), room
    listed = (await eve.request("rooms"))["rooms"]
    assert {r["id"] for r in listed} == {"general"}
    assert (await eve.request("rooms", query="board"))["rooms"] == []
    where = await eve.request("where", user="alice")
    assert where["rooms"] == ["general"]
    # Resume cursors for rooms one is not in replay nothing and do not show up in welcome.
    spy = await clients(b.ws_url, user="eve", cursors={
        closed["id"]: {"epoch": closed["epoch"], "id": "0-0"},
        direct["id"]: {"epoch": direct["epoch"], "id": "0-0"},
    })
    assert set(spy.welcome["recovered"]) <= {"general"}
    assert {r["id"] for r in spy.welcome["rooms"]} == {"general"}
    spy.drain_events()
    await alice.send(closed["id"], "more secrets")
    await alice.send("general", "public marker")
    event = await until(spy, lambda e: e["type"] == "message")
    assert event["room"] == "general"


async def test_text_commands_are_never_stored(start_nodes, clients):
    (a,) = start_nodes(1)
    alice = await clients(a.ws_url, user="alice")
    await clients(a.ws_url, user="bob")
    room = (await alice.request("create_room", name="Ops", visibility="open"))["room"]
    who = await alice.send("general", "/who")
    assert who["command"] == "who" and {"id": "alice", "name": "alice"} in who["online"] and who["count"] >= 2
    rooms = await alice.send("general", "/rooms")
    assert rooms["command"] == "rooms" and room["id"] in [r["id"] for r in rooms["rooms"]]
    where = await alice.send("general", "/where bob")
    assert where["command"] == "where" and where["online"] is True
    bob = await clients(a.ws_url, user="carol")
    joined = await bob.send("general", f"/join {room['id']}")
    assert joined["command"] == "join" and joined["room"]["id"] == room["id"]
    assert (await alice.history("general"))["messages"] == []
    plain = await alice.send("general", "/shrug is not a command")
    assert "id" in plain


@pytest.mark.parametrize("text", [
    "line one\nline two",
    "windows\r\nline",
    "emoji 🎉👩‍👩‍👧‍👦 and flags 🇳🇱",
    "עברית مرحبا right-to-left \u202e",
    "x" * 4000,
    '{"type":"welcome"} <script>alert(1)</script> \\ "quotes"',
])
async def test_unusual_text_arrives_unchanged(start_nodes, clients, text):
    a, b = start_nodes(2)
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(b.ws_url, user="bob")
    await alice.send("general", text)
    got = await until(bob, lambda e: e["type"] == "message")
    assert got["text"] == text
    assert (await bob.history("general"))["messages"][-1]["text"] == text
