"""The command dispatcher shared by the WebSocket and the HTTP transports.

``Commands.dispatch(caller, frame)`` takes a validated frame (see :mod:`node.protocol`) and
returns the reply's ``data``, or raises a :class:`~node.errors.ChatError`. One code path for
both transports: the HTTP ``/api/v1/command`` endpoint calls exactly this.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .auth import Identity
from .errors import BadRequest
from .metrics import METRICS
from .protocol import CMID_RE, check_stream_id, check_text, message_event

if TYPE_CHECKING:
    from .app import Node

Handler = Callable[["Caller", dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass
class Caller:
    """Who sends a command, and over what."""

    identity: Identity
    session_id: str
    transport: str  # "ws" or "http"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def user(self) -> str:
        return self.identity.user


class Commands:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.handlers: dict[str, Handler] = {
            "send": self.send,
            "history": self.history,
            "ping": self.ping,
        }

    def register(self, name: str, handler: Handler) -> None:
        self.handlers[name] = handler

    async def dispatch(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        kind = frame["type"]
        handler = self.handlers.get(kind)
        if handler is None:
            raise BadRequest(f"{kind} is not a command here")
        try:
            data = await handler(caller, frame)
        except Exception as exc:
            METRICS.commands.labels(type=kind, result=getattr(exc, "code", "internal")).inc()
            raise
        METRICS.commands.labels(type=kind, result="ok").inc()
        return data

    # -- commands --------------------------------------------------------------------------
    async def ping(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        return {}

    async def send(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        node = self.node
        room = frame["room"]
        text = check_text(frame["text"], node.settings.max_text_chars)
        cmid = frame.get("cmid")
        if cmid is not None and not CMID_RE.match(cmid):
            raise BadRequest("cmid must match ^[A-Za-z0-9_.:-]{1,64}$")
        await node.rooms.require_reader(caller.identity.user, room)
        appended = await node.publish(room, caller.identity.user, caller.identity.name, text, cmid)
        return {"id": appended.id, "seq": appended.seq, "ts": appended.ts,
                **({"duplicate": True} if appended.duplicate else {})}

    async def history(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        node = self.node
        room = frame["room"]
        before, after = frame.get("before"), frame.get("after")
        if before is not None and after is not None:
            raise BadRequest("give before or after, not both")
        if before is not None:
            check_stream_id(before, "before")
        if after is not None:
            check_stream_id(after, "after")
        limit = frame.get("limit", 50)
        if not 1 <= limit <= node.settings.history_limit_max:
            raise BadRequest(f"limit must be 1..{node.settings.history_limit_max}")
        await node.rooms.require_reader(caller.identity.user, room)
        entries, more = await node.streams.history(room, before=before, after=after, limit=limit)
        messages = [message_event(room, sid.decode(), fields) for sid, fields in entries]
        for m in messages:
            del m["type"]
        return {"messages": messages, "more": more}
