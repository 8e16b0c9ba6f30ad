"""Live WebSocket sessions on this node and the membership changes applied to them.

A session goes live through :class:`WsLive` while :class:`~node.opener.SessionOpener` opens it.
Afterwards its rooms change through :meth:`Sessions.joined` / :meth:`Sessions.left` (its own
commands) and through the user's personal stream (invitations, DMs opened by others, changes
made on other nodes): every personal ``room`` event delivered on this node is applied to the
user's local sessions by :meth:`Sessions.reconcile_room`, under the session's lock, against the
membership in Redis -- so the order in which events and commands arrive does not matter.

The hand-over from replay to live is exact because of one synchronous step: for each room the
connection joins the room's topic and reads the topic's position ``P`` with no await in between.
From then on every entry after ``P`` reaches the connection live (held back until the replay is
written), and the replay is the range ``(cursor, P]``. Nothing is missed and nothing comes twice.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson

from .auth import Identity
from .config import Settings
from .fanout import Fanout, Topic
from .keys import Keys, UserId
from .opener import SessionOpener
from .pauses import PausePoints
from .personal import PersonalStreams, PersonalTopic
from .protocol import dumps, message_event, ws_text_frame
from .resume import plan_replay
from .roles import roles_of_new
from .rooms import Rooms
from .sink import Sink
from .streams import RoomMeta, RoomStreams, room_gap_event, room_summary
from .summaries import RoomSummaries
from .supervise import Jobs

PERSONAL = "@personal"  # the key of the user's personal topic among a session's topics


@dataclass(eq=False)
class Subscription:
    """The live side of one WebSocket session: its sink and the topics it is in."""

    sink: Sink
    topics: dict[str, Topic] = field(default_factory=dict)  # room id -> topic
    # Serialises membership changes of this session (join/leave/invite events may race).
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    closed: bool = False  # set when the connection ends: nothing may subscribe it again

    def __post_init__(self) -> None:
        self.sink.sub = self  # personal events find the session of a sink without the transport

    def rooms(self) -> list[str]:
        """The rooms the session is subscribed to now."""
        return [room for room in self.topics if room != PERSONAL]


class WsLive:
    """A WebSocket going live while its session opens: it joins the topics (see opener)."""

    def __init__(self, sessions: Sessions, sub: Subscription) -> None:
        self.sessions = sessions
        self.sub = sub
        self.created: list[Topic] = []

    @property
    def closed(self) -> bool:
        return self.sub.closed

    async def personal(self, user: UserId, epoch: str, last_id: str) -> str:
        topic, is_new = self.sessions.personal_topic(user, last_id, epoch)
        topic.sinks.add(self.sub.sink)
        self.sub.topics[PERSONAL] = topic
        upto = topic.pos
        if is_new:
            await self.sessions.fanout.reader_of(topic).interrupt(topic.key)
        return upto

    def rooms(self, metas: dict[str, RoomMeta]) -> dict[str, tuple[str, int]]:
        """Synchronous: join every topic and note where live delivery starts. A topic this node
        does not read yet starts at the room's newest entry as the metadata says (never 0-0:
        that would replay all history live)."""
        fanout = self.sessions.fanout
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
        fanout = self.sessions.fanout
        if self.created:
            await asyncio.gather(*(fanout.reader_of(t).interrupt(t.key) for t in self.created))


class Sessions:
    def __init__(self, settings: Settings, keys: Keys, fanout: Fanout, streams: RoomStreams, rooms: Rooms,
                 personal: PersonalStreams, summaries: RoomSummaries, opener: SessionOpener,
                 jobs: Jobs, pauses: PausePoints) -> None:
        self.settings = settings
        self.keys = keys
        self.fanout = fanout
        self.streams = streams
        self.rooms = rooms
        self.personal = personal
        self.summaries = summaries
        self.opener = opener
        self.jobs = jobs
        self.pauses = pauses

    async def open_ws(self, identity: Identity, hello: dict[str, Any], sub: Subscription,
                      session_id: str) -> None:
        """Open the session (:class:`~node.opener.SessionOpener`), write ``welcome`` and the
        replay, go live. The session's lock is held throughout, so membership changes that
        arrive live meanwhile are applied once it is open (:meth:`reconcile_room`)."""
        sink = sub.sink
        async with sub.lock:
            sink.hold()
            try:
                opened = await self.opener.open(identity, hello.get("cursors"), hello.get("personal"),
                                                session_id, WsLive(self, sub))
                if opened.closed:
                    return
                sink.push_now(ws_text_frame(dumps(opened.welcome)))
                for payload in opened.messages:
                    sink.push_now(ws_text_frame(payload))
                for payload in opened.personal:
                    sink.push_now(ws_text_frame(payload))
            finally:
                sink.release()

    # -- the user's personal stream on this node -------------------------------------------
    def personal_topic(self, user: str, last_id: str, epoch: str) -> tuple[Topic, bool]:
        """The user's personal topic on this node, created at ``last_id`` (the stream's newest
        entry as Redis said, never a client's cursor) if the node does not read it yet.

        Every creator (WebSocket session, long poll) gets the same topic with the same hook,
        so membership changes always reach the user's sessions. Synchronous."""
        key = self.keys.user_inbox(user)
        topic = self.fanout.get(key)
        if topic is not None:
            return topic, False
        return self.fanout.install(PersonalTopic(key, self.keys.user_shard(user), user, last_id,
                                                 epoch, self._after_personal)), True

    def _after_personal(self, topic: Topic, entries: list[tuple[str, dict[bytes, bytes]]]) -> None:
        """Personal events delivered on this node: apply room membership changes to the user's
        local sessions, and move the user's "delivered up to" marker."""
        if not topic.sinks:
            return
        for _sid, fields in entries:
            try:
                event = orjson.loads(fields.get(b"d", b"{}"))
            except orjson.JSONDecodeError:
                continue
            if event.get("type") != "room" or event.get("change") not in ("added", "removed"):
                continue
            room = (event.get("room") or {}).get("id")
            if not isinstance(room, str):
                continue
            start = (event.get("room") or {}).get("last_id") or "0-0"
            removed = event.get("change") == "removed"
            for sink in list(topic.sinks):
                sub = getattr(sink, "sub", None)  # a long poll's waiter has no session
                if sub is not None:
                    if removed:
                        # At once, in this dispatch, before the event reaches the socket: a
                        # kicked or leaving user gets nothing of the room after being told.
                        # The reconcile below puts it back if Redis says they are a member.
                        self.unsubscribe_room(sub, room)
                    elif room in sub.topics:
                        # Subscribed already (the session's own join, create or dm): nothing to
                        # check. A later leave or kick comes as its own "removed" event.
                        continue
                    self.jobs.spawn(self.reconcile_room(sub, UserId(topic.name), room, start), "membership")
        self.jobs.spawn(self.personal.mark_delivered(topic.name, entries[-1][0]), "personal-delivered")

    # -- membership changes ----------------------------------------------------------------
    async def joined(self, user: UserId, live: Subscription | None, meta: RoomMeta, users: list[str],
                     inviter: str | None = None, announce: bool = True,
                     summary_for_user: bool = True) -> dict[str, Any]:
        """After users became members: subscribe the acting session at once (``live``), and
        tell every session of every user (any node) through their personal streams. Returns
        the room's summary for ``user`` (``{}`` without ``summary_for_user``)."""
        summary: dict[str, Any] = {}
        if live is not None:
            async with live.lock:
                position = await self.subscribe_room(live, meta.room, None, meta)
            # The topic knows the seq at the position (as a hello's rooms do): no read of it.
            topic = live.topics.get(meta.room)
            seqs: dict[str, int] | None = ({meta.room: topic.seq} if topic is not None and topic.pos == position
                                           and topic.seq >= 0 else None)
            summary = (await self.summaries.summaries(user, {meta.room: meta}, {meta.room: position}, seqs))[0]
        elif summary_for_user:
            summary = (await self.summaries.summaries(user, {meta.room: meta}))[0]
        if announce:
            base = room_summary(meta, meta.last_id, 0, 0, 0)
            event: dict[str, Any] = {"type": "room", "change": "added", "room": base}
            if inviter:
                event["by"] = inviter
            for role, group in roles_of_new(meta, list(dict.fromkeys(users))).items():
                await self.personal.publish_many(group, {**event, "room": {**base, "role": role}})
        return summary

    async def left(self, user: UserId, live: Subscription | None, room: str) -> None:
        if live is not None:
            async with live.lock:
                self.unsubscribe_room(live, room)
        await self.personal.publish(user, {"type": "room", "change": "removed", "room": {"id": room}})

    async def subscribe_room(self, sub: Subscription, room: str, start: str | None,
                             meta: RoomMeta | None = None) -> str:
        """Add a room to a live session (after join/invite/dm, on any node). Call with
        ``sub.lock`` held.

        Live delivery starts after the topic's position ``P``; with ``start`` the entries in
        ``(start, P]`` are replayed first, so a membership learnt late opens no gap (or, if the
        gap is past what can be replayed, the client is told ``recovered: false``). Returns
        ``P``, the room's ``last_id`` as far as this session is concerned. ``meta``: the room's
        metadata if the caller has just read it.
        """
        if room in sub.topics:
            return sub.topics[room].pos
        if meta is None:  # (the caller's own command just read it: no second read)
            meta = await self.streams.meta(room)
        if meta is None or sub.closed:
            return "0-0"
        sink = sub.sink
        sink.hold()
        try:
            if room in sub.topics or sink.closed:
                return sub.topics[room].pos if room in sub.topics else "0-0"
            topic, is_new = self.fanout.add_room_topic(room, meta)
            topic.sinks.add(sink)
            sub.topics[room] = topic
            upto = topic.pos
            if is_new:
                await self.fanout.reader_of(topic).interrupt(topic.key)
            if start is not None and start != upto:
                limit = self.settings.replay_limit
                entries = await self.streams.replay_range(room, start, upto, limit)
                plan = plan_replay(meta.epoch, topic.epoch, start, upto, entries, limit)
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
                member = await self.rooms.is_member(user, room)
                await self.pauses.point("reconcile.checked")
                if sub.closed:
                    return
                if member and room not in sub.topics:
                    await self.subscribe_room(sub, room, start)
                elif not member and room in sub.topics:
                    self.unsubscribe_room(sub, room)
        finally:
            await self.pauses.point("reconcile.done")

    def unsubscribe_room(self, sub: Subscription, room: str) -> None:
        topic = sub.topics.pop(room, None)
        if topic is not None:
            self.fanout.unsubscribe(topic, sub.sink)

    def close_ws(self, sub: Subscription) -> None:
        sub.closed = True
        for topic in list(sub.topics.values()):
            self.fanout.unsubscribe(topic, sub.sink)
        sub.topics.clear()
