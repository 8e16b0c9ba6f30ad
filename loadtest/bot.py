"""One connection that sends fast (a bot, an integration): ack latency and order, open loop.

Starts Redis and one node (``python -m node node`` from ``--tree``, default this checkout, so
two trees can be compared side by side in one run), connects one WebSocket client and sends
``--rate`` messages per second for ``--seconds`` seconds on a fixed schedule (open loop: a slow
server does not slow the sender), each to one of two rooms. Reports ack latency from the
scheduled send time (p50, p99, max), whether the step kept up (acks within the run + 1 s), and
whether each room's history has the messages in the order they were sent.

    python -m loadtest.bot [--rate 2000] [--seconds 5] [--tree PATH ...] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from node.embedded import start_node, start_redis
from node.keys import Keys

REPO = Path(__file__).resolve().parents[1]


def commit_of(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def run_one(tree: Path, rate: int, seconds: float) -> dict[str, Any]:
    redis = start_redis(0)
    env = {"CHAT_AUTH": "dev", "CHAT_HOST": "127.0.0.1", "CHAT_WS_PORT": "0", "CHAT_HTTP_PORT": "0",
           "CHAT_REDIS_URL": redis.info["url"], "CHAT_RATE_PER_S": "100000", "CHAT_RATE_BURST": "100000",
           "CHAT_LOG_LEVEL": "WARNING", "PYTHONPATH": str(tree)}
    cwd = os.getcwd()
    os.chdir(tree)  # `python -m node` resolves the package of that tree
    try:
        node = start_node(env, name="bot-node")
    finally:
        os.chdir(cwd)
    try:
        async with connect(f"ws://127.0.0.1:{node.info['ws_port']}/ws", compression=None, max_size=2**24) as ws:
            await ws.send(orjson.dumps({"type": "hello", "user": "bot"}).decode())
            while orjson.loads(await ws.recv())["type"] != "welcome":
                pass
            await ws.send(orjson.dumps({"type": "create_room", "name": "bot", "visibility": "open", "ref": "c"}).decode())
            while True:
                frame = orjson.loads(await ws.recv())
                if frame.get("ref") == "c":
                    room = frame["data"]["room"]["id"]
                    break
            total = int(rate * seconds)
            scheduled: dict[int, float] = {}
            latencies: list[float] = []
            done = asyncio.Event()
            refs: list[int] = []

            async def reader() -> None:
                async for raw in ws:
                    frame = orjson.loads(raw)
                    if frame.get("type") == "reply" and isinstance(frame.get("ref"), int):
                        assert frame["ok"], frame
                        refs.append(frame["ref"])
                        latencies.append(time.perf_counter() - scheduled[frame["ref"]])
                        if len(refs) == total:
                            done.set()
                            return

            task = asyncio.create_task(reader())
            start = time.perf_counter() + 0.2
            for i in range(total):
                at = start + i / rate
                delay = at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                scheduled[i] = at
                await ws.send(orjson.dumps({"type": "send", "room": (room, "general")[i % 2],
                                            "text": f"b{i}", "ref": i}).decode())
            kept_up = True
            try:
                await asyncio.wait_for(done.wait(), 1.0 + seconds)
            except TimeoutError:
                kept_up = False
            task.cancel()
        client = aioredis.Redis.from_url(redis.info["url"])
        keys = Keys(16)
        ordered = True
        for j, target in enumerate((room, "general")):
            texts = [f[b"t"].decode() for _, f in await client.xrange(keys.room_stream(target))]
            ordered = ordered and texts == [f"b{i}" for i in range(j, total, 2)][:len(texts)]
        await client.aclose()
        return {"tree": str(tree), "commit": commit_of(tree), "rate": rate, "seconds": seconds, "sent": total,
                "acked": len(refs), "kept_up": kept_up, "acks_in_order": refs == sorted(refs),
                "history_in_order": ordered,
                "p50_ms": round(pct(latencies, 0.5) * 1000, 2), "p99_ms": round(pct(latencies, 0.99) * 1000, 2),
                "max_ms": round(max(latencies, default=float("nan")) * 1000, 2)}
    finally:
        node.stop(timeout=5)
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--tree", action="append", default=[], help="checkout whose node to run (repeatable)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    trees = [Path(t).resolve() for t in args.tree] or [REPO]
    results = [asyncio.run(run_one(tree, args.rate, args.seconds)) for tree in trees]
    doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(sys.argv), "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    json.dump(doc, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
