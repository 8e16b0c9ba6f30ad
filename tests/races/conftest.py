"""Races, forced: nodes run in the test's own event loop, so a test can hold a coroutine of the
node at a named pause point (node.pauses), do the interfering thing, and release it.

Redis is real (the ``redis_server`` fixture of tests/conftest.py); clients are real WebSocket
and HTTP clients on the node's real ports.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from node import config
from node.app import Node
from tests.conftest import BASE_ENV


@pytest.fixture
async def inproc(redis_server: Any) -> AsyncIterator[Callable[..., Any]]:
    """``await inproc(**env)`` starts a node in this event loop; all stopped at teardown."""
    running: list[tuple[Node, asyncio.Task[None]]] = []

    async def start(**env: Any) -> Node:
        values = {**BASE_ENV, "CHAT_REDIS_URL": redis_server.url, "CHAT_GC_FREEZE": "0",
                  "CHAT_NODE_ID": f"inproc-{len(running) + 1}", **{k: str(v) for k, v in env.items()}}
        node = Node(config.load(values))
        task = asyncio.create_task(node.run(announce=False, signals=False))
        started = asyncio.create_task(node.started.wait())
        done, _ = await asyncio.wait({task, started}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            task.result()  # raises why it did not start
        assert started in done, "the node did not start in time"
        running.append((node, task))
        return node

    yield start
    for node, task in running:
        node.stop()
        try:
            await asyncio.wait_for(task, 10)
        except Exception:
            task.cancel()


def ws_url(node: Node) -> str:
    return f"ws://127.0.0.1:{node.ws_port}/ws"


def http_url(node: Node) -> str:
    return f"http://127.0.0.1:{node.http_port}"


async def api(node: Node, path: str, body: dict[str, Any], user: str | None = None,
              server: bool = False) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": "Bearer " + ("test-api-key" if server else f"dev:{user}")}
    async with aiohttp.ClientSession() as http, \
            http.post(http_url(node) + path, data=orjson.dumps(body), headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read())


async def command(node: Node, user: str, frame: dict[str, Any]) -> dict[str, Any]:
    status, reply = await api(node, "/api/v1/command", frame, user)
    assert status == 200 and reply["ok"], reply
    return reply["data"]


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for node state the test cannot be told about otherwise (checked every loop turn)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)
