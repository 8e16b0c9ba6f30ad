"""The wire format, without I/O: parsing and validating client frames, encoding server frames.

Everything here is a pure function of its arguments, so it is tested (and fuzzed) without
sockets or Redis. :func:`parse_frame` either returns a validated command dict or raises a
:class:`~node.errors.ChatError` whose code goes into the error reply.
"""

from __future__ import annotations

import re
import time
from typing import Any

import orjson

from .errors import BadRequest, TooLarge

# \Z, not $: "$" also matches before a trailing newline, which let "alice\n" pass as a user id.
USER_ID_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}\Z")
ROOM_ID_RE = re.compile(r"^(general|dm:[A-Za-z0-9_.@-]{1,64}:[A-Za-z0-9_.@-]{1,64}|r-[a-z0-9]{4,32})\Z")
STREAM_ID_RE = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}\Z")
CMID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}\Z")
EPOCH_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
MAX_STREAM_PART = 2**64 - 1  # Redis refuses larger stream id parts (an error, not a miss)
MAX_REF_CHARS = 64
MAX_DEPTH = 8  # default of CHAT_MAX_JSON_DEPTH
MIN_DEPTH = 4  # the contract's own frames nest this deep (hello.cursors.ROOM.id)


# Field kinds used in the command table.
_STR, _INT, _BOOL, _DICT, _LIST = "str", "int", "bool", "dict", "list"

# type -> {field: (kind, required)}; fields not listed are ignored (forward compatibility).
COMMANDS: dict[str, dict[str, tuple[str, bool]]] = {
    "hello": {"token": (_STR, False), "user": (_STR, False), "name": (_STR, False),
              "cursors": (_DICT, False), "personal": (_DICT, False), "client": (_STR, False)},
    "send": {"room": (_STR, True), "text": (_STR, True), "cmid": (_STR, False)},
    "history": {"room": (_STR, True), "before": (_STR, False), "after": (_STR, False), "limit": (_INT, False)},
    "join": {"room": (_STR, True)},
    "leave": {"room": (_STR, True)},
    "create_room": {"name": (_STR, True), "visibility": (_STR, True), "members": (_LIST, False)},
    "invite": {"room": (_STR, True), "user": (_STR, True)},
    "dm": {"user": (_STR, True)},
    "rooms": {"query": (_STR, False)},
    "who": {"room": (_STR, True), "limit": (_INT, False)},
    "where": {"user": (_STR, True)},
    "read": {"room": (_STR, True), "id": (_STR, True)},
    "edit": {"room": (_STR, True), "id": (_STR, True), "text": (_STR, True)},
    "delete": {"room": (_STR, True), "id": (_STR, True)},
    "typing": {"room": (_STR, True)},
    "set_role": {"room": (_STR, True), "user": (_STR, True), "role": (_STR, True)},
    "kick": {"room": (_STR, True), "user": (_STR, True)},
    "ping": {},
    "refresh": {"token": (_STR, True)},
}

_KIND_TYPES: dict[str, type | tuple[type, ...]] = {
    _STR: str, _INT: int, _BOOL: bool, _DICT: dict, _LIST: list,
}


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a decoded JSON value, stopping early past ``limit``."""
    stack = [(value, 1)]
    deepest = 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


# One stream entry as Redis returns it: (id, fields).
Entry = tuple[bytes, dict[bytes, bytes]]


def ref_of(frame: Any) -> str | int | None:
    """The frame's ``ref`` if it is a valid one, for echoing in an error reply."""
    if isinstance(frame, dict):
        ref = frame.get("ref")
        if isinstance(ref, bool):
            return None
        if isinstance(ref, int) and -(2**53) < ref < 2**53:
            return ref
        if isinstance(ref, str) and len(ref) <= MAX_REF_CHARS:
            return ref
    return None


def decode(data: str | bytes) -> Any:
    """Decode one frame's JSON; raises :class:`BadRequest` with a short reason."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise BadRequest("malformed JSON") from None


def loose_ref(raw: str | bytes) -> str | int | None:
    """The ``ref`` of a frame that failed to parse or validate, if one can be read, for
    echoing in its error reply."""
    try:
        return ref_of(orjson.loads(raw))
    except orjson.JSONDecodeError:
        return None


def validate(frame: Any, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """Check a decoded frame against the command table; returns it unchanged if valid."""
    if not isinstance(frame, dict):
        raise BadRequest("a frame must be a JSON object")
    kind = frame.get("type")
    if not isinstance(kind, str):
        raise BadRequest("missing field: type")
    spec = COMMANDS.get(kind)
    if spec is None:
        raise BadRequest(f"unknown type: {kind[:32]}")
    if "ref" in frame and ref_of(frame) is None:
        raise BadRequest("ref must be a string (up to 64 chars) or an integer")
    if _depth(frame, max_depth) > max_depth:
        raise BadRequest("frame nested too deeply", limit="json_depth")
    for name, (field_kind, required) in spec.items():
        if name not in frame or frame[name] is None:
            if required:
                raise BadRequest(f"missing field: {name}")
            frame.pop(name, None)  # an optional null means "absent": handlers use their default
            continue
        value = frame[name]
        expected = _KIND_TYPES[field_kind]
        if not isinstance(value, expected) or (field_kind == _INT and isinstance(value, bool)):
            raise BadRequest(f"field {name} must be of type {field_kind}")
    return frame


def parse_frame(data: str | bytes, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    return validate(decode(data), max_depth)


# -- field checks shared by the commands ---------------------------------------------------

def check_room_id(room: str) -> str:
    if not ROOM_ID_RE.match(room):
        raise BadRequest("invalid room id")
    return room


def check_user_id(user: str) -> str:
    if not USER_ID_RE.match(user):
        raise BadRequest("invalid user id")
    return user


def stream_id_ok(value: str) -> bool:
    """A stream id Redis accepts: ``ms-seq``, each part at most 2**64 - 1."""
    if not STREAM_ID_RE.match(value):
        return False
    ms, _, seq = value.partition("-")
    return int(ms) <= MAX_STREAM_PART and int(seq) <= MAX_STREAM_PART


def check_stream_id(value: str, field: str = "id") -> str:
    if not stream_id_ok(value):
        raise BadRequest(f"{field} must be a stream id like 1732200000000-0")
    return value


def check_text(text: str, max_chars: int) -> str:
    if not text or not text.strip():
        raise BadRequest("text must not be empty")
    if len(text) > max_chars:
        raise TooLarge(f"text longer than {max_chars} characters", limit="text_chars")
    if "\x00" in text:
        raise BadRequest("text must not contain NUL characters")
    return text


def check_display_name(name: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 80:
        raise BadRequest("name must be 1..80 characters")
    return name


def parse_cursor(value: Any) -> tuple[str, str] | None:
    """``{"epoch", "id"}`` -> (epoch, id); ``None`` if malformed (the room is then not resumed)."""
    if not isinstance(value, dict):
        return None
    epoch, sid = value.get("epoch"), value.get("id")
    if not isinstance(epoch, str) or not isinstance(sid, str):
        return None
    if not EPOCH_RE.match(epoch) or not stream_id_ok(sid):
        return None
    return epoch, sid


def now_ms() -> int:
    """The node's clock in ms (``server_time``, presence expiries): wall time, not monotonic."""
    return int(time.time() * 1000)


def stream_id_tuple(sid: str) -> tuple[int, int]:
    ms, _, seq = sid.partition("-")
    return int(ms), int(seq or 0)


# -- server frames -----------------------------------------------------------------------

def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)


def reply_ok(ref: Any, data: dict[str, Any]) -> bytes:
    frame: dict[str, Any] = {"type": "reply", "ok": True, "data": data}
    if ref is not None:
        frame["ref"] = ref
    return orjson.dumps(frame)


def reply_error(ref: Any, error: dict[str, Any]) -> bytes:
    frame: dict[str, Any] = {"type": "reply", "ok": False, "error": error}
    if ref is not None:
        frame["ref"] = ref
    return orjson.dumps(frame)


def message_event(room: str, sid: str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """The ``message`` event of one stream entry (fields as stored by the append script); the
    ``edit`` or ``delete`` event of an edit or delete entry (see :func:`fold_event`)."""
    if b"x" in fields:
        return fold_event(room, sid, fields)
    event: dict[str, Any] = {
        "type": "message",
        "room": room,
        "id": sid,
        "seq": int(fields.get(b"s", b"0")),
        "ts": int(sid.partition("-")[0]),
        "from": {"id": fields.get(b"f", b"").decode(), "name": fields.get(b"n", b"").decode()},
        "text": fields.get(b"t", b"").decode(),
    }
    cmid = fields.get(b"c")
    if cmid:
        event["cmid"] = cmid.decode()
    if fields.get(b"k") == b"system":
        event["kind"] = "system"
    return event


def fold_event(room: str, sid: str, fields: dict[bytes, bytes]) -> dict[str, Any]:
    """The ``edit`` / ``delete`` event of an edit or delete entry (PROTOCOL 5.2; written by
    :mod:`node.edits`). ``id`` is the edited or deleted message; ``entry_id`` is the entry's own
    stream id, the one a client's cursor moves to."""
    by = {"id": fields.get(b"f", b"").decode(), "name": fields.get(b"n", b"").decode()}
    target = fields.get(b"m", b"").decode()
    if fields.get(b"x") == b"e":
        return {"type": "edit", "room": room, "id": target, "text": fields.get(b"t", b"").decode(),
                "edited_at": int(sid.partition("-")[0]), "by": by, "entry_id": sid}
    event: dict[str, Any] = {"type": "delete", "room": room, "id": target, "by": by, "entry_id": sid}
    deleted_seq = fields.get(b"ds")
    if deleted_seq is not None:
        # Extension: the deleted message's seq, so that a client checking seq continuity knows
        # the hole it leaves in a replay or poll that no longer has the message.
        event["deleted_seq"] = int(deleted_seq)
    return event


def entry_seq(fields: dict[bytes, bytes]) -> int:
    """The room's ``seq`` as of a stream entry: a message's own ``seq``, or for an edit or
    delete entry (which has none) the ``seq`` of the newest message when it was written."""
    raw = fields.get(b"s")
    if raw is None:
        raw = fields.get(b"q", b"0")
    return int(raw)


def ws_text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented WebSocket text frame (RFC 6455 5.2) around ``payload``.

    Server-to-client frames are never masked, so the bytes are the same for every recipient:
    a message is framed once per node and the same buffer is written to every socket.
    Compression is disabled on the server for that reason.
    """
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return bytes((0x81, 126, n >> 8, n & 0xFF)) + payload
    return bytes((0x81, 127)) + n.to_bytes(8, "big") + payload
