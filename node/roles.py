"""Room roles (``owner``/``admin``/``member``), ``set_role`` and ``kick`` (protocol v1.1).

Only created rooms (``open``, ``closed``) have roles: the creator is the ``owner`` (``owner`` in
the room's metadata), admins are listed in ``Keys.room_roles`` (a hash user -> ``admin``, in the
room's slot), everyone else is a ``member``. In ``general`` and ``direct`` rooms everyone is a
``member`` and nobody may kick or change roles.

Rules, each checked by one script in the room's slot (so a check and the change it allows are
atomic, whatever commands race on other nodes):

* ``set_role``: the owner (still a member) only; the target must be a member; the owner's own
  role cannot change.
* ``kick``: the owner or an admin; never the owner, never oneself (use ``leave``); an admin
  cannot kick another admin (only the owner can: admins could otherwise kick each other out in
  a race, and demoting is the owner's call). The target leaves the room (members set, roles
  hash) and is added to ``Keys.room_banned`` in the same script; ``join`` refuses them
  (``forbidden``) until an ``invite`` removes them from it.
"""

from __future__ import annotations

from typing import Any

from .errors import BadRequest, ChatError, Forbidden, NotFound
from .keys import Keys
from .redisio import as_str, unavailable_on_redis_errors
from .streams import RoomMeta
from .webhooks import Outbox, outbox_xadd

ROLES = ("owner", "admin", "member")
SETTABLE = ("admin", "member")
ROLE_KINDS = ("open", "closed")


def role_of(meta: RoomMeta, user: str, stored: Any) -> str:
    """The role of ``user`` given the room's metadata and their entry in the roles hash."""
    if meta.kind not in ROLE_KINDS:
        return "member"
    if meta.owner and user == meta.owner:
        return "owner"
    return "admin" if stored is not None and as_str(stored) == "admin" else "member"


def roles_of_new(meta: RoomMeta, users: list[str]) -> dict[str, list[str]]:
    """Role -> the users just added to a room (the creator of a room owns it; the others are
    members: nobody joins as an admin)."""
    out: dict[str, list[str]] = {}
    for user in users:
        out.setdefault(role_of(meta, user, None), []).append(user)
    return out


# KEYS: meta, members, roles.  ARGV: caller, target, role ('admin' or 'member').
# 1 changed, 0 unchanged; < 0: refused (see SET_ROLE_ERRORS).
SET_ROLE_LUA = """
local kind = redis.call('HGET', KEYS[1], 'kind')
if not kind then return -1 end
if kind ~= 'open' and kind ~= 'closed' then return -2 end
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner ~= ARGV[1] or redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then return -3 end
if ARGV[2] == owner then return -4 end
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 0 then return -5 end
if ARGV[3] == 'admin' then return redis.call('HSET', KEYS[3], ARGV[2], 'admin') end
return redis.call('HDEL', KEYS[3], ARGV[2])
"""

# KEYS: meta, members, roles, banned, webhook outbox.  ARGV: kicker, target, most banned users,
# outbox maxlen ('0': webhooks off), room.  1 kicked; < 0: refused (see KICK_ERRORS). The
# webhook event (node.webhooks, change "kicked") is written in the same step.
KICK_LUA = """
local kind = redis.call('HGET', KEYS[1], 'kind')
if not kind then return -1 end
if kind ~= 'open' and kind ~= 'closed' then return -2 end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then return -3 end
local owner = redis.call('HGET', KEYS[1], 'owner')
local admin = redis.call('HGET', KEYS[3], ARGV[1]) == 'admin'
if ARGV[1] ~= owner and not admin then return -3 end
if ARGV[2] == owner then return -4 end
if ARGV[2] == ARGV[1] then return -6 end
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 0 then return -5 end
if ARGV[1] ~= owner and redis.call('HGET', KEYS[3], ARGV[2]) == 'admin' then return -7 end
if redis.call('SISMEMBER', KEYS[4], ARGV[2]) == 0 and redis.call('SCARD', KEYS[4]) >= tonumber(ARGV[3]) then
  return -8
end
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[4], ARGV[2])
""" + outbox_xadd("KEYS[5]", "ARGV[4]", "'r'", "ARGV[5]", "'m'", "'kicked'", "'u'", "ARGV[2]", "'b'", "ARGV[1]") + """
return 1
"""

NOT_FOUND = "no such room"
Refusal = tuple[type[ChatError], str]
Refusals = dict[int, Refusal]


def refusals(no_roles: str, not_allowed: str, owner_target: Refusal, *more: Refusal) -> Refusals:
    """The refusal codes of a role script: those both scripts share (-1 no such room, -2
    ``no_roles``: a room without roles, -3 ``not_allowed``: the caller may not, -4
    ``owner_target``: the target is the owner, -5 the target is not a member), then ``more``
    from -6 down."""
    table: Refusals = {
        -1: (NotFound, NOT_FOUND),
        -2: (BadRequest, no_roles),
        -3: (Forbidden, not_allowed),
        -4: owner_target,
        -5: (BadRequest, "the user is not a member of the room"),
    }
    for i, extra in enumerate(more):
        table[-6 - i] = extra
    return table


SET_ROLE_ERRORS = refusals("only created rooms have roles", "only the room's owner may change roles",
                           (BadRequest, "the owner's role cannot change"))
KICK_ERRORS = refusals(
    "nobody can be kicked from this room", "only the room's owner and admins may kick",
    (Forbidden, "the owner cannot be kicked"),
    (BadRequest, "use leave to leave a room"),  # -6
    (Forbidden, "only the owner may kick an admin"),  # -7
    (BadRequest, "too many users kicked from this room (CHAT_MAX_ROOM_MEMBERS); invite some back first"),  # -8
)


def refusal(code: int, table: Refusals) -> ChatError:
    """The error a script's refusal code stands for."""
    cls, message = table[code]
    return cls(message)


class Roles:
    """Role reads and the set_role/kick scripts. Holds no state besides the script handles."""

    def __init__(self, redis: Any, keys: Keys, outbox: Outbox | None = None) -> None:
        self.redis = redis
        self.keys = keys
        self.outbox = outbox if outbox is not None else Outbox(keys)
        self._set_role = redis.register_script(SET_ROLE_LUA)
        self._kick = redis.register_script(KICK_LUA)

    async def role(self, meta: RoomMeta, user: str) -> str:
        if meta.kind not in ROLE_KINDS or user == meta.owner:
            return role_of(meta, user, None)
        with unavailable_on_redis_errors("roles"):
            stored = await self.redis.hget(self.keys.room_roles(meta.room), user)
        return role_of(meta, user, stored)

    async def roles(self, meta: RoomMeta, users: list[str]) -> dict[str, str]:
        """The role of each of ``users`` (one HMGET; none for rooms without roles)."""
        if meta.kind not in ROLE_KINDS or not users:
            return {u: role_of(meta, u, None) for u in users}
        with unavailable_on_redis_errors("roles"):
            stored = await self.redis.hmget(self.keys.room_roles(meta.room), users)
        return {u: role_of(meta, u, s) for u, s in zip(users, stored, strict=True)}

    async def set_role(self, room: str, caller: str, target: str, role: str) -> bool:
        """Give ``target`` the role (owner only); True if it changed."""
        if role not in SETTABLE:
            raise BadRequest("role must be admin or member")
        k = self.keys
        with unavailable_on_redis_errors("set_role"):
            code = int(await self._set_role(keys=[k.room_meta(room), k.room_members(room), k.room_roles(room)],
                                            args=[caller, target, role]))
        if code < 0:
            raise refusal(code, SET_ROLE_ERRORS)
        return code > 0

    async def kick(self, room: str, kicker: str, target: str, max_banned: int) -> None:
        """Remove ``target`` from the room and ban them from joining until invited again. The
        room's side is one script; the user's list of rooms (another slot) follows, as in
        :meth:`node.rooms.Rooms.remove_member`."""
        k = self.keys
        with unavailable_on_redis_errors("kick"):
            code = int(await self._kick(
                keys=[k.room_meta(room), k.room_members(room), k.room_roles(room), k.room_banned(room),
                      self.outbox.key(room)],
                args=[kicker, target, max_banned, self.outbox.arg, room]))
        if code < 0:
            raise refusal(code, KICK_ERRORS)
        with unavailable_on_redis_errors("kick"):
            await self.redis.srem(k.user_rooms(target), room)

    async def forget(self, room: str, user: str) -> None:
        """After ``user`` left ``room``: their role goes (re-joining makes them a member)."""
        with unavailable_on_redis_errors("leave"):
            await self.redis.hdel(self.keys.room_roles(room), user)
