"""Deletes racing the shard reader: a message deleted (XDELed) before the reader read it leaves
a hole in the seqs, which must not be taken for trimmed history (recovered: false)."""

from __future__ import annotations

from typing import Any

from tests.integration.wire import recv_json

from .conftest import command
from .reader import reader_held


async def room_frames_until(ws: Any, last_text: str) -> list[dict[str, Any]]:
    """Every room-related frame (message, edit, delete, room) up to the message ``last_text``."""
    out: list[dict[str, Any]] = []
    while True:
        frame = await recv_json(ws)
        if frame["type"] in ("message", "edit", "delete", "room"):
            out.append(frame)
            if frame["type"] == "message" and frame["text"] == last_text:
                return out


async def test_a_message_deleted_before_the_reader_read_it_is_no_gap(inproc):
    node, ws, gate = await reader_held(inproc)
    # While the reader is held: m1 and m2 are sent, then m1 is deleted (gone from the stream):
    # the reader finds m2's seq after a hole, and the delete that explains it after m2.
    m1 = await command(node, "bo", {"type": "send", "room": "general", "text": "m1"})
    await command(node, "bo", {"type": "send", "room": "general", "text": "m2"})
    await command(node, "bo", {"type": "delete", "room": "general", "id": m1["id"]})
    gate.release()
    frames = await room_frames_until(ws, "m2")
    while frames[-1]["type"] != "delete":
        frames.append(await recv_json(ws))
    kinds = [(f["type"], f.get("text")) for f in frames if f.get("text") != "wake"]
    assert kinds == [("message", "m2"), ("delete", None)], frames
    assert frames[-1]["id"] == m1["id"]
    # The reader's seq bookkeeping is right after it: the next message is no gap either.
    await command(node, "bo", {"type": "send", "room": "general", "text": "m3"})
    assert [f["type"] for f in await room_frames_until(ws, "m3")] == ["message"]
    await ws.close()


async def test_a_delete_read_before_the_next_message_is_no_gap(inproc):
    """The delete entry is read in one batch, the message after the hole in the next."""
    node, ws, gate = await reader_held(inproc)
    m1 = await command(node, "bo", {"type": "send", "room": "general", "text": "m1"})
    await command(node, "bo", {"type": "delete", "room": "general", "id": m1["id"]})
    gate.release()
    frames = await room_frames_until(ws, "wake")
    while frames[-1]["type"] != "delete":
        frames.append(await recv_json(ws))
    await command(node, "bo", {"type": "send", "room": "general", "text": "m2"})
    after = await room_frames_until(ws, "m2")
    assert [f["type"] for f in frames + after if f["type"] == "room"] == [], frames + after
    await ws.close()
