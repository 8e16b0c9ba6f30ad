"""The pure parts of v1.1 roles and mentions: who has which role, what a text mentions, how
many mentions are after a read marker."""

from __future__ import annotations

from node.keys import RoomId, StreamId
from node.mentions import MAX_MENTIONS, mention_candidates, mention_count
from node.roles import role_of, roles_of_new
from node.streams import RoomMeta


def meta(kind: str, owner: str = "ann") -> RoomMeta:
    return RoomMeta(RoomId("r-abcd"), "e1", kind, "n", owner, 0, StreamId("0-0"))


def test_roles():
    assert role_of(meta("open"), "ann", None) == "owner"
    assert role_of(meta("closed"), "bo", b"admin") == "admin"
    assert role_of(meta("closed"), "bo", b"other") == "member"
    assert role_of(meta("open"), "bo", None) == "member"
    # No roles outside created rooms, whatever is stored or whoever created it.
    assert role_of(meta("direct"), "ann", b"admin") == "member"
    assert role_of(meta("general", ""), "", None) == "member"
    assert roles_of_new(meta("open"), ["ann", "bo", "cy"]) == {"owner": ["ann"], "member": ["bo", "cy"]}


def test_mention_candidates():
    text = "@bob hi @carol. and x@dave, @erin\t@bob @alice"
    assert mention_candidates(text, "alice") == ["bob", "carol.", "carol", "erin"]
    many = "@" + " @".join(f"u{i}" for i in range(30))
    assert mention_candidates(many, "x") == [f"u{i}" for i in range(MAX_MENTIONS)]
    assert mention_candidates("email me at a@b.c", "x") == []
    assert mention_candidates("@", "x") == [] and mention_candidates("@-", "x") == ["-"]


def test_mention_count():
    assert mention_count(None, 0) == 0
    assert mention_count(b"3,7,9", 0) == 3
    assert mention_count(b"3,7,9", 7) == 1
    assert mention_count("3,x,9", 2) == 2  # a broken part is skipped
