"""The command gate and the room rules, without Redis or sockets."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from node import config
from node.auth import Identity
from node.commands import Caller, Commands, parse_text_command
from node.errors import BadRequest, NotFound
from node.keys import UserId
from node.metrics import METRICS
from node.rooms import dm_members, dm_room, may_read, may_see
from node.supervise import ThrottledLog


def gate(**env: Any) -> Commands:
    settings = config.load({"CHAT_AUTH": "dev", **{k: str(v) for k, v in env.items()}})
    # No service is needed by the gate itself; the handlers that need one are replaced below.
    return Commands(settings, None, None, None, None, None, None, None, None,  # type: ignore[arg-type]
                    ThrottledLog(logging.getLogger("test")))


def caller(transport: str = "ws") -> Caller:
    return Caller(Identity(UserId("ann"), "Ann", None), "c-1", transport)


def run(commands: Commands, frame: dict[str, Any], transport: str = "ws") -> dict[str, Any]:
    return asyncio.run(commands.execute(caller(transport), frame)).envelope()


def test_ok_and_the_ref_come_back():
    assert run(gate(), {"type": "ping", "ref": 5}) == {"type": "reply", "ok": True, "data": {}, "ref": 5}


def test_transport_frames_are_refused_with_a_reason_per_transport():
    assert run(gate(), {"type": "hello"})["error"]["message"] == "already said hello"
    refused = run(gate(), {"type": "refresh", "ref": "r"}, "http")
    assert refused["error"] == {"code": "bad_request",
                                "message": "refresh is a WebSocket frame; use /api/v1/session"}
    assert refused["ref"] == "r"


def test_chat_errors_keep_their_code_and_unexpected_ones_are_internal():
    commands = gate()

    async def missing(c: Caller, f: dict[str, Any]) -> dict[str, Any]:
        raise NotFound("no such room")

    async def broken(c: Caller, f: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("a bug")

    commands.handlers["history"] = missing
    commands.handlers["who"] = broken
    assert run(commands, {"type": "history", "room": "x"})["error"]["code"] == "not_found"
    assert run(commands, {"type": "who", "room": "x"})["error"] == {"code": "internal", "message": "internal error"}


def test_create_room_is_rate_limited_per_user_and_counted():
    commands = gate(CHAT_CREATE_ROOM_PER_MIN=0.001, CHAT_CREATE_ROOM_BURST=1)

    async def made(c: Caller, f: dict[str, Any]) -> dict[str, Any]:
        return {"room": {"id": "r-1"}}

    commands.handlers["create_room"] = made
    counted = METRICS.rate_limited.labels(limit="create_room")
    before = counted._value.get()
    frame = {"type": "create_room", "name": "x", "visibility": "open"}
    assert run(commands, frame)["ok"] is True
    assert run(commands, frame)["error"]["code"] == "rate_limited"
    assert counted._value.get() == before + 1


def test_text_commands_map_to_commands():
    assert parse_text_command("/who", "r-1") == {"type": "who", "room": "r-1"}
    assert parse_text_command("/join r-2", "general") == {"type": "join", "room": "r-2"}
    assert parse_text_command("hello /who", "general") is None
    with pytest.raises(BadRequest):
        parse_text_command("/where", "general")


def test_room_rules():
    assert dm_room("bob", "alice") == dm_room("alice", "bob") == "dm:alice:bob"
    assert dm_members("dm:alice:bob") == ("alice", "bob") and dm_members("r-abc") is None
    with pytest.raises(BadRequest):
        dm_room("ann", "ann")
    assert may_see("open", False) and may_see("general", False) and not may_see("closed", False)
    assert may_read("general", False) and not may_read("open", False) and may_read("direct", True)
