"""Room rules: kinds, membership, visibility. Pure rules first, Redis glue after.

Privacy rule: to a non-member, a closed or direct room is indistinguishable from a room that
does not exist -- every command answers ``not_found`` with the same message for both.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest, Forbidden, NotFound
from .keys import GENERAL, Keys, RoomId, UserId
from .metrics import METRICS
from .pauses import PausePoints
from .protocol import USER_ID_RE, check_room_id
from .redisio import as_str, concurrently, unavailable_on_redis_errors
from .streams import Appended, RoomMeta, RoomStreams
from .webhooks import outbox_xadd

KINDS = ("general", "open", "closed", "direct")
NOT_FOUND = "no such room"
GENERAL_COUNT_MAX_AGE_S = 5.0  # how old general's member count may be (an estimate anyway)
MAX_REMEMBERED_COUNTS = 10_000  # member counts remembered for advisory uses (see member_counts)


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


def rooms_in_order(members: Iterable[str]) -> list[RoomId]:
    """A user's rooms as sessions list them: ``general`` first, then the others sorted."""
    return [GENERAL] + [RoomId(r) for r in sorted(members) if r != GENERAL]


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


# KEYS: a set.  ARGV: member, cap.  Adds the member unless the set already holds ``cap``
# members: 1 added, 0 already there, -1 full. Check and add are one step in Redis, so concurrent
# joins (on any nodes) can never take a set past its cap.
CAPPED_ADD_LUA = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 0 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
"""


# KEYS: room's members, room's banned users, webhook outbox.  ARGV: member, cap, outbox maxlen
# ('0': off), room, change (joined/invited), by: the webhook event (node.webhooks) is written in
# the same step.  As CAPPED_ADD_LUA, and -2 if the
# user was kicked (node.roles): in one step, so a kick racing a join cannot be undone by it.
MEMBER_ADD_LUA = """
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 0 end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return -2 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
redis.call('SADD', KEYS[1], ARGV[1])
""" + outbox_xadd("KEYS[3]", "ARGV[3]", "'r'", "ARGV[4]", "'m'", "ARGV[5]", "'u'", "ARGV[1]",
                  "'b'", "ARGV[6]") + """
return 1
"""
# The room's side of leaving (or being kicked), with its webhook event in the same step.
# KEYS: members, outbox.  ARGV: member, (unused), outbox maxlen ('0': off), room, change, by.
MEMBER_REMOVE_LUA = """
if redis.call('SREM', KEYS[1], ARGV[1]) == 0 then return 0 end
""" + outbox_xadd("KEYS[2]", "ARGV[3]", "'r'", "ARGV[4]", "'m'", "ARGV[5]", "'u'", "ARGV[1]",
                  "'b'", "ARGV[6]") + """
return 1
"""
KICKED = "you were removed from this room; a member must invite you again"


def rooms_quota_error(user: str, max_rooms: int) -> BadRequest:
    return BadRequest(f"a user may be in at most {max_rooms} rooms ({user} is in as many)",
                      limit="rooms_per_user")


def room_full_error(max_members: int) -> BadRequest:
    return BadRequest(f"the room is full ({max_members} members)", limit="room_members")


class Rooms:
    """Membership and room metadata in Redis."""

    def __init__(self, redis: Any, keys: Keys, streams: RoomStreams, pauses: PausePoints | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.streams = streams
        self.pauses = pauses if pauses is not None else PausePoints()
        self._capped_add = redis.register_script(CAPPED_ADD_LUA)
        self._member_add = redis.register_script(MEMBER_ADD_LUA)
        self._member_remove = redis.register_script(MEMBER_REMOVE_LUA)
        self._counts: dict[str, tuple[float, int]] = {}  # room -> (monotonic time, member count)

    async def publish(self, room: str, user: str, name: str, text: str, cmid: str | None,
                      kind: str = "", check_member: bool = False) -> Appended:
        """Append a message to a room's stream (see :meth:`RoomStreams.append`)."""
        check = check_member and room != GENERAL  # everyone is a member of general
        try:
            appended = await self.streams.append(room, user, name, text, cmid, kind, check)
        except NotFound:
            if room != GENERAL:
                raise
            await self.ensure_general()  # Redis lost its data: the general room comes back
            appended = await self.streams.append(room, user, name, text, cmid, kind)
        if not appended.duplicate:
            METRICS.messages_published.inc()
        return appended

    async def ensure_general(self) -> str:
        return await self.streams.ensure_room(GENERAL, "general", "General", "", int(time.time() * 1000))

    async def user_rooms(self, user: UserId) -> list[RoomId]:
        """``general`` first, then the user's other rooms in a stable order."""
        with unavailable_on_redis_errors("user_rooms"):
            members = await self.redis.smembers(self.keys.user_rooms(user))
        return rooms_in_order(m.decode() if isinstance(m, bytes) else m for m in members)

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

    # -- membership changes ------------------------------------------------------------------
    # A membership is two sets in two slots (the room's members, the user's rooms), each capped
    # (CHAT_MAX_ROOM_MEMBERS, CHAT_MAX_ROOMS_PER_USER) by one atomic script. The room's set is
    # written first: a failure between the two leaves a member whose room is missing from their
    # list (repaired by joining again), never a listed room the user cannot read.
    async def create(self, owner: UserId, name: str, visibility: str, members: list[str],
                     max_rooms: int, max_members: int) -> tuple[RoomMeta, list[str]]:
        """Create a room with its owner and members. Returns (meta, members added): a member
        already in CHAT_MAX_ROOMS_PER_USER rooms is left out (the caller reports them)."""
        if visibility not in ("open", "closed"):
            raise BadRequest("visibility must be open or closed")
        members = sorted({m for m in members if m != owner})
        if len(members) + 1 > max_members:
            raise BadRequest(f"a room has at most {max_members} members", limit="room_members")
        with unavailable_on_redis_errors("user_rooms"):
            if await self.redis.scard(self.keys.user_rooms(owner)) >= max_rooms:
                raise rooms_quota_error(owner, max_rooms)
        room = new_room_id()
        await self.streams.ensure_room(room, visibility, name, owner, int(time.time() * 1000))
        if members and visibility == "closed":
            with unavailable_on_redis_errors("create_room"):
                await self.redis.sadd(self.keys.room_invites(room), *members)
        await self.add_member(room, owner, max_rooms, max_members)
        added: list[str] = []
        for user in members:
            try:
                await self.add_member(room, user, max_rooms, max_members, "invited", owner)
                added.append(user)
            except BadRequest as exc:
                if exc.limit != "rooms_per_user":
                    raise
        if visibility == "open":
            with unavailable_on_redis_errors("create_room"):
                await self.redis.hset(self.keys.room_directory(), room, name)
        meta = await self.streams.meta(room)
        assert meta is not None
        return meta, added

    async def add_member(self, room: str, user: str, max_rooms: int, max_members: int,
                         change: str = "joined", by: str = "") -> bool:
        """Make ``user`` a member, within both caps; True if they were not one before.
        ``change`` and ``by`` describe it to webhooks (node.webhooks.MEMBER_CHANGES)."""
        if room == GENERAL:
            return False
        await self.pauses.point("rooms.before_add")
        with unavailable_on_redis_errors("join"):
            added = int(await self._member_add(
                keys=[self.keys.room_members(room), self.keys.room_banned(room), self.streams.outbox.key(room)],
                args=[user, max_members, self.streams.outbox.arg, room, change, by]))
        if added == -2:
            raise Forbidden(KICKED)
        if added < 0:
            raise room_full_error(max_members)
        with unavailable_on_redis_errors("join"):
            listed = int(await self._capped_add(keys=[self.keys.user_rooms(user)], args=[room, max_rooms]))
        if listed < 0:
            if added > 0:  # undo: the user may not be in one more room
                await self.remove_member(room, user, user_side=False)
            raise rooms_quota_error(user, max_rooms)
        return added > 0

    async def remove_member(self, room: str, user: str, change: str = "left", by: str = "",
                            user_side: bool = True) -> bool:
        """The user is no member any more. ``change`` (left/kicked) and ``by`` go to webhooks."""
        outbox = self.streams.outbox
        with unavailable_on_redis_errors("leave"):
            removed = await self._member_remove(
                keys=[self.keys.room_members(room), outbox.key(room)],
                args=[user, 0, outbox.arg, room, change, by])
            if user_side:
                await self.redis.srem(self.keys.user_rooms(user), room)
        return bool(removed)

    async def join(self, user: UserId, room: str, max_rooms: int, max_members: int) -> tuple[RoomMeta, bool]:
        """Join an open room, or a closed room one was invited to. (meta, newly joined)."""
        check_room_id(room)
        meta = await self.streams.meta(room)
        if meta is None:
            raise NotFound(NOT_FOUND)
        if meta.kind == "general":
            return meta, False
        if meta.kind == "direct":
            if await self.is_member(user, room):
                return meta, False
            raise NotFound(NOT_FOUND)
        if meta.kind == "closed" and not await self.is_member(user, room):
            with unavailable_on_redis_errors("join"):
                invited = await self.redis.sismember(self.keys.room_invites(room), user)
            if not invited:
                raise NotFound(NOT_FOUND)
        return meta, await self.add_member(room, user, max_rooms, max_members)

    async def invite(self, inviter: UserId, room: str, invitee: str, max_rooms: int,
                     max_members: int) -> tuple[RoomMeta, bool]:
        """Members invite others; the invitee becomes a member (and may re-join after leaving)."""
        if not USER_ID_RE.match(invitee):
            raise BadRequest("invalid user id")
        acc = await self.access(inviter, room)
        if acc.meta.kind in ("general", "direct"):
            raise BadRequest(f"cannot invite to a {acc.meta.kind} room")
        if not acc.is_member:
            raise Forbidden("only members may invite")
        with unavailable_on_redis_errors("invite"):
            await self.redis.sadd(self.keys.room_invites(room), invitee)
        await self.unban(room, invitee)
        return acc.meta, await self.add_member(room, invitee, max_rooms, max_members, "invited", inviter)

    async def leave(self, user: UserId, room: str) -> RoomMeta:
        acc = await self.access(user, room)
        if acc.meta.kind in ("general", "direct"):
            raise BadRequest(f"cannot leave a {acc.meta.kind} room")
        if not acc.is_member:
            raise BadRequest("not a member")
        await self.remove_member(room, user)
        return acc.meta

    async def dm(self, user: UserId, other: str, max_rooms: int) -> tuple[RoomMeta, bool]:
        """Get or create the direct room of two users. (meta, newly created)."""
        if not USER_ID_RE.match(other):
            raise BadRequest("invalid user id")
        room = dm_room(user, other)
        meta = await self.streams.meta(room)
        if meta is None:
            await self.streams.ensure_room(room, "direct", room, user, int(time.time() * 1000))
            meta = await self.streams.meta(room)
            if meta is None:
                raise NotFound(NOT_FOUND)
        # Both users' room quotas apply (a DM is a room of each); the caller's first.
        new = await self.add_member(room, user, max_rooms, 2)
        try:
            new = await self.add_member(room, other, max_rooms, 2, "invited", user) or new
        except BadRequest as exc:
            if new:  # no half-made DM: the caller leaves it again
                await self.remove_member(room, user)
            if exc.limit == "rooms_per_user":
                raise rooms_quota_error(other, max_rooms) from None
            raise
        return meta, new  # new members: tell both users about the room

    async def members(self, room: str) -> list[str]:
        with unavailable_on_redis_errors("members"):
            raw = await self.redis.smembers(self.keys.room_members(room))
        return sorted(m.decode() if isinstance(m, bytes) else m for m in raw)

    async def members_of_rooms(self, rooms: list[str]) -> dict[str, list[str]]:
        """The members of each room (one pipeline)."""
        with unavailable_on_redis_errors("members"):
            pipe = self.redis.pipeline(transaction=False)
            for room in rooms:
                pipe.smembers(self.keys.room_members(room))
            results = await pipe.execute()
        return {room: [as_str(m) for m in raw] for room, raw in zip(rooms, results, strict=True)}

    def remember_counts(self, counts: dict[str, int]) -> None:
        """Member counts the caller just read another way (see :meth:`member_counts`)."""
        now = time.monotonic()
        if len(self._counts) + len(counts) > MAX_REMEMBERED_COUNTS:
            self._counts.clear()
        for room, count in counts.items():
            self._counts[room] = (now, count)

    async def member_counts(self, rooms: list[str], max_age_s: float = 0.0) -> dict[str, int]:
        """Member count of each room, read from Redis. With ``max_age_s`` a count this node read
        at most that long ago is taken instead (for advisory uses: which rooms are small enough
        for per-user presence events); every read refreshes those remembered counts."""
        if not rooms:
            return {}
        out: dict[str, int] = {}
        now = time.monotonic()
        for room in rooms:
            # general's count is a HyperLogLog estimate of everyone ever seen: a few seconds
            # old is as good, and every hello would read it otherwise.
            age = max(max_age_s, GENERAL_COUNT_MAX_AGE_S) if room == GENERAL else max_age_s
            seen = self._counts.get(room)
            if age > 0 and seen is not None and now - seen[0] <= age:
                out[room] = seen[1]
        if len(out) == len(rooms):
            return out
        asked = rooms
        rooms = [room for room in rooms if room not in out]
        others = [room for room in rooms if room != GENERAL]

        async def general() -> None:
            # PFCOUNT outside the pipeline: the cluster client refuses it in one (it may name
            # several keys); the general room's HyperLogLog is one key in one slot.
            out[GENERAL] = int(await self.redis.pfcount(self.keys.general_members()))

        async def created() -> None:
            pipe = self.redis.pipeline(transaction=False)
            for room in others:
                pipe.scard(self.keys.room_members(room))
            for room, n in zip(others, await pipe.execute(), strict=True):
                out[room] = int(n)

        with unavailable_on_redis_errors("members"):
            # Concurrently: one round trip of latency, not two.
            await concurrently(*([general()] if GENERAL in rooms else []), *([created()] if others else []))
        self.remember_counts({room: out[room] for room in rooms})
        return {room: out[room] for room in asked}

    async def open_rooms(self, query: str | None, limit: int = 200) -> dict[str, str]:
        """Open rooms from the directory (id -> name), filtered by a case-insensitive query."""
        needle = (query or "").strip().lower()
        out: dict[str, str] = {}
        cursor = 0
        scanned = 0
        with unavailable_on_redis_errors("rooms"):
            while True:
                cursor, page = await self.redis.hscan(self.keys.room_directory(), cursor, count=500)
                for rid, name in page.items():
                    rid_s = rid.decode() if isinstance(rid, bytes) else rid
                    name_s = name.decode() if isinstance(name, bytes) else name
                    if not needle or needle in name_s.lower() or needle in rid_s:
                        out[rid_s] = name_s
                scanned += len(page)
                if not cursor or len(out) >= limit or scanned >= 20000:
                    break
        return dict(sorted(out.items(), key=lambda kv: kv[1].lower())[:limit])

    async def visible_to(self, viewer: UserId, rooms: list[str]) -> list[str]:
        """The subset of ``rooms`` whose existence ``viewer`` may know."""
        if not rooms:
            return []
        metas = await self.streams.metas(rooms)
        with unavailable_on_redis_errors("where"):
            pipe = self.redis.pipeline(transaction=False)
            for room in rooms:
                pipe.sismember(self.keys.room_members(room), viewer)
            member = await pipe.execute()
        out = []
        for room, is_member in zip(rooms, member, strict=True):
            meta = metas.get(room)
            if meta is not None and may_see(meta.kind, bool(is_member) or room == GENERAL):
                out.append(room)
        return out

    # -- roles and kicks (node.roles) --------------------------------------------------------
    async def unban(self, room: str, user: str) -> None:
        """An invitation lifts a kick: the user may join (and is added) again."""
        with unavailable_on_redis_errors("invite"):
            await self.redis.srem(self.keys.room_banned(room), user)

    async def is_moderator(self, room: str, user: str) -> bool:
        """Whether ``user`` is the room's ``owner`` or an ``admin`` (may delete others'
        messages, kick). Never in ``general`` or ``direct`` rooms."""
        meta = await self.streams.meta(room)
        if meta is None or meta.kind not in ("open", "closed"):
            return False
        if user == meta.owner:
            return await self.is_member(UserId(user), room)
        with unavailable_on_redis_errors("roles"):
            stored = await self.redis.hget(self.keys.room_roles(room), user)
        return stored is not None and as_str(stored) == "admin"
