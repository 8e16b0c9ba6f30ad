"""A send from a live session costs one Redis call (the append) and stays exact: the append
script re-checks membership, so a membership the session has not yet heard is gone is refused."""

from __future__ import annotations

from node.metrics import METRICS
from tests.integration.wire import hello, next_reply, raw_connect, send_json

from .conftest import command, until, ws_url


def calls(op: str) -> float:
    """Redis calls the node made for ``op`` (its latency histogram's count)."""
    value = METRICS.registry.get_sample_value("chatcluster_redis_command_duration_seconds_count", {"op": op})
    return value or 0.0


async def test_a_send_from_a_live_session_is_one_redis_call(inproc, redis_client):
    node = await inproc()
    room = (await command(node, "ana", {"type": "create_room", "name": "s", "visibility": "closed"}))["room"]["id"]
    ws = await raw_connect(ws_url(node))
    await hello(ws, "ana")
    # Readers check their rooms' epochs when they connect (room_meta): let them settle first.
    await until(lambda: all(r.healthy for r in node.fanout.readers.values() if r.topics))
    ops = ("append", "room_meta", "is_member")
    before = {op: calls(op) for op in ops}
    for i in range(10):
        await send_json(ws, {"type": "send", "room": room, "text": f"t{i}", "ref": i})
        assert (await next_reply(ws))["ok"]
    made = {op: calls(op) - before[op] for op in ops}
    assert made == {"append": 10, "room_meta": 0, "is_member": 0}, made
    await ws.close()


async def test_a_stale_membership_is_refused_by_the_append(inproc, redis_client):
    node = await inproc()
    room = (await command(node, "bea", {"type": "create_room", "name": "s", "visibility": "closed",
                                        "members": ["cy"]}))["room"]["id"]
    ws = await raw_connect(ws_url(node))
    await hello(ws, "cy")
    # Removed behind the session's back (no event: its cache still says member).
    await redis_client.srem(node.keys.room_members(room), "cy")
    await send_json(ws, {"type": "send", "room": room, "text": "sneaky", "ref": 1})
    reply = await next_reply(ws)
    assert reply["ok"] is False and reply["error"]["code"] == "not_found", reply
    assert await redis_client.xlen(node.keys.room_stream(room)) == 0
    await ws.close()


async def test_a_connection_that_sends_without_waiting_keeps_its_order(inproc, redis_client):
    """500 sends written back to back, without waiting for replies, to two rooms: every one is
    acked in order, and each room's history has them in the order they were sent."""
    node = await inproc()
    room = (await command(node, "bot", {"type": "create_room", "name": "b", "visibility": "open"}))["room"]["id"]
    ws = await raw_connect(ws_url(node))
    await hello(ws, "bot")
    batches = node.streams._pipe.batches
    for i in range(500):
        await send_json(ws, {"type": "send", "room": (room, "general")[i % 2], "text": f"n{i}", "ref": i})
    refs = [(await next_reply(ws, 20))["ref"] for _ in range(500)]
    assert refs == list(range(500))
    for j, target in enumerate((room, "general")):
        entries = await redis_client.xrange(node.keys.room_stream(target))
        texts = [fields[b"t"].decode() for _, fields in entries]
        assert texts == [f"n{i}" for i in range(j, 500, 2)]
    print(f"500 sends in {node.streams._pipe.batches - batches} append round trips")
    await ws.close()
