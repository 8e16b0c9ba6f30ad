"""The naive baseline for the fan-out benchmark: the same job done the obvious way.

Same inputs and outputs as a chatcluster node for the benchmark's purposes:

* same Redis data: it reads the same room streams (``XREAD`` with the node's ``COUNT``, from
  the position the room was first subscribed at) and the same membership keys
  (``general`` + the user's room set);
* same dev-auth ``hello`` -> a small ``welcome`` frame, then live ``message`` events;
* same encoding: :func:`node.protocol.message_event` + ``orjson``, once per message.

What is naive: each message is sent with ``websockets.asyncio.server.broadcast(connections,
payload, text=True)``, which frames the message again for every connection and writes each
frame with its own ``transport.write`` -- no per-tick batching, no pre-built frame. One reader
task issues one ``XREAD`` over every subscribed room (it wakes every 100 ms to pick up new
rooms), which is if anything cheaper in Redis round trips than the node's per-shard readers.

Everything else a node does (resume, presence, commands, rate limits) is absent, which also
favours the baseline.

Run: ``python -m loadtest.naive_server --redis-url redis://127.0.0.1:6379/0 --port 0``; it
prints ``CHATCLUSTER READY node=naive ws=PORT http=0`` like a node.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import orjson
import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, broadcast, serve

from node.keys import GENERAL, Keys
from node.protocol import message_event


class NaiveServer:
    def __init__(self, redis_url: str, shards: int, read_count: int) -> None:
        # A blocking pool: a burst of handshakes waits for a connection instead of failing.
        self.redis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            redis_url, max_connections=64, timeout=30))
        self.reader_conn = aioredis.Redis.from_url(redis_url, single_connection_client=True)
        self.keys = Keys(shards)
        self.read_count = read_count
        self.rooms: dict[str, set[ServerConnection]] = {}  # stream key -> connections
        self.names: dict[str, str] = {}  # stream key -> room id
        self.positions: dict[str, str] = {}  # stream key -> last id read

    async def handler(self, ws: ServerConnection) -> None:
        hello = orjson.loads(await ws.recv())
        user = str(hello["user"])
        members = await self.redis.smembers(self.keys.user_rooms(user))
        rooms = [GENERAL] + sorted(m.decode() for m in members)
        keys = []
        for room in rooms:
            key = self.keys.room_stream(room)
            if key not in self.rooms:
                last = await self.redis.xrevrange(key, "+", "-", count=1)
                if key not in self.rooms:
                    self.rooms[key] = set()
                    self.names[key] = room
                    self.positions[key] = last[0][0].decode() if last else "0-0"
            self.rooms[key].add(ws)
            keys.append(key)
        await ws.send(orjson.dumps({"type": "welcome", "user": {"id": user}}).decode())
        try:
            async for _ in ws:
                pass  # the benchmark clients send nothing after hello
        finally:
            for key in keys:
                self.rooms[key].discard(ws)

    async def read_loop(self) -> None:
        while True:
            if not self.positions:
                await asyncio.sleep(0.1)
                continue
            result = await self.reader_conn.xread(dict(self.positions), count=self.read_count,
                                                  block=100)
            for raw_key, entries in result or []:
                key = raw_key.decode()
                room = self.names[key]
                conns = self.rooms[key]
                for raw_id, fields in entries:
                    sid = raw_id.decode()
                    payload = orjson.dumps(message_event(room, sid, fields))
                    broadcast(conns, payload, text=True)
                if entries:
                    self.positions[key] = entries[-1][0].decode()


async def main(args: argparse.Namespace) -> None:
    server = NaiveServer(args.redis_url, args.shards, args.read_count)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with serve(server.handler, args.host, args.port, compression=None,
                     max_queue=8, ping_interval=20, ping_timeout=20) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        print(f"CHATCLUSTER READY node=naive ws={port} http=0", flush=True)
        reader = asyncio.create_task(server.read_loop())
        await stop.wait()
        reader.cancel()


def cli(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--read-count", type=int, default=512)
    args = parser.parse_args(argv)
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(main(args))


if __name__ == "__main__":
    cli()
