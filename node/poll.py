"""The HTTP polling fallback: the adaptive interval (pure) and stateless collection of events.

A poll carries the client's cursors; any node answers it from them alone, so consecutive polls
may hit different nodes with no sticky sessions. The interval decays while nothing happens and
snaps back to the minimum on activity (PROTOCOL.md section 3):

* after a poll that returned events: ``min_ms``;
* after an empty one: ``min(max_ms, interval_ms * decay)``;
* an unfocused client: at least ``unfocused_ms``;
* a node under load multiplies the result by its load factor (at most twice ``max_ms``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from .auth import Identity
from .errors import BadRequest, RateLimited
from .fanout import Fanout, Topic
from .metrics import METRICS
from .online import Online
from .opener import SessionOpener, parse_cursors
from .personal import PersonalStreams, personal_payload
from .protocol import message_event, parse_cursor, stream_id_tuple
from .redisio import concurrently
from .resume import ReplayPlan, plan_replay
from .rooms import Rooms, rooms_in_order
from .session import Sessions
from .status import NodeStatus
from .streams import RoomStreams, room_summary

if TYPE_CHECKING:
    from .config import Settings


def next_poll_ms(had_events: bool, interval_ms: int | float | None, focused: bool,
                 settings: Settings, load: float = 1.0) -> int:
    """The interval before the client's next poll, in milliseconds."""
    lo, hi = settings.poll_min_ms, settings.poll_max_ms
    if had_events or not interval_ms or interval_ms <= 0:
        interval = float(lo)
    else:
        interval = min(float(hi), max(float(lo), float(interval_ms)) * settings.poll_decay)
    if not focused:
        interval = max(interval, float(settings.poll_unfocused_ms))
    if load > 1.0:
        interval = min(interval * load, 2.0 * hi)
    return int(round(interval))


@dataclass
class Collected:
    events: list[dict[str, Any]] = field(default_factory=list)
    cursors: dict[str, dict[str, str]] = field(default_factory=dict)
    personal: dict[str, str] = field(default_factory=dict)
    recovered: dict[str, bool] = field(default_factory=dict)
    personal_recovered: bool = True
    personal_last: str = "0-0"  # the personal stream's newest id when collected
    metas: dict[str, Any] = field(default_factory=dict)


POLL_CACHE_SWEEP_S = 5.0
MAX_BEATS_PER_USER = 16  # poll sessions (tabs, devices) of one user whose heartbeats are known


class PollWaiter:
    """A sink-shaped object that wakes a long poll when any of its topics gets an entry."""

    __slots__ = ("event", "owner", "session", "closed", "sub")

    # Typing and presence are not part of the polling transport: they must not wake a long poll
    # (it would return empty and every waiter of the room would poll again at once).
    takes_ephemeral = False

    def __init__(self, owner: str) -> None:
        self.event = asyncio.Event()
        self.owner = owner
        self.session = ""
        self.closed = False
        self.sub = None  # not a session: membership changes are not applied to a poll

    def push(self, frame: bytes) -> None:
        self.event.set()

    def push_now(self, frame: bytes) -> None:
        self.event.set()


@dataclass(slots=True)
class PollState:
    """What the node learnt from a user's last full poll, kept while the user keeps polling."""

    metas: dict[str, Any]
    topics: list[Topic]  # the rooms' topics then the personal one, pinned while the state lives
    personal_epoch: str
    personal_pos: str  # the personal topic's position then: a newer entry may change the rooms
    expires: float
    # Poll session -> when the presence entry its last heartbeat wrote expires (monotonic):
    # a poll skips the heartbeat while that covers it (as a WebSocket beats every TTL/3).
    beats: dict[str, float] = field(default_factory=dict)


class PollCache:
    """The rooms, epochs and stream positions behind a user's polls, so that a poll that finds
    nothing new costs no Redis read (PROTOCOL.md 3; issue 14).

    After a full poll the node pins the topics of the user's rooms and personal stream (it keeps
    reading them with no sink) until a little after the next poll is due. A poll whose cursors
    equal those topics' positions, with no personal entry since (membership changes arrive there
    first), has nothing to collect: it waits on the topics at once. Anything else -- a cursor
    from another node, a room without a cursor, an entry since, an expired or evicted state --
    takes the full path, which rebuilds the state. Bounded by CHAT_POLL_CACHE_USERS (oldest out).
    """

    def __init__(self, fanout: Fanout, max_users: int) -> None:
        self.fanout = fanout
        self.max_users = max_users
        self.states: dict[str, PollState] = {}

    def remember(self, user: str, collected: Collected, personal_topic: Topic, ttl_s: float) -> list[Topic]:
        """Keep ``collected``'s rooms for ``user``; returns the topics this created (the caller
        makes their readers pick them up)."""
        fresh: list[Topic] = []
        topics: list[Topic] = []
        for room, meta in collected.metas.items():
            topic, is_new = self.fanout.add_room_topic(room, meta)
            if is_new:
                fresh.append(topic)
            topics.append(topic)
        topics.append(personal_topic)
        for topic in topics:
            self.fanout.pin(topic)
        self.forget(user)
        self.states[user] = PollState(collected.metas, topics, collected.personal["epoch"],
                                      personal_topic.pos, time.monotonic() + ttl_s)
        while len(self.states) > self.max_users:
            self.forget(next(iter(self.states)))
        return fresh

    def beat_needed(self, user: str, session: str, now: float, cover_s: float) -> bool:
        """Whether this poll must write a presence heartbeat: the last one of ``session`` does
        not keep it online for ``cover_s`` more seconds."""
        state = self.states.get(user)
        return state is None or state.beats.get(session, 0.0) - now < cover_s

    def beaten(self, user: str, session: str, until: float) -> None:
        state = self.states.get(user)
        if state is not None:
            if session not in state.beats and len(state.beats) >= MAX_BEATS_PER_USER:
                state.beats.clear()
            state.beats[session] = until

    def forget(self, user: str) -> None:
        state = self.states.pop(user, None)
        if state is not None:
            for topic in state.topics:
                self.fanout.unpin(topic)

    def plan(self, user: str, raw_cursors: Any, raw_personal: Any,
             ttl_s: float) -> tuple[Collected, dict[str, tuple[str, str]]] | None:
        """What a poll must read, if the node knows the user's rooms and positions: the
        collection so far (cursors at the node's positions, no personal entry since) and the
        rooms whose cursor is behind the node's position, with the range to replay
        (cursor, position). ``None`` when it does not know (take the full path)."""
        state = self.states.get(user)
        now = time.monotonic()
        if state is None:
            return None
        if state.expires < now:
            self.forget(user)
            return None
        personal = state.topics[-1]
        pcursor = parse_cursor(raw_personal)
        if (pcursor is None or self.fanout.get(personal.key) is not personal
                or personal.pos != state.personal_pos or pcursor != (state.personal_epoch, personal.pos)):
            return None
        cursors = parse_cursors(raw_cursors)
        if cursors.keys() != state.metas.keys():
            return None
        out = Collected(personal={"epoch": state.personal_epoch, "id": personal.pos},
                        personal_last=personal.pos, metas=state.metas)
        behind: dict[str, tuple[str, str]] = {}
        for topic in state.topics[:-1]:
            epoch, cursor_id = cursors[topic.name]
            if (self.fanout.get(topic.key) is not topic or epoch != topic.epoch
                    or state.metas[topic.name].epoch != topic.epoch):
                return None
            if cursor_id != topic.pos:
                if stream_id_tuple(cursor_id) > stream_id_tuple(topic.pos):
                    return None  # the client saw more than this node read so far
                behind[topic.name] = (cursor_id, topic.pos)
            out.cursors[topic.name] = {"epoch": topic.epoch, "id": cursor_id}
        state.expires = now + ttl_s
        return out, behind

    def sweep(self) -> None:
        now = time.monotonic()
        for user in [u for u, st in self.states.items() if st.expires < now]:
            self.forget(user)

    def clear(self) -> None:
        for user in list(self.states):
            self.forget(user)


class Poller:
    def __init__(self, settings: Settings, rooms: Rooms, streams: RoomStreams, personal: PersonalStreams,
                 fanout: Fanout, sessions: Sessions, opener: SessionOpener, online: Online,
                 status: NodeStatus) -> None:
        self.settings = settings
        self.rooms = rooms
        self.streams = streams
        self.personal = personal
        self.fanout = fanout
        self.sessions = sessions
        self.opener = opener
        self.online = online
        self.status = status
        # Long polls waiting on this node, per user (CHAT_MAX_POLLS_PER_USER): each holds a
        # request, a waiter on the user's topics and up to 25 s of the node's attention.
        self.waiting: Counter[str] = Counter()
        self._waiters: set[PollWaiter] = set()
        self.cache = PollCache(fanout, settings.poll_cache_users)

    async def collect(self, identity: Identity, raw_cursors: Any, raw_personal: Any,
                      limit_per_room: int) -> Collected:
        """Every event after the given cursors, oldest first per room, then personal events.

        Rooms without a cursor start at their newest message (no events); a cursor that cannot
        be resumed gives a ``room`` event with ``recovered: false`` and a fresh cursor.
        """
        user = identity.user
        out = Collected()
        cursors = parse_cursors(raw_cursors)
        # The personal stream first, then the rooms (as for a WebSocket session): a membership
        # change is written before its personal event, so a room added by an event of this
        # response is in the rooms read below, and starts where the event says it did.
        # The rooms come with the personal stream's newest id (one script, one instant): they
        # hold every membership change whose event is collected here.
        epoch, pdel, last_id, member_of = await self.personal.open_with_rooms(user)
        personal_events, metas = await concurrently(
            self._collect_personal(user, raw_personal, out, (epoch, pdel, last_id)),
            self.opener.room_metas(rooms_in_order(member_of)))
        added_at = {e["room"]["id"]: e["room"].get("last_id") or "0-0" for e in personal_events
                    if e.get("type") == "room" and e.get("change") == "added"
                    and isinstance(e.get("room"), dict) and isinstance(e["room"].get("id"), str)}
        out.metas = metas
        # One response carries at most `limit_per_room` messages in all: past that, rooms keep
        # their cursors and the rest comes with the next poll (paging, not a gap).
        remaining = limit_per_room
        for room, meta in metas.items():
            cursor = cursors.get(room)
            if cursor is None and room in added_at:
                # Joined since the last poll: the messages since the invitation are part of it.
                cursor = (meta.epoch, added_at[room])
            if cursor is None:
                out.cursors[room] = {"epoch": meta.epoch, "id": meta.last_id}
                continue
            epoch, cursor_id = cursor
            upto = meta.last_id
            if (epoch == meta.epoch and cursor_id == upto) or remaining <= 0:
                out.cursors[room] = {"epoch": epoch, "id": cursor_id}
                continue
            # remaining + 1 entries: the cursor's own entry proves nothing was trimmed after it.
            entries = await self.streams.replay_range(room, cursor_id, upto, remaining - 1) \
                if epoch == meta.epoch else []
            plan = plan_replay(epoch, meta.epoch, cursor_id, upto, entries, len(entries))
            if plan.recovered:
                plan = ReplayPlan(True, list(plan.entries)[:remaining])
                remaining -= len(plan.entries)
            out.recovered[room] = plan.recovered
            if not plan.recovered:
                out.events.append({"type": "room", "change": "updated", "recovered": False,
                                   "room": room_summary(meta, meta.last_id, 0, 0, 0)})
                out.cursors[room] = {"epoch": meta.epoch, "id": meta.last_id}
                continue
            last = cursor_id
            for sid, fields in plan.entries:
                last = sid.decode()
                out.events.append(message_event(room, last, fields))
            out.cursors[room] = {"epoch": meta.epoch, "id": last}

        out.events.extend(personal_events)
        return out

    async def _collect_personal(self, user: str, raw_personal: Any, out: Collected,
                                opened: tuple[str, str, str]) -> list[dict[str, Any]]:
        """Personal events after the poll's personal cursor (oldest first, paged: the cursor
        moves to the last one returned), given the stream's (epoch, delivered-up-to, newest id).
        Sets ``out.personal`` and ``out.personal_last``."""
        epoch, pdel, last_id = opened
        out.personal_last = last_id
        pcursor = parse_cursor(raw_personal)
        after = pdel
        if pcursor is not None:
            if pcursor[0] == epoch and stream_id_tuple(pcursor[1]) <= stream_id_tuple(last_id):
                after = pcursor[1]
            else:
                out.personal_recovered = False  # another epoch, or a cursor from the future
        entries = await self.personal.range_after(user, after, last_id, self.settings.personal_maxlen)
        events: list[dict[str, Any]] = []
        newest = after
        for sid, fields in entries:
            payload = personal_payload(sid.decode(), fields)
            newest = sid.decode()
            if payload is not None:
                events.append(orjson.loads(payload))
        if entries:
            await self.personal.mark_delivered(user, newest)
        out.personal = {"epoch": epoch, "id": newest}
        return events

    async def wait(self, identity: Identity, collected: Collected, wait_ms: int) -> bool:
        """Block until an entry arrives on any of the user's streams, or ``wait_ms`` passes.
        Returns whether it was woken (an entry, or a drain) rather than timed out.

        Uses the node's shard readers (no Redis connection per waiting poll): the waiter joins
        the topics like a socket would. Entries already past the collected cursors when it joins
        wake it at once, so nothing that arrived in between is slept through.
        """
        waiter = PollWaiter(identity.user)
        joined: list[Topic] = []
        fresh: list[Topic] = []
        self._waiters.add(waiter)
        try:
            # Topics this node does not read yet start where Redis says the stream ends (as
            # collected), never at a client's cursor: a cursor from the future would make the
            # node skip entries for every other session of the topic.
            for room, cursor in collected.cursors.items():
                meta = collected.metas.get(room)
                if meta is None:
                    continue
                topic, is_new = self.fanout.add_room_topic(room, meta)
                topic.sinks.add(waiter)  # type: ignore[arg-type]
                joined.append(topic)
                if is_new:
                    fresh.append(topic)
                if stream_id_tuple(topic.pos) > stream_id_tuple(cursor["id"]):
                    waiter.event.set()
            ptopic, is_new = self.sessions.personal_topic(identity.user, collected.personal_last,
                                                 collected.personal["epoch"])
            if is_new:
                fresh.append(ptopic)
            ptopic.sinks.add(waiter)  # type: ignore[arg-type]
            joined.append(ptopic)
            if stream_id_tuple(ptopic.pos) > stream_id_tuple(collected.personal["id"]):
                waiter.event.set()
            for topic in fresh:
                await self.fanout.reader_of(topic).interrupt(topic.key)
            if not waiter.event.is_set() and not self.status.draining:
                try:
                    await asyncio.wait_for(waiter.event.wait(), wait_ms / 1000.0)
                except TimeoutError:
                    return False
            return True
        finally:
            self._waiters.discard(waiter)
            for topic in joined:
                self.fanout.unsubscribe(topic, waiter)  # type: ignore[arg-type]

    async def _replay(self, out: Collected, behind: dict[str, tuple[str, str]], limit: int) -> Collected:
        """Complete a collection planned from the node's positions: the entries of the rooms
        that moved, in one pipelined read, at most ``limit`` in all (the rest comes with the next
        poll, as in :meth:`collect`)."""
        if not behind:
            return out
        ranges = await self.streams.replay_ranges(behind, limit)
        remaining = limit
        for room, (cursor_id, upto) in behind.items():
            meta = out.metas[room]
            if remaining <= 0:
                break
            entries = ranges.get(room, [])
            # At most limit + 2 entries were read from the cursor's own: a longer gap pages.
            plan = plan_replay(meta.epoch, meta.epoch, cursor_id, upto, entries, len(entries))
            out.recovered[room] = plan.recovered
            if not plan.recovered:
                out.events.append({"type": "room", "change": "updated", "recovered": False,
                                   "room": room_summary(meta, upto, 0, 0, 0)})
                out.cursors[room] = {"epoch": meta.epoch, "id": upto}
                continue
            last = cursor_id
            for sid, fields in list(plan.entries)[:remaining]:
                last = sid.decode()
                out.events.append(message_event(room, last, fields))
                remaining -= 1
            out.cursors[room] = {"epoch": meta.epoch, "id": last}
        return out

    async def _remember(self, user: str, collected: Collected, keep_s: float) -> None:
        ptopic, is_new = self.sessions.personal_topic(user, collected.personal_last, collected.personal["epoch"])
        fresh = self.cache.remember(user, collected, ptopic, keep_s)
        if is_new:
            fresh.append(ptopic)
        for topic in fresh:
            await self.fanout.reader_of(topic).interrupt(topic.key)

    def wake_all(self) -> None:
        """Answer every waiting long poll now (the node is draining)."""
        self.cache.clear()
        for waiter in list(self._waiters):
            waiter.event.set()

    async def sweeper(self) -> None:
        """Loop: stop reading the rooms of users who stopped polling."""
        while True:
            await asyncio.sleep(POLL_CACHE_SWEEP_S)
            self.cache.sweep()

    async def poll(self, identity: Identity, body: dict[str, Any], session: str) -> dict[str, Any]:
        s = self.settings
        wait_ms = body.get("wait_ms", 0)
        interval_ms = body.get("interval_ms", s.poll_min_ms)
        focused = body.get("focused", True)
        if not isinstance(wait_ms, int) or isinstance(wait_ms, bool) or not 0 <= wait_ms <= 25000:
            raise BadRequest("wait_ms must be an integer 0..25000")
        if not isinstance(interval_ms, (int, float)) or isinstance(interval_ms, bool) or interval_ms < 0:
            raise BadRequest("interval_ms must be a non-negative number")
        focused = bool(focused)
        user = identity.user
        if wait_ms > 0 and s.max_polls_per_user and self.waiting[user] >= s.max_polls_per_user:
            METRICS.rate_limited.labels(limit="polls_per_user").inc()
            raise RateLimited(f"too many long polls of this user waiting (at most {s.max_polls_per_user})")
        # The poll keeps the user online until a little after the latest its next poll may come
        # (this poll's wait, then the interval it will be given if it brings nothing): known
        # now, so the heartbeat goes to Redis together with the first read, not after.
        load = self.status.load_factor()
        latest_ms = wait_ms + next_poll_ms(False, interval_ms, focused, s, load)
        # The node keeps what this poll learnt until a little after the next one is due.
        keep_s = latest_ms / 1000.0 + s.presence_ttl
        planned = self.cache.plan(user, body.get("cursors"), body.get("personal"), keep_s) \
            if s.poll_cache_users else None
        now = time.monotonic()
        beat_until = now + latest_ms / 1000.0 + s.presence_ttl
        # A poll without a session id gets a new one each time: its user's last heartbeat is
        # what keeps them online, whichever id it was written under.
        beat_key = session if isinstance(body.get("session"), str) else ""
        if planned is not None:
            METRICS.poll_cache.labels(result="hit").inc()
            if self.cache.beat_needed(user, beat_key, now, latest_ms / 1000.0 + s.presence_ttl * 2 / 3):
                collected, _ = await concurrently(self._replay(*planned, s.replay_limit),
                                                  self.online.poll_heartbeat(identity, session, latest_ms))
                self.cache.beaten(user, beat_key, beat_until)
                METRICS.presence_heartbeats.inc()
            else:
                collected = await self._replay(*planned, s.replay_limit)
        else:
            collected, _ = await concurrently(
                self.collect(identity, body.get("cursors"), body.get("personal"), s.replay_limit),
                self.online.poll_heartbeat(identity, session, latest_ms))
            METRICS.presence_heartbeats.inc()
            if s.poll_cache_users:
                METRICS.poll_cache.labels(result="miss").inc()
                await self._remember(user, collected, keep_s)
                self.cache.beaten(user, beat_key, beat_until)
        if not collected.events and wait_ms > 0 and not self.status.draining:
            self.waiting[user] += 1
            METRICS.polls_waiting.inc()
            try:
                woken = await self.wait(identity, collected, wait_ms)
            finally:
                METRICS.polls_waiting.dec()
                self.waiting[user] -= 1
                if self.waiting[user] <= 0:
                    del self.waiting[user]
            # Timed out: no entry reached any of the user's topics (they were joined at or before
            # the collected cursors), so there is nothing to collect again.
            if woken:
                planned = self.cache.plan(user, collected.cursors, collected.personal, keep_s) \
                    if s.poll_cache_users else None
                if planned is not None:
                    METRICS.poll_cache.labels(result="hit").inc()
                    collected = await self._replay(*planned, s.replay_limit)
                else:
                    collected = await self.collect(identity, collected.cursors, collected.personal, s.replay_limit)
                    if s.poll_cache_users:
                        METRICS.poll_cache.labels(result="miss").inc()
                        await self._remember(user, collected, keep_s)
        had_events = bool(collected.events)
        next_ms = next_poll_ms(had_events, interval_ms, focused, s, load)
        METRICS.polls.labels(result="events" if had_events else "empty").inc()
        METRICS.next_poll.observe(next_ms / 1000.0)
        return {"events": collected.events, "cursors": collected.cursors,
                "personal": collected.personal, "next_poll_ms": next_ms}

    async def session(self, identity: Identity, body: dict[str, Any], session: str) -> dict[str, Any]:
        """``POST /api/v1/session``: the welcome object plus the replay, for a polling client
        (the same opener as a WebSocket hello), and the cursors to poll with."""
        opened = await self.opener.open(identity, body.get("cursors"), body.get("personal"), session, None)
        await self.online.poll_heartbeat(identity, session, self.settings.poll_min_ms)
        METRICS.presence_heartbeats.inc()
        welcome = opened.welcome
        epochs = {room["id"]: room["epoch"] for room in welcome["rooms"]}
        return {
            **welcome,
            "events": [orjson.loads(p) for p in (*opened.messages, *opened.personal)],
            "cursors": {room: {"epoch": epochs[room], "id": pos} for room, pos in opened.positions.items()},
            "poll": {"min_ms": self.settings.poll_min_ms, "max_ms": self.settings.poll_max_ms,
                     "decay": self.settings.poll_decay, "unfocused_ms": self.settings.poll_unfocused_ms},
        }
