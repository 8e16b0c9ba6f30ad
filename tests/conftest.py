"""Shared fixtures: a real redis-server per test on a free port, real nodes as subprocesses.

Nothing is shared between tests: every test gets its own Redis and its own nodes, on ports the
OS picked, and everything is killed (process groups) at teardown.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from node.client import ChatClient
from node.embedded import Proc, RedisClusterProcs, start_node, start_redis, start_redis_cluster


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--redis-cluster", action="store_true", default=False,
                     help="run against a real 3-master/3-replica Redis Cluster instead of one Redis")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "standalone_only: needs a single Redis server (restarts it, etc.)")
    config.addinivalue_line("markers", "cluster_only: needs Redis Cluster (failover, slots)")


def use_cluster(config: pytest.Config) -> bool:
    return bool(config.getoption("--redis-cluster") or os.environ.get("CHAT_TEST_REDIS") == "cluster")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cluster = use_cluster(config)
    for item in items:
        if cluster and item.get_closest_marker("standalone_only"):
            item.add_marker(pytest.mark.skip(reason="needs a single Redis server"))
        if not cluster and item.get_closest_marker("cluster_only"):
            item.add_marker(pytest.mark.skip(reason="needs --redis-cluster"))


@dataclass
class RedisHandle:
    proc: Proc
    url: str
    port: int
    cluster: RedisClusterProcs | None = None

    def restart(self) -> None:
        """Kill Redis (no persistence) and start an empty one on the same port."""
        assert self.cluster is None, "mark the test standalone_only"
        self.proc.stop(timeout=0.1)
        self.proc = start_redis(self.port)

    def client(self) -> Any:
        if self.cluster is not None:
            from redis.asyncio.cluster import RedisCluster

            return RedisCluster(host="127.0.0.1", port=self.port)
        return aioredis.Redis.from_url(self.url)


@dataclass
class NodeHandle:
    proc: Proc
    env: dict[str, str]

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.proc.info['ws_port']}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.proc.info['http_port']}"

    @property
    def node_id(self) -> str:
        return self.proc.info["node_id"]


@pytest.fixture
def redis_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisHandle]:
    """A Redis of this test's own: one server, or with ``--redis-cluster`` a real cluster of
    three masters and three replicas (then ``url`` is a ``redis+cluster://`` URL)."""
    if use_cluster(request.config):
        cluster = start_redis_cluster(3, 1, log_dir=str(tmp_path))
        handle = RedisHandle(cluster.procs[0], cluster.url, cluster.ports[0], cluster)
        yield handle
        cluster.stop()
        return
    proc = start_redis(0, log_path=str(tmp_path / "redis.log"))
    handle = RedisHandle(proc, proc.info["url"], int(proc.info["port"]))
    yield handle
    handle.proc.stop(timeout=1)


@pytest.fixture
async def redis_client(redis_server: RedisHandle) -> AsyncIterator[Any]:
    client = redis_server.client()
    yield client
    await client.aclose()


BASE_ENV = {
    "CHAT_AUTH": "dev",
    "CHAT_HOST": "127.0.0.1",
    "CHAT_WS_PORT": "0",
    "CHAT_HTTP_PORT": "0",
    "CHAT_LOG_FORMAT": "json",
    "CHAT_API_KEY": "test-api-key",
    "CHAT_JWT_SECRET": "test-jwt-secret",
    "CHAT_DRAIN_SECONDS": "2",
    # Tests send faster than a person; the rate limit has tests of its own.
    "CHAT_RATE_PER_S": "100000",
    "CHAT_RATE_BURST": "100000",
    # Tests of abuse reconnect from 127.0.0.1 again and again; the penalty box has its own test.
    "CHAT_ABUSE_CLOSES_MAX": "0",
    # A loaded CI machine's lag spikes would refuse handshakes (503) at random; admission control
    # has its own tests (tests/unit/test_admission.py, tests/faults/test_admission.py).
    "CHAT_ADMISSION_MAX_LAG_MS": "0",
}


@pytest.fixture
def start_nodes(redis_server: RedisHandle, tmp_path: Path) -> Iterator[Callable[..., list[NodeHandle]]]:
    """``start_nodes(n, **env)`` starts ``n`` nodes on the test's Redis; all stopped at teardown."""
    started: list[NodeHandle] = []

    def start(n: int = 1, **env: Any) -> list[NodeHandle]:
        out = []
        for _ in range(n):
            i = len(started) + 1
            full = {**BASE_ENV, "CHAT_REDIS_URL": redis_server.url, "CHAT_NODE_ID": f"node-{i}",
                    **{k: str(v) for k, v in env.items()}}
            proc = start_node(full, name=f"node-{i}", log_path=str(tmp_path / f"node-{i}.log"))
            handle = NodeHandle(proc, full)
            started.append(handle)
            out.append(handle)
        return out

    yield start
    for handle in started:
        handle.proc.stop(timeout=5)
    if os.environ.get("CHAT_TEST_SHOW_LOGS"):
        for log in sorted(tmp_path.glob("node-*.log")):
            print(log.read_text()[-4000:])


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., Any]]:
    """``await clients(url_or_urls, user=...)`` connects a ChatClient closed at teardown."""
    made: list[ChatClient] = []

    async def make(urls: Any, **kwargs: Any) -> ChatClient:
        client = ChatClient(urls, **kwargs)
        made.append(client)
        await asyncio.wait_for(client.start(), 15)
        return client

    yield make
    for client in made:
        await client.close()
