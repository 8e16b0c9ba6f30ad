"""Flood resistance: one connection floods commands, another sends oversized frames, both
reconnecting as soon as they are cut off, while a third user chats. The chatter's every message
reaches a listener on another node and the chatter itself, in order; the flooders get
``rate_limited`` replies and close 4003, and close 1009."""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from ..integration.wire import hello, raw_connect

MESSAGES = 40
LIMITS = {"CHAT_RATE_PER_S": 20, "CHAT_RATE_BURST": 60, "CHAT_RATE_STRIKES_MAX": 20,
          "CHAT_MAX_FRAME_BYTES": 8192}


async def test_flooders_are_limited_while_a_third_user_chats(start_nodes, clients):
    a, b = start_nodes(2, **LIMITS)
    chatter = await clients(a.ws_url, user="chatter")
    listener = await clients(b.ws_url, user="listener")
    done = asyncio.Event()
    cut_off = {"4003": asyncio.Event(), "1009": asyncio.Event()}
    seen = {"rate_limited": 0, "4003": 0, "1009": 0, "other_closes": []}

    async def command_flood() -> None:
        while not done.is_set():
            ws = await raw_connect(a.ws_url)
            await hello(ws, "flooder")
            reader: asyncio.Task[None] | None = None
            try:
                async def read(ws: ClientConnection) -> None:
                    async for raw in ws:
                        frame = json.loads(raw)
                        if frame.get("type") == "reply" and not frame["ok"]:
                            assert frame["error"]["code"] == "rate_limited", frame
                            seen["rate_limited"] += 1

                reader = asyncio.create_task(read(ws))
                i = 0
                while not done.is_set():
                    i += 1
                    await ws.send(json.dumps({"type": "ping", "ref": i}))
                    if i % 50 == 0:
                        await asyncio.sleep(0)  # let the reader and the chat run on this loop
                await ws.close()
                await reader
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                if code == 4003:
                    seen["4003"] += 1
                    cut_off["4003"].set()
                else:
                    seen["other_closes"].append(code)
            finally:
                if reader is not None:
                    reader.cancel()

    async def frame_flood() -> None:
        big = json.dumps({"type": "send", "room": "general", "text": "x" * 20000})
        while not done.is_set():
            ws = await raw_connect(a.ws_url)
            await hello(ws, "bigframes")
            try:
                while True:
                    await ws.send(big)
                    await asyncio.sleep(0)
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                if code == 1009:
                    seen["1009"] += 1
                    cut_off["1009"].set()
                else:
                    seen["other_closes"].append(code)

    async def chat() -> list[str]:
        ids = []
        # Wait until both floods have been cut off at least once, so the chat runs under them.
        await cut_off["4003"].wait()
        await cut_off["1009"].wait()
        for i in range(MESSAGES):
            ack = await chatter.send("general", f"m{i}")
            ids.append(ack["id"])
            await asyncio.sleep(0.02)
        return ids

    floods = [asyncio.create_task(command_flood()), asyncio.create_task(frame_flood())]
    try:
        ids = await asyncio.wait_for(chat(), 60)
    finally:
        done.set()
        await asyncio.wait_for(asyncio.gather(*floods, return_exceptions=True), 20)
    for client in (listener, chatter):
        got = []
        while len(got) < MESSAGES:
            event = await client.next_event("message", timeout=10)
            if event["from"]["id"] == "chatter":
                got.append(event)
        assert [e["text"] for e in got] == [f"m{i}" for i in range(MESSAGES)]
        assert [e["id"] for e in got] == ids
    assert seen["rate_limited"] >= 20 and seen["4003"] >= 1 and seen["1009"] >= 1, seen
    assert set(seen["other_closes"]) <= {None, 1000}, seen  # a close we started ourselves
    assert chatter.close_codes == [] and listener.close_codes == []
