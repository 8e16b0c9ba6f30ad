"""The command dispatcher shared by the WebSocket and the HTTP transports.

``Commands.dispatch(caller, frame)`` takes a validated frame (see :mod:`node.protocol`) and
returns the reply's ``data``, or raises a :class:`~node.errors.ChatError`. One code path for
both transports: the HTTP ``/api/v1/command`` endpoint calls exactly this.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

from .auth import Identity
from .edits import NotAuthor, RoomEdits
from .errors import BadRequest, ChatError, Internal, RateLimited, error_body
from .keys import GENERAL, UserId
from .mentions import Mentions, mention_candidates
from .metrics import METRICS
from .protocol import (
    CMID_RE,
    check_display_name,
    check_room_id,
    check_stream_id,
    check_text,
    check_user_id,
    dumps,
    ref_of,
)
from .ratelimit import KeyedBuckets
from .redisio import concurrently
from .roles import ROLE_KINDS, Roles
from .streams import NotMember
from .unread import unread_count

if TYPE_CHECKING:
    from .config import Settings
    from .ephemeral import Ephemeral
    from .personal import PersonalStreams
    from .presence import Presence
    from .rooms import Rooms
    from .session import Sessions, Subscription
    from .streams import RoomStreams
    from .summaries import RoomSummaries
    from .supervise import ThrottledLog
    from .unread import ReadMarkers

Handler = Callable[["Caller", dict[str, Any]], Awaitable[dict[str, Any]]]

# Text commands a client may type into the message box; never stored as messages.
TEXT_COMMANDS = {"/who": "who", "/rooms": "rooms", "/join": "join", "/where": "where"}


# Frames that belong to a transport, not to the command gate: `hello` opens a WebSocket
# session (over HTTP: POST /api/v1/session), `refresh` renews a live WebSocket's token.
TRANSPORT_FRAMES = frozenset({"hello", "refresh"})


@dataclass(slots=True)
class Outcome:
    """What the command gate answers, whatever the transport: the reply's ``data``, or the
    error. Transports only translate it (a reply frame, an HTTP response)."""

    ref: Any
    data: dict[str, Any] | None = None
    error: ChatError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def status(self) -> int:
        return 200 if self.error is None else self.error.status

    def envelope(self) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "reply", "ok": self.error is None}
        if self.error is None:
            frame["data"] = self.data
        else:
            frame["error"] = error_body(self.error)
        if self.ref is not None:
            frame["ref"] = self.ref
        return frame

    def encode(self) -> bytes:
        return dumps(self.envelope())


def refused(ref: Any, exc: ChatError) -> Outcome:
    """An outcome for a frame refused before dispatch (malformed, rate limited); counts the
    configured limit that refused it, if any."""
    if exc.limit is not None:
        METRICS.rate_limited.labels(limit=exc.limit).inc()
    return Outcome(ref, error=exc)


@dataclass
class Caller:
    """Who sends a command, and over what."""

    identity: Identity
    session_id: str
    transport: str  # "ws" or "http"
    live: Subscription | None = None  # the WebSocket session a command comes from

    @property
    def user(self) -> UserId:
        return self.identity.user


def parse_text_command(text: str, room: str) -> dict[str, Any] | None:
    """``/who`` -> a ``who`` frame for the current room, etc.; None if not a text command."""
    parts = text.strip().split()
    if not parts or parts[0].lower() not in TEXT_COMMANDS:
        return None
    kind = TEXT_COMMANDS[parts[0].lower()]
    args = parts[1:]
    if kind == "who":
        return {"type": "who", "room": args[0] if args else room}
    if kind == "rooms":
        return {"type": "rooms", **({"query": " ".join(args)} if args else {})}
    if not args:
        raise BadRequest(f"usage: {parts[0]} {'ROOM' if kind == 'join' else 'USER'}")
    if kind == "join":
        return {"type": "join", "room": args[0]}
    return {"type": "where", "user": args[0]}


class Commands:
    def __init__(self, settings: Settings, rooms: Rooms, streams: RoomStreams, sessions: Sessions,
                 summaries: RoomSummaries, presence: Presence, unread: ReadMarkers,
                 personal: PersonalStreams, ephemeral: Ephemeral, errors: ThrottledLog) -> None:
        self.settings = settings
        self.rooms = rooms
        self.streams = streams
        self.sessions = sessions
        self.summaries = summaries
        self.presence = presence
        self.unread = unread
        self.personal = personal
        self.ephemeral = ephemeral
        self.errors = errors
        self.handlers: dict[str, Handler] = {
            "send": self.send,
            "history": self.history,
            "ping": self.ping,
            "join": self.join,
            "leave": self.leave,
            "create_room": self.create_room,
            "invite": self.invite,
            "dm": self.dm,
            "rooms": self.list_rooms,
            "who": self.who,
            "where": self.where,
            "read": self.read,
            "typing": self.typing,
            "edit": self.edit,
            "delete": self.delete,
            "set_role": self.set_role,
            "kick": self.kick,
        }
        self._typing_seen: dict[tuple[str, str], float] = {}
        s = settings
        # create_room per user, per node, whatever the transport.
        self.create_room_buckets = KeyedBuckets(s.create_room_per_min / 60.0, s.create_room_burst)

    # v1.1 roles, kicks and mentions: their own modules, on the rooms' Redis handle (made on
    # first use: a gate built without Redis, as in the unit tests, never needs them).
    @cached_property
    def roles(self) -> Roles:
        return Roles(self.rooms.redis, self.rooms.keys, self.streams.outbox)

    @cached_property
    def mentions(self) -> Mentions:
        return Mentions(self.rooms.redis, self.rooms.keys, self.settings.personal_maxlen)

    @cached_property
    def edits(self) -> RoomEdits:
        """v1.1 edits and deletes (node.edits), on the room streams' Redis handle and limits."""
        s = self.streams
        return RoomEdits(s.redis, s.keys, maxlen=s.maxlen, max_age_ms=s.max_age_ms, outbox=s.outbox)

    async def execute(self, caller: Caller, frame: dict[str, Any]) -> Outcome:
        """The command gate: every command of every transport goes through here. Refuses
        transport frames, applies the per-user limiters, dispatches, counts (commands, and the
        limit that refused it), and turns any error into an outcome (unexpected ones into
        ``internal``, logged once per cause per interval). Never raises but on cancellation."""
        ref = ref_of(frame)
        kind = frame["type"]
        try:
            if kind in TRANSPORT_FRAMES:
                raise BadRequest("already said hello" if caller.transport == "ws" and kind == "hello"
                                 else f"{kind} is a WebSocket frame; use /api/v1/session")
            if kind == "create_room":
                self._check_create_room(caller.user)
            return Outcome(ref, await self.dispatch(caller, frame))
        except ChatError as exc:
            return refused(ref, exc)
        except Exception as exc:
            self.errors.error("command", exc, command=kind)
            return Outcome(ref, error=Internal("internal error"))

    def _check_create_room(self, user: str) -> None:
        """CHAT_CREATE_ROOM_PER_MIN per user and node; raises ``rate_limited``."""
        if not self.create_room_buckets.take(user, time.monotonic()):
            wait = self.create_room_buckets.retry_after(user)
            raise RateLimited(f"too many rooms created; retry in {max(1, round(wait))} s", limit="create_room")

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

    # -- messages ----------------------------------------------------------------------------
    async def ping(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        return {}

    def ordered_send(self, caller: Caller, frame: dict[str, Any]) -> bool:
        """Whether ``frame`` is a send that reaches its append with no await before it (a room
        of the caller's live session, not a text command), so that sends of one connection may
        be started one after the other without waiting for each other's reply and still be
        appended in their order (see :mod:`node.autopipe`)."""
        if frame["type"] != "send" or not self.streams.ordered:
            return False
        live, text = caller.live, frame.get("text")
        return (live is not None and frame.get("room") in live.topics and isinstance(text, str)
                and not text.startswith("/"))

    async def send(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        room = check_room_id(frame["room"])
        text = check_text(frame["text"], self.settings.max_text_chars)
        if text.startswith("/"):
            mapped = parse_text_command(text, room)
            if mapped is not None:
                data = await self.dispatch(caller, mapped)
                return {"command": mapped["type"], **data}
        cmid = frame.get("cmid")
        if cmid is not None and not CMID_RE.match(cmid):
            raise BadRequest("cmid must match ^[A-Za-z0-9_.:-]{1,64}$")
        live = caller.live
        if live is not None and room in live.topics:
            # A room of this live session (kept exact by the membership events it gets): one
            # round trip, the append, whose script re-checks the membership atomically.
            try:
                appended = await self.rooms.publish(room, caller.user, caller.identity.name, text, cmid,
                                                    check_member=True)
            except NotMember:
                await self.rooms.require_reader(caller.user, room)  # the precise refusal
                raise
        else:
            acc = await self.rooms.require_reader(caller.user, room)
            await self.rooms.pauses.point("send.checked")
            # The script re-checks the membership: a kick landing after the check above
            # refuses the append instead of letting the message in after the removal.
            try:
                appended = await self.rooms.publish(room, caller.user, caller.identity.name, text, cmid,
                                                    check_member=acc.meta.kind != "general")
            except NotMember:
                await self.rooms.require_reader(caller.user, room)
                raise
        if not appended.duplicate and "@" in text:
            await self._mentions(caller, room, appended.id, appended.seq, text)
        return {"id": appended.id, "seq": appended.seq, "ts": appended.ts,
                **({"duplicate": True} if appended.duplicate else {}),
                **({} if appended.durable is None else {"durable": appended.durable})}

    async def _mentions(self, caller: Caller, room: str, sid: str, seq: int, text: str) -> None:
        """Count a stored message for the members it mentions. The message stands whatever
        happens here: a failure is logged (throttled) and the counts may miss it."""
        if not mention_candidates(text, caller.user):
            return  # no @word at all: no Redis work
        try:
            meta = None if room == GENERAL else await self.streams.meta(room)
            where = "General" if meta is None else "a direct message" if meta.kind == "direct" else meta.name
            await self.mentions.record(room, where, seq, sid, caller.user, caller.identity.name, text)
        except ChatError as exc:
            self.errors.error("mentions", exc)

    async def history(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        room = check_room_id(frame["room"])
        before, after = frame.get("before"), frame.get("after")
        if before is not None and after is not None:
            raise BadRequest("give before or after, not both")
        if before is not None:
            check_stream_id(before, "before")
        if after is not None:
            check_stream_id(after, "after")
        limit = frame.get("limit", 50)
        if not 1 <= limit <= self.settings.history_limit_max:
            raise BadRequest(f"limit must be 1..{self.settings.history_limit_max}")
        await self.rooms.require_reader(caller.user, room)
        # Each message in its latest state (edited text, or a tombstone), see node.edits.
        messages, more = await self.edits.history(room, before=before, after=after, limit=limit)
        return {"messages": messages, "more": more}

    async def edit(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        room = check_room_id(frame["room"])
        target = check_stream_id(frame["id"])
        text = check_text(frame["text"], self.settings.max_text_chars)
        acc = await self.rooms.require_reader(caller.user, room)
        changed = await self.edits.edit(room, caller.user, caller.identity.name, target, text,
                                        check_member=acc.meta.kind != "general")
        return {"id": target, "edited_at": changed.ts}

    async def delete(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        room = check_room_id(frame["room"])
        target = check_stream_id(frame["id"])
        acc = await self.rooms.require_reader(caller.user, room)
        check = acc.meta.kind != "general"
        try:
            await self.edits.delete(room, caller.user, caller.identity.name, target, check, moderator=False)
        except NotAuthor:
            # Someone else's message: only an owner or admin may (one more read, rare).
            if not await self.rooms.is_moderator(room, caller.user):
                raise
            await self.edits.delete(room, caller.user, caller.identity.name, target, check, moderator=True)
        return {"id": target}

    # -- rooms -------------------------------------------------------------------------------
    async def create_room(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        name = check_display_name(frame["name"])
        members = frame.get("members") or []
        if not all(isinstance(m, str) for m in members):
            raise BadRequest("members must be user ids")
        for m in members:
            check_user_id(m)
        meta, added = await self.rooms.create(caller.user, name, frame["visibility"], members,
                                              s.max_rooms_per_user, s.max_room_members)
        summary = await self.sessions.joined(caller.user, caller.live, meta, [caller.user, *added], inviter=caller.user)
        left_out = sorted(set(members) - set(added) - {caller.user})
        # Members already in CHAT_MAX_ROOMS_PER_USER rooms were not added: say who.
        return {"room": summary, **({"not_added": left_out} if left_out else {})}

    async def join(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        meta, _ = await self.rooms.join(caller.user, frame["room"], s.max_rooms_per_user, s.max_room_members)
        summary = await self.sessions.joined(caller.user, caller.live, meta, [caller.user])
        return {"room": summary}

    async def leave(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        meta = await self.rooms.leave(caller.user, frame["room"])
        await self.sessions.left(caller.user, caller.live, meta.room)
        await concurrently(self.roles.forget(meta.room, caller.user), self.mentions.forget(caller.user, meta.room))
        return {}

    async def invite(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        invitee = check_user_id(frame["user"])
        meta, added = await self.rooms.invite(caller.user, frame["room"], invitee,
                                              s.max_rooms_per_user, s.max_room_members)
        if added:
            await self.sessions.joined(caller.user, None, meta, [invitee], inviter=caller.user,
                                        summary_for_user=False)
        return {}

    async def dm(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        other = check_user_id(frame["user"])
        meta, new = await self.rooms.dm(caller.user, other, self.settings.max_rooms_per_user)
        users: list[str] = [caller.user, other] if new else [caller.user]
        summary = await self.sessions.joined(caller.user, caller.live, meta, users, announce=new)
        return {"room": summary}

    async def list_rooms(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        query = frame.get("query")
        if query is not None and len(query) > 80:
            raise BadRequest("query longer than 80 characters")
        mine = await self.rooms.user_rooms(caller.user)
        open_rooms = await self.rooms.open_rooms(query)
        needle = (query or "").strip().lower()
        ids = list(dict.fromkeys([*mine, *open_rooms]))
        metas = await self.streams.metas(ids)
        listed = []
        for room in ids:
            meta = metas.get(room)
            if meta is None:
                continue
            if needle and needle not in meta.name.lower() and needle not in room:
                continue
            listed.append(meta)
        summaries = await self.summaries.summaries(caller.user, {m.room: m for m in listed[:200]})
        for summary in summaries:
            summary["member"] = summary["id"] in mine
        return {"rooms": summaries}

    async def who(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        room = check_room_id(frame["room"])
        limit = frame.get("limit", 100)
        if not 1 <= limit <= 1000:
            raise BadRequest("limit must be 1..1000")
        await self.rooms.require_reader(caller.user, room)
        users, count = await self.summaries.who(room, limit)
        names = await self.presence.names(users)
        online: list[dict[str, Any]] = [{"id": u, "name": names.get(u) or u} for u in users]
        # Extension (v1.1): each user's role in created rooms, for member lists with moderation.
        meta = await self.streams.meta(room) if room != GENERAL and not room.startswith("dm:") else None
        if meta is not None and meta.kind in ROLE_KINDS:
            roles = await self.roles.roles(meta, users)
            for item in online:
                item["role"] = roles[item["id"]]
        return {"online": online, "count": count}

    async def where(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        target = check_user_id(frame["user"])
        online, last_seen = await self.presence.status(target)
        theirs = await self.rooms.user_rooms(UserId(target))
        visible = await self.rooms.visible_to(caller.user, list(theirs))
        return {"user": target, "online": online, "last_seen": last_seen, "rooms": visible}

    async def read(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        room = check_room_id(frame["room"])
        sid = check_stream_id(frame["id"])
        acc = await self.rooms.require_reader(caller.user, room)
        seq = await self.streams.seq_at(room, sid, acc.meta)
        read_id, read_seq = await self.unread.mark(caller.user, room, sid, seq)
        fresh, mentions = await concurrently(self.streams.meta(room), self.mentions.count(caller.user, room, read_seq))
        meta = fresh or acc.meta
        unread = unread_count(meta.seq, f"{read_id} {read_seq}")
        await concurrently(
            self.personal.publish(caller.user, {"type": "unread", "room": room, "unread": unread,
                                                "read_id": read_id, "mentions": mentions}),
            self._receipt(caller, room, meta.kind, read_id))
        return {"unread": unread, "read_id": read_id, "mentions": mentions}

    async def _receipt(self, caller: Caller, room: str, kind: str, read_id: str) -> None:
        """The room's other members see the marker move (small and direct rooms only)."""
        await self.ephemeral.receipt(room, kind, caller.user, caller.identity.name, read_id,
                                     self.settings.receipts_room_limit)

    async def typing(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        room = check_room_id(frame["room"])
        key = (caller.user, room)
        now = time.monotonic()
        interval = self.settings.typing_interval_ms / 1000.0
        if now - self._typing_seen.get(key, 0.0) < interval:
            return {"sent": False}  # throttled locally: no Redis work at all
        if len(self._typing_seen) > 50_000:
            self._typing_seen = {k: t for k, t in self._typing_seen.items() if now - t < interval}
        self._typing_seen[key] = now
        if room != GENERAL:
            await self.rooms.require_reader(caller.user, room)
        sent = await self.ephemeral.typing(room, caller.user, caller.identity.name)
        return {"sent": sent}

    # -- roles and kicks (v1.1, node.roles) ---------------------------------------------------
    async def set_role(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        room = check_room_id(frame["room"])
        target = check_user_id(frame["user"])
        await self.rooms.access(caller.user, room)  # not_found for rooms one may not see
        if await self.roles.set_role(room, caller.user, target, frame["role"]):
            # The target's sessions (any node) see their new role in a room `updated` event. Its
            # room object has only what changed (no epoch or last_id: cursors stay where they are).
            await self.personal.publish(target, {"type": "room", "change": "updated",
                                                 "room": {"id": room, "role": frame["role"]}, "by": caller.user})
        return {}

    async def kick(self, caller: Caller, frame: dict[str, Any]) -> dict[str, Any]:
        room = check_room_id(frame["room"])
        target = check_user_id(frame["user"])
        await self.rooms.access(caller.user, room)  # not_found for rooms one may not see
        await self.roles.kick(room, caller.user, target, self.settings.max_room_members)
        # The personal `room removed` event makes every node drop the target's live delivery
        # (Sessions.reconcile_room); their sends were refused from the kick on (the append
        # script checks the membership).
        await concurrently(
            self.personal.publish(target, {"type": "room", "change": "removed", "room": {"id": room},
                                           "by": caller.user}),
            self.mentions.forget(target, room))
        return {}
