"""Opening a session: the welcome, the room replays and the personal replay from the client's
cursors -- one path for a WebSocket ``hello`` and a polling client's ``POST /api/v1/session``.

The transports differ only in how they go live (a WebSocket joins the topics of its rooms, a
polling client does not) and in how they send what :meth:`SessionOpener.open` returns.

Order matters. The personal stream's position ``P0`` is taken first and the user's rooms are
read after it. A membership change (invitation, new DM, kick) writes the membership before it
publishes its personal event, so it is either among the rooms read here or its event comes
after ``P0`` (live, for a WebSocket; in the next poll for a polling client).

For each room, the position ``P`` where live delivery starts is taken synchronously (a
WebSocket joins the room's topic and reads the topic's position with no await in between;
a polling client takes the room's newest entry as its metadata says). The replay is exactly
``(cursor, P]``: nothing missed, nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from .auth import Identity
from .config import Settings
from .keys import GENERAL, RoomId, UserId
from .metrics import METRICS
from .pauses import PausePoints
from .personal import PersonalStreams, personal_payload
from .protocol import dumps, message_event, now_ms, parse_cursor, stream_id_tuple
from .redisio import concurrently
from .resume import plan_replay
from .rooms import Rooms, rooms_in_order
from .streams import RoomMeta, RoomStreams
from .summaries import KnownFacts, RoomSummaries

MAX_CURSORS = 1000


def parse_cursors(raw: Any) -> dict[str, tuple[str, str]]:
    """Valid cursors of a hello/session/poll body; malformed ones are ignored (no replay)."""
    out: dict[str, tuple[str, str]] = {}
    if not isinstance(raw, dict):
        return out
    for room, value in list(raw.items())[:MAX_CURSORS]:
        cursor = parse_cursor(value)
        if isinstance(room, str) and cursor is not None:
            out[room] = cursor
    return out


class Live(Protocol):
    """How a transport goes live while a session opens (a WebSocket; polling has none)."""

    async def personal(self, user: UserId, epoch: str, last_id: str) -> str:
        """Join the user's personal topic; returns the position live delivery starts after."""

    def rooms(self, metas: dict[str, RoomMeta]) -> dict[str, tuple[str, int]]:
        """Join the rooms' topics, synchronously; returns room -> (position, seq at it or -1)."""

    async def started(self) -> None:
        """After :meth:`rooms`: make the readers include the topics it created."""

    @property
    def closed(self) -> bool:
        """The connection ended meanwhile: stop."""


@dataclass
class Opened:
    welcome: dict[str, Any]
    messages: list[bytes] = field(default_factory=list)  # room replays, encoded, in order
    personal: list[bytes] = field(default_factory=list)  # personal replay payloads, in order
    positions: dict[str, str] = field(default_factory=dict)  # room -> P
    closed: bool = False  # the connection ended while opening


class SessionOpener:
    def __init__(self, settings: Settings, rooms: Rooms, streams: RoomStreams, personal: PersonalStreams,
                 summaries: RoomSummaries, pauses: PausePoints) -> None:
        self.settings = settings
        self.rooms = rooms
        self.streams = streams
        self.personal = personal
        self.summaries = summaries
        self.pauses = pauses

    async def room_metas(self, rooms: list[RoomId]) -> dict[str, RoomMeta]:
        """Metadata of the user's rooms; recreates ``general`` if Redis lost it."""
        metas = await self.streams.metas(list(rooms))
        if metas.get(GENERAL) is None:
            await self.rooms.ensure_general()
            metas[GENERAL] = await self.streams.meta(GENERAL)
        return {room: meta for room, meta in metas.items() if meta is not None}

    async def room_facts(self, rooms: list[RoomId], user: UserId,
                         markers: dict[str, tuple[Any, Any]]) -> tuple[dict[str, RoomMeta], KnownFacts]:
        """Metadata of the user's rooms (recreating ``general`` if Redis lost it), with what the
        welcome's summaries need of them (``markers``: read markers and mentions read with the
        personal stream): one read."""
        facts = await self.streams.room_facts(list(rooms), user)
        if (general := facts.get(GENERAL)) is None or general.meta is None:
            await self.rooms.ensure_general()
            facts.update(await self.streams.room_facts([GENERAL], user))
        metas = {room: f.meta for room, f in facts.items() if f.meta is not None}
        known = KnownFacts({room: f.members for room, f in facts.items() if room != GENERAL and f.meta is not None},
                           {room: f.stored_role or None for room, f in facts.items() if f.meta is not None},
                           markers)
        return metas, known

    async def open(self, identity: Identity, raw_cursors: Any, raw_personal: Any, session_id: str,
                   live: Live | None) -> Opened:
        settings = self.settings
        user = identity.user
        epoch, pdel, last_pid, member_of, markers = await self.personal.open_for_session(user)
        p0 = await live.personal(user, epoch, last_pid) if live is not None else last_pid
        # The rooms read with the personal stream's newest id hold every change whose event is
        # at or before it, and live personal delivery starts at p0: when this node already read
        # the user's stream past that id, read the rooms again, after it.
        rooms = rooms_in_order(member_of) if stream_id_tuple(p0) <= stream_id_tuple(last_pid) \
            else await self.rooms.user_rooms(user)
        metas, known = await self.room_facts(rooms, user, markers)
        await self.pauses.point("session.rooms_read")
        if live is not None and live.closed:
            return Opened({}, closed=True)

        if live is not None:
            joined = live.rooms(metas)
            await live.started()
        else:
            joined = {room: (meta.last_id, meta.seq) for room, meta in metas.items()}
        positions = {room: pos for room, (pos, _) in joined.items()}

        recovered: dict[str, bool] = {}
        messages: list[bytes] = []
        # The replay goes through the connection's bounded buffer: past this budget, further
        # rooms get `recovered: false` (reload with history) instead of a replay that would
        # overflow the buffer and cut the client off as slow, again at every reconnect.
        budget = settings.outbound_buffer_bytes // 2
        # Cursors of rooms that are not the user's get no replay, and no hint that they exist.
        cursors = {room: c for room, c in parse_cursors(raw_cursors).items() if room in metas}
        # The replays, the summaries and the personal replay are independent: read concurrently.
        seqs = {room: seq for room, (_, seq) in joined.items() if seq >= 0}
        ranges, summaries, (personal, personal_ok) = await concurrently(
            # A cursor at the position has nothing to replay (plan_replay says so without
            # entries): no read. That is every room of a client that was live until now.
            self.streams.replay_ranges(
                {room: (cursor_id, positions[room]) for room, (cursor_epoch, cursor_id) in cursors.items()
                 if cursor_epoch == metas[room].epoch and cursor_id != positions[room]},
                settings.replay_limit),
            self.summaries.summaries(user, metas, positions, seqs, known),
            self._personal_replay(user, raw_personal, epoch, pdel, p0))
        for room, (cursor_epoch, cursor_id) in cursors.items():
            meta = metas[room]
            upto = positions[room]
            entries = ranges.get(room, [])
            plan = plan_replay(cursor_epoch, meta.epoch, cursor_id, upto, entries, settings.replay_limit)
            encoded = [dumps(message_event(room, sid.decode(), fields)) for sid, fields in plan.entries]
            size = sum(len(e) for e in encoded)
            ok = plan.recovered and size <= budget
            recovered[room] = ok
            METRICS.resumes.labels(recovered=str(ok).lower()).inc()
            if ok:
                budget -= size
                messages.extend(encoded)
                METRICS.replay_messages.observe(len(encoded))

        welcome = {
            "type": "welcome",
            "user": {"id": user, "name": identity.name},
            "node": settings.node_id,
            "session": session_id,
            "server_time": now_ms(),
            "rooms": summaries,
            "recovered": recovered,
            "personal": {"epoch": epoch, "recovered": personal_ok, "last_id": p0},
            "limits": settings.public_limits(),
        }
        return Opened(welcome, messages, personal, positions)

    async def _personal_replay(self, user: UserId, raw_cursor: Any, epoch: str, pdel: str,
                               upto: str) -> tuple[list[bytes], bool]:
        """After the client's cursor, or without one after the user's delivered-up-to marker,
        up to ``upto``. At most CHAT_PERSONAL_MAXLEN events and a quarter of the outbound
        buffer: the newest are kept (they matter most, and the cursor moves past all of them);
        if any were left out, or trimmed before they were delivered, it is not recovered."""
        cursor = parse_cursor(raw_cursor)
        recovered = True
        after = pdel
        if cursor is not None:
            if cursor[0] == epoch and stream_id_tuple(cursor[1]) <= stream_id_tuple(upto):
                after = cursor[1]
            else:
                recovered = False  # another epoch, or a cursor from this stream's future
        entries, complete = await self.personal.newest_between(user, after, upto, self.settings.personal_maxlen)
        recovered = recovered and complete
        payloads = [p for sid, fields in entries if (p := personal_payload(sid.decode(), fields)) is not None]
        budget, kept = self.settings.outbound_buffer_bytes // 4, 0
        for i in range(len(payloads) - 1, -1, -1):
            kept += len(payloads[i])
            if kept > budget:
                payloads = payloads[i + 1:]
                recovered = False
                break
        if entries:
            await self.personal.mark_delivered(user, entries[-1][0].decode())
        return payloads, recovered
