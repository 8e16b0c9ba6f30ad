"""Hypothesis fuzz of a live node: random JSON, near-valid commands with mutated fields, random
text and bytes, sent over one socket. Every frame gets an ok reply or an error reply with a
contract code (echoing a valid ``ref``), or the connection closes with a contract close code;
never 1011/1006, never a hang. After the run a fresh client can still chat."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from node.protocol import COMMANDS

from .wire import CLOSE_CODES, ERROR_CODES, assert_node_serves, hello, raw_connect

MAX_FRAME_BYTES = 4096
ENV = {"CHAT_PROTOCOL_ERRORS_MAX": 5, "CHAT_MAX_TEXT_CHARS": 50,
       "CHAT_MAX_FRAME_BYTES": MAX_FRAME_BYTES, "CHAT_HELLO_TIMEOUT_S": 5}

json_leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_value = st.recursive(
    json_leaf,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
refs = st.one_of(st.integers(-(2**60), 2**60), st.text(max_size=80), st.booleans(), st.none(),
                 st.floats(allow_nan=False, allow_infinity=False), st.lists(st.integers(), max_size=2))
rooms = st.sampled_from(["general", "r-abcd1234", "dm:alice:bob", "", "general ", "GENERAL", "dm:x"]) \
    | st.text(max_size=12)
good_values: dict[str, st.SearchStrategy[Any]] = {
    "room": rooms,
    "text": st.text(min_size=0, max_size=70),
    "cmid": st.text(alphabet="abcXYZ0129_.:- ", min_size=0, max_size=70),
    "limit": st.integers(-5, 200),
    "before": st.sampled_from(["0-0", "1-1", "9999999999999-0", "x-1", ""]),
    "after": st.sampled_from(["0-0", "1-1", "9999999999999-0", "x-1", ""]),
    "user": st.sampled_from(["alice", "bob", "fuzzer", "no spaces!", ""]),
    "id": st.sampled_from(["0-0", "1-1", "bad"]),
}


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    """A command frame of the table, then a few random mutations of its fields."""
    kind = draw(st.sampled_from(sorted(COMMANDS)))
    frame: dict[str, Any] = {"type": kind}
    for name in COMMANDS[kind]:
        if draw(st.booleans()):
            frame[name] = draw(good_values.get(name, json_value))
    if draw(st.booleans()):
        frame["ref"] = draw(refs)
    for _ in range(draw(st.integers(0, 2))):
        action = draw(st.sampled_from(["drop", "retype", "add", "type"]))
        if action == "drop" and frame:
            frame.pop(draw(st.sampled_from(sorted(frame))))
        elif action == "retype" and frame:
            frame[draw(st.sampled_from(sorted(frame)))] = draw(json_value)
        elif action == "add":
            frame[draw(st.text(max_size=8))] = draw(json_value)
        else:
            frame["type"] = draw(st.text(max_size=12) | json_value)
    return frame


frames = st.one_of(
    near_valid().map(json.dumps),
    json_value.map(json.dumps),
    st.text(max_size=60),
    st.binary(max_size=60),
    st.builds(lambda n: json.dumps({"type": "send", "ref": "big", "room": "general", "text": "z" * n}),
              st.integers(MAX_FRAME_BYTES - 100, MAX_FRAME_BYTES + 100)),
)


def valid_ref(frame: Any) -> Any:
    """The ``ref`` the reply must echo: a string or an integer (bools are not integers)."""
    if not isinstance(frame, dict) or "ref" not in frame:
        return None
    ref = frame["ref"]
    if isinstance(ref, bool):
        return None
    if isinstance(ref, int) and -(2**53) < ref < 2**53:
        return ref
    if isinstance(ref, str) and len(ref) <= 64:
        return ref
    return None


def _decoded(raw: str | bytes) -> Any:
    if isinstance(raw, bytes):
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


class Session:
    """One live connection, reopened whenever the node closed it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws: ClientConnection | None = None
        self.fence = 0
        self.closes: list[int] = []

    async def ensure(self) -> ClientConnection:
        if self.ws is None:
            self.ws = await raw_connect(self.url)
            await hello(self.ws, "fuzzer")
        return self.ws

    async def exchange(self, raw: str | bytes) -> None:
        """Send ``raw`` then a ``ping`` fence; check what comes back before the fence."""
        ws = await self.ensure()
        self.fence += 1
        fence = f"fence-{self.fence}"
        decoded = _decoded(raw)
        replies: list[dict[str, Any]] = []
        try:
            await ws.send(raw)
            await ws.send(json.dumps({"type": "ping", "ref": fence}))
            async with asyncio.timeout(5):
                while True:
                    event = json.loads(await ws.recv())
                    assert isinstance(event, dict) and isinstance(event.get("type"), str), event
                    if event["type"] != "reply":
                        continue
                    if event.get("ref") == fence:
                        assert event["ok"] is True, event
                        break
                    replies.append(event)
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else 1006
            self.closes.append(code)
            self.ws = None
            assert code in CLOSE_CODES - {4001, 4002}, f"closed with {code} after {raw!r}"
            if code == 1009:
                size = len(raw.encode() if isinstance(raw, str) else raw)
                assert size > MAX_FRAME_BYTES, f"1009 for a frame of {size} bytes"
            assert len(replies) <= 1, replies
        else:
            size = len(raw.encode() if isinstance(raw, str) else raw)
            assert size <= MAX_FRAME_BYTES, f"a frame of {size} bytes was not refused with 1009"
            # typing needs no reply (contract 2.2); everything else gets exactly one.
            is_typing = isinstance(decoded, dict) and decoded.get("type") == "typing"
            assert len(replies) in ((0, 1) if is_typing else (1,)), (raw, replies)
        for reply in replies:
            if reply["ok"] is False:
                assert reply["error"]["code"] in ERROR_CODES, reply
                assert isinstance(reply["error"]["message"], str), reply
            else:
                assert reply["ok"] is True and isinstance(reply["data"], dict), reply
            ref = valid_ref(decoded)
            if ref is None:
                assert "ref" not in reply, (raw, reply)
            else:
                assert reply.get("ref") == ref, (raw, reply)


def test_fuzzed_frames_never_crash_or_hang_the_node(start_nodes):
    (a,) = start_nodes(1, **ENV)
    loop = asyncio.new_event_loop()
    session = Session(a.ws_url)
    try:
        @settings(max_examples=200, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
        @given(st.lists(frames, min_size=1, max_size=4))
        def check(batch: list[str | bytes]) -> None:
            for raw in batch:
                loop.run_until_complete(session.exchange(raw))

        check()
        assert not any(code in (1006, 1011) for code in session.closes), session.closes
        loop.run_until_complete(assert_node_serves(a.ws_url, user="after-fuzz-" + uuid.uuid4().hex[:6]))
        assert a.proc.alive()
    finally:
        if session.ws is not None:
            loop.run_until_complete(session.ws.close())
        loop.close()
