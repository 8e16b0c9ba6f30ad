"""python-socketio peer for loadtest/bench.py: one aiohttp process (uvloop), WebSocket and polling transports,
``socketio.AsyncRedisManager`` on the benchmark's Redis.

    python loadtest/peers/socketio_py.py --redis redis://127.0.0.1:6379 --port 0

Clients emit ``join`` (a room id) and get ``joined`` back. Messages arrive through the Redis
manager: the benchmark publisher PUBLISHes on the manager's channel exactly what
``AsyncRedisManager(write_only=True).emit("message", m, room=r)`` publishes (a pickled ``emit``
dict), so the server does the fan-out alone. Prints the same READY line as a chatcluster node.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import socketio
import uvloop
from aiohttp import web


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--redis", default="redis://127.0.0.1:6379")
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args()
    mgr = socketio.AsyncRedisManager(a.redis)
    sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=mgr,
                               transports=["polling", "websocket"],
                               cors_allowed_origins="*", http_compression=False,
                               compression_threshold=1 << 30)

    @sio.on("join")
    async def join(sid: str, room: str) -> None:
        await sio.enter_room(sid, str(room))
        await sio.emit("joined", str(room), to=sid)

    app = web.Application()
    sio.attach(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", a.port, backlog=4096)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"CHATCLUSTER READY node=socketio-py ws={port} http=0", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    uvloop.run(main())
