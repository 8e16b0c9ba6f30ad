"""Redis refusing service never ends a node (issue 12 #1, #2): out of memory, a restart with
stale pooled connections, an outage during a hello. Real Redis, real nodes."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from node.client import ChatClientError
from node.embedded import start_redis

from .wire import assert_error, assert_node_serves, close_code, next_of, raw_connect, send_json


async def labelled(http_url: str, name: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(http_url + "/metrics") as response:
        text = await response.text()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{re.escape(name)}{{{re.escape(want)}}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def eventually(check, timeout: float = 15.0) -> None:
    """Poll a node's observable state (a metric) until it holds; fails at the deadline."""
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.05)


@pytest.mark.standalone_only
async def test_out_of_memory_redis_refuses_writes_and_no_node_exits(start_nodes, clients, redis_client):
    a, b = start_nodes(2, CHAT_PRESENCE_TTL=3)  # heartbeats every second
    alice = await clients(a.ws_url, user="alice")
    await clients(b.ws_url, user="bob")
    await redis_client.config_set("maxmemory-policy", "noeviction")
    await redis_client.config_set("maxmemory", 1)
    try:
        # Every node's heartbeat hits OOM (it used to end the process, all nodes at once).
        for node in (a, b):
            await eventually(lambda n=node: _errors(n, "heartbeat"))
        # A command gets `unavailable`; a hello gets `unavailable` and close 1013.
        with pytest.raises(ChatClientError) as refused:
            await alice.request("send", room="general", text="full")
        assert refused.value.code == "unavailable"
        ws = await raw_connect(b.ws_url)
        await send_json(ws, {"type": "hello", "user": "carol", "ref": 1})
        assert_error(await next_of(ws, "reply"), "unavailable", 1)
        assert await close_code(ws) == 1013
    finally:
        await redis_client.config_set("maxmemory", 0)
    for node in (a, b):
        assert node.proc.popen.poll() is None, "a node exited when Redis refused writes"
        await assert_node_serves(node.ws_url)


async def _errors(node, op: str) -> bool:
    return await labelled(node.http_url, "chatcluster_redis_errors_total", op=op) > 0


@pytest.mark.standalone_only
async def test_hellos_during_and_after_a_redis_restart(start_nodes, redis_server):
    (a,) = start_nodes(1)
    await assert_node_serves(a.ws_url)  # the pool holds connections that the restart kills
    redis_server.proc.stop(timeout=0.1)
    ws = await raw_connect(a.ws_url)
    await send_json(ws, {"type": "hello", "user": "dan", "ref": "h"})
    assert_error(await next_of(ws, "reply", timeout=15), "unavailable", "h")
    assert await close_code(ws) == 1013
    redis_server.proc = start_redis(redis_server.port)
    # The first hello after the restart is served: stale pooled sockets are retried, not 1011.
    for i in range(5):
        ws = await raw_connect(a.ws_url)
        await send_json(ws, {"type": "hello", "user": f"eve{i}"})
        frame = await next_of(ws, "welcome", timeout=15)
        assert frame["type"] == "welcome"
        await ws.close()
    assert a.proc.popen.poll() is None
