"""Hypothesis strategies for the fuzzers: typed, near-valid values for every command field."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from node.protocol import COMMANDS

json_leaf = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
json_value = st.recursive(
    json_leaf,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
user_ids = st.one_of(
    st.sampled_from(["alice", "bob", "fuzzer", "eve", "a", "x" * 64, "x" * 65, "", " ", "al ice",
                     "alice\x00", "ALICE", "a.b@c-d_e", "../etc", "dm:alice:bob", "général"]),
    st.from_regex(r"[A-Za-z0-9_.@-]{1,64}", fullmatch=True),
    st.text(max_size=70),
)
stream_ids = st.one_of(
    st.sampled_from(["0-0", "0-1", "1-0", "1-1", "9999999999999-0", "18446744073709551615-18446744073709551615",
                     "18446744073709551616-0", "99999999999999999999-99999999999999999999",
                     "0-18446744073709551616", "-1-0", "1", "1-", "-", "x-1", "", " 1-1", "1-1 ",
                     "01-01", "1e3-0"]),
    st.from_regex(r"[0-9]{1,20}-[0-9]{1,20}", fullmatch=True),
    st.text(max_size=30),
)
room_ids = st.one_of(
    st.sampled_from(["general", "GENERAL", "general ", "r-abcd", "r-abc", "r-" + "a" * 32, "r-" + "a" * 33,
                     "r-doesnotexist", "r-ABCD", "dm:alice:bob", "dm:bob:alice", "dm:alice:alice",
                     "dm:alice", "dm:a:b:c", "dm::", "dm:fuzzer:x", "", "\x00", "r-abcd\n"]),
    st.from_regex(r"r-[a-z0-9]{4,32}", fullmatch=True),
    st.builds(lambda a, b: f"dm:{a}:{b}", user_ids, user_ids),
    st.text(max_size=40),
)
texts = st.one_of(
    st.text(min_size=0, max_size=80),
    st.sampled_from(["", " ", "\x00", "a\x00b", "/who", "/join", "/join r-doesnotexist", "/join general",
                     "/where", "/where alice", "/where no body", "/rooms", "/rooms x" * 30, "/WHO",
                     "\u202e", "\ud7ff", "🎉" * 30, "x" * 51, "\n\n"]),
)
cmids = st.one_of(st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True), st.text(max_size=70))
limits = st.one_of(st.integers(-5, 1200), st.sampled_from([0, 1, 100, 101, 1000, 1001, 2**53, -(2**63), 2**64]))
names = st.one_of(st.text(max_size=90), st.sampled_from(["", " ", "x" * 80, "x" * 81, "Room\x00"]))
members = st.lists(user_ids, max_size=6) | st.lists(json_value, max_size=3)
tokens = st.one_of(st.text(max_size=40), st.sampled_from(["", "a.b.c", "eyJhbGciOiJub25lIn0.e30."]))

FIELD: dict[str, st.SearchStrategy[Any]] = {
    "room": room_ids, "text": texts, "cmid": cmids, "limit": limits, "before": stream_ids,
    "after": stream_ids, "id": stream_ids, "user": user_ids, "name": names,
    "visibility": st.sampled_from(["open", "closed", "direct", "general", "", "OPEN"]) | st.text(max_size=8),
    "members": members, "query": st.text(max_size=100), "token": tokens,
    "cursors": json_value, "personal": json_value, "client": st.text(max_size=30),
}
refs = st.one_of(st.integers(-(2**60), 2**60), st.text(max_size=70), st.none())


@st.composite
def command(draw: st.DrawFn, kinds: list[str] | None = None) -> dict[str, Any]:
    """A frame of one command type: each field typed and near-valid, sometimes missing or of
    the wrong JSON type."""
    kind = draw(st.sampled_from(kinds or sorted(k for k in COMMANDS if k != "hello")))
    frame: dict[str, Any] = {"type": kind}
    for name, (_, required) in COMMANDS[kind].items():
        roll = draw(st.integers(0, 9))
        if roll == 0 and not required:
            continue
        if roll == 1:
            frame[name] = draw(json_value)  # the wrong type, usually
        elif roll == 2 and not required:
            continue
        else:
            frame[name] = draw(FIELD.get(name, json_value))
    if draw(st.booleans()):
        frame["ref"] = draw(refs)
    return frame
