"""Shared setup of the race tests that hold the shard reader (node pause point
``reader.rooms.before_read``) while the room's stream changes under it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from node.app import Node
from node.pauses import Gate
from tests.integration.wire import hello, raw_connect

from .conftest import command, ws_url
from .test_session_races import messages_of


async def reader_held(inproc: Callable[..., Any]) -> tuple[Node, Any, Gate]:
    """A node (``inproc()``) with a session of ``ann`` that got ``bo``'s first message of
    ``general`` ("m0"), and its shard reader held before its next read: ``bo`` sent "wake" to
    bring it round, so the reader is held after it read "wake", or before (it may have been
    on its way round already, and then "wake" is read with what the test sends next).
    Returns the node, ann's WebSocket and the gate (``gate.release()`` lets the reader go)."""
    node = await inproc()
    ws = await raw_connect(ws_url(node))
    await hello(ws, "ann")
    first = await command(node, "bo", {"type": "send", "room": "general", "text": "m0"})
    assert (await messages_of(ws, "general", 1))[0]["id"] == first["id"]
    gate = node.pauses.arm("reader.rooms.before_read")
    await command(node, "bo", {"type": "send", "room": "general", "text": "wake"})
    await gate.reached()
    return node, ws, gate
