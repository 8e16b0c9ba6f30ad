"""Locust load test: users that behave like people, over WebSocket and over the polling fallback.

    locust -f loadtest/locustfile.py --headless -u 200 -r 20 -t 5m \
        --host http://127.0.0.1:8001 --chat-ws-urls ws://127.0.0.1:8000/ws

``--host`` is a node's HTTP port (or the load balancer); ``--chat-ws-urls`` the WebSocket URLs
(default: ``ws://<host>/ws``, which is right behind HAProxy), and ``--chat-http-urls`` extra
HTTP base URLs to spread polls over (polling is stateless: any node answers any poll). Every
``--chat-*`` option also reads an environment variable (``CHAT_LOCUST_<NAME>``), so a compose
service or a CI job can set them without a command line. Works headless, with ``--processes``
and with ``--master``/``--worker`` (the checks are per receiving session, so per process).

What the users do
-----------------
``ChatWsUser`` (WebSocket, dev auth ``{"type":"hello","user":..}``): reads ``general``'s history,
chats in ``general``, now and then creates an open room or joins one from the directory, opens a
DM with another user of its process and chats there (some messages ``@``-mention another user),
edits and deletes its own recent messages, sends ``typing``, marks rooms ``read``, and
reconnects with its cursors (resume). ``ChatPollUser`` (HTTP): ``POST /api/v1/session`` then
``POST /api/v1/poll`` with ``Authorization: Bearer dev:<user>``, waiting ``next_poll_ms`` between
polls (long-polling ``--chat-poll-wait-ms``), and sends now and then via ``/api/v1/command``.

What is measured
----------------
* Every received ``message`` fires a Locust request event, type ``WS recv`` (or ``poll recv``),
  named by the room's size bucket (``general``, ``dm``, ``room<=10``, ...), whose response time
  is the end-to-end latency from the sender's clock (the text starts with ``lt <send µs>``).
  Messages of other senders (not this locustfile) are checked but not timed.
* Per receiving session the ``seq`` of each room must be contiguous: a jump that no ``delete``
  event accounts for (its ``deleted_seq``) by the end of the run is a ``gap`` failure, a repeat
  a ``duplicate`` failure (type ``WS seq``/``poll seq``). A resume keeps the
  last seq, so the replay after a reconnect must fill the gap exactly. Own messages never echoed
  back within ``--chat-lost-after-s`` are ``lost`` failures at stop.
* Edits and deletes (``edit``/``delete`` events, no ``seq``) are checked like messages: each
  (entry) once per receiving session (a repeat is a ``duplicate`` failure, type ``WS fold``),
  and the author's own edit or delete must come back (else ``lost`` at stop). Their entry ids
  move the room's cursor, so a resume must not replay them either.
* Every command's round trip is a ``WS cmd`` event; an error reply is a failure.
* At quit (on the master, or the single process) the exit code is set to 1 when the failure
  ratio exceeds ``--chat-max-fail-ratio`` (default 0: any failure) or the p99 of ``WS recv``
  exceeds ``--chat-max-p99-ms``.

``CHAT_LOCUST_FAULT=drop`` (or ``dup``) makes one WebSocket user per process ignore (or process twice) one
received ``general`` message, ``dupfold`` process one ``edit``/``delete`` event twice: the run must then fail. The smoke test uses it to prove the
checks can fail.

The official Locust image lacks websocket-client: see ``loadtest/requirements.txt``.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import string
import time
import uuid
from dataclasses import dataclass
from typing import Any

import gevent
import websocket  # websocket-client
from gevent.event import AsyncResult
from locust import HttpUser, User, events, task
from locust.runners import WorkerRunner

# -- options ---------------------------------------------------------------------------------------

# name -> (type, default, help). Each is ``--chat-<name>`` and env ``CHAT_LOCUST_<NAME>``.
OPTIONS: dict[str, tuple[type, Any, str]] = {
    "ws-urls": (str, "", "comma-separated WebSocket URLs (default ws://<host>/ws)"),
    "http-urls": (str, "", "comma-separated HTTP base URLs for polling users (default --host)"),
    "poll-weight": (int, 1, "weight of polling users (WebSocket users: --chat-ws-weight)"),
    "ws-weight": (int, 9, "weight of WebSocket users"),
    "wait-min": (float, 1.0, "seconds a user waits between actions, at least"),
    "wait-max": (float, 3.0, "... and at most"),
    "send-weight": (int, 10, "weight of 'chat in general'"),
    "room-send-weight": (int, 4, "weight of 'chat in one of my open rooms'"),
    "dm-weight": (int, 2, "weight of 'open a DM and chat there'"),
    "room-weight": (int, 1, "weight of 'create or join an open room'"),
    "typing-weight": (int, 4, "weight of 'typing'"),
    "read-weight": (int, 3, "weight of 'mark a room read'"),
    "history-weight": (int, 1, "weight of 'read general history'"),
    "reconnect-weight": (int, 1, "weight of 'reconnect and resume with cursors'"),
    "edit-weight": (int, 1, "weight of 'edit one of my recent messages'"),
    "delete-weight": (int, 1, "weight of 'delete one of my recent messages'"),
    "mention-prob": (float, 0.2, "probability that a message mentions another user (@id)"),
    "max-rooms": (int, 4, "open rooms a user creates or joins at most"),
    "poll-wait-ms": (int, 20000, "long-poll wait_ms of polling users (0: short polls)"),
    "poll-send-prob": (float, 0.1, "probability that a poll cycle also sends a message"),
    "lost-after-s": (float, 5.0, "own message not echoed after this long at stop: lost"),
    "max-fail-ratio": (float, 0.0, "exit 1 when the failure ratio is above this"),
    "max-p99-ms": (float, 1000.0, "exit 1 when the p99 of 'WS recv' is above this (ms)"),
}


def _env_name(name: str) -> str:
    return "CHAT_LOCUST_" + name.upper().replace("-", "_")


@events.init_command_line_parser.add_listener
def _add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("chatcluster")
    for name, (typ, default, help_) in OPTIONS.items():
        env = os.environ.get(_env_name(name))
        group.add_argument(f"--chat-{name}", type=typ, default=typ(env) if env is not None else default,
                           env_var=_env_name(name), help=help_)


@dataclass
class Opts:
    ws_urls: list[str]
    http_urls: list[str]
    raw: Any

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, "chat_" + name)


def _opts(environment: Any) -> Opts:
    o = environment.parsed_options
    host = (environment.host or o.host or "http://127.0.0.1:8001").rstrip("/")
    ws = [u.strip() for u in o.chat_ws_urls.split(",") if u.strip()]
    if not ws:
        ws = [host.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/ws"]
    http = [u.strip().rstrip("/") for u in o.chat_http_urls.split(",") if u.strip()] or [host]
    return Opts(ws, http, o)


@events.init.add_listener
def _on_init(environment: Any, **_: Any) -> None:
    o = environment.parsed_options
    if o is None:
        return
    ChatWsUser.weight = o.chat_ws_weight
    ChatPollUser.weight = o.chat_poll_weight


FAULT = os.environ.get("CHAT_LOCUST_FAULT", "")  # "drop" / "dup": see the module docstring
_fault_armed = [bool(FAULT)]


# -- helpers ---------------------------------------------------------------------------------------

_ids = itertools.count(1)
_RUN = "".join(random.choices(string.ascii_lowercase + string.digits, k=6))
ONLINE: list[str] = []  # users of this process, for DMs


def _new_user_id(prefix: str) -> str:
    return f"{prefix}{_RUN}{os.getpid() % 10000}x{next(_ids)}"


def size_bucket(room: str, members: int | None) -> str:
    if room == "general":
        return "general"
    if room.startswith("dm:"):
        return "dm"
    n = members or 0
    for limit in (10, 100, 1000):
        if n <= limit:
            return f"room<={limit}"
    return "room>1000"


def _now_us() -> int:
    return time.time_ns() // 1000


def make_text(user: str) -> str:
    return f"lt {_now_us()} hello from {user} " + "".join(random.choices(string.ascii_letters, k=24))


def sent_at_us(text: str) -> int | None:
    if text.startswith("lt "):
        try:
            return int(text[3:text.index(" ", 3)])
        except ValueError:
            return None
    return None


class SeqError(Exception):
    pass


@dataclass
class RoomState:
    epoch: str
    last_id: str
    seq: int
    members: int | None
    since: str = ""  # set until the first message after a (re)connect or join: for diagnosis
    # The room's seq came from a welcome or reply without a cursor: live delivery starts after
    # its ``last_id``, but the node reads ``seq`` from Redis at another moment than it fixes
    # ``last_id`` (see docs/benchmarks.md), so the first message sets the baseline.
    loose: bool = False


class Receiver:
    """Per receiving session: seq continuity per room, latency events, own-message echo."""

    def __init__(self, environment: Any, kind: str, user: str) -> None:
        self.env = environment
        self.kind = kind  # "WS" or "poll"
        self.user = user
        self.rooms: dict[str, RoomState] = {}
        self.pending: dict[str, float] = {}  # cmid -> monotonic send time
        self.pending_folds: dict[str, float] = {}  # "edit:<id>" / "delete:<id>" -> request time
        self.folds: dict[str, None] = {}  # edit/delete entries seen (insertion-ordered, capped)
        self.holes: dict[str, dict[int, str]] = {}  # room -> seqs skipped -> why (gap unless deleted)
        self.deleted: dict[str, set[int]] = {}  # room -> deleted seqs not (yet) seen as holes
        self.general_seen = 0

    def fire(self, rtype: str, name: str, ms: float, length: int = 0, exc: Exception | None = None) -> None:
        self.env.events.request.fire(request_type=f"{self.kind} {rtype}", name=name,
                                     response_time=ms, response_length=length, exception=exc,
                                     context={})

    def track(self, room: dict[str, Any], *, replace: bool, since: str, loose: bool = True) -> None:
        rid = room["id"]
        if not replace and rid in self.rooms:
            self.rooms[rid].since = since
            return
        self.rooms[rid] = RoomState(room.get("epoch", ""), room.get("last_id", "0-0"),
                                    int(room.get("seq", 0)), room.get("members"), since, loose)

    def cursors(self) -> dict[str, dict[str, str]]:
        return {rid: {"epoch": st.epoch, "id": st.last_id} for rid, st in self.rooms.items()
                if st.epoch}

    def message(self, ev: dict[str, Any], length: int) -> None:
        room = ev["room"]
        if room == "general" and _fault_armed[0] and self.kind == "WS" and FAULT in ("drop", "dup"):
            self.general_seen += 1
            if self.general_seen == 3:
                _fault_armed[0] = False
                if FAULT == "drop":
                    # The client believes it has it (its cursor moves on), as a real lost message
                    # would look: a resume must not quietly bring it back and hide the gap.
                    lost = self.rooms.get(room)
                    if lost is not None:
                        lost.last_id = ev["id"]
                    return
                if FAULT == "dup":
                    self.message(ev, length)
        seq = int(ev["seq"])
        st = self.rooms.get(room)
        if st is None:  # a room we learn of by its first message (e.g. a DM opened by the peer)
            st = self.rooms[room] = RoomState("", ev["id"], seq - 1, None)
        bucket = size_bucket(room, st.members)
        where = f" (first after {st.since})" if st.since else ""
        if st.loose and seq != st.seq + 1:
            self.fire("note", "seq in welcome/reply off its last_id", 0)
        elif seq <= st.seq:
            self.fire("seq", bucket, 0, 0, SeqError(f"duplicate seq{where}"))
            return
        elif seq != st.seq + 1:
            # A hole may be a deleted message (its delete event, with ``deleted_seq``, comes
            # before or after): a gap only if no delete accounts for it by the end of the run.
            deleted = self.deleted.setdefault(room, set())
            holes = self.holes.setdefault(room, {})
            for missing in range(st.seq + 1, seq):
                if missing in deleted:
                    deleted.discard(missing)
                elif len(holes) < 10_000:
                    holes[missing] = f"gap{where}"
        st.loose = False
        st.since = ""
        st.seq = seq
        st.last_id = ev["id"]
        sent = sent_at_us(ev.get("text", ""))
        if sent is not None:
            self.fire("recv", bucket, (_now_us() - sent) / 1000.0, length)
        cmid = ev.get("cmid")
        if cmid and ev.get("from", {}).get("id") == self.user:
            self.pending.pop(cmid, None)

    def fold(self, ev: dict[str, Any]) -> None:
        """An ``edit`` or ``delete`` event: once per session, and the room's cursor moves on."""
        if FAULT == "dupfold" and _fault_armed[0] and self.kind == "WS":
            _fault_armed[0] = False
            self.fold(ev)
        entry = ev.get("entry_id") or f"{ev['type']}:{ev.get('id')}:{ev.get('edited_at', '')}"
        st = self.rooms.get(ev.get("room", ""))
        bucket = size_bucket(ev.get("room", ""), st.members if st else None)
        if entry in self.folds:
            self.fire("fold", bucket, 0, 0, SeqError(f"duplicate {ev['type']}"))
            return
        self.folds[entry] = None
        if len(self.folds) > 10_000:
            self.folds.pop(next(iter(self.folds)))
        if st is not None and ev.get("entry_id"):
            st.last_id = ev["entry_id"]
        if ev["type"] == "delete" and isinstance(ev.get("deleted_seq"), int):
            room = ev.get("room", "")
            if self.holes.get(room, {}).pop(ev["deleted_seq"], None) is None:
                seen = self.deleted.setdefault(room, set())
                if len(seen) < 10_000:
                    seen.add(ev["deleted_seq"])
        key = f"{ev['type']}:{ev.get('id')}"
        t = self.pending_folds.pop(key, None)
        if t is not None:
            self.fire("fold", ev["type"], (time.monotonic() - t) * 1000)

    def lost(self, after_s: float) -> None:
        now = time.monotonic()
        for cmid, t in list(self.pending.items()):
            if now - t > after_s:
                self.fire("lost", "own message", 0, 0, SeqError(f"own message {cmid} never arrived"))
            del self.pending[cmid]
        for key, t in list(self.pending_folds.items()):
            if now - t > after_s:
                self.fire("lost", "own edit/delete", 0, 0, SeqError(f"own {key} never arrived"))
            del self.pending_folds[key]
        for room, holes in self.holes.items():
            st = self.rooms.get(room)
            for why in holes.values():
                self.fire("seq", size_bucket(room, st.members if st else None), 0, 0,
                          SeqError(f"{why}: 1 missing"))
        self.holes.clear()


class CommandError(Exception):
    pass


# -- WebSocket users -------------------------------------------------------------------------------

class ChatWsUser(User):
    weight = 9

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.opts = _opts(environment)
        self.user_id = _new_user_id("w")
        self.rx = Receiver(environment, "WS", self.user_id)
        self.ws: websocket.WebSocket | None = None
        self.reader: gevent.Greenlet | None = None
        self.refs = itertools.count(1)
        self.waiting: dict[int, AsyncResult] = {}
        self.my_rooms: list[str] = []  # open rooms created or joined
        self.dms: list[str] = []
        self.mine: list[tuple[str, str]] = []  # (room, id) of my recent messages, newest last

    def wait_time(self) -> float:
        return random.uniform(self.opts.wait_min, self.opts.wait_max)

    # -- connection ------------------------------------------------------------------------------
    def on_start(self) -> None:
        self.connect(resume=False)
        ONLINE.append(self.user_id)
        self.command("history", room="general", limit=20)

    def on_stop(self) -> None:
        if self.user_id in ONLINE:
            ONLINE.remove(self.user_id)
        self.rx.lost(self.opts.lost_after_s)
        self.disconnect()

    def connect(self, resume: bool) -> None:
        url = random.choice(self.opts.ws_urls)
        t0 = time.perf_counter()
        hello: dict[str, Any] = {"type": "hello", "user": self.user_id, "client": "locust"}
        if resume:
            hello["cursors"] = self.rx.cursors()
        try:
            ws = websocket.create_connection(url, timeout=15, enable_multithread=True)
            ws.send(json.dumps(hello))
            while True:
                ev = json.loads(ws.recv())
                if ev.get("type") == "welcome":
                    break
        except Exception as exc:
            self.rx.fire("connect", "resume" if resume else "hello",
                         (time.perf_counter() - t0) * 1000, 0, exc)
            raise
        ws.settimeout(None)
        self.rx.fire("connect", "resume" if resume else "hello", (time.perf_counter() - t0) * 1000)
        recovered = ev.get("recovered", {})
        for room in ev.get("rooms", []):
            rid = room["id"]
            ok = recovered.get(rid) is True
            if resume and not ok and rid in self.rx.rooms:
                # Not resumable (epoch or history gone): a real client reloads with history.
                self.rx.fire("resume", "not recovered", 0)
            # A recovered room keeps its seq: the replay must continue it exactly.
            self.rx.track(room, replace=not (resume and ok),
                          since=("resume" if ok else "resume, not recovered") if resume else "welcome",
                          loose=not (resume and ok))
        self.ws = ws
        self.reader = gevent.spawn(self._read, ws)

    def disconnect(self) -> None:
        ws, self.ws = self.ws, None
        # Not ws.close(): it reads the close reply itself, under the lock the reader greenlet
        # holds while blocked in recv(), and could wait for ever (a stopping Locust user then
        # never ends). The reader sees the server's close reply and ends; shutdown() unblocks it
        # if it does not.
        if ws is not None:
            try:
                ws.send_close()
            except Exception:
                pass
        if self.reader is not None:
            self.reader.join(timeout=2)
        if ws is not None:
            try:
                ws.shutdown()
            except Exception:
                pass
        if self.reader is not None:
            self.reader.kill(timeout=2)
            self.reader = None
        for res in self.waiting.values():
            res.set_exception(CommandError("disconnected"))
        self.waiting.clear()

    def _read(self, ws: websocket.WebSocket) -> None:
        try:
            while True:
                raw = ws.recv()
                if not raw:
                    return
                ev = json.loads(raw)
                t = ev.get("type")
                if t == "message":
                    self.rx.message(ev, len(raw))
                elif t in ("edit", "delete"):
                    self.rx.fold(ev)
                elif t == "reply":
                    res = self.waiting.pop(ev.get("ref"), None)
                    if res is not None:
                        res.set(ev)
                elif t == "room" and ev.get("change") == "added":
                    self.rx.track(ev["room"], replace=False, since="room added")
        except (websocket.WebSocketConnectionClosedException, OSError):
            return
        finally:
            if self.ws is ws:  # closed under us (not by disconnect): count it, reconnect later
                self.ws = None
                self.rx.fire("connect", "closed by server", 0, 0,
                             CommandError(f"closed: {getattr(ws, 'status', '')}"))

    def command(self, ctype: str, **fields: Any) -> dict[str, Any]:
        if self.ws is None:
            self.connect(resume=True)
        assert self.ws is not None
        ref = next(self.refs)
        res = AsyncResult()
        self.waiting[ref] = res
        t0 = time.perf_counter()
        exc: Exception | None = None
        data: dict[str, Any] = {}
        try:
            self.ws.send(json.dumps({"type": ctype, "ref": ref, **fields}))
            reply = res.get(timeout=15)
            if reply.get("ok"):
                data = reply.get("data", {})
            else:
                exc = CommandError(f"{reply.get('error', {}).get('code')}")
        except Exception as e:  # noqa: BLE001 - reported as a failed request
            exc = e
            self.waiting.pop(ref, None)
        self.rx.fire("cmd", ctype, (time.perf_counter() - t0) * 1000, 0, exc)
        if exc is not None:
            raise CommandError(f"{ctype}: {exc}")
        return data

    def send_text(self, room: str) -> None:
        cmid = uuid.uuid4().hex[:16]
        self.rx.pending[cmid] = time.monotonic()
        text = make_text(self.user_id)
        others = [u for u in ONLINE if u != self.user_id]
        if others and random.random() < self.opts.mention_prob:
            text += f" @{random.choice(others)}"
        sent = self.command("send", room=room, text=text, cmid=cmid)
        if "id" in sent:
            self.mine.append((room, sent["id"]))
            del self.mine[:-20]

    def edit_own(self) -> None:
        if not self.mine:
            return
        room, mid = random.choice(self.mine)
        self.rx.pending_folds[f"edit:{mid}"] = time.monotonic()
        try:
            self.command("edit", room=room, id=mid, text=make_text(self.user_id) + " (edited)")
        except CommandError:
            self.rx.pending_folds.pop(f"edit:{mid}", None)
            raise

    def delete_own(self) -> None:
        if not self.mine:
            return
        room, mid = self.mine.pop(random.randrange(len(self.mine)))
        self.rx.pending_folds[f"delete:{mid}"] = time.monotonic()
        self.rx.pending_folds.pop(f"edit:{mid}", None)  # an edit's event may now never come
        try:
            self.command("delete", room=room, id=mid)
        except CommandError:
            self.rx.pending_folds.pop(f"delete:{mid}", None)
            raise

    # -- behaviour -------------------------------------------------------------------------------
    @task
    def act(self) -> None:
        o = self.opts
        choices = [(self.chat_general, o.send_weight), (self.chat_room, o.room_send_weight),
                   (self.chat_dm, o.dm_weight), (self.open_room, o.room_weight),
                   (self.typing, o.typing_weight), (self.read, o.read_weight),
                   (self.history, o.history_weight), (self.reconnect, o.reconnect_weight),
                   (self.edit_own, o.edit_weight), (self.delete_own, o.delete_weight)]
        funcs, weights = zip(*[(f, w) for f, w in choices if w > 0], strict=True)
        action = random.choices(funcs, weights)[0]
        try:
            action()
        except CommandError:
            pass  # already reported as a failed request

    def chat_general(self) -> None:
        self.send_text("general")

    def chat_room(self) -> None:
        if not self.my_rooms:
            return self.open_room()
        self.send_text(random.choice(self.my_rooms))

    def open_room(self) -> None:
        if len(self.my_rooms) >= self.opts.max_rooms:
            room = self.my_rooms.pop(random.randrange(len(self.my_rooms)))
            self.command("leave", room=room)
            self.rx.rooms.pop(room, None)
            self.mine = [(r, m) for r, m in self.mine if r != room]
            return
        listing = self.command("rooms").get("rooms", [])
        joinable = [r for r in listing if r.get("kind") == "open" and not r.get("member")]
        if joinable and random.random() < 0.7:
            room = self.command("join", room=random.choice(joinable)["id"])["room"]
        else:
            room = self.command("create_room", name=f"room of {self.user_id}",
                                visibility="open")["room"]
        self.rx.track(room, replace=False, since="join/create")
        self.my_rooms.append(room["id"])

    def chat_dm(self) -> None:
        others = [u for u in ONLINE if u != self.user_id]
        if not others:
            return
        room = self.command("dm", user=random.choice(others))["room"]
        self.rx.track(room, replace=False, since="dm")
        self.send_text(room["id"])

    def typing(self) -> None:
        if self.ws is None:
            return
        room = random.choice(["general", *self.my_rooms])
        self.ws.send(json.dumps({"type": "typing", "room": room}))

    def read(self) -> None:
        rid = random.choice(list(self.rx.rooms))
        st = self.rx.rooms[rid]
        if st.last_id and st.last_id != "0-0" and st.seq > 0:
            self.command("read", room=rid, id=st.last_id)

    def history(self) -> None:
        self.command("history", room="general", limit=20)

    def reconnect(self) -> None:
        self.disconnect()
        self.connect(resume=True)


# -- polling users ---------------------------------------------------------------------------------

class ChatPollUser(HttpUser):
    weight = 1
    host = "http://127.0.0.1:8001"  # replaced by --host

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.opts = _opts(environment)
        self.user_id = _new_user_id("p")
        self.rx = Receiver(environment, "poll", self.user_id)
        self.headers = {"Authorization": f"Bearer dev:{self.user_id}"}
        self.cursors: dict[str, Any] = {}
        self.personal: Any = None
        self.next_ms = 1000

    def wait_time(self) -> float:
        return self.next_ms / 1000.0

    def _post(self, path: str, body: dict[str, Any], name: str, timeout: float = 10) -> dict[str, Any] | None:
        url = random.choice(self.opts.http_urls) + path
        with self.client.post(url, json=body, headers=self.headers, name=name, timeout=timeout,
                              catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}")
                return None
            return resp.json()

    def _events(self, evs: list[dict[str, Any]]) -> None:
        for ev in evs:
            if ev.get("type") == "message":
                self.rx.message(ev, 0)
            elif ev.get("type") in ("edit", "delete"):
                self.rx.fold(ev)

    def on_start(self) -> None:
        data = self._post("/api/v1/session", {}, "/api/v1/session")
        if data is None:
            return
        for room in data.get("rooms", []):
            self.rx.track(room, replace=True, since="session")
        self._events(data.get("events", []))
        self.cursors = data.get("cursors", self.rx.cursors())
        self.personal = data.get("personal")

    def on_stop(self) -> None:
        self.rx.lost(self.opts.lost_after_s)

    @task
    def poll(self) -> None:
        if random.random() < self.opts.poll_send_prob:
            cmid = uuid.uuid4().hex[:16]
            self.rx.pending[cmid] = time.monotonic()
            self._post("/api/v1/command", {"type": "send", "room": "general", "cmid": cmid,
                                           "text": make_text(self.user_id)}, "/api/v1/command send")
        body = {"cursors": self.cursors, "personal": self.personal, "wait_ms": self.opts.poll_wait_ms,
                "interval_ms": self.next_ms, "focused": True}
        data = self._post("/api/v1/poll", body, "/api/v1/poll",
                          timeout=self.opts.poll_wait_ms / 1000 + 10)
        if data is None:
            self.next_ms = 1000
            return
        self._events(data.get("events", []))
        self.cursors = data.get("cursors", self.cursors)
        self.personal = data.get("personal", self.personal)
        self.next_ms = int(data.get("next_poll_ms", 1000))


# -- verdict ---------------------------------------------------------------------------------------

@events.quitting.add_listener
def _verdict(environment: Any, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner) or environment.parsed_options is None:
        return  # the master (or the single process) judges the aggregated stats
    o = environment.parsed_options
    stats = environment.stats
    total = stats.total
    fail_ratio = total.fail_ratio
    recv = stats.entries.get(("general", "WS recv"))
    p99s = [e.get_response_time_percentile(0.99) for (name, method), e in stats.entries.items()
            if method == "WS recv" and e.num_requests]
    p99 = max(p99s) if p99s else 0.0
    problems = []
    if fail_ratio > o.chat_max_fail_ratio:
        problems.append(f"failure ratio {fail_ratio:.4%} > {o.chat_max_fail_ratio:.4%} "
                        f"({total.num_failures} of {total.num_requests})")
    if p99 > o.chat_max_p99_ms:
        problems.append(f"WS recv p99 {p99:.0f} ms > {o.chat_max_p99_ms:.0f} ms")
    received = sum(e.num_requests for (n, m), e in stats.entries.items() if m.endswith(" recv"))
    if received == 0 and total.num_requests > 0:
        problems.append("no message was received at all")
    summary = (f"chatcluster verdict: {received} messages received, general recv "
               f"{recv.num_requests if recv else 0}, max p99 {p99:.0f} ms, failures "
               f"{total.num_failures}/{total.num_requests}")
    if problems:
        environment.process_exit_code = 1
        print(summary + " -- FAIL: " + "; ".join(problems), flush=True)
    else:
        print(summary + " -- OK", flush=True)
