"""Edits and deletes of room messages (PROTOCOL 5.1/5.2), and history in the folded state.

An edit or a delete is a new entry of the room's stream, so live sessions, resumes, polls and
webhooks get it in order like a message (:func:`node.protocol.fold_event` turns it into the
event). It has no ``s`` (seq): unread counts ignore it. Its fields:

* edit: ``x=e``, ``m`` (the edited message), ``f``/``n`` (the author), ``t`` (the new text),
  ``q`` (the room's seq when it was written: read markers placed on it stay exact);
* delete: ``x=d``, ``m``, ``f``/``n`` (who deleted it), ``q``, ``ds`` (the deleted message's
  seq: a shard reader that finds that seq missing knows why, see ``Topic.deliver``).

**Deleted text is gone.** A delete ``XDEL``s the message's entry and its edit entry; an edit
``XDEL``s the edit entry it supersedes (a message has at most one edit entry). What is left of
a deleted message is a tombstone: its id, seq and author. A cursor that points at an entry
removed this way is still resumable (see :meth:`RoomEdits.fill_holes`).

**Fold state**, in the room's slot, so every script here touches one slot (Redis Cluster):

* ``Keys.room_folds``: hash message id -> ``e <edit entry id> <text>`` (latest text of an
  edited message) or ``d <delete entry id> <seq> <author id> <author name>`` (tombstone);
* ``Keys.room_edited``: the ids of edited messages (lex-ordered zset, see :func:`pad_id`);
* ``Keys.room_tombs``: the ids of deleted messages, in the same order (history reads ranges);
* ``Keys.room_tomb_ops``: ``<delete entry id> <message id>`` of each tombstone.

Bounded: each edit and delete script prunes (up to :data:`PRUNE_BATCH` each) the fold state of
messages the stream has trimmed: an edited message older than the stream's first entry, a
tombstone whose delete entry is older than it. Live fold state is thus at most one record per
entry of the (capped) stream; without edits or deletes nothing grows.

Every command is one Lua script (read the target with ``XRANGE id id``, check, append, fold):
atomic, and a retried command (a broken connection, see ``redisio``) is answered from its
dedupe key instead of being applied twice.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from .errors import BadRequest, Forbidden, NotFound
from .keys import Keys, StreamId
from .protocol import MAX_STREAM_PART, message_event, stream_id_tuple
from .redisio import as_str, unavailable_on_redis_errors
from .webhooks import Outbox, outbox_xadd

# How long a command's dedupe key lives: longer than any retry of the command that wrote it.
RETRY_DEDUPE_TTL_S = 60
PRUNE_BATCH = 100
# History: most stream entries one page may scan past edit and delete entries.
HISTORY_SCAN_MAX = 4096

# Lua helpers: a stream id padded to fixed width sorts like the id (lex zsets, comparisons).
_LUA_IDS = """
local function pad(id)
  local ms, sq = string.match(id, '^(%d+)-(%d+)$')
  return string.rep('0', 20 - #ms) .. ms .. '-' .. string.rep('0', 20 - #sq) .. sq
end
local function unpad(p)
  local ms, sq = string.match(p, '^(%d+)-(%d+)$')
  return (string.gsub(ms, '^0+(%d)', '%1')) .. '-' .. (string.gsub(sq, '^0+(%d)', '%1'))
end
"""

# Lua, shared with the append script (node.streams.APPEND_LUA): after the XADD of entry ``id``
# to ``stream``, trim the entries older than ``max_age`` ms (an ARGV string, '0' off) relative
# to ``id`` (Redis's clock, like the ids; XADD takes one trim strategy, hence XTRIM) and record
# ``id`` as the room's ``last_id`` in ``meta``. The callers pass their own KEYS entries: every
# key is still a declared key of the script (one slot, Redis Cluster).
LUA_NOTE_APPENDED = """
local function note_appended(stream, meta, id, max_age)
  max_age = tonumber(max_age)
  if max_age > 0 then
    local cut = tonumber(string.match(id, '^(%d+)')) - max_age
    if cut > 0 then redis.call('XTRIM', stream, 'MINID', '~', string.format('%.0f', cut)) end
  end
  redis.call('HSET', meta, 'last_id', id)
end
"""

# KEYS: 1 stream, 2 meta, 3 members, 4 folds, 5 edited, 6 tombs, 7 tomb ops, 8 dedupe,
# 9 the shard's webhook outbox.
# ARGV: 1 target id, 2 user, 3 name, 4 text ('' for a delete), 5 maxlen, 6 max_age_ms (0 off),
# 7 '1' if the user must be in the members set, 8 dedupe ttl, 9 '1' if the user may delete
# others' messages (owner/admin), 10 the outbox maxlen ('0': webhooks off), 11 the room id.
# Returns {1, entry id} | {-1} no room | {-2} not a member | {-3} no such message |
# {-4} a system message | {-5} not the author.
_LUA_COMMON = _LUA_IDS + LUA_NOTE_APPENDED + """
local prev = redis.call('GET', KEYS[8])
if prev then return {1, prev} end
if redis.call('HEXISTS', KEYS[2], 'epoch') == 0 then return {-1, ''} end
if ARGV[7] == '1' and redis.call('SISMEMBER', KEYS[3], ARGV[2]) == 0 then return {-2, ''} end
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then return {-3, ''} end
local msg = {}
local raw = found[1][2]
for i = 1, #raw, 2 do msg[raw[i]] = raw[i + 1] end
if msg['x'] or not msg['s'] then return {-3, ''} end
local seq = redis.call('HGET', KEYS[2], 'seq') or '0'
local function appended(id)
  note_appended(KEYS[1], KEYS[2], id, ARGV[6])
  redis.call('SET', KEYS[8], id, 'EX', ARGV[8])
  """ + outbox_xadd("KEYS[9]", "ARGV[10]", "'r'", "ARGV[11]", "'i'", "id") + """
end
-- Entries removed by edits and deletes, counted in the metadata (``xdel``): with the stream's
-- entries-added and length it tells whether anything was ever trimmed (see fill_holes).
local function xdel(id)
  local n = redis.call('XDEL', KEYS[1], id)
  if n > 0 then redis.call('HINCRBY', KEYS[2], 'xdel', n) end
end
local function drop_edit(target)
  local old = redis.call('HGET', KEYS[4], target)
  if old then
    local eid = string.match(old, '^e (%S+)')
    if eid then xdel(eid) end
  end
end
local function prune()
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
  if #first == 0 then return end
  local bound = '(' .. pad(first[1][1])
  for _, m in ipairs(redis.call('ZRANGEBYLEX', KEYS[5], '-', bound, 'LIMIT', 0, """ + str(PRUNE_BATCH) + """)) do
    local mid = unpad(m)
    local v = redis.call('HGET', KEYS[4], mid)
    if v and string.sub(v, 1, 1) == 'e' then redis.call('HDEL', KEYS[4], mid) end
    redis.call('ZREM', KEYS[5], m)
  end
  for _, m in ipairs(redis.call('ZRANGEBYLEX', KEYS[7], '-', bound, 'LIMIT', 0, """ + str(PRUNE_BATCH) + """)) do
    local t = string.match(m, ' (%S+)$')
    redis.call('ZREM', KEYS[6], t)
    redis.call('HDEL', KEYS[4], unpad(t))
    redis.call('ZREM', KEYS[7], m)
  end
end
"""

EDIT_LUA = _LUA_COMMON + """
if msg['k'] == 'system' then return {-4, ''} end
if msg['f'] ~= ARGV[2] then return {-5, ''} end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'x', 'e', 'm', ARGV[1],
                      'f', ARGV[2], 'n', ARGV[3], 't', ARGV[4], 'q', seq)
appended(id)
drop_edit(ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], 'e ' .. id .. ' ' .. ARGV[4])
redis.call('ZADD', KEYS[5], 0, pad(ARGV[1]))
prune()
return {1, id}
"""

DELETE_LUA = _LUA_COMMON + """
-- A system message has no author among the users (its 'f' is 'system'): moderators only.
if (msg['f'] ~= ARGV[2] or msg['k'] == 'system') and ARGV[9] ~= '1' then return {-5, ''} end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[5], '*', 'x', 'd', 'm', ARGV[1],
                      'f', ARGV[2], 'n', ARGV[3], 'q', seq, 'ds', msg['s'])
appended(id)
drop_edit(ARGV[1])
xdel(ARGV[1])
redis.call('ZREM', KEYS[5], pad(ARGV[1]))
redis.call('HSET', KEYS[4], ARGV[1], 'd ' .. id .. ' ' .. msg['s'] .. ' ' .. (msg['f'] or '') .. ' ' .. (msg['n'] or ''))
redis.call('ZADD', KEYS[6], 0, pad(ARGV[1]))
redis.call('ZADD', KEYS[7], 0, pad(id) .. ' ' .. pad(ARGV[1]))
prune()
return {1, id}
"""

# KEYS: 1 stream, 2 folds, 3 tombs.  ARGV: 1 'b' (newest first, before ARGV[2]) or 'a' (oldest
# first, after ARGV[2]), 2 exclusive bound ('' none), 3 limit.
# Returns {more (0/1), {{id, {fields...}, fold value or ''}, ...}} in the direction read: the
# room's messages (edit and delete entries skipped, at most HISTORY_SCAN_MAX entries scanned)
# merged with the tombstones of the same range, limit items at most.
HISTORY_LUA = _LUA_IDS + """
local back = ARGV[1] == 'b'
local want = tonumber(ARGV[3]) + 1
local start
if ARGV[2] == '' then start = back and '+' or '-' else start = '(' .. ARGV[2] end
local msgs = {}
local reach = nil
local exhausted = false
local budget = """ + str(HISTORY_SCAN_MAX) + """
local n = want + 16
while true do
  local batch
  if back then batch = redis.call('XREVRANGE', KEYS[1], start, '-', 'COUNT', n)
  else batch = redis.call('XRANGE', KEYS[1], start, '+', 'COUNT', n) end
  for _, e in ipairs(batch) do
    reach = e[1]
    if e[2][1] ~= 'x' then
      msgs[#msgs + 1] = e
      if #msgs == want then break end
    end
  end
  if #msgs >= want then break end
  if #batch < n then exhausted = true; break end
  budget = budget - #batch
  if budget <= 0 then break end
  start = '(' .. batch[#batch][1]
  n = math.min(n * 2, 1024)
end
local tombs
if back then
  local hi = ARGV[2] == '' and '+' or '(' .. pad(ARGV[2])
  local lo = (exhausted or reach == nil) and '-' or '(' .. pad(reach)
  tombs = redis.call('ZREVRANGEBYLEX', KEYS[3], hi, lo, 'LIMIT', 0, want)
else
  local lo = ARGV[2] == '' and '-' or '(' .. pad(ARGV[2])
  local hi = (exhausted or reach == nil) and '+' or '(' .. pad(reach)
  tombs = redis.call('ZRANGEBYLEX', KEYS[3], lo, hi, 'LIMIT', 0, want)
end
local out = {}
local i, j = 1, 1
while #out < want and (i <= #msgs or j <= #tombs) do
  local take_msg
  if i > #msgs then take_msg = false
  elseif j > #tombs then take_msg = true
  else
    local a = pad(msgs[i][1])
    if back then take_msg = a > tombs[j] else take_msg = a < tombs[j] end
  end
  if take_msg then
    out[#out + 1] = {msgs[i][1], msgs[i][2], redis.call('HGET', KEYS[2], msgs[i][1]) or ''}
    i = i + 1
  else
    local tid = unpad(tombs[j])
    out[#out + 1] = {tid, {}, redis.call('HGET', KEYS[2], tid) or ''}
    j = j + 1
  end
end
local more = 0
if #out >= want or (not exhausted and #msgs < want) then more = 1 end
if #out >= want then out[#out] = nil end
return {more, out}
"""

# KEYS: 1 folds, 2 edited, 3 tombs.  ARGV: 1 id (inclusive).  Forgets the fold state of the
# messages up to ARGV[1] (``chatcluster archive`` after it trimmed them); returns how many.
FORGET_LUA = _LUA_IDS + """
local bound = '[' .. pad(ARGV[1])
local n = 0
for _, z in ipairs({KEYS[2], KEYS[3]}) do
  for _, m in ipairs(redis.call('ZRANGEBYLEX', z, '-', bound, 'LIMIT', 0, 1000)) do
    redis.call('HDEL', KEYS[1], unpad(m))
    redis.call('ZREM', z, m)
    n = n + 1
  end
end
return n
"""


def pad_id(sid: str) -> str:
    """A stream id padded to fixed width (as the Lua ``pad``): sorts like the id."""
    ms, _, seq = sid.partition("-")
    return f"{int(ms):020d}-{int(seq or 0):020d}"


def stream_ms(sid: str) -> int:
    return int(sid.partition("-")[0])


def history_item(room: str, sid: str, fields: dict[bytes, bytes], fold: str) -> dict[str, Any]:
    """One ``history`` item in its latest state: the message with its edited text and
    ``edited_at``, or a tombstone ``{room, id, seq, ts, from, deleted: true}`` (no text)."""
    if fold.startswith("d "):
        _, _, seq, author, name = (fold.split(" ", 4) + ["", "", "", "", ""])[:5]
        return {"room": room, "id": sid, "seq": int(seq or 0), "ts": stream_ms(sid),
                "from": {"id": author, "name": name}, "deleted": True}
    item = message_event(room, sid, fields)
    del item["type"]
    if fold.startswith("e "):
        _, eid, text = fold.split(" ", 2)
        item["text"] = text
        item["edited_at"] = stream_ms(eid)
    return item


def _fields(raw: Any) -> dict[bytes, bytes]:
    flat = list(raw or [])
    return {bytes(flat[i]): bytes(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


class NotAuthor(Forbidden):
    """The message is someone else's (a delete may still be allowed to an owner or admin)."""


@dataclass(frozen=True, slots=True)
class Changed:
    id: StreamId  # the edit or delete entry

    @property
    def ts(self) -> int:
        return stream_ms(self.id)


class RoomEdits:
    """Edit, delete and folded history of room messages. No state besides script handles."""

    def __init__(self, redis: Any, keys: Keys, *, maxlen: int, max_age_ms: int = 0,
                 outbox: Outbox | None = None) -> None:
        self.redis = redis
        self.keys = keys
        # Edits and deletes are webhook events too (node.webhooks), written in the same step.
        self.outbox = outbox if outbox is not None else Outbox(keys)
        self.maxlen = maxlen
        self.max_age_ms = max_age_ms
        self._edit = redis.register_script(EDIT_LUA)
        self._delete = redis.register_script(DELETE_LUA)
        self._history = redis.register_script(HISTORY_LUA)
        self._forget = redis.register_script(FORGET_LUA)

    def _keys(self, room: str, user: str) -> list[str]:
        k = self.keys
        return [k.room_stream(room), k.room_meta(room), k.room_members(room), k.room_folds(room),
                k.room_edited(room), k.room_tombs(room), k.room_tomb_ops(room),
                k.room_cmid(room, user, "~op" + secrets.token_hex(8)), self.outbox.key(room)]

    async def _run(self, script: Any, op: str, room: str, user: str, args: list[Any]) -> Changed:
        with unavailable_on_redis_errors(op):
            status, payload = await script(keys=self._keys(room, user), args=args)
        code = int(status)
        if code == 1:
            return Changed(StreamId(as_str(payload)))
        if code == -1:
            raise NotFound("no such room")
        if code == -2:
            raise Forbidden("not a member of the room")
        if code == -3:
            raise NotFound("no such message")
        if code == -4:
            raise BadRequest("system messages cannot be edited")
        raise NotAuthor(f"only the author may {op} this message" if op == "edit"
                        else "only the author or an owner or admin of the room may delete this message")

    async def edit(self, room: str, user: str, name: str, target: str, text: str,
                   check_member: bool) -> Changed:
        """Replace the text of ``user``'s message ``target``. ``check_member``: refuse a user
        not in the room's members set (every room but ``general``)."""
        return await self._run(self._edit, "edit", room, user, [
            target, user, name, text, self.maxlen, self.max_age_ms, "1" if check_member else "",
            RETRY_DEDUPE_TTL_S, "", self.outbox.arg, room])

    async def delete(self, room: str, user: str, name: str, target: str, check_member: bool,
                     moderator: bool) -> Changed:
        """Delete message ``target``: ``user``'s own, or any if ``moderator`` (owner/admin)."""
        return await self._run(self._delete, "delete", room, user, [
            target, user, name, "", self.maxlen, self.max_age_ms, "1" if check_member else "",
            RETRY_DEDUPE_TTL_S, "1" if moderator else "", self.outbox.arg, room])

    async def history(self, room: str, *, before: str | None, after: str | None,
                      limit: int) -> tuple[list[dict[str, Any]], bool]:
        """A page of ``limit`` messages and tombstones in their latest state, oldest first, and
        whether more exist beyond it. ``before``/``after`` exclusive; neither: the newest."""
        # Nothing is before the first possible id or after the last: Redis refuses those
        # exclusive bounds ("invalid ID for the interval"), the answer is an empty page.
        if before is not None and stream_id_tuple(before) == (0, 0):
            return [], False
        if after is not None and stream_id_tuple(after) == (MAX_STREAM_PART, MAX_STREAM_PART):
            return [], False
        k = self.keys
        back = after is None
        bound = (before or "") if back else after
        with unavailable_on_redis_errors("history"):
            more, items = await self._history(
                keys=[k.room_stream(room), k.room_folds(room), k.room_tombs(room)],
                args=["b" if back else "a", bound, limit])
        out = [history_item(room, as_str(sid), _fields(fields), as_str(fold)) for sid, fields, fold in items]
        if back:
            out.reverse()
        return out, bool(int(more))

    async def forget_upto(self, room: str, sid: str) -> int:
        """Drop the fold state of the messages up to ``sid`` inclusive (archived and trimmed)."""
        k = self.keys
        total = 0
        while True:
            n = int(await self._forget(keys=[k.room_folds(room), k.room_edited(room), k.room_tombs(room)],
                                       args=[sid]))
            total += n
            if n < 1000:
                return total


async def fill_holes(redis: Any, keys: Keys, ranges: dict[str, tuple[str, str]],
                     results: dict[str, list[tuple[bytes, dict[bytes, bytes]]]]) -> None:
    """Make replays from a cursor whose entry an edit or delete removed resumable.

    ``results[room]`` holds the entries from ``ranges[room][0]`` (the cursor) inclusive. When
    the cursor's own entry is missing, nothing after it was trimmed if the stream still holds
    an entry older than it (trimming removes the oldest entries first), or if the stream never
    lost an entry but to edits and deletes (its ``entries-added`` minus its length is the
    room's ``xdel`` count): the cursor entry was ``XDEL``ed by a delete or a newer edit. Then a
    placeholder entry for the cursor is put first, which :func:`node.resume.plan_replay` takes
    as the proof of continuity (it is never replayed). One pipelined read, only for such
    cursors (the usual resume costs nothing more).
    """
    suspects = [room for room, (cursor, _) in ranges.items()
                if cursor != "0-0" and (not results.get(room) or as_str(results[room][0][0]) != cursor)]
    if not suspects:
        return
    with unavailable_on_redis_errors("replay"):
        pipe = redis.pipeline(transaction=False)
        for room in suspects:
            stream = keys.room_stream(room)
            pipe.xrevrange(stream, "(" + ranges[room][0], "-", count=1)
            pipe.xinfo_stream(stream)
            pipe.hget(keys.room_meta(room), "xdel")
        replies = await pipe.execute(raise_on_error=False)
        for reply in replies[0::3] + replies[2::3]:
            if isinstance(reply, Exception):
                raise reply
    for i, room in enumerate(suspects):
        older, info, xdels = replies[3 * i: 3 * i + 3]
        never_trimmed = (isinstance(info, dict)  # (an error: no such stream)
                         and int(info.get("entries-added", -1)) - int(info.get("length", 0)) == int(xdels or 0))
        if older or never_trimmed:
            results[room] = [(ranges[room][0].encode(), {}), *results.get(room, [])]
