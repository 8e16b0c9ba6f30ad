"""Cursor arithmetic for resuming a room: pure functions, no I/O.

A cursor ``(epoch, id)`` can be resumed when the epoch is the room's current one and no entry
after ``id`` has been trimmed away. Messages leave a stream only by trimming, oldest first, so
"nothing after the cursor was trimmed" is the same as "the cursor's own entry is still there"
(or, for the cursor ``0-0``, "the first retained entry has seq 1").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .protocol import Entry, stream_id_tuple


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    recovered: bool
    entries: Sequence[Entry]


def _sid(entry: Entry) -> str:
    raw = entry[0]
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def plan_replay(cursor_epoch: str, room_epoch: str, cursor_id: str, upto_id: str,
                entries: Sequence[Entry], limit: int) -> ReplayPlan:
    """Decide what to replay after a cursor.

    ``entries`` are the stream's entries from ``cursor_id`` inclusive to ``upto_id`` inclusive,
    oldest first, at most ``limit + 2`` of them (see ``RoomStreams.replay_range``). ``upto_id`` is
    the position from which this connection receives live entries, so the replay is exactly the
    entries strictly after the cursor and up to it.
    """
    if cursor_epoch != room_epoch:
        return ReplayPlan(False, ())
    if stream_id_tuple(cursor_id) > stream_id_tuple(upto_id):
        # A cursor from the future of this epoch: the client saw entries this stream never had.
        return ReplayPlan(False, ())
    if cursor_id == "0-0":
        rest = list(entries)
        if rest and int(rest[0][1].get(b"s", b"0")) != 1:
            return ReplayPlan(False, ())
    else:
        if not entries or _sid(entries[0]) != cursor_id:
            # The cursor's entry is gone: trimmed (a gap) or never existed.
            if cursor_id == upto_id and not entries:
                return ReplayPlan(True, ())
            return ReplayPlan(False, ())
        rest = list(entries[1:])
    if len(rest) > limit:
        return ReplayPlan(False, ())
    return ReplayPlan(True, rest)
