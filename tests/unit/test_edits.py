"""The pure parts of edits and deletes: events of edit/delete entries, history items, ids."""

from __future__ import annotations

from node.edits import history_item, pad_id
from node.protocol import entry_seq, message_event


def test_edit_and_delete_entries_decode_into_their_events():
    edit = {b"x": b"e", b"m": b"100-0", b"f": b"alice", b"n": b"Alice", b"t": b"new", b"q": b"7"}
    assert message_event("general", "250-1", edit) == {
        "type": "edit", "room": "general", "id": "100-0", "text": "new", "edited_at": 250,
        "by": {"id": "alice", "name": "Alice"}, "entry_id": "250-1"}
    delete = {b"x": b"d", b"m": b"100-0", b"f": b"mod", b"n": b"Mod", b"q": b"7", b"ds": b"3"}
    assert message_event("general", "300-0", delete) == {
        "type": "delete", "room": "general", "id": "100-0", "by": {"id": "mod", "name": "Mod"},
        "entry_id": "300-0", "deleted_seq": 3}
    assert entry_seq(edit) == 7 and entry_seq({b"s": b"4", b"f": b"a"}) == 4


def test_history_items_carry_the_latest_state():
    fields = {b"f": b"alice", b"n": b"Alice", b"t": b"old", b"s": b"3"}
    assert history_item("general", "100-0", fields, "")["text"] == "old"
    edited = history_item("general", "100-0", fields, "e 250-1 new text with spaces")
    assert edited["text"] == "new text with spaces" and edited["edited_at"] == 250 and edited["seq"] == 3
    assert "type" not in edited
    assert history_item("general", "100-0", {}, "d 300-0 3 alice Alice Smith") == {
        "room": "general", "id": "100-0", "seq": 3, "ts": 100,
        "from": {"id": "alice", "name": "Alice Smith"}, "deleted": True}


def test_padded_ids_sort_like_stream_ids():
    ids = ["9-10", "10-0", "9-9", "1732200000000-0", "1732200000000-12", "0-1"]
    assert sorted(ids, key=pad_id) == sorted(ids, key=lambda s: tuple(map(int, s.split("-"))))
