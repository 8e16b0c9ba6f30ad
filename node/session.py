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
from .keys import UserId
from .protocol import dumps, message_event, ws_text_frame
from .resume import plan_replay
from .streams import RoomMeta, room_gap_event

if TYPE_CHECKING:
    from .app import Node

@dataclass
class Subscription:
    """The live side of one WebSocket session: its sink and the topics it is in."""

    sink: Sink
    topics: dict[str, Topic] = field(default_factory=dict)  # room id -> topic
    # Serialises membership changes of this session (join/leave/invite events may race).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False  # set when the connection ends: nothing may subscribe it again


class WsLive:
    """A WebSocket going live while its session opens: it joins the topics (see opener)."""

    def __init__(self, node: Node, sub: Subscription) -> None:
        self.node = node
        self.sub = sub
        self.created: list[Topic] = []

    @property
    def closed(self) -> bool:
        return self.sub.closed

    async def personal(self, user: UserId, epoch: str, last_id: str) -> str:
        topic, is_new = self.node.personal_topic(user, last_id, epoch)
        topic.sinks.add(self.sub.sink)
        self.sub.topics["@personal"] = topic
        upto = topic.pos
        if is_new:
            await self.node.fanout.reader_of(topic).interrupt(topic.key)
        return upto

    def rooms(self, metas: dict[str, RoomMeta]) -> dict[str, tuple[str, int]]:
        """Synchronous: join every topic and note where live delivery starts. A topic this node
        does not read yet starts at the room's newest entry as the metadata says (never 0-0:
        that would replay all history live)."""
        fanout = self.node.fanout
        sink = self.sub.sink
        out: dict[str, tuple[str, int]] = {}
        for room, meta in metas.items():
            topic, is_new = fanout.add_room_topic(room, meta)
            topic.sinks.add(sink)
            self.sub.topics[room] = topic
            out[room] = (topic.pos, topic.seq)
            if is_new:
                self.created.append(topic)
        return out

    async def started(self) -> None:
        fanout = self.node.fanout
        if self.created:
            await asyncio.gather(*(fanout.reader_of(t).interrupt(t.key) for t in self.created))


class Sessions:
    def __init__(self, node: Node) -> None:
        self.node = node

    async def open_ws(self, identity: Identity, hello: dict[str, Any], sub: Subscription,
                      session_id: str) -> None:
        """Open the session (:class:`~node.opener.SessionOpener`), write ``welcome`` and the
        replay, go live. The session's lock is held throughout, so membership changes that
        arrive live meanwhile are applied once it is open (:meth:`reconcile_room`)."""
        sink = sub.sink
        async with sub.lock:
            sink.hold()
            try:
                opened = await self.node.opener.open(identity, hello.get("cursors"), hello.get("personal"),
                                                     session_id, WsLive(self.node, sub))
                if opened.closed:
                    return
                sink.push_now(ws_text_frame(dumps(opened.welcome)))
                for payload in opened.messages:
                    sink.push_now(ws_text_frame(payload))
                for payload in opened.personal:
                    sink.push_now(ws_text_frame(payload))
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
