"""Edits and deletes (PROTOCOL 5.1/5.2) against real nodes: live across nodes, resume, polling,
history folding, permissions, deleted text gone from Redis, unread counts."""

from __future__ import annotations

from typing import Any

import aiohttp

from node.archive import archive, read_archive
from node.client import ChatClient
from node.keys import Keys

from .test_polling import Poller
from .test_webhooks import Receiver, hook_env, signed
from .test_webhooks import receiver as receiver  # the fixture
from .wire import error_code, until

KEYS = Keys(16)



async def events_until(client: ChatClient, last: Any, timeout: float = 10.0) -> list[dict]:
    """Every room event (message, edit, delete) up to the one ``last`` accepts, in order."""
    out = []
    while True:
        event = await client.next_event(timeout=timeout)
        if event["type"] in ("message", "edit", "delete"):
            out.append(event)
            if last(event):
                return out



def brief(event: dict) -> tuple:
    return (event["type"], event["id"], event.get("text"))


async def test_edit_and_delete_reach_sessions_on_other_nodes_in_order(start_nodes, clients):
    a, b = start_nodes(2)
    alice = await clients(a.ws_url, user="alice", name="Alice")
    bob = await clients(b.ws_url, user="bob")
    m1 = await alice.send("general", "first draft")
    m2 = await alice.send("general", "oops")
    edited = await alice.edit("general", m1["id"], "final text")
    assert set(edited) == {"id", "edited_at"} and edited["id"] == m1["id"]
    assert edited["edited_at"] >= m1["ts"]
    deleted = await alice.delete("general", m2["id"])
    assert deleted == {"id": m2["id"]}
    m3 = await alice.send("general", "after")
    got = await events_until(bob, lambda e: e.get("id") == m3["id"])
    assert [brief(e) for e in got] == [("message", m1["id"], "first draft"), ("message", m2["id"], "oops"),
                                       ("edit", m1["id"], "final text"), ("delete", m2["id"], None),
                                       ("message", m3["id"], "after")]
    edit, delete = got[2], got[3]
    assert edit == {"type": "edit", "room": "general", "id": m1["id"], "text": "final text",
                    "edited_at": edited["edited_at"], "by": {"id": "alice", "name": "Alice"},
                    "entry_id": edit["entry_id"]}
    assert "seq" not in edit and "seq" not in delete
    assert delete["by"] == {"id": "alice", "name": "Alice"} and "text" not in delete
    assert delete["deleted_seq"] == m2["seq"]  # extension: the hole it leaves is accounted for
    # Each is an entry of its own, between the messages around it.
    assert m2["id"] < edit["entry_id"] < delete["entry_id"] < m3["id"]
    # The author's own other session (same node) gets them too.
    own = await events_until(alice, lambda e: e["type"] == "delete")
    assert [e["type"] for e in own if e["type"] != "message"] == ["edit", "delete"]
    # m3 follows m1 and m2 with consecutive seqs: edits and deletes take none.
    assert m3["seq"] == m1["seq"] + 2


async def test_resume_gets_exactly_the_missed_edits_and_deletes(start_nodes, clients):
    a, b = start_nodes(2)
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(b.ws_url, user="bob")
    kept = await alice.send("general", "kept")
    seen = await alice.send("general", "seen then deleted")
    await until(bob, lambda e: e.get("id") == seen["id"])
    cursor = dict(bob.cursors["general"])
    assert cursor["id"] == seen["id"]
    await bob.close()
    # While Bob is away: an edit of a message he saw, a message he misses with its edit and
    # delete, the delete of the message his cursor points at, one more message.
    await alice.edit("general", kept["id"], "kept, edited")
    missed = await alice.send("general", "missed and deleted")
    await alice.edit("general", missed["id"], "missed, edited")
    await alice.delete("general", missed["id"])
    await alice.delete("general", seen["id"])
    last = await alice.send("general", "last")
    bob2 = await clients(b.ws_url, user="bob", cursors={"general": cursor})
    assert bob2.welcome["recovered"]["general"] is True
    got = await events_until(bob2, lambda e: e.get("id") == last["id"])
    assert [brief(e) for e in got] == [("edit", kept["id"], "kept, edited"), ("delete", missed["id"], None),
                                       ("delete", seen["id"], None), ("message", last["id"], "last")]
    # Once: nothing more follows (a live marker message is the next event).
    marker = await alice.send("general", "marker")
    assert brief(await until(bob2, lambda e: e["type"] in ("message", "edit", "delete"))) == \
        ("message", marker["id"], "marker")
    # A cursor on an edit entry that a later delete removed is resumable too.
    cursor2 = dict(bob2.cursors["general"])
    doomed = await alice.send("general", "doomed")
    await until(bob2, lambda e: e.get("id") == doomed["id"])
    await alice.edit("general", doomed["id"], "doomed, edited")
    on_edit = await until(bob2, lambda e: e["type"] == "edit")
    cursor3 = dict(bob2.cursors["general"])
    assert cursor3["id"] == on_edit["entry_id"] and cursor3 != cursor2
    await bob2.close()
    await alice.delete("general", doomed["id"])
    bob3 = await clients(a.ws_url, user="bob", cursors={"general": cursor3})
    assert bob3.welcome["recovered"]["general"] is True
    got = await events_until(bob3, lambda e: e["type"] == "delete")
    assert [brief(e) for e in got] == [("delete", doomed["id"], None)]


async def test_polling_client_edits_and_gets_edits_and_deletes(start_nodes, clients):
    a, b = start_nodes(2)
    alice = await clients(a.ws_url, user="alice")
    async with aiohttp.ClientSession() as http:
        pat = Poller(http, [a.http_url, b.http_url], "pat")
        await pat.start()
        m1 = await alice.send("general", "hello pat")
        events = await pat.poll()
        assert [brief(e) for e in events] == [("message", m1["id"], "hello pat")]
        # Pat's own message, edited over /api/v1/command (the same dispatcher as the socket).
        status, body = await pat.call("/api/v1/command", {"type": "send", "room": "general", "text": "typo"})
        assert status == 200, body
        mine = body["data"]["id"]
        status, body = await pat.call("/api/v1/command", {"type": "edit", "room": "general", "id": mine,
                                                          "text": "fixed"})
        assert status == 200 and body["data"]["id"] == mine, body
        status, body = await pat.call("/api/v1/command", {"type": "edit", "room": "general", "id": m1["id"],
                                                          "text": "not mine"})
        assert status == 403 and body["error"]["code"] == "forbidden", body
        await alice.delete("general", m1["id"])
        events = await pat.poll(wait_ms=5000)
        assert [brief(e) for e in events] == [("message", mine, "typo"), ("edit", mine, "fixed"),
                                              ("delete", m1["id"], None)]
        # The cursor moved to the delete entry; the next poll repeats nothing.
        assert pat.cursors["general"]["id"] == events[-1]["entry_id"]
        assert await pat.poll() == []
        status, body = await pat.call("/api/v1/command", {"type": "history", "room": "general"})
        assert status == 200
        assert [(m["id"], m.get("text"), m.get("deleted")) for m in body["data"]["messages"]] == [
            (m1["id"], None, True), (mine, "fixed", None)]


async def test_history_returns_messages_in_their_latest_state(start_nodes, clients):
    (a,) = start_nodes(1)
    alice = await clients(a.ws_url, user="alice", name="Alice")
    bob = await clients(a.ws_url, user="bob")
    sent = [await alice.send("general", f"m{i}") for i in range(12)]
    ids = [s["id"] for s in sent]
    # Many edit entries between the messages: pages must still hold `limit` messages.
    for round_ in range(3):
        for i in (1, 2, 3, 4, 5, 6, 7):
            await alice.edit("general", ids[i], f"m{i} v{round_}")
    await alice.delete("general", ids[2])
    await alice.delete("general", ids[10])
    edited_at = (await alice.edit("general", ids[11], "m11 last"))["edited_at"]
    expected: list[tuple[str, str | None, bool | None]] = []
    for i, sid in enumerate(ids):
        if i in (2, 10):
            expected.append((sid, None, True))
        elif 1 <= i <= 7:
            expected.append((sid, f"m{i} v2", None))
        elif i == 11:
            expected.append((sid, "m11 last", None))
        else:
            expected.append((sid, f"m{i}", None))

    def shape(messages: list[dict]) -> list[tuple]:
        return [(m["id"], m.get("text"), m.get("deleted")) for m in messages]

    page = await bob.history("general", limit=100)
    assert shape(page["messages"]) == expected and page["more"] is False
    tomb = page["messages"][2]
    assert tomb == {"room": "general", "id": ids[2], "seq": sent[2]["seq"], "ts": sent[2]["ts"],
                    "from": {"id": "alice", "name": "Alice"}, "deleted": True}
    assert page["messages"][11]["edited_at"] == edited_at
    assert "edited_at" not in page["messages"][0]
    # Backwards and forwards in pages of 3: every page full, the same sequence.
    pages, before = [], None
    while True:
        page = await bob.history("general", limit=3, **({"before": before} if before else {}))
        pages.append(page["messages"])
        if not page["more"]:
            break
        assert len(page["messages"]) == 3
        before = page["messages"][0]["id"]
    assert shape([m for p in reversed(pages) for m in p]) == expected
    forward, after = [], "0-0"
    while True:
        page = await bob.history("general", limit=3, after=after)
        forward += page["messages"]
        if not page["more"]:
            break
        assert len(page["messages"]) == 3
        after = page["messages"][-1]["id"]
    assert shape(forward) == expected
    # A page bounded by a tombstone's id.
    page = await bob.history("general", limit=2, before=ids[3])
    assert shape(page["messages"]) == expected[1:3] and page["more"] is True


async def test_permissions_and_bad_input(start_nodes, clients):
    (a,) = start_nodes(1)
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(a.ws_url, user="bob")
    carol = await clients(a.ws_url, user="carol")
    room = (await alice.request("create_room", name="Team", visibility="closed", members=["bob"]))["room"]["id"]
    await until(bob, lambda e: e["type"] == "room" and e["change"] == "added")
    by_alice = await alice.send(room, "alice's")
    by_bob = await bob.send(room, "bob's")
    # Not the author: no edit, no delete (bob is a plain member).
    assert await error_code(bob.edit(room, by_alice["id"], "hijack")) == "forbidden"
    assert await error_code(bob.delete(room, by_alice["id"])) == "forbidden"
    # Not a member of the closed room: as if it did not exist.
    assert await error_code(carol.edit(room, by_alice["id"], "x")) == "not_found"
    assert await error_code(carol.delete(room, by_alice["id"])) == "not_found"
    # The owner may delete a member's message, not edit it.
    assert await error_code(alice.edit(room, by_bob["id"], "x")) == "forbidden"
    assert (await alice.delete(room, by_bob["id"])) == {"id": by_bob["id"]}
    # Deleted, unknown, or an edit entry rather than a message: not_found.
    assert await error_code(bob.edit(room, by_bob["id"], "again")) == "not_found"
    assert await error_code(alice.delete(room, by_bob["id"])) == "not_found"
    assert await error_code(alice.edit(room, "1-0", "x")) == "not_found"
    edit_entry = (await alice.edit(room, by_alice["id"], "v2"))
    on_edit = await until(bob, lambda e: e["type"] == "edit")
    assert on_edit["edited_at"] == edit_entry["edited_at"]
    assert await error_code(alice.edit(room, on_edit["entry_id"], "x")) == "not_found"
    assert await error_code(alice.delete(room, on_edit["entry_id"])) == "not_found"
    # A member who left can no longer edit their own messages.
    by_bob2 = await bob.send(room, "leaving soon")
    await bob.request("leave", room=room)
    assert await error_code(bob.edit(room, by_bob2["id"], "x")) in ("forbidden", "not_found")
    assert await error_code(bob.delete(room, by_bob2["id"])) in ("forbidden", "not_found")
    # Bad input.
    mine = await alice.send("general", "mine")
    assert await error_code(alice.edit("general", "nope", "x")) == "bad_request"
    assert await error_code(alice.edit("general", mine["id"], "   ")) == "bad_request"
    assert await error_code(alice.edit("general", mine["id"], "x" * 5000)) == "too_large"
    assert await error_code(alice.request("edit", room="general", id=mine["id"])) == "bad_request"
    assert await error_code(alice.request("delete", room="general", id=7)) == "bad_request"
    assert await error_code(alice.delete("no such room", mine["id"])) == "bad_request"
    # System messages cannot be edited.
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{a.http_url}/api/v1/rooms/general/messages", json={"text": "Deploy at 5"},
                             headers={"Authorization": "Bearer test-api-key"}) as response:
            assert response.status == 200
            system = await response.json()
    sysuser = await clients(a.ws_url, user="system")
    assert await error_code(sysuser.edit("general", system["id"], "x")) == "bad_request"
    # Nor deleted by a user who happens to be called "system" (only an owner or admin could).
    assert await error_code(sysuser.delete("general", system["id"])) == "forbidden"
    # The connection survived all of it.
    assert (await alice.edit("general", mine["id"], "mine, edited"))["id"] == mine["id"]


async def _all_values(redis: Any) -> list[bytes]:
    """The raw contents of every key of the data set (all masters of a cluster)."""
    out: list[bytes] = []
    async for key in redis.scan_iter(match="*", count=1000):
        kind = (await redis.type(key)).decode()
        out.append(key)
        if kind == "stream":
            for sid, fields in await redis.xrange(key):
                out += [sid, *fields.keys(), *fields.values()]
        elif kind == "hash":
            for f, v in (await redis.hgetall(key)).items():
                out += [f, v]
        elif kind == "zset":
            out += await redis.zrange(key, 0, -1)
        elif kind == "set":
            out += list(await redis.smembers(key))
        elif kind == "list":
            out += await redis.lrange(key, 0, -1)
        elif kind == "string":
            out.append(await redis.get(key))
    return out


async def test_deleted_text_is_gone_from_redis(start_nodes, clients, redis_client):
    (a,) = start_nodes(1)
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(a.ws_url, user="bob")
    secret = await alice.send("general", "SECRET-ORIGINAL-4711", cmid="c-secret")
    await alice.edit("general", secret["id"], "SECRET-EDIT-ONE")
    await alice.edit("general", secret["id"], "SECRET-EDIT-TWO")
    kept = await alice.send("general", "KEPT-TEXT")
    await alice.edit("general", kept["id"], "KEPT-EDITED")
    values = b"\n".join(v for v in await _all_values(redis_client) if v)
    assert b"SECRET-ORIGINAL-4711" in values and b"SECRET-EDIT-TWO" in values  # the scan sees texts
    assert b"SECRET-EDIT-ONE" not in values  # a superseded edit is removed at once
    await alice.delete("general", secret["id"])
    await until(bob, lambda e: e["type"] == "delete")
    values = b"\n".join(v for v in await _all_values(redis_client) if v)
    assert b"SECRET" not in values
    assert b"KEPT-TEXT" in values and b"KEPT-EDITED" in values
    page = await bob.history("general")
    assert [(m["id"], m.get("text"), m.get("deleted")) for m in page["messages"]] == [
        (secret["id"], None, True), (kept["id"], "KEPT-EDITED", None)]


async def test_unread_counts_ignore_edits_and_deletes(start_nodes, clients):
    a, b = start_nodes(2)
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(b.ws_url, user="bob")
    room = (await alice.request("dm", user="bob"))["room"]["id"]
    await until(bob, lambda e: e["type"] == "room")
    await bob.close()
    sent = [await alice.send(room, f"u{i}") for i in range(3)]
    await alice.edit(room, sent[0]["id"], "u0 edited")
    edit_entry = (await until(alice, lambda e: e["type"] == "edit"))["entry_id"]
    await alice.delete(room, sent[1]["id"])
    bob2 = await clients(b.ws_url, user="bob")
    summary = next(r for r in bob2.welcome["rooms"] if r["id"] == room)
    assert summary["unread"] == 3 and summary["seq"] == sent[-1]["seq"]
    # A read marker on an edit entry (no seq of its own) counts the messages before it.
    assert (await bob2.request("read", room=room, id=edit_entry))["unread"] == 0
    # Reading up to the newest entry (the delete entry) too.
    delete_entry = summary["last_id"]
    assert delete_entry > sent[-1]["id"]
    assert (await bob2.request("read", room=room, id=delete_entry))["unread"] == 0
    await alice.edit(room, sent[2]["id"], "u2 edited")
    await until(bob2, lambda e: e["type"] == "edit")
    bob3 = await clients(a.ws_url, user="bob")
    assert next(r for r in bob3.welcome["rooms"] if r["id"] == room)["unread"] == 0


async def test_archive_exports_the_folded_state(start_nodes, clients, redis_client, tmp_path):
    (a,) = start_nodes(1)
    alice = await clients(a.ws_url, user="alice")
    sent = [await alice.send("general", f"a{i}") for i in range(5)]
    edited_at = (await alice.edit("general", sent[1]["id"], "a1 edited"))["edited_at"]
    await alice.delete("general", sent[3]["id"])
    await alice.edit("general", sent[4]["id"], "a4 edited")
    out = tmp_path / "archive.jsonl.gz"
    result = await archive(a.env["CHAT_REDIS_URL"], 0, out, batch=2)
    lines = [line for line in read_archive(out) if line["room"] == "general"]
    assert [(line["id"], line.get("text"), line.get("deleted")) for line in lines] == [
        (sent[0]["id"], "a0", None), (sent[1]["id"], "a1 edited", None), (sent[2]["id"], "a2", None),
        (sent[3]["id"], None, True), (sent[4]["id"], "a4 edited", None)]
    assert lines[1]["edited_at"] == edited_at and lines[3]["from"]["id"] == "alice"
    assert result.exported == 5
    # Exported and trimmed with their edit and delete entries; their fold state is gone too.
    assert await redis_client.xlen(KEYS.room_stream("general")) == 0
    for key in (KEYS.room_folds("general"), KEYS.room_edited("general"), KEYS.room_tombs("general")):
        assert await redis_client.exists(key) == 0, key
    again = await archive(a.env["CHAT_REDIS_URL"], 0, tmp_path / "again.jsonl.gz")
    assert again.exported == 0
    assert (await alice.history("general"))["messages"] == []


async def test_edits_and_deletes_are_webhook_events_in_order(start_nodes, clients, receiver: Receiver):
    # The endpoint holds the first delivery, so everything below happens before the rest goes out.
    receiver.policy = lambda payload, attempt: None
    (a,) = start_nodes(1, **hook_env(receiver, CHAT_WEBHOOK_TIMEOUT="20", CHAT_WEBHOOK_LEASE="60"))
    alice = await clients(a.ws_url, user="alice", name="Alice")
    m0 = await alice.send("general", "w0")
    await receiver.wait_for(lambda: receiver.held == 1)
    m1 = await alice.send("general", "w1")
    await alice.edit("general", m0["id"], "w0 edited")
    await alice.delete("general", m1["id"])
    receiver.policy = lambda payload, attempt: 200
    receiver.release()
    await receiver.wait_for(lambda: any(e["type"] == "delete" for e in receiver.events("general")))
    got = receiver.events("general")
    # w1 was deleted before its delivery: its text is never sent, its delete is.
    assert [brief(e) for e in got] == [("message", m0["id"], "w0"), ("edit", m0["id"], "w0 edited"),
                                       ("delete", m1["id"], None)]
    assert got[1]["by"] == {"id": "alice", "name": "Alice"} and all(signed(r) for r in receiver.requests)
    assert all(b"w1" not in r["body"] for r in receiver.requests)


async def test_fold_state_of_trimmed_messages_is_pruned(start_nodes, clients, redis_client):
    (a,) = start_nodes(1, CHAT_HISTORY_MAXLEN=10)
    alice = await clients(a.ws_url, user="alice")
    old = [await alice.send("general", f"old{i}") for i in range(4)]
    await alice.edit("general", old[0]["id"], "old0 edited")
    await alice.edit("general", old[1]["id"], "old1 edited")
    await alice.delete("general", old[2]["id"])
    await alice.delete("general", old[3]["id"])
    folds, edited, tombs, ops = (KEYS.room_folds("general"), KEYS.room_edited("general"),
                                 KEYS.room_tombs("general"), KEYS.room_tomb_ops("general"))
    assert await redis_client.hlen(folds) == 4 and await redis_client.zcard(tombs) == 2
    # Enough traffic for the approximate MAXLEN to trim the first entries away.
    stream = KEYS.room_stream("general")
    while (await redis_client.xrange(stream, "-", "+", count=1))[0][0].decode() <= old[-1]["id"]:
        for i in range(50):
            await alice.send("general", f"new{i}")
    recent = await alice.send("general", "recent")
    await alice.edit("general", recent["id"], "recent edited")
    # The next edit pruned the records of the trimmed messages; only the new one is left.
    assert await redis_client.hkeys(folds) == [recent["id"].encode()]
    assert await redis_client.zcard(edited) == 1
    assert await redis_client.zcard(tombs) == 0 and await redis_client.zcard(ops) == 0
    page = await alice.history("general", limit=100)
    assert all(not m.get("deleted") for m in page["messages"])
