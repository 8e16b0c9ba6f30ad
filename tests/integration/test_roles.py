"""Protocol v1.1 roles and kicks across two nodes: set_role permissions, roles in welcome, join
and room events, kick stopping a user everywhere until invited again."""

from __future__ import annotations

from typing import Any

from tests.integration.test_webhooks import hook_env, receiver  # noqa: F401 (the fixture)

from .wire import error_code, room_of, until


async def test_set_role_permissions_and_roles_in_summaries(start_nodes, clients):
    a, b = start_nodes(2)
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(b.ws_url, user="bob")
    carol = await clients(b.ws_url, user="carol")
    created = (await alice.request("create_room", name="Team", visibility="open"))["room"]
    room = created["id"]
    assert created["role"] == "owner"
    assert (await bob.request("join", room=room))["room"]["role"] == "member"
    await carol.request("join", room=room)
    assert room_of(alice.welcome, "general")["role"] == "member"

    # Only the owner changes roles; never the owner's own; targets must be members.
    assert await error_code(bob.request("set_role", room=room, user="carol", role="admin")) == "forbidden"
    assert await error_code(alice.request("set_role", room=room, user="alice", role="member")) == "bad_request"
    assert await error_code(alice.request("set_role", room=room, user="dave", role="admin")) == "bad_request"
    assert await error_code(alice.request("set_role", room=room, user="bob", role="owner")) == "bad_request"
    assert await error_code(alice.request("set_role", room=room, user="bad id!", role="admin")) == "bad_request"
    assert await error_code(alice.request("set_role", room="general", user="bob", role="admin")) == "bad_request"

    # The target's session on the other node learns its new role.
    assert await alice.request("set_role", room=room, user="bob", role="admin") == {}
    event = await until(bob, lambda e: e["type"] == "room" and e["change"] == "updated")
    assert event["room"] == {"id": room, "role": "admin"} and event["by"] == "alice"
    # An admin still cannot change roles.
    assert await error_code(bob.request("set_role", room=room, user="carol", role="admin")) == "forbidden"

    # A new session sees it in welcome; a demotion comes the same way.
    bob2 = await clients(a.ws_url, user="bob")
    assert room_of(bob2.welcome, room)["role"] == "admin"
    assert room_of(bob2.welcome, room)["mentions"] == 0
    await alice.request("set_role", room=room, user="bob", role="member")
    event = await until(bob2, lambda e: e["type"] == "room" and e["change"] == "updated")
    assert event["room"]["role"] == "member"
    alice2 = await clients(b.ws_url, user="alice")
    assert room_of(alice2.welcome, room)["role"] == "owner"

    # A closed room one is not in stays invisible.
    secret = (await alice.request("create_room", name="S", visibility="closed"))["room"]["id"]
    assert await error_code(bob.request("set_role", room=secret, user="alice", role="admin")) == "not_found"
    # In a direct room everyone is a member and nobody changes roles.
    dm = (await alice.request("dm", user="bob"))["room"]
    assert dm["role"] == "member"
    assert await error_code(alice.request("set_role", room=dm["id"], user="bob", role="admin")) == "bad_request"


async def test_room_added_events_carry_the_role(start_nodes, clients):
    (a,) = start_nodes(1)
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(a.ws_url, user="bob")
    created = (await alice.request("create_room", name="R", visibility="closed", members=["bob"]))["room"]
    mine = await until(alice, lambda e: e["type"] == "room" and e["change"] == "added")
    theirs = await until(bob, lambda e: e["type"] == "room" and e["change"] == "added")
    assert mine["room"]["id"] == theirs["room"]["id"] == created["id"]
    assert (mine["room"]["role"], theirs["room"]["role"]) == ("owner", "member")


async def test_kick_stops_the_user_on_every_node_until_invited_again(start_nodes, clients):
    a, b = start_nodes(2)
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(b.ws_url, user="bob")
    carol_a = await clients(a.ws_url, user="carol")
    carol_b = await clients(b.ws_url, user="carol")
    dave = await clients(b.ws_url, user="dave")
    room = (await alice.request("create_room", name="Club", visibility="open"))["room"]["id"]
    for user in (bob, carol_a, dave):
        await user.request("join", room=room)
    await alice.request("set_role", room=room, user="bob", role="admin")
    await alice.request("set_role", room=room, user="dave", role="admin")
    await carol_b.send(room, "hello")  # carol's sessions get the room live
    for c in (carol_a, carol_b):
        await until(c, lambda e: e["type"] == "message" and e["room"] == room)

    # Who may kick whom.
    assert await error_code(carol_a.request("kick", room=room, user="bob")) == "forbidden"
    assert await error_code(bob.request("kick", room=room, user="alice")) == "forbidden"
    assert await error_code(bob.request("kick", room=room, user="dave")) == "forbidden"
    assert await error_code(bob.request("kick", room=room, user="bob")) == "bad_request"
    assert await error_code(bob.request("kick", room=room, user="erin")) == "bad_request"
    assert await error_code(bob.request("kick", room="general", user="carol")) == "bad_request"

    # An admin kicks a member: every session of hers, on both nodes, gets `room removed`.
    carol_a.drain_events()
    carol_b.drain_events()
    assert await bob.request("kick", room=room, user="carol") == {}
    for c in (carol_a, carol_b):
        removed = await until(c, lambda e: e["type"] == "room")
        assert removed["change"] == "removed" and removed["room"]["id"] == room and removed["by"] == "bob"

    # Live delivery stopped: the room's next message does not reach her, the marker after it does.
    await alice.send(room, "after the kick")
    await alice.send("general", "marker")
    for c in (carol_a, carol_b):
        event = await until(c, lambda e: e["type"] == "message")
        assert (event["room"], event["text"]) == ("general", "marker")

    # Send (both the live session's path and HTTP-like path), history, typing, join: refused.
    assert await error_code(carol_a.send(room, "let me in")) == "forbidden"
    assert await error_code(carol_b.request("history", room=room)) == "forbidden"
    assert await error_code(carol_b.request("typing", room=room)) == "forbidden"
    assert await error_code(carol_a.request("join", room=room)) == "forbidden"
    assert room not in [r["id"] for r in (await clients(b.ws_url, user="carol")).welcome["rooms"]]
    members = (await alice.request("join", room=room))["room"]["members"]
    assert members == 3

    # The owner kicks an admin; an invitation lifts the kick.
    await alice.request("kick", room=room, user="dave")
    assert await error_code(dave.request("join", room=room)) == "forbidden"
    await bob.request("invite", room=room, user="carol")
    added = await until(carol_b, lambda e: e["type"] == "room" and e["change"] == "added")
    assert added["room"]["id"] == room and added["room"]["role"] == "member"
    await carol_b.send(room, "back")
    got = await until(alice, lambda e: e["type"] == "message" and e["room"] == room and e["from"]["id"] == "carol"
                      and e["text"] == "back")
    assert got["text"] == "back"
    # Dave, still kicked, joins nothing; an admin he was, a member he is when invited back.
    await alice.request("invite", room=room, user="dave")
    assert room_of(await dave_welcome(clients, a.ws_url), room)["role"] == "member"


async def dave_welcome(clients, url: str) -> dict[str, Any]:
    return (await clients(url, user="dave")).welcome


async def test_a_kicked_user_cannot_rejoin_a_closed_room_they_were_invited_to(start_nodes, clients):
    (a,) = start_nodes(1)
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(a.ws_url, user="bob")
    room = (await alice.request("create_room", name="C", visibility="closed", members=["bob"]))["room"]["id"]
    await alice.request("kick", room=room, user="bob")
    assert await error_code(bob.request("join", room=room)) == "forbidden"
    assert await error_code(bob.request("history", room=room)) == "not_found"
    await alice.request("invite", room=room, user="bob")
    assert (await bob.request("history", room=room))["messages"] == []


async def test_a_kick_is_a_webhook_membership_change(start_nodes, clients, receiver):  # noqa: F811
    (a,) = start_nodes(1, **hook_env(receiver))
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(a.ws_url, user="bob")
    room = (await alice.request("create_room", name="W", visibility="open"))["room"]["id"]
    await bob.request("join", room=room)
    await alice.request("kick", room=room, user="bob")

    def kicked() -> list[dict[str, Any]]:
        return [e for e in receiver.events(room) if e["type"] == "member" and e["change"] == "kicked"]

    await receiver.wait_for(lambda: bool(kicked()))
    assert [(e["user"], e["by"]) for e in kicked()] == [("bob", "alice")]
