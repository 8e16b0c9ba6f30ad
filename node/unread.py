"""Unread arithmetic (pure).

A room's unread count for a user is derived, never counted per member: the room has a message
counter ``seq`` (one HINCRBY per message, whatever the room's size) and each user has a read
marker ``"<read_id> <read_seq>"``. Unread is ``seq - read_seq``.
"""

from __future__ import annotations

from typing import Any


def parse_marker(raw: Any) -> tuple[str, int]:
    """``"<id> <seq>"`` -> (id, seq); a missing or broken marker reads as nothing read."""
    if raw is None:
        return "0-0", 0
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    sid, _, seq = text.partition(" ")
    try:
        return sid or "0-0", max(0, int(seq))
    except ValueError:
        return "0-0", 0


def unread_count(room_seq: int, marker: Any) -> int:
    return max(0, room_seq - parse_marker(marker)[1])


def format_marker(sid: str, seq: int) -> str:
    return f"{sid} {seq}"
