"""An address that keeps getting cut off for abuse is refused at the handshake for a while."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from ..integration.wire import metric


async def test_repeated_oversize_frames_get_the_address_refused(start_nodes, clients):
    (a,) = start_nodes(1, CHAT_ABUSE_CLOSES_MAX=3, CHAT_ABUSE_PENALTY_S=30, CHAT_MAX_FRAME_BYTES=1024)
    for _ in range(3):
        async with connect(a.ws_url, compression=None, ping_interval=None) as ws:
            await ws.send('{"type":"hello","user":"flood"}')
            await ws.recv()
            await ws.send("x" * 4096)
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    await ws.recv()
            assert info.value.rcvd is None or info.value.rcvd.code == 1009
    # The node records the close when its handler unwinds, which races with our next connect.
    async with asyncio.timeout(10):
        while await metric(a.http_url, "chatcluster_abuse_closes_total") < 3:
            await asyncio.sleep(0.02)
    with pytest.raises(InvalidStatus) as refused:
        async with connect(a.ws_url, compression=None, ping_interval=None):
            pass
    assert refused.value.response.status_code == 429
    assert int(refused.value.response.headers["Retry-After"]) > 0
