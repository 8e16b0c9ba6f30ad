"""Redis calls per operation of the common path, counted by the node itself.

Runs a node in this process on a fresh embedded Redis, then counts, from the node's own
``chatcluster_redis_command_duration_seconds_count{op}`` (one sample per Redis call or
pipeline), what each operation costs: a hello of a returning user in 10 rooms with cursors,
a send from a live session, an empty poll, an empty long-poll cycle. It also reports the sequential depth of a hello
(calls that the code awaits one after the other), which is what its latency is made of.

    python -m loadtest.redis_trips [--out loadtest/results/redis-trips-<date>.json]

Counts, not times: the figures do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from node import config
from node.app import Node
from node.embedded import start_redis
from node.metrics import METRICS
from tests.conftest import BASE_ENV
from tests.integration.wire import hello, next_reply, raw_connect, send_json
from tests.races.conftest import api, command, ws_url

N = 20


def counts() -> dict[str, float]:
    out: dict[str, float] = {}
    for family in METRICS.redis_latency.collect():
        for sample in family.samples:
            if sample.name.endswith("_count"):
                out[sample.labels["op"]] = sample.value
    return out


def per_op(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    return {op: round((after[op] - before.get(op, 0.0)) / n, 2) for op in sorted(after)
            if after[op] != before.get(op, 0.0) and op != "ping"}


async def measure() -> dict[str, Any]:
    redis = start_redis(0)
    node = Node(config.load({**BASE_ENV, "CHAT_REDIS_URL": redis.info["url"], "CHAT_GC_FREEZE": "0",
                              "CHAT_MAX_CONNECTIONS_PER_USER": "0"}))
    task = asyncio.create_task(node.run(announce=False, signals=False))
    try:
        await node.started.wait()
        rooms = [(await command(node, "u", {"type": "create_room", "name": f"r{i}", "visibility": "open"}))
                 ["room"]["id"] for i in range(9)]
        ws = await raw_connect(ws_url(node))
        welcome = await hello(ws, "u")
        cursors = {r["id"]: {"epoch": r["epoch"], "id": r["last_id"]} for r in welcome["rooms"]}
        while not all(r.healthy for r in node.fanout.readers.values() if r.topics):
            await asyncio.sleep(0.01)
        out: dict[str, Any] = {}

        before = counts()
        for i in range(N):
            await send_json(ws, {"type": "send", "room": rooms[i % len(rooms)], "text": f"m{i}", "ref": i})
            assert (await next_reply(ws))["ok"]
        out["send_from_live_session"] = per_op(before, counts(), N)

        cursors = {room: {"epoch": c["epoch"], "id": node.fanout.topics[node.keys.room_stream(room)].pos}
                   for room, c in cursors.items()}
        before = counts()
        held = []
        for _ in range(N):
            other = await raw_connect(ws_url(node))
            await hello(other, "u", cursors=cursors)
            held.append(other)
        out["hello_returning_10_rooms"] = per_op(before, counts(), N)
        for other in held:
            await other.close()

        status, session = await api(node, "/api/v1/session", {}, "p")
        body = {"cursors": session["cursors"], "wait_ms": 0,
                "personal": {"epoch": session["personal"]["epoch"], "id": session["personal"]["last_id"]}}
        before = counts()
        for _ in range(N):
            status, _ = await api(node, "/api/v1/poll", body, "p")
            assert status == 200
        out["empty_poll_10_rooms"] = per_op(before, counts(), N)

        before = counts()
        for _ in range(5):  # a long poll that waits 200 ms and times out: one empty cycle
            status, _ = await api(node, "/api/v1/poll", {**body, "wait_ms": 200}, "p")
            assert status == 200
        out["empty_long_poll_cycle_10_rooms"] = per_op(before, counts(), 5)
        await ws.close()
        return out
    finally:
        node.stop()
        await asyncio.wait_for(task, 10)
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=f"loadtest/results/redis-trips-{time.strftime('%Y-%m-%d')}.json")
    args = parser.parse_args()
    result = asyncio.run(measure())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {"commit": commit, "date": time.strftime("%Y-%m-%d %H:%M"), "runs_per_operation": N,
           "calls_per_operation": result,
           "totals": {k: round(sum(v.values()), 2) for k, v in result.items()}}
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    json.dump(doc, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
