"""Opening a session: ``hello`` -> subscribe -> replay -> ``welcome`` -> live.

The hand-over from replay to live is exact because of one synchronous step: for each room the
connection joins the room's topic and reads the topic's position ``P`` with no await in between.
From then on every entry after ``P`` reaches the connection live (held back until the replay is
written), and the replay is the range ``(cursor, P]``. Nothing is missed and nothing comes twice.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .auth import Identity
from .fanout import Sink, Topic
from .keys import RoomId, UserId
from .metrics import METRICS
from .protocol import dumps, message_event, parse_cursor, ws_text_frame
from .resume import plan_replay
from .streams import RoomMeta, room_gap_event

if TYPE_CHECKING:
    from .app import Node

MAX_CURSORS = 1000


@dataclass
class Subscription:
    """The live side of one WebSocket session: its sink and the topics it is in."""

    sink: Sink
    topics: dict[str, Topic] = field(default_factory=dict)  # room id -> topic
    # Serialises membership changes of this session (join/leave/invite events may race).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False  # set when the connection ends: nothing may subscribe it again


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


class Sessions:
    def __init__(self, node: Node) -> None:
        self.node = node

    async def room_metas(self, rooms: list[RoomId]) -> dict[str, RoomMeta]:
        """Metadata of the user's rooms; recreates ``general`` if Redis lost it."""
        node = self.node
        metas = await node.streams.metas(list(rooms))
        if metas.get("general") is None:
            await node.rooms.ensure_general()
            metas["general"] = await node.streams.meta("general")
        return {room: meta for room, meta in metas.items() if meta is not None}

    async def open_ws(self, identity: Identity, hello: dict[str, Any], sub: Subscription,
                      session_id: str) -> None:
        """Subscribe ``sub`` to the user's rooms, write ``welcome`` and the replay, go live.

        Order matters. The personal stream is joined first, at position ``P0``; the user's rooms
        are read after that. A membership change (invitation, new DM, kick) writes the membership
        before it publishes its personal event, so it is either in the rooms read here or its
        event comes after ``P0`` and reaches this session live, where it is applied
        (:meth:`reconcile_room`) once the session is open: the session's lock is held until then.
        """
        node = self.node
        pauses = node.pauses
        sink = sub.sink
        async with sub.lock:
            sink.hold()
            try:
                personal = await node.join_personal(identity.user, sub)
                rooms = await node.rooms.user_rooms(identity.user)
                metas = await self.room_metas(rooms)
                await pauses.point("session.rooms_read")
                if sub.closed:
                    return
                cursors = parse_cursors(hello.get("cursors"))
                fanout = node.fanout

                # --- synchronous: join every topic and note where live delivery starts ---------
                # A topic this node does not read yet starts at the room's newest entry as the
                # metadata just read says (never at 0-0: that would replay all history live).
                positions: dict[str, str] = {}
                created: list[Topic] = []
                for room, meta in metas.items():
                    topic, is_new = fanout.add_room_topic(room, meta)
                    topic.sinks.add(sink)
                    sub.topics[room] = topic
                    positions[room] = topic.pos
                    if is_new:
                        created.append(topic)
                # ---------------------------------------------------------------------------------
                if created:
                    await asyncio.gather(*(fanout.reader_of(t).interrupt(t.key) for t in created))

                recovered: dict[str, bool] = {}
                replay_frames: list[bytes] = []
                # The replay goes through the connection's bounded buffer: past this budget,
                # further rooms get `recovered: false` (reload with history) instead of a replay
                # that would overflow the buffer and cut the client off as slow, again at every
                # reconnect.
                budget = node.settings.outbound_buffer_bytes // 2
                for room, (epoch, cursor_id) in cursors.items():
                    room_meta = metas.get(room)
                    room_topic = sub.topics.get(room)
                    if room_meta is None or room_topic is None:
                        continue  # not a room of this user: no replay, and no hint that it exists
                    upto = positions[room]
                    entries = await node.streams.replay_range(room, cursor_id, upto, node.settings.replay_limit) \
                        if epoch == room_topic.epoch else []
                    plan = plan_replay(epoch, room_topic.epoch, cursor_id, upto, entries, node.settings.replay_limit)
                    frames = [ws_text_frame(dumps(message_event(room, sid.decode(), fields)))
                              for sid, fields in plan.entries]
                    size = sum(len(f) for f in frames)
                    ok = plan.recovered and size <= budget
                    recovered[room] = ok
                    METRICS.resumes.labels(recovered=str(ok).lower()).inc()
                    if ok:
                        budget -= size
                        replay_frames.extend(frames)
                        METRICS.replay_messages.observe(len(frames))

                summaries = await node.summaries(identity.user, metas, positions)
                welcome = {
                    "type": "welcome",
                    "user": {"id": identity.user, "name": identity.name},
                    "node": node.settings.node_id,
                    "session": session_id,
                    "server_time": node.now_ms(),
                    "rooms": summaries,
                    "recovered": recovered,
                    "limits": node.settings.public_limits(),
                }
                personal_frames = await node.replay_personal(identity.user, hello, personal, welcome)
                sink.push_now(ws_text_frame(dumps(welcome)))
                for frame in replay_frames:
                    sink.push_now(frame)
                for frame in personal_frames:
                    sink.push_now(frame)
            finally:
                sink.release()

    async def subscribe_room(self, sub: Subscription, room: str, start: str | None) -> str:
        """Add a room to a live session (after join/invite/dm, on any node). Call with
        ``sub.lock`` held.

        Live delivery starts after the topic's position ``P``; with ``start`` the entries in
        ``(start, P]`` are replayed first, so a membership learnt late opens no gap (or, if the
        gap is past what can be replayed, the client is told ``recovered: false``). Returns
        ``P``, the room's ``last_id`` as far as this session is concerned.
        """
        node = self.node
        if room in sub.topics:
            return sub.topics[room].pos
        meta = await node.streams.meta(room)
        if meta is None or sub.closed:
            return "0-0"
        sink = sub.sink
        sink.hold()
        try:
            if room in sub.topics or sink.closed:
                return sub.topics[room].pos if room in sub.topics else "0-0"
            topic, is_new = node.fanout.add_room_topic(room, meta)
            topic.sinks.add(sink)
            sub.topics[room] = topic
            upto = topic.pos
            if is_new:
                await node.fanout.reader_of(topic).interrupt(topic.key)
            if start is not None and start != upto:
                entries = await node.streams.replay_range(room, start, upto, node.settings.replay_limit)
                plan = plan_replay(meta.epoch, topic.epoch, start, upto, entries, node.settings.replay_limit)
                if not plan.recovered:
                    # Too much to replay (or trimmed): say so, the client reloads with history.
                    sink.push_now(ws_text_frame(dumps(room_gap_event(meta, upto))))
                for sid, fields in plan.entries:
                    sink.push_now(ws_text_frame(dumps(message_event(room, sid.decode(), fields))))
            return upto
        finally:
            sink.release()

    async def reconcile_room(self, sub: Subscription, user: UserId, room: str, start: str | None) -> None:
        """Make the session's subscription to ``room`` match the membership in Redis.

        Membership events can arrive late or out of step with the session's own commands;
        checking the source of truth under the session's lock makes their order irrelevant.
        A session closed meanwhile is left alone (re-subscribing its dead sink would make the
        node read that room for ever).
        """
        try:
            async with sub.lock:
                if sub.closed:
                    return
                member = await self.node.rooms.is_member(user, room)
                await self.node.pauses.point("reconcile.checked")
                if sub.closed:
                    return
                if member and room not in sub.topics:
                    await self.subscribe_room(sub, room, start)
                elif not member and room in sub.topics:
                    self.unsubscribe_room(sub, room)
        finally:
            await self.node.pauses.point("reconcile.done")

    def unsubscribe_room(self, sub: Subscription, room: str) -> None:
        topic = sub.topics.pop(room, None)
        if topic is not None:
            self.node.fanout.unsubscribe(topic, sub.sink)

    def close_ws(self, sub: Subscription) -> None:
        sub.closed = True
        for topic in list(sub.topics.values()):
            self.node.fanout.unsubscribe(topic, sub.sink)
        sub.topics.clear()
