"""Extension of ``who`` (v1.1): in created rooms each online user carries their ``role``, so a
member list can show roles and offer moderation; ``general`` and direct rooms carry none."""

from __future__ import annotations


async def test_who_lists_roles_in_created_rooms_only(start_nodes, clients):
    a, b = start_nodes(2)
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(b.ws_url, user="bob")
    carol = await clients(b.ws_url, user="carol")
    room = (await alice.request("create_room", name="Crew", visibility="open"))["room"]["id"]
    await bob.request("join", room=room)
    await carol.request("join", room=room)
    await alice.request("set_role", room=room, user="bob", role="admin")

    who = await carol.request("who", room=room)
    assert who["count"] == 3
    assert [(u["id"], u["role"]) for u in who["online"]] == [("alice", "owner"), ("bob", "admin"), ("carol", "member")]

    await alice.request("set_role", room=room, user="bob", role="member")
    who = await alice.request("who", room=room, limit=2)
    assert [(u["id"], u["role"]) for u in who["online"]] == [("alice", "owner"), ("bob", "member")]

    assert all("role" not in u for u in (await bob.request("who", room="general"))["online"])
    dm = (await alice.request("dm", user="bob"))["room"]["id"]
    assert all("role" not in u for u in (await alice.request("who", room=dm))["online"])
