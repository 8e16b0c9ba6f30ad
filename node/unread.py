"""Unread arithmetic (pure).

A room's unread count for a user is derived, never counted per member: the room has a message
counter ``seq`` (one HINCRBY per message, whatever the room's size) and each user has a read
marker ``"<read_id> <read_seq>"``. Unread is ``seq - read_seq``.
"""

from __future__ import annotations

from typing import Any

from .redisio import unavailable_on_redis_errors


def parse_marker(raw: Any) -> tuple[str, int]:
    """``"<id> <seq>"`` -> (id, seq); a missing or broken marker reads as nothing read."""
    if raw is None:
        return "0-0", 0
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    sid, _, seq = text.partition(" ")
    try:
        return sid or "0-0", max(0, int(seq))
    except ValueError:
        return "0-0", 0


def unread_count(room_seq: int, marker: Any) -> int:
    return max(0, room_seq - parse_marker(marker)[1])


def format_marker(sid: str, seq: int) -> str:
    return f"{sid} {seq}"


# KEYS: reads hash.  ARGV: room, id, seq.  Moves the marker forward only; returns it.
MARK_LUA = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local cur_seq = tonumber(string.match(cur, ' (%d+)$') or '0')
  if cur_seq >= tonumber(ARGV[3]) then return cur end
end
local marker = ARGV[2] .. ' ' .. ARGV[3]
redis.call('HSET', KEYS[1], ARGV[1], marker)
return marker
"""


class ReadMarkers:
    """Per-user read markers in Redis (one hash per user, on the user's shard)."""

    def __init__(self, redis: Any, keys: Any) -> None:
        self.redis = redis
        self.keys = keys
        self._mark = redis.register_script(MARK_LUA)

    async def mark(self, user: str, room: str, sid: str, seq: int) -> tuple[str, int]:
        with unavailable_on_redis_errors("read"):
            marker = await self._mark(keys=[self.keys.user_reads(user)], args=[room, sid, seq])
        return parse_marker(marker)
