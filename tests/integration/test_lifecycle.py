"""Lifecycle: SIGTERM drains a node (readyz 503, ``reconnect``, close 4001, exit on its own) with
nothing lost for clients that fail over; ``chatcluster up`` starts a cluster and Ctrl-C leaves
nothing running."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from typing import Any

import aiohttp
import psutil

from node.client import ChatClient

from .wire import assert_node_serves

DRAIN_S = 1.0


async def collect(client: ChatClient, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(got) < n:
            event = await client.next_event("message", timeout=timeout)
            if event["room"] == "general":
                got.append(event)
    return got


async def test_sigterm_drains_and_clients_continue_on_the_other_node(start_nodes, clients):
    a, b = start_nodes(2, CHAT_DRAIN_SECONDS=DRAIN_S)
    both = [a.ws_url, b.ws_url]
    sender = await clients(both, user="sender")
    drained = [await clients(both, user=f"d{i}") for i in range(3)]
    bystander = await clients(b.ws_url, user="bystander")
    on_a = [sender, *drained]
    assert {c.welcome["node"] for c in on_a} == {a.node_id}

    acked: list[dict[str, Any]] = []
    stop, warmed_up = asyncio.Event(), asyncio.Event()

    async def keep_sending() -> None:
        while not stop.is_set():
            acked.append(await sender.send("general", f"t{len(acked)}", timeout=20))
            if len(acked) == 20:
                warmed_up.set()

    sending = asyncio.create_task(keep_sending())
    await asyncio.wait_for(warmed_up.wait(), 10)  # some traffic before the drain

    started = time.monotonic()
    a.proc.signal(signal.SIGTERM)
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(DRAIN_S):
            while True:
                async with http.get(a.http_url + "/readyz") as response:
                    body = await response.json()
                    if response.status == 503:
                        break
                    assert response.status == 200
        assert body["draining"] is True and body["ready"] is False
        async with http.get(b.http_url + "/readyz") as response:
            assert response.status == 200

    # The node exits by itself within the drain window plus a small grace.
    code = await asyncio.to_thread(a.proc.popen.wait, DRAIN_S + 4)
    assert code == 0
    assert time.monotonic() - started < DRAIN_S + 2.5

    for client in on_a:
        await asyncio.wait_for(client.wait_connected(), 10)
        async with asyncio.timeout(10):
            while client.welcomes < 2:
                await client.next_event("welcome")
    stop.set()
    await asyncio.wait_for(sending, 20)
    acked.append(await sender.send("general", "after the drain"))

    for client in on_a:
        assert client.close_codes[:1] == [4001], client.close_codes
        assert client.welcome["node"] == b.node_id
        assert client.welcome["recovered"] == {"general": True}
    for client in drained:
        got = await collect(client, len(acked))
        assert [m["id"] for m in got] == [m["id"] for m in acked]
        assert got[-1]["text"] == "after the drain"
    got = await collect(bystander, len(acked))
    assert [m["text"] for m in got] == [f"t{i}" for i in range(len(acked) - 1)] + ["after the drain"]


async def test_drained_client_gets_reconnect_event_then_4001(start_nodes, clients):
    a, b = start_nodes(2, CHAT_DRAIN_SECONDS=DRAIN_S)
    client = await clients([a.ws_url, b.ws_url], user="alice")
    client.drain_events()
    a.proc.signal(signal.SIGTERM)
    event = await client.next_event(timeout=5)
    while event["type"] == "presence":  # other users' presence may come first
        event = await client.next_event(timeout=5)
    assert event["type"] == "reconnect", event
    assert event["reason"] and isinstance(event["retry_after_ms"], int)
    assert 0 <= event["retry_after_ms"] <= DRAIN_S * 1000
    welcome = await client.next_event("welcome", timeout=10)  # the close came, then the new session
    assert client.close_codes == [4001]
    assert welcome["node"] == b.node_id
    assert await asyncio.to_thread(a.proc.popen.wait, DRAIN_S + 4) == 0
    await assert_node_serves(b.ws_url)


UP_LINE = re.compile(r"^(node-\d+)\s+(http://\S+)\s+(ws://\S+)$")


async def test_chatcluster_up_runs_a_cluster_and_ctrl_c_leaves_nothing():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "node", "up", "--nodes", "2", "--base-port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "CHAT_DRAIN_SECONDS": "1"},
    )
    descendants: list[psutil.Process] = []
    try:
        assert proc.stdout is not None
        nodes: dict[str, str] = {}
        async with asyncio.timeout(30):
            while True:
                line = (await proc.stdout.readline()).decode()
                assert line, f"chatcluster up exited early with {await proc.wait()}"
                match = UP_LINE.match(line.strip())
                if match:
                    nodes[match.group(1)] = match.group(3)
                if line.startswith("Ctrl-C"):
                    break
        assert sorted(nodes) == ["node-1", "node-2"]
        descendants = psutil.Process(proc.pid).children(recursive=True)
        names = sorted(p.name() for p in descendants)
        assert len(descendants) == 3 and any("redis" in n for n in names), names

        alice = ChatClient(nodes["node-1"], user="alice", reconnect=False)
        bob = ChatClient(nodes["node-2"], user="bob", reconnect=False)
        try:
            assert (await asyncio.wait_for(alice.start(), 10))["node"] == "node-1"
            assert (await asyncio.wait_for(bob.start(), 10))["node"] == "node-2"
            ack = await alice.send("general", "hello from node-1")
            event = await bob.next_event("message", timeout=10)
            assert (event["id"], event["text"]) == (ack["id"], "hello from node-1")
        finally:
            await alice.close()
            await bob.close()

        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        rest = (await proc.stdout.read()).decode()
        assert "stopped." in rest
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        left = [p for p in descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in left:
            p.kill()
    assert left == [], left
