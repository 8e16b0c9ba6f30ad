"""Redis Cluster specifics: a master killed and its replica promoted under traffic.

Run with ``--redis-cluster`` (CI does). Loss is allowed only where it is reported: a receiver
either gets every acknowledged message exactly once, in order, or is told
``recovered: false`` for the room (a promoted replica may lack the newest entries, since
replication is asynchronous) -- never a silent gap.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from node.keys import Keys

from .wire import master_port_of, receive_until

pytestmark = pytest.mark.cluster_only


async def test_master_killed_and_replica_promoted_loses_nothing_silently(start_nodes, clients, redis_server):
    cluster = redis_server.cluster
    assert cluster is not None
    a, b = start_nodes(2)
    urls = [a.ws_url, b.ws_url]
    sender = await clients(urls, user="sender")
    receivers = [await clients(urls[i % 2:] + urls[:i % 2], user=f"r{i}") for i in range(4)]
    acked: list[str] = []

    async def send_all(n: int) -> None:
        for i in range(n):
            reply = await sender.send("general", f"m{i}", timeout=30)
            acked.append(reply["id"])

    await send_all(30)
    victim_port = master_port_of(cluster.ports[0], Keys(16).room_stream("general"))
    victim = next(p for p in cluster.procs if int(p.info["port"]) == victim_port)
    task = asyncio.create_task(send_all(60))
    await asyncio.sleep(0)
    victim.signal(signal.SIGKILL)
    await asyncio.wait_for(task, 60)
    assert master_port_of(next(p for p in cluster.ports if p != victim_port), Keys(16).room_stream("general")) != victim_port

    for client in receivers:
        ids, reported = await receive_until(client, "general", acked[-1])
        assert len(ids) == len(set(ids)), "a message arrived twice"
        assert ids == sorted(ids, key=lambda s: tuple(map(int, s.split("-")))), "out of order"
        missing = [i for i in acked if i not in ids]
        assert not missing or reported, f"{len(missing)} acknowledged messages lost silently"
        assert acked[-1] in ids  # chat goes on after the failover
