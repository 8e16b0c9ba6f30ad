"""Faults: a node killed with SIGKILL under load, Redis restarted empty, a client that never
reads. Clients fail over like behind a load balancer (two URLs) and nothing is lost or doubled."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import aiohttp
import pytest

from node.client import ChatClient, ChatClientError
from node.embedded import start_redis

from .wire import masked_frame, metric, read_until_close, ws_handshake


async def collect(client: ChatClient, room: str, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(got) < n:
            event = await client.next_event("message", timeout=timeout)
            if event["room"] == room:
                got.append(event)
    return got


async def assert_nothing_more(sender: ChatClient, receivers: list[ChatClient], room: str) -> None:
    """No duplicate is still on its way: a marker is each receiver's very next message."""
    marker = await sender.send(room, "marker")
    for receiver in receivers:
        event = (await collect(receiver, room, 1))[0]
        assert (event["id"], event["text"]) == (marker["id"], "marker")


async def test_sigkill_of_a_node_under_load_loses_and_doubles_nothing(start_nodes, clients):
    a, b = start_nodes(2)
    both = [a.ws_url, b.ws_url]
    sender = await clients(both, user="sender")
    on_a = [await clients(both, user=f"ra{i}") for i in range(2)]
    on_b = [await clients([b.ws_url, a.ws_url], user=f"rb{i}") for i in range(2)]
    receivers = on_a + on_b
    assert {r.welcome["node"] for r in on_a} == {a.node_id}
    assert {r.welcome["node"] for r in on_b} == {b.node_id}
    total, kill_after = 400, 120
    acked: list[dict[str, Any]] = []
    halfway = asyncio.Event()

    async def send_all() -> None:
        for i in range(total):
            acked.append(await sender.send("general", f"k{i}", timeout=20))
            if i == kill_after:
                halfway.set()

    sending = asyncio.create_task(send_all())
    await asyncio.wait_for(halfway.wait(), 20)
    a.proc.signal(signal.SIGKILL)
    await asyncio.wait_for(sending, 30)
    assert a.proc.popen.wait(5) == -signal.SIGKILL

    assert len({m["id"] for m in acked}) == total  # a retried send was deduplicated, not re-sent
    assert sender.welcomes >= 2 and sender.welcome["node"] == b.node_id  # it did fail over
    for receiver in receivers:
        got = await collect(receiver, "general", total)
        assert [m["text"] for m in got] == [f"k{i}" for i in range(total)]
        assert [m["id"] for m in got] == [m["id"] for m in acked]
    for receiver in on_a:
        assert receiver.welcomes == 2 and receiver.welcome["node"] == b.node_id
        assert receiver.welcome["recovered"] == {"general": True}
    await assert_nothing_more(sender, receivers, "general")
    page = await on_b[0].history("general", limit=3)
    assert [m["text"] for m in page["messages"]] == ["k398", "k399", "marker"]


@pytest.mark.standalone_only
async def test_redis_restarted_empty_gives_new_epoch_and_chat_recovers(start_nodes, clients, redis_server):
    a, b = start_nodes(2)
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(b.ws_url, user="bob")
    old_epoch = alice.welcome["rooms"][0]["epoch"]
    first = await alice.send("general", "before the crash")
    assert (await collect(bob, "general", 1))[0]["id"] == first["id"]
    old_cursor = {"general": {"epoch": old_epoch, "id": first["id"]}}

    # Redis dies (no persistence): a send is refused with `unavailable`, promptly.
    redis_server.proc.stop(timeout=0.1)
    try:
        async with asyncio.timeout(8):
            await alice.request("send", room="general", text="into the void", cmid="void-1")
        raise AssertionError("a send succeeded while Redis was down")
    except ChatClientError as exc:
        assert exc.code == "unavailable", exc
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(5):
            while True:
                async with http.get(a.http_url + "/readyz") as response:
                    if response.status == 503:
                        break
                await asyncio.sleep(0.05)  # polling an HTTP condition, with a deadline

    # An empty Redis comes back on the same port.
    redis_server.proc = start_redis(redis_server.port)
    updates = []
    for client in (alice, bob):
        event = await client.next_event("room", timeout=15)
        assert event["change"] == "updated" and event["recovered"] is False, event
        assert event["room"]["id"] == "general"
        updates.append(event["room"]["epoch"])
    new_epoch = updates[0]
    assert new_epoch != old_epoch and updates[1] == new_epoch

    # A client coming back with its old cursor is told to reload.
    late = await clients(b.ws_url, user="carol", cursors=old_cursor)
    assert late.welcome["recovered"] == {"general": False}
    assert late.welcome["rooms"][0]["epoch"] == new_epoch

    # Chat works again, across the nodes, and the lost message is gone for good.
    sent = [await alice.send("general", f"after {i}") for i in range(3)]
    for client in (bob, late, alice):
        got = await collect(client, "general", 3)
        assert [m["id"] for m in got] == [s["id"] for s in sent]
        assert [m["text"] for m in got] == ["after 0", "after 1", "after 2"]
        assert [m["seq"] for m in got] == [1, 2, 3]
    page = await bob.history("general")
    assert [m["text"] for m in page["messages"]] == ["after 0", "after 1", "after 2"]


async def _flood_until_cut_off(a: Any, sender: ChatClient, acked: list[dict[str, Any]]) -> None:
    """Send 4 KB messages in batches until the node has cut a slow client off; the kernel
    buffers between the node and that client hold a few MB at most."""
    text = "x" * 3900
    for _ in range(100):
        acked += await asyncio.gather(*(sender.send("general", f"{len(acked) + i:05d} {text}")
                                        for i in range(50)))
        if await metric(a.http_url, SLOW_METRIC) >= 1:
            return
    raise AssertionError("the slow consumer was never cut off")


SLOW_METRIC = "chatcluster_slow_consumer_disconnects_total"
OPEN_METRIC = 'chatcluster_connections_open{transport="ws"}'


async def test_slow_consumer_is_cut_off_4002_and_others_get_everything(start_nodes, clients):
    (a,) = start_nodes(1, CHAT_OUTBOUND_BUFFER_BYTES=32 * 1024)
    slow = await asyncio.to_thread(ws_handshake, "127.0.0.1", int(a.proc.info["ws_port"]), 4096)
    try:
        slow.sendall(masked_frame(b'{"type": "hello", "user": "sloth"}'))
        reader = await clients(a.ws_url, user="reader")
        sender = await clients(a.ws_url, user="sender")
        assert await metric(a.http_url, SLOW_METRIC) == 0
        acked: list[dict[str, Any]] = []
        await _flood_until_cut_off(a, sender, acked)
        # The slow client, once it reads, finds whole frames and then the close frame 4002.
        slow_read = asyncio.create_task(asyncio.to_thread(read_until_close, slow, 10.0))
        acked += [await sender.send("general", f"{len(acked):05d} after")]
        assert await metric(a.http_url, SLOW_METRIC) == 1

        got = await collect(reader, "general", len(acked), timeout=30)
        acked.sort(key=lambda m: m["seq"])
        assert [m["id"] for m in got] == [m["id"] for m in acked]
        assert [m["seq"] for m in got] == list(range(1, len(acked) + 1))

        code, frames = await slow_read
        assert code == 4002, code
        # welcome and a few presence events besides messages: far fewer frames than were sent
        assert 1 <= frames < len(acked) + 5
    finally:
        slow.close()
    assert a.proc.alive()


async def test_slow_consumer_that_never_reads_is_dropped(start_nodes, clients):
    """After 4002 the node must not keep a client that never reads (and its buffer) forever."""
    (a,) = start_nodes(1, CHAT_OUTBOUND_BUFFER_BYTES=32 * 1024)
    slow = await asyncio.to_thread(ws_handshake, "127.0.0.1", int(a.proc.info["ws_port"]), 4096)
    try:
        slow.sendall(masked_frame(b'{"type": "hello", "user": "sloth"}'))
        sender = await clients(a.ws_url, user="sender")
        assert await metric(a.http_url, OPEN_METRIC) == 2
        await _flood_until_cut_off(a, sender, [])
        async with asyncio.timeout(8):  # the node aborts the socket after a short grace
            while await metric(a.http_url, OPEN_METRIC) != 1:
                await asyncio.sleep(0.1)  # polling a metric, with a deadline
        # The node still serves the others.
        ack = await sender.send("general", "still here")
        assert ack["seq"] >= 1
    finally:
        slow.close()
