"""Protocol v1.1 mentions (counts, read lowering them, alerts for offline members) and read
receipts (direct rooms across nodes, none above CHAT_RECEIPTS_ROOM_LIMIT, none for one's own)."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from node.keys import Keys

from .wire import room_of, until


async def server_alert(http_url: str, user: str, title: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            http_url + "/api/v1/alerts", json={"to": [user], "kind": "system", "title": title},
            headers={"Authorization": "Bearer test-api-key"}) as resp:
        assert resp.status == 200, await resp.text()


async def personal_alerts(redis_client, user: str) -> list[dict[str, Any]]:
    keys = Keys(16)
    entries = await redis_client.xrange(keys.user_inbox(user), "-", "+")
    events = [orjson.loads(fields[b"d"]) for _, fields in entries]
    return [e for e in events if e.get("type") == "alert"]


async def test_mentions_are_counted_and_lowered_by_reading(start_nodes, clients):
    a, b = start_nodes(2)
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(b.ws_url, user="bob")
    carol = await clients(b.ws_url, user="carol")
    room = (await alice.request("create_room", name="M", visibility="open"))["room"]["id"]
    await bob.request("join", room=room)
    await carol.request("join", room=room)
    first = await alice.send(room, "@bob look")
    await alice.send(room, "nothing for anyone @dave @alice")  # not a member; oneself
    await alice.send(room, "and @bob. again, @carol")
    last = await alice.send(room, "x@bob is no mention")

    bob2 = await clients(a.ws_url, user="bob")
    assert room_of(bob2.welcome, room)["mentions"] == 2
    assert room_of(bob2.welcome, room)["unread"] == 4
    assert (await carol.request("join", room=room))["room"]["mentions"] == 1
    assert room_of(alice.welcome, "general")["mentions"] == 0

    # Reading past the first mention lowers the count; the `unread` event says so too.
    reply = await bob.request("read", room=room, id=first["id"])
    assert (reply["unread"], reply["mentions"]) == (3, 1)
    event = await until(bob2, lambda e: e["type"] == "unread" and e["room"] == room)
    assert (event["unread"], event["mentions"]) == (3, 1)
    reply = await bob.request("read", room=room, id=last["id"])
    assert (reply["unread"], reply["mentions"]) == (0, 0)
    assert room_of((await clients(b.ws_url, user="bob")).welcome, room)["mentions"] == 0

    # The general room: any user who ever opened a session.
    await carol.send("general", "@bob in general, @nosuchuser")
    assert room_of((await clients(a.ws_url, user="bob")).welcome, "general")["mentions"] == 1


async def test_an_offline_member_gets_one_alert_an_online_one_none(start_nodes, clients, redis_client):
    (a,) = start_nodes(1)
    alice = await clients(a.ws_url, user="alice")
    await clients(a.ws_url, user="bob")  # online while mentioned: counted, never alerted
    room = (await alice.request("create_room", name="Ops", visibility="closed",
                                members=["bob", "dave"]))["room"]["id"]
    sent = await alice.send(room, "@dave @bob the deploy is done")
    await alice.send(room, "@dave again")  # a second mention: a second alert

    # Online bob: counted, not alerted. Offline dave (never connected): alerted, once per message.
    assert await personal_alerts(redis_client, "bob") == []
    alerts = await personal_alerts(redis_client, "dave")
    assert [(x["kind"], x["data"]["room"]) for x in alerts] == [("mention", room), ("mention", room)]
    assert alerts[0]["data"]["id"] == sent["id"]
    assert "deploy" not in alerts[0]["title"]

    # Delivered at the next login, once.
    dave = await clients(a.ws_url, user="dave")
    got = await until(dave, lambda e: e["type"] == "alert")
    assert got["kind"] == "mention" and got["data"] == {"room": room, "id": sent["id"]}
    await until(dave, lambda e: e["type"] == "alert")
    assert room_of(dave.welcome, room)["mentions"] == 2
    await dave.close()
    await server_alert(a.http_url, "dave", "marker")
    again = await clients(a.ws_url, user="dave")
    first = await until(again, lambda e: e["type"] == "alert")
    assert (first["kind"], first["title"]) == ("system", "marker")


async def test_receipts_in_a_direct_room_across_nodes(start_nodes, clients):
    a, b = start_nodes(2)
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(b.ws_url, user="bob")
    dm = (await alice.request("dm", user="bob"))["room"]
    assert dm["read_by"] == [{"id": "bob", "read_id": "0-0"}]
    room = dm["id"]
    await until(bob, lambda e: e["type"] == "room" and e["change"] == "added")
    sent = await alice.send(room, "seen?")
    await until(bob, lambda e: e["type"] == "message" and e["room"] == room)

    await bob.request("read", room=room, id=sent["id"])
    receipt = await until(alice, lambda e: e["type"] == "receipt")
    assert receipt == {"type": "receipt", "room": room, "user": {"id": "bob", "name": "bob"},
                       "read_id": sent["id"]}
    # Reading the same message again announces nothing; alice's own read reaches bob only.
    await bob.request("read", room=room, id=sent["id"])
    await alice.request("read", room=room, id=sent["id"])
    theirs = await until(bob, lambda e: e["type"] == "receipt")
    assert theirs["user"]["id"] == "alice"
    await alice.request("typing", room=room)
    assert (await until(bob, lambda e: e["type"] in ("receipt", "typing")))["type"] == "typing"
    # Alice's own read did not come back to her: the next receipt or typing she sees is bob's typing.
    await bob.request("typing", room=room)
    assert (await until(alice, lambda e: e["type"] in ("receipt", "typing")))["type"] == "typing"

    # A reloaded page knows what the other member has read.
    again = await clients(a.ws_url, user="alice")
    assert room_of(again.welcome, room)["read_by"] == [{"id": "bob", "read_id": sent["id"]}]


async def test_no_receipts_in_a_room_above_the_limit(start_nodes, clients):
    a, b = start_nodes(2, CHAT_RECEIPTS_ROOM_LIMIT="2")
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(b.ws_url, user="bob")
    room = (await alice.request("create_room", name="Two", visibility="open"))["room"]["id"]
    await bob.request("join", room=room)
    sent = await alice.send(room, "one")
    await bob.request("read", room=room, id=sent["id"])
    assert (await until(alice, lambda e: e["type"] == "receipt"))["user"]["id"] == "bob"
    carol = await clients(a.ws_url, user="carol")
    await carol.request("join", room=room)  # three members: above the limit
    sent = await alice.send(room, "two")
    await bob.request("read", room=room, id=sent["id"])
    await bob.request("typing", room=room)  # the same shard stream: after any receipt
    assert (await until(alice, lambda e: e["type"] in ("receipt", "typing")))["type"] == "typing"
    # Never in general.
    await bob.request("read", room="general", id=sent["id"].split("-")[0] + "-0")
    await bob.request("typing", room="general")
    assert (await until(alice, lambda e: e["type"] in ("receipt", "typing")))["room"] == "general"
