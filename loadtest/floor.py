"""The kernel floor of fan-out on this machine: CPU per ``transport.write`` to a loopback socket.

One uvloop process writes a pre-built 254-byte WebSocket frame (``k`` of them per write) to each
of 1000 loopback TCP connections, 300 rounds; a second process drains them. It prints the
sender's CPU per write and per frame. No Python fan-out logic is involved, so this bounds what
any fan-out that makes one write per delivery can reach (on loopback the sender's ``send()``
also runs the receive side of TCP, so the floor is higher than with a real NIC).

    python loadtest/floor.py
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import selectors
import socket
import time

import psutil
import uvloop

N = 1000
ROUNDS = 300
FRAME = b"\x81\x7e\x00\xfa" + b"x" * 250


def reader(port: int, n: int) -> None:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            try:
                if not key.fileobj.recv(65536):  # type: ignore[union-attr]
                    return
            except BlockingIOError:
                pass


class Server(asyncio.Protocol):
    def __init__(self, transports: list[asyncio.BaseTransport]) -> None:
        self.transports = transports

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transports.append(transport)


async def run(k: int) -> None:
    transports: list = []
    server = await asyncio.get_running_loop().create_server(lambda: Server(transports), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc = mp.Process(target=reader, args=(port, N))
    proc.start()
    while len(transports) < N:
        await asyncio.sleep(0.05)
    me, peer = psutil.Process(), psutil.Process(proc.pid)
    data = FRAME * k
    t0, s0, r0 = sum(me.cpu_times()[:2]), me.cpu_times().system, sum(peer.cpu_times()[:2])
    for _ in range(ROUNDS):
        for t in transports:
            t.write(data)
        await asyncio.sleep(0.003)
    t1, s1, r1 = sum(me.cpu_times()[:2]), me.cpu_times().system, sum(peer.cpu_times()[:2])
    writes = ROUNDS * N
    print(f"{k} frame(s) per write: sender {1e6 * (t1 - t0) / writes:.2f} µs/write, "
          f"{1e6 * (t1 - t0) / writes / k:.2f} µs/frame ({(s1 - s0) / (t1 - t0):.0%} kernel); "
          f"receiver {1e6 * (r1 - r0) / writes / k:.2f} µs/frame")
    for t in transports:
        t.close()
    server.close()
    proc.terminate()
    proc.join()


if __name__ == "__main__":
    for k in (1, 2, 4):
        uvloop.run(run(k))
    time.sleep(0)
