"""Room rules: kinds, membership, visibility. Pure rules first, Redis glue after.

Privacy rule: to a non-member, a closed or direct room is indistinguishable from a room that
does not exist -- every command answers ``not_found`` with the same message for both.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest, Forbidden, NotFound
from .keys import GENERAL, Keys, RoomId, UserId
from .protocol import USER_ID_RE, check_room_id
from .redisio import unavailable_on_redis_errors
from .streams import RoomMeta, RoomStreams

KINDS = ("general", "open", "closed", "direct")
NOT_FOUND = "no such room"


def dm_room(a: str, b: str) -> RoomId:
    """The deterministic direct room of two users (``a < b`` in byte order)."""
    if a == b:
        raise BadRequest("a direct conversation needs two different users")
    lo, hi = sorted((a, b), key=lambda s: s.encode())
    return RoomId(f"dm:{lo}:{hi}")


def dm_members(room: str) -> tuple[str, str] | None:
    if not room.startswith("dm:"):
        return None
    parts = room.split(":")
    if len(parts) != 3 or not all(USER_ID_RE.match(p) for p in parts[1:]):
        return None
    return parts[1], parts[2]


def new_room_id() -> RoomId:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    return RoomId("r-" + "".join(secrets.choice(alphabet) for _ in range(10)))


def may_see(kind: str, is_member: bool) -> bool:
    """Whether a user may know the room exists (list it, read its metadata)."""
    return kind in ("general", "open") or is_member


def may_read(kind: str, is_member: bool) -> bool:
    """History, who, replay: members only (everyone is a member of general)."""
    return kind == "general" or is_member


@dataclass(frozen=True, slots=True)
class Access:
    meta: RoomMeta
    is_member: bool


class Rooms:
    """Membership and room metadata in Redis."""

    def __init__(self, redis: Any, keys: Keys, streams: RoomStreams) -> None:
        self.redis = redis
        self.keys = keys
        self.streams = streams

    async def ensure_general(self) -> str:
        return await self.streams.ensure_room(GENERAL, "general", "General", "", int(time.time() * 1000))

    async def user_rooms(self, user: UserId) -> list[RoomId]:
        """``general`` first, then the user's other rooms in a stable order."""
        with unavailable_on_redis_errors("user_rooms"):
            members = await self.redis.smembers(self.keys.user_rooms(user))
        rooms = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
        return [GENERAL] + [RoomId(r) for r in rooms if r != GENERAL]

    async def is_member(self, user: UserId, room: str) -> bool:
        if room == GENERAL:
            return True
        with unavailable_on_redis_errors("is_member"):
            return bool(await self.redis.sismember(self.keys.room_members(room), user))

    async def access(self, user: UserId, room: str) -> Access:
        """The room's metadata and the user's membership; ``not_found`` if invisible to them."""
        check_room_id(room)
        meta = await self.streams.meta(room)
        if meta is None and room == GENERAL:
            await self.ensure_general()
            meta = await self.streams.meta(room)
        if meta is None:
            raise NotFound(NOT_FOUND)
        member = await self.is_member(user, room)
        if not may_see(meta.kind, member):
            raise NotFound(NOT_FOUND)
        return Access(meta, member)

    async def require_reader(self, user: UserId, room: str) -> Access:
        acc = await self.access(user, room)
        if not may_read(acc.meta.kind, acc.is_member):
            raise Forbidden("join the room first")
        return acc
