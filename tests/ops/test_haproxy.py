"""The cluster behind HAProxy, with deploy/haproxy.cfg rendered for local ports: routing, the
spread of connections, a drain under traffic with nothing lost, and an unready node out."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from node.client import ChatClient
from node.embedded import start_redis
from node.protocol import stream_id_tuple

from .haproxy import HAProxy, NodePorts, haproxy_binary, server_states, start_haproxy

pytestmark = pytest.mark.skipif(haproxy_binary() is None, reason="haproxy is not installed")

NAMES = ("node1", "node2", "node3")  # the server names of deploy/haproxy.cfg


@pytest.fixture
def haproxy(tmp_path: Path):
    started: list[HAProxy] = []

    def start(nodes: list[Any]) -> HAProxy:
        lb = start_haproxy({name: NodePorts(int(n.proc.info["ws_port"]), int(n.proc.info["http_port"]))
                            for name, n in zip(NAMES, nodes, strict=True)}, tmp_path)
        started.append(lb)
        return lb

    yield start
    for lb in started:
        lb.proc.stop(timeout=2)


async def wait_for_states(lb: HAProxy, want: dict[str, str], within: float = 10.0) -> dict[Any, Any]:
    """Poll HAProxy's stats until every named server has the wanted status in both backends."""
    states: dict[Any, Any] = {}
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(within):
            while True:
                async with http.get(lb.stats_url) as response:
                    states = server_states(await response.text())
                if all(states[(backend, name)]["status"] == status
                       for name, status in want.items() for backend in ("ws", "http")):
                    return states
                await asyncio.sleep(0.05)  # polling HAProxy's view, with a deadline
    except TimeoutError:
        seen = {key: (row["status"], row.get("check_status"), row.get("check_code")) for key, row in states.items()}
        raise AssertionError(f"HAProxy never saw {want}: {seen}") from None


async def general_messages(client: ChatClient, n: int, within: float = 20.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(within):
        while len(got) < n:
            event = await client.next_event("message", timeout=within)
            if event["room"] == "general":
                got.append(event)
    return got


async def test_routes_through_haproxy(start_nodes, haproxy, clients):
    nodes = start_nodes(3)
    lb = haproxy(nodes)
    await wait_for_states(lb, dict.fromkeys(NAMES, "UP"))
    async with aiohttp.ClientSession() as http:
        async with http.get(lb.http_url + "/") as response:
            assert response.status == 200 and "text/html" in response.headers["Content-Type"]
        async with http.get(lb.http_url + "/static/chatcluster.js") as response:
            assert response.status == 200
        for private in ("/metrics", "/healthz", "/readyz", "/nope"):
            async with http.get(lb.http_url + private) as response:
                assert response.status == 404, private
                assert "chatcluster_" not in await response.text()
        served_by = set()
        for _ in range(6):  # round-robin per request, keep-alive or not
            async with http.get(lb.http_url + "/api/v1/config") as response:
                assert response.status == 200
                served_by.add((await response.json())["node"])
        assert len(served_by) >= 2, served_by
        # The polling fallback works through the balancer, each poll on any node.
        poll = {"cursors": {}, "personal": None, "wait_ms": 0, "interval_ms": 1000, "focused": True}
        async with http.post(lb.http_url + "/api/v1/poll", json=poll,
                             headers={"Authorization": "Bearer dev:poller"}) as response:
            assert response.status == 200
            assert (await response.json())["next_poll_ms"] >= 1000

    alice = await clients(lb.ws_url, user="alice")
    bob = await clients(lb.ws_url, user="bob")
    assert alice.welcome["node"] != bob.welcome["node"]  # leastconn
    sent = await alice.send("general", "through the balancer")
    assert (await general_messages(bob, 1))[0]["id"] == sent["id"]


async def test_drain_under_traffic_behind_haproxy_loses_nothing(start_nodes, haproxy, clients):
    nodes = start_nodes(3, CHAT_DRAIN_SECONDS=1)
    by_id = {n.node_id: n for n in nodes}
    lb = haproxy(nodes)
    await wait_for_states(lb, dict.fromkeys(NAMES, "UP"))

    # Sequential connects, leastconn: the connections spread over the nodes.
    everyone = [await clients(lb.ws_url, user=f"u{i}") for i in range(9)]
    placement = {c.welcome["node"] for c in everyone}
    assert len(placement) >= 2, placement
    target = max(placement, key=lambda n: sum(c.welcome["node"] == n for c in everyone))
    on_target = [c for c in everyone if c.welcome["node"] == target]
    elsewhere = [c for c in everyone if c.welcome["node"] != target]
    assert on_target and elsewhere
    # Two senders: one on the drained node (its sends must survive the failover), one not.
    senders = [on_target[0], elsewhere[0]]
    acked: list[dict[str, Any]] = []
    stop = asyncio.Event()
    progress = asyncio.Condition()

    async def keep_sending(sender: ChatClient, tag: str) -> None:
        i = 0
        while not stop.is_set():
            reply = await sender.send("general", f"{tag}-{i}", timeout=20)
            i += 1
            async with progress:
                acked.append(reply)
                progress.notify_all()

    async def until_acked(n: int) -> None:
        async with asyncio.timeout(20), progress:
            await progress.wait_for(lambda: len(acked) >= n)

    sending = [asyncio.create_task(keep_sending(s, tag)) for s, tag in zip(senders, "ab", strict=True)]
    await until_acked(20)

    drained_name = NAMES[nodes.index(by_id[target])]
    nodes_left = [n for n in NAMES if n != drained_name]
    by_id[target].proc.signal(signal.SIGTERM)
    assert await asyncio.to_thread(by_id[target].proc.popen.wait, 6) == 0
    states = await wait_for_states(lb, {drained_name: "DOWN", **dict.fromkeys(nodes_left, "UP")})
    assert states[("ws", drained_name)]["status"] == "DOWN"

    for client in on_target:  # each came back through HAProxy, on another node
        await asyncio.wait_for(client.wait_connected(), 10)
        async with asyncio.timeout(10):
            while client.welcomes < 2:
                await client.next_event("welcome")
        assert client.welcome["node"] != target
        assert client.close_codes[:1] == [4001], client.close_codes
        assert client.welcome["recovered"] == {"general": True}
    await until_acked(len(acked) + 20)  # traffic continues after the failover
    stop.set()
    await asyncio.wait_for(asyncio.gather(*sending), 20)

    expected = sorted((m["id"] for m in acked), key=stream_id_tuple)
    assert len(set(expected)) == len(expected)
    for client in everyone:
        got = await general_messages(client, len(expected))
        assert [m["id"] for m in got] == expected  # all of them, exactly once, in order
        assert not [e for e in client.drain_events() if e.get("type") == "message"]


async def test_unready_node_gets_no_new_connections(start_nodes, haproxy, clients, tmp_path):
    """A node whose /readyz says 503 (here: its Redis is gone) is taken out of both backends
    by the health checks, while its process is still up and listening."""
    other = start_redis(0, log_path=str(tmp_path / "redis-b.log"))
    try:
        a, b = start_nodes(2)
        lonely = start_nodes(1, CHAT_REDIS_URL=other.info["url"])[0]
        lb = haproxy([a, b, lonely])
        await wait_for_states(lb, dict.fromkeys(NAMES, "UP"))
        other.stop(timeout=0.1)
        states = await wait_for_states(lb, {"node1": "UP", "node2": "UP", "node3": "DOWN"})
        for backend in ("ws", "http"):  # taken out by the answer, not by a dead socket
            assert states[(backend, "node3")]["check_status"] == "L7STS", states[(backend, "node3")]
            assert states[(backend, "node3")]["check_code"] == "503"
        assert lonely.proc.alive()
        got = [await clients(lb.ws_url, user=f"n{i}") for i in range(6)]
        assert {c.welcome["node"] for c in got} == {a.node_id, b.node_id}
        async with aiohttp.ClientSession() as http:
            for _ in range(6):
                async with http.get(lb.http_url + "/api/v1/config") as response:
                    assert (await response.json())["node"] != lonely.node_id
    finally:
        other.stop(timeout=0.1)
