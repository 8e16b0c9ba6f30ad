"""Abuse resistance benchmark: a quiet user's delivery latency, alone and under a flood.

One embedded Redis and one node (default settings: 20 commands/s per connection, burst 60,
20 strikes before close 4003, 64 KiB frames). A chatter sends ``--messages`` messages at
``--rate`` per second; a listener on the same node receives them. Latency is listener receipt
minus the chatter's send time (same process, monotonic clock). Phase 1 (baseline): nothing else.
Phase 2 (flood): a separate process runs ``--command-flooders`` connections sending pings as
fast as they can (reconnecting after 4003) and ``--frame-flooders`` connections sending 100 KiB
frames (reconnecting after 1009). Both phases run in the same invocation on the same node.

    python loadtest/abuse.py --messages 300 --rate 20 --command-flooders 8 --frame-flooders 4

Prints a Markdown table; ``--json PATH`` writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402

from node.client import ChatClient  # noqa: E402
from node.embedded import start_node, start_redis  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# -- the flood (child process) -------------------------------------------------------------
# Everything runs on loopback; the node trusts 127.0.0.1 as a proxy (CHAT_TRUSTED_PROXIES), so
# the flooders present their own client address with X-Forwarded-For (a documentation-range
# address: only a header, no traffic goes there) and the quiet users keep 127.0.0.1 -- as on a
# real deployment behind HAProxy, where abusers and the people they disturb differ in address.
FLOOD_HEADERS = {"X-Forwarded-For": "198.51.100.7"}
async def _command_flooder(url: str, user: str, stop: float, stats: dict[str, int]) -> None:
    while time.monotonic() < stop:
        try:
            async with connect(url, compression=None, ping_interval=None, max_size=2**24,
                               additional_headers=FLOOD_HEADERS) as ws:
                await ws.send(json.dumps({"type": "hello", "user": user}))
                await ws.recv()

                async def read() -> None:
                    async for raw in ws:
                        if b'"rate_limited"' in (raw if isinstance(raw, bytes) else raw.encode()):
                            stats["rate_limited"] += 1

                reader = asyncio.create_task(read())
                try:
                    i = 0
                    while time.monotonic() < stop:
                        i += 1
                        await ws.send(f'{{"type":"ping","ref":{i}}}')
                        stats["commands_sent"] += 1
                        if i % 20 == 0:
                            await asyncio.sleep(0)
                finally:
                    reader.cancel()
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else 1006
            stats[f"close_{code}"] = stats.get(f"close_{code}", 0) + 1
        except (OSError, InvalidStatus, TimeoutError):
            stats["connect_errors"] += 1
            await asyncio.sleep(0.05)
        except Exception as exc:  # a flood client must never take the run down
            stats[type(exc).__name__] = stats.get(type(exc).__name__, 0) + 1
            await asyncio.sleep(0.05)


async def _frame_flooder(url: str, user: str, stop: float, stats: dict[str, int]) -> None:
    big = json.dumps({"type": "send", "room": "general", "text": "x" * 100_000})
    while time.monotonic() < stop:
        try:
            async with connect(url, compression=None, ping_interval=None, max_size=2**24,
                               additional_headers=FLOOD_HEADERS) as ws:
                await ws.send(json.dumps({"type": "hello", "user": user}))
                await ws.recv()
                while time.monotonic() < stop:
                    await ws.send(big)
                    stats["big_frames_sent"] += 1
                    await asyncio.sleep(0)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else 1006
            stats[f"close_{code}"] = stats.get(f"close_{code}", 0) + 1
        except (OSError, InvalidStatus, TimeoutError):
            stats["connect_errors"] += 1
            await asyncio.sleep(0.05)
        except Exception as exc:
            stats[type(exc).__name__] = stats.get(type(exc).__name__, 0) + 1
            await asyncio.sleep(0.05)


def flood_main(url: str, commands: int, frames: int, seconds: float, conn: Any) -> None:
    async def run() -> dict[str, int]:
        stats = {"commands_sent": 0, "rate_limited": 0, "big_frames_sent": 0, "connect_errors": 0}
        stop = time.monotonic() + seconds
        try:
            async with asyncio.timeout(seconds + 15):
                await asyncio.gather(
                    *(_command_flooder(url, f"flood-c{i}", stop, stats) for i in range(commands)),
                    *(_frame_flooder(url, f"flood-f{i}", stop, stats) for i in range(frames)),
                )
        except TimeoutError:
            stats["flooders_stuck"] = 1
        return stats

    try:
        conn.send(asyncio.run(run()))
    except BaseException as exc:
        conn.send({"flood_process_error": repr(exc)})


# -- the quiet users -------------------------------------------------------------------------
async def quiet_phase(url: str, messages: int, rate: float, tag: str) -> list[float]:
    chatter = ChatClient(url, user=f"chatter-{tag}", reconnect=False)
    listener = ChatClient(url, user=f"listener-{tag}", reconnect=False)
    await chatter.start()
    await listener.start()
    sent: dict[str, float] = {}
    latencies: list[float] = []
    got = asyncio.Event()

    async def listen() -> None:
        while len(latencies) < messages:
            event = await listener.next_event("message", timeout=30)
            key = event["text"]
            if key in sent:
                latencies.append((time.perf_counter() - sent.pop(key)) * 1000.0)
        got.set()

    task = asyncio.create_task(listen())
    start = time.perf_counter()
    for i in range(messages):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        key = f"{tag}-{i}"
        sent[key] = time.perf_counter()
        await chatter.send("general", key)
    await asyncio.wait_for(got.wait(), 30)
    await task
    await chatter.close()
    await listener.close()
    return latencies


def summary(lat: list[float]) -> dict[str, float]:
    return {"n": len(lat), "p50_ms": round(percentile(lat, 0.50), 2), "p90_ms": round(percentile(lat, 0.90), 2),
            "p99_ms": round(percentile(lat, 0.99), 2), "max_ms": round(max(lat), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--rate", type=float, default=20.0, help="chatter messages per second")
    parser.add_argument("--command-flooders", type=int, default=8)
    parser.add_argument("--frame-flooders", type=int, default=4)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)

    redis = start_redis(0)
    node = start_node({"CHAT_REDIS_URL": redis.info["url"], "CHAT_HOST": "127.0.0.1", "CHAT_WS_PORT": "0",
                       "CHAT_HTTP_PORT": "0", "CHAT_AUTH": "dev", "CHAT_LOG_FORMAT": "json",
                       "CHAT_LOG_LEVEL": "WARNING", "CHAT_NODE_ID": "abuse-1",
                       "CHAT_TRUSTED_PROXIES": "127.0.0.1"}, name="abuse-1")
    url = f"ws://127.0.0.1:{node.info['ws_port']}/ws"
    node_proc = psutil.Process(node.pid)
    try:
        cpu0 = node_proc.cpu_times()
        t0 = time.monotonic()
        baseline = asyncio.run(quiet_phase(url, args.messages, args.rate, "base"))
        base_cpu = (sum(node_proc.cpu_times()[:2]) - sum(cpu0[:2])) / (time.monotonic() - t0)

        seconds = args.messages / args.rate + 10
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        flood = ctx.Process(target=flood_main, args=(url, args.command_flooders, args.frame_flooders, seconds, child))
        flood.start()
        time.sleep(2.0)  # warm-up: let the flooders reach their steady cycle before measuring
        cpu1 = node_proc.cpu_times()
        t1 = time.monotonic()
        flooded = asyncio.run(quiet_phase(url, args.messages, args.rate, "flood"))
        flood_cpu = (sum(node_proc.cpu_times()[:2]) - sum(cpu1[:2])) / (time.monotonic() - t1)
        flood_stats = parent.recv() if parent.poll(seconds + 60) else {"flood_process": "no report"}
        flood.join(10)
        if flood.is_alive():
            flood.kill()
    finally:
        node.stop()
        redis.stop()

    doc = {
        "command": "python loadtest/abuse.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "baseline": summary(baseline), "flood": summary(flooded),
        "node_cpu": {"baseline": round(base_cpu, 2), "flood": round(flood_cpu, 2)},
        "flooders": {"command": args.command_flooders, "frame": args.frame_flooders, **flood_stats},
    }
    doc["p99_ratio"] = round(doc["flood"]["p99_ms"] / max(doc["baseline"]["p99_ms"], 0.001), 2)
    print("| phase | n | p50 ms | p90 ms | p99 ms | max ms | node CPU (cores) |")
    print("|---|---|---|---|---|---|---|")
    for phase in ("baseline", "flood"):
        s = doc[phase]
        print(f"| {phase} | {s['n']} | {s['p50_ms']} | {s['p90_ms']} | {s['p99_ms']} | {s['max_ms']} "
              f"| {doc['node_cpu'][phase]} |")
    print(f"\np99 ratio flood/baseline: {doc['p99_ratio']}")
    print("flood:", json.dumps(doc["flooders"]))
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
