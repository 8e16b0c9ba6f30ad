"""Rolling restart of every node behind HAProxy (deploy/haproxy.cfg rendered for local ports)
under traffic: SIGTERM one node at a time, wait until it has drained and exited and its
replacement (same ports, so the same HAProxy server slot) is UP, then the next. Every client is
moved at least once and receives every message exactly once, in order."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tests.ops.haproxy import NodePorts, haproxy_binary, start_haproxy

from .common import Sender, assert_exact_sequence, expected_ids, wait_for_states

pytestmark = pytest.mark.skipif(haproxy_binary() is None, reason="haproxy is not installed")

NAMES = ("node1", "node2", "node3")  # the server slots of deploy/haproxy.cfg
DRAIN_S = 0.6


async def test_rolling_restart_of_every_node_through_haproxy_loses_nothing(parallel_nodes, clients,
                                                                          tmp_path: Path):
    nodes = dict(zip(NAMES, await parallel_nodes.start(3, CHAT_DRAIN_SECONDS=DRAIN_S), strict=True))
    ports = {name: NodePorts(int(n.proc.info["ws_port"]), int(n.proc.info["http_port"]))
             for name, n in nodes.items()}
    lb = start_haproxy(ports, tmp_path)
    try:
        await wait_for_states(lb, dict.fromkeys(NAMES, "UP"))
        everyone = [await clients(lb.ws_url, user=f"u{i}") for i in range(9)]
        first_nodes = {c.welcome["node"] for c in everyone}
        assert first_nodes == {n.node_id for n in nodes.values()}, first_nodes  # leastconn spread
        senders = [Sender(everyone[0], "a").start(), Sender(everyone[4], "b").start()]
        await senders[0].until(10)

        for name in NAMES:
            old = nodes[name]
            old.proc.signal(signal.SIGTERM)
            # Draining answers /readyz 503, so HAProxy takes the slot out before the exit.
            await wait_for_states(lb, {name: "DOWN"})
            assert await asyncio.to_thread(old.proc.popen.wait, DRAIN_S + 5) == 0
            (new,) = await parallel_nodes.start(1, CHAT_DRAIN_SECONDS=DRAIN_S, CHAT_WS_PORT=ports[name].ws,
                                 CHAT_HTTP_PORT=ports[name].http)
            await wait_for_states(lb, {name: "UP"})
            nodes[name] = new
            for sender in senders:  # traffic goes on between the steps
                await sender.more(5)
        for sender in senders:
            await sender.stop()
        ids = expected_ids(*senders)
        assert len(ids) >= 40
        new_ids = {n.node_id for n in nodes.values()}
        for client in everyone:
            await assert_exact_sequence(client, ids)
            assert client.welcomes >= 2 and 4001 in client.close_codes, (client.user, client.close_codes)
            assert client.welcome["node"] in new_ids
            assert client.welcome["recovered"] == {"general": True}
    finally:
        lb.proc.stop(timeout=2)
