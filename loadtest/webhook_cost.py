"""What webhooks cost the append path in Redis, and how fast one shard's webhooks go out.

    python loadtest/webhook_cost.py [--appends 20000]

1. **Append cost.** Starts its own Redis and runs the node's append script (``APPEND_LUA``)
   ``--appends`` times into one room, in pipelines of 100, with webhooks off (outbox maxlen
   '0') and on: Redis's time per ``EVALSHA`` (``INFO commandstats``, usec_per_call) and the
   outbox's memory per waiting event (``MEMORY USAGE``). The alternative the outbox could have
   taken -- a copy of the event (text included) -- is measured too, for its memory.
2. **Delivery rate.** One node (webhooks on) and a local receiver that answers 204 at once:
   ``--events`` messages into ``general`` (one shard), time from the first POST to the last,
   i.e. one shard's sequential delivery rate against an instant endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import redis
from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from node.client import ChatClient  # noqa: E402
from node.embedded import start_node, start_redis  # noqa: E402
from node.keys import Keys  # noqa: E402
from node.streams import APPEND_LUA, ENSURE_ROOM_LUA  # noqa: E402
from node.webhooks import outbox_xadd  # noqa: E402

# The alternative: the outbox carries the event itself (author, name, text).
COPY_LUA = APPEND_LUA.replace(
    outbox_xadd("KEYS[5]", "ARGV[11]", "'r'", "ARGV[12]", "'i'", "id"),
    outbox_xadd("KEYS[5]", "ARGV[11]", "'r'", "ARGV[12]", "'i'", "id", "'f'", "ARGV[2]", "'n'", "ARGV[3]",
                "'t'", "ARGV[4]"))


def append_cost(client: redis.Redis, n: int, text: str, rounds: int = 3) -> dict[str, Any]:
    """Each variant ``rounds`` times, interleaved; the least time per append is kept (the
    machine may be shared: the minimum is the cost, the rest is interference)."""
    out: dict[str, Any] = {}
    for r in range(rounds):
        for label, result in append_round(client, n, text, r).items():
            best = out.get(label)
            if best is None or result["usec_per_append"] < best["usec_per_append"]:
                out[label] = result
    return out


def append_round(client: redis.Redis, n: int, text: str, r: int) -> dict[str, Any]:
    keys = Keys(16)
    out: dict[str, Any] = {}
    for label, script, maxlen in (("off", APPEND_LUA, "0"), ("reference", APPEND_LUA, "1000000"),
                                  ("copy", COPY_LUA, "1000000")):
        room = f"cost-{label}-{r}"
        client.eval(ENSURE_ROOM_LUA, 1, keys.room_meta(room), "e1", "open", room, "", 0)
        sha = client.script_load(script)
        outbox = keys.webhook_outbox(keys.room_shard(room))
        client.delete(outbox)
        client.config_resetstat()
        start = time.perf_counter()
        for base in range(0, n, 100):
            pipe = client.pipeline(transaction=False)
            for i in range(base, min(n, base + 100)):
                pipe.evalsha(sha, 5, keys.room_stream(room), keys.room_meta(room),
                             keys.room_cmid(room, "u", f"~{label}{i}"), keys.room_members(room), outbox,
                             10000, "u", "User", text, f"~{label}{i}", "", 60, 0, "", "", maxlen, room)
            pipe.execute()
        wall = time.perf_counter() - start
        stats = client.info("commandstats")["cmdstat_evalsha"]
        length = client.xlen(outbox)
        memory = client.memory_usage(outbox, samples=0) or 0
        out[label] = {"usec_per_append": stats["usec_per_call"], "wall_s": round(wall, 3),
                      "outbox_entries": length,
                      "outbox_bytes_per_entry": round(memory / length, 1) if length else 0}
    return out


async def delivery_rate(redis_url: str, events: int) -> dict[str, Any]:
    stamps: list[float] = []
    done = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        stamps.append(time.perf_counter())
        if len(stamps) >= events:
            done.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    env = {"CHAT_AUTH": "dev", "CHAT_HOST": "127.0.0.1", "CHAT_WS_PORT": "0", "CHAT_HTTP_PORT": "0",
           "CHAT_REDIS_URL": redis_url, "CHAT_RATE_PER_S": "100000", "CHAT_RATE_BURST": "100000",
           "CHAT_WEBHOOK_URL": f"http://127.0.0.1:{port}/hook", "CHAT_WEBHOOK_SECRET": "bench"}
    node = start_node(env, name="bench-node")
    try:
        client = ChatClient(f"ws://127.0.0.1:{node.info['ws_port']}/ws", user="bench")
        await client.start()
        await asyncio.gather(*(client.send("general", f"event {i}") for i in range(events)))
        await asyncio.wait_for(done.wait(), 300)
        await client.close()
    finally:
        node.stop(5)
        await runner.cleanup()
    span = stamps[-1] - stamps[0]
    return {"events": events, "seconds": round(span, 3), "events_per_s_one_shard": round((events - 1) / span)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--appends", type=int, default=20000)
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--text-bytes", type=int, default=100)
    args = ap.parse_args()
    proc = start_redis(0)
    try:
        client = redis.Redis.from_url(proc.info["url"])
        result = {"append": append_cost(client, args.appends, "x" * args.text_bytes)}
        client.close()
        result["delivery"] = asyncio.run(delivery_rate(proc.info["url"], args.events))
    finally:
        proc.stop(1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
