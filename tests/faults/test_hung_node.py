"""A hung node (SIGSTOP) for longer than the keepalive: its clients notice the missing pongs,
fail over to the other node with their cursors and miss nothing; after SIGCONT the node reaps
the dead connections and serves again."""

from __future__ import annotations

import asyncio
import signal

from tests.integration.wire import assert_node_serves

from .common import OPEN_WS, Sender, Tracker, expected_ids, metric, wait_ready

PING_S = 0.3  # client keepalive: a silent node is given up after about 2 x PING_S


async def test_sigstopped_node_is_detected_by_ping_timeout_and_clients_fail_over(parallel_nodes, clients):
    # The senders are paced (~400 messages/s together): a failover's gap stays far below the
    # replay limit even on a loaded machine.
    a, b = await parallel_nodes.start(2, CHAT_PING_INTERVAL_S=1, CHAT_REPLAY_LIMIT=5000)
    fast = {"ping_interval": PING_S, "ping_timeout": PING_S}
    on_a = [await clients([a.ws_url, b.ws_url], user=f"ra{i}", **fast) for i in range(3)]
    on_b = [await clients([b.ws_url, a.ws_url], user=f"rb{i}", **fast) for i in range(2)]
    sender_a = await clients([a.ws_url, b.ws_url], user="sender-a", **fast)
    sender_b = await clients([b.ws_url, a.ws_url], user="sender-b", **fast)
    assert {c.welcome["node"] for c in [*on_a, sender_a]} == {a.node_id}
    moved = [Tracker(c) for c in [*on_a, sender_a]]
    stayed = [Tracker(c) for c in [*on_b, sender_b]]
    senders = [Sender(sender_a, "a").start(), Sender(sender_b, "b").start()]
    await senders[0].until(10)
    await senders[1].until(10)

    a.proc.signal(signal.SIGSTOP)  # hung: its sockets stay open, nothing answers
    try:
        loop = asyncio.get_running_loop()
        stopped_at = loop.time()
        for tracker in moved:
            await tracker.until(lambda t: len(t.welcomes) >= 2, "failover welcome", within=10)
        detected_in = loop.time() - stopped_at
        for tracker in moved:
            welcome = tracker.welcomes[1]
            assert welcome["node"] == b.node_id and welcome["recovered"] == {"general": True}
            # A hung node sends no close frame: the client's keepalive gave up on it (1006).
            assert tracker.client.close_codes[:1] == [1006], tracker.client.close_codes
        assert detected_in < 5, detected_in
        await senders[0].more(10)  # the hung node's sender goes on from the other node
        await senders[1].more(10)
        assert a.proc.alive()
    finally:
        a.proc.signal(signal.SIGCONT)

    for sender in senders:
        await sender.stop()
    ids = expected_ids(*senders)
    for tracker in moved + stayed:
        await tracker.exact(ids)
    assert all(len(t.welcomes) == 1 for t in stayed)  # the healthy node's clients noticed nothing

    # The node recovers: it reaps the connections whose clients left, is ready, and serves.
    await wait_ready(a.http_url, 200)
    async with asyncio.timeout(10):
        while await metric(a.http_url, OPEN_WS) != 0:
            await asyncio.sleep(0.1)  # polling a metric, with a deadline
    for tracker in moved + stayed:
        assert len(tracker.messages) == len(ids)  # no late duplicate arrived meanwhile
        assert len(tracker.welcomes) == (2 if tracker in moved else 1)
        tracker.stop()
    await assert_node_serves(a.ws_url)
