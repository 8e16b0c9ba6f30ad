"""Mentions (protocol v1.1): ``@<user id>`` in a message's text, counted per member like unread.

A message mentions a user when its text has ``@<user id>`` at the start or after whitespace and
that user is a member of the room (in ``general``: any user who has ever opened a session). A
trailing ``.``/``-`` is also tried without it (``@bob.`` at the end of a sentence mentions
``bob``). Only the first :data:`MAX_MENTIONS` distinct ``@`` words of a message are considered,
so a message costs at most that many small scripts whatever the room's size. The author never
mentions themselves. ``@everyone``/``@here`` are not room-wide mentions: a room-wide mention
would cost O(members) per message; they are plain words (mentioning a member whose id it is).

Bookkeeping lives in the mentioned user's slot (``Keys.user_mentions``: room -> the ``seq`` of
the newest :data:`MAX_TRACKED` mentioning messages after the read marker), written by one script
per mentioned user right after the append (the room's slot). The count shown (``mentions``) is
the number of those above the read marker, so moving the marker lowers it with no write. If the
node dies between the append and these scripts, the message is stored but the count (and the
alert) may miss it. A mentioned user with no live session (WebSocket or polling) gets one
``alert`` of kind ``mention`` in their personal stream (delivered at their next login).
"""

from __future__ import annotations

import asyncio
import re
import secrets
from typing import Any

import orjson

from .keys import GENERAL, Keys
from .protocol import USER_ID_RE, now_ms
from .redisio import as_str, unavailable_on_redis_errors
from .streams import new_epoch

MAX_MENTIONS = 20  # distinct @words considered per message
MAX_TRACKED = 100  # mentioning messages remembered per user and room (the count stops there)
MENTION_RE = re.compile(r"(?<!\S)@([A-Za-z0-9_.@-]{1,64})")
ALERT_DEDUPE_TTL_S = 86_400


def mention_candidates(text: str, author: str, cap: int = MAX_MENTIONS) -> list[str]:
    """User ids a text may mention (membership is checked in Redis), in text order."""
    out: list[str] = []
    words = 0
    for match in MENTION_RE.finditer(text):
        word = match.group(1)
        for user in (word, word.rstrip(".-@")):
            if user and user != author and user not in out and USER_ID_RE.match(user):
                out.append(user)
        words += 1
        if words >= cap:
            break
    return out


def mention_seqs(raw: Any) -> list[int]:
    if raw is None:
        return []
    out = []
    for part in as_str(raw).split(","):
        if part.isdigit():
            out.append(int(part))
    return out


def mention_count(raw: Any, read_seq: int) -> int:
    """Mentioning messages after the read marker (``raw``: the user's field for the room)."""
    return sum(1 for seq in mention_seqs(raw) if seq > read_seq)


# KEYS: mentions hash, reads hash, sessions, inbox, user-meta, alert dedupe key.
# ARGV: room, seq, now_ms, alert json, personal maxlen, new epoch, dedupe ttl,
# '1' if the user must have opened a session once (general), most seqs kept.
# 0: not recorded (unknown user, or already read), 1 recorded, 2 recorded and alerted.
MENTION_LUA = """
if ARGV[8] == '1' and redis.call('HEXISTS', KEYS[5], 'name') == 0 then return 0 end
local read_seq = 0
local marker = redis.call('HGET', KEYS[2], ARGV[1])
if marker then read_seq = tonumber(string.match(marker, ' (%d+)$') or '0') end
local seq = tonumber(ARGV[2])
if seq <= read_seq then return 0 end
local kept = {}
for s in string.gmatch(redis.call('HGET', KEYS[1], ARGV[1]) or '', '%d+') do
  local n = tonumber(s)
  if n > read_seq and n ~= seq then kept[#kept + 1] = n end
end
kept[#kept + 1] = seq
table.sort(kept)
local cap = tonumber(ARGV[9])
local first = math.max(1, #kept - cap + 1)
local out = {}
for i = first, #kept do out[#out + 1] = string.format('%d', kept[i]) end
redis.call('HSET', KEYS[1], ARGV[1], table.concat(out, ','))
if redis.call('ZCOUNT', KEYS[3], '(' .. ARGV[3], '+inf') > 0 then return 1 end
if redis.call('EXISTS', KEYS[6]) == 1 then return 1 end
if redis.call('HEXISTS', KEYS[5], 'pepoch') == 0 then redis.call('HSET', KEYS[5], 'pepoch', ARGV[6]) end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'd', ARGV[4])
redis.call('SET', KEYS[6], '1', 'EX', ARGV[7])
return 2
"""


class Mentions:
    def __init__(self, redis: Any, keys: Keys, personal_maxlen: int) -> None:
        self.redis = redis
        self.keys = keys
        self.personal_maxlen = personal_maxlen
        self._mention = redis.register_script(MENTION_LUA)

    async def members_of(self, room: str, users: list[str]) -> list[str]:
        """Which of ``users`` are members of ``room`` (one SMISMEMBER; everyone in general)."""
        if room == GENERAL or not users:
            return list(users)
        with unavailable_on_redis_errors("mentions"):
            flags = await self.redis.smismember(self.keys.room_members(room), users)
        return [u for u, f in zip(users, flags, strict=True) if int(f)]

    async def record(self, room: str, room_name: str, seq: int, sid: str, author: str,
                     author_name: str, text: str) -> dict[str, int]:
        """After message ``sid`` (``seq``) was appended: count it for the members it mentions
        and alert those offline. Returns user -> script result (1 counted, 2 also alerted)."""
        users = await self.members_of(room, mention_candidates(text, author))
        if not users:
            return {}
        alert = orjson.dumps({"type": "alert", "id": "al-" + secrets.token_hex(8), "kind": "mention",
                              "title": f"{author_name} mentioned you in {room_name}", "ts": now_ms(),
                              "data": {"room": room, "id": sid}})
        k = self.keys
        now = now_ms()

        async def one(user: str) -> int:
            return int(await self._mention(
                keys=[k.user_mentions(user), k.user_reads(user), k.user_sessions(user), k.user_inbox(user),
                      k.user_meta(user), k.user_publish_dedupe(user, f"mn:{room}:{seq}")],
                args=[room, seq, now, alert, self.personal_maxlen, new_epoch(), ALERT_DEDUPE_TTL_S,
                      "1" if room == GENERAL else "", MAX_TRACKED]))

        # One script per user, concurrently: each user's keys are in their own slot.
        with unavailable_on_redis_errors("mentions"):
            results = await asyncio.gather(*(one(u) for u in users))
        return {u: r for u, r in zip(users, results, strict=True) if r}

    async def count(self, user: str, room: str, read_seq: int) -> int:
        with unavailable_on_redis_errors("mentions"):
            raw = await self.redis.hget(self.keys.user_mentions(user), room)
        return mention_count(raw, read_seq)

    async def forget(self, user: str, room: str) -> None:
        """The user left the room (or was kicked): drop its field (the hash stays bounded)."""
        with unavailable_on_redis_errors("mentions"):
            await self.redis.hdel(self.keys.user_mentions(user), room)
