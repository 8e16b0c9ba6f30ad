"""``chatcluster archive``: export room messages older than a cut to gzipped JSON lines, then
trim exactly what was exported.

Safe to run from cron while the cluster serves:

* The cut is taken from each Redis server's own clock (``TIME``), the clock that makes the
  stream ids, so a skewed clock on the archiving host cannot reach into recent messages.
* Nothing is trimmed before the export file is complete, flushed, fsynced and renamed into
  place (and its directory fsynced).
* Each room is then trimmed with an exact ``XTRIM MINID`` just past the *last exported* entry
  (which is never newer than the cut). Stream ids only grow, so every entry below that bound was
  exported; a message appended during the run has a newer id and is never touched.
* A second run finds nothing older than the cut and exports and trims nothing. An existing
  ``--out`` file is never truncated: new messages are added to it as another gzip member
  (``gzip``/``zcat`` and :func:`gzip.open` read concatenated members as one stream).

Delivery is at-least-once: if the process dies after the export was written but before the
trim, the next run exports those messages again. ``(room, id)`` identifies a message; dedupe
on it when loading archives.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from . import redisio
from .edits import RoomEdits, history_item, pad_id
from .keys import PREFIX, Keys

STREAM_PATTERN = PREFIX + ":{s*}:r:*:x"  # the shape of Keys.room_stream, any shard and room
MAX_SEQ = (1 << 64) - 1


@dataclass
class RoomExport:
    key: str
    room: str
    cut: str  # entries below this id were candidates
    exported: int = 0
    last_id: str = ""  # the newest entry exported, or folded into the export (edits, deletes)


@dataclass
class ArchiveResult:
    out: str
    rooms_scanned: int = 0
    exported: int = 0
    trimmed: int = 0
    rooms: list[RoomExport] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"out": self.out, "rooms_scanned": self.rooms_scanned,
                "rooms_archived": sum(1 for r in self.rooms if r.exported),
                "exported": self.exported, "trimmed": self.trimmed}



def next_id(sid: str) -> str:
    """The smallest stream id greater than ``sid``."""
    ms, _, seq = sid.partition("-")
    return f"{ms}-{int(seq) + 1}" if int(seq) < MAX_SEQ else f"{int(ms) + 1}-0"


def archive_line(room: str, sid: str, fields: dict[bytes, bytes], fold: str = "") -> bytes:
    """One JSON line: the message as ``history`` returns it, in its latest state (``fold``:
    its fold record, see :mod:`node.edits`): edited text and ``edited_at``, or a tombstone."""
    return orjson.dumps(history_item(room, sid, fields, fold)) + b"\n"


async def _servers(client: Any) -> list[tuple[aioredis.Redis, bool]]:
    """One client per server to scan: every master of a cluster, or the one server."""
    if not hasattr(client, "get_primaries"):
        return [(client, False)]
    await client.initialize()
    password = client.get_connection_kwargs().get("password")
    return [(aioredis.Redis(host=node.host, port=node.port, password=password,
                            socket_connect_timeout=5, socket_timeout=30), True)
            for node in client.get_primaries()]


async def _room_streams(server: aioredis.Redis, keys: Keys) -> AsyncIterator[tuple[str, str]]:
    async for raw in server.scan_iter(match=STREAM_PATTERN, count=1000, _type="stream"):
        key = redisio.as_str(raw)
        room = keys.stream_room(key)
        if room is not None:
            yield key, room


async def _export_room(client: Any, keys: Keys, room: RoomExport, gz: Any, batch: int) -> None:
    """Export the room's messages below the cut in their folded state (node.edits): edited text
    with ``edited_at``, and the tombstones of deleted messages at their place; the edit and
    delete entries themselves are not exported (what they did is)."""
    start = "-"
    low = "-"  # tombstones already merged are below this (lex bound, node.edits.pad_id)
    while True:
        entries = await client.xrange(room.key, start, "(" + room.cut, count=batch)
        full = len(entries) == batch
        high = "[" + pad_id(redisio.as_str(entries[-1][0])) if full else "(" + pad_id(room.cut)
        tombs = [redisio.as_str(t) for t in await client.zrangebylex(keys.room_tombs(room.room), low, high)]
        items = [(redisio.as_str(sid), fields) for sid, fields in entries if b"x" not in fields]
        items += [(t, {}) for t in (_unpad(p) for p in tombs)]
        items.sort(key=lambda item: pad_id(item[0]))
        folds = await client.hmget(keys.room_folds(room.room), [sid for sid, _ in items]) if items else []
        for (sid, fields), fold in zip(items, folds, strict=True):
            gz.write(archive_line(room.room, sid, fields, redisio.as_str(fold or b"")))
            room.exported += 1
            room.last_id = sid
        if entries and pad_id(redisio.as_str(entries[-1][0])) > pad_id(room.last_id or "0-0"):
            # Edit and delete entries after the last message: what they did is in the file.
            room.last_id = redisio.as_str(entries[-1][0])
        if not full:
            return
        start = "(" + redisio.as_str(entries[-1][0])
        low = "(" + high[1:]


def _unpad(padded: str) -> str:
    ms, _, seq = padded.partition("-")
    return f"{int(ms)}-{int(seq)}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_export(tmp: Path) -> tuple[Any, gzip.GzipFile]:
    raw = open(tmp, "wb")  # noqa: SIM115 -- closed by the caller's with
    return raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0)


def _publish(tmp: Path, out: Path, exported: bool) -> None:
    """Make ``out`` hold its old content (if any) followed by ``tmp``, atomically and durably.

    With nothing exported an existing ``out`` is left alone (a new one is created empty)."""
    if out.exists():
        if not exported:
            return
        combined = tmp.with_name(tmp.name + ".all")
        try:
            with open(combined, "wb") as dst:
                for part in (out, tmp):
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(combined, out)
        finally:
            combined.unlink(missing_ok=True)
    else:
        os.replace(tmp, out)
    _fsync_dir(out.parent)


async def archive(redis_url: str, older_than_s: float, out: str | os.PathLike[str], *,
                  shards: int = 16, batch: int = 1000) -> ArchiveResult:
    """Export every room message older than ``older_than_s`` to ``out`` and trim them.

    ``shards`` only names keys; the scan finds every room stream whatever the shard count.
    """
    out_path = Path(out)
    result = ArchiveResult(str(out_path))
    keys = Keys(shards)
    client = redisio.connect(redis_url, max_connections=8)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    servers: list[tuple[aioredis.Redis, bool]] = []
    try:
        servers = await _servers(client)
        rooms: list[RoomExport] = []
        raw, gz = _open_export(tmp)
        with raw, gz:
            for server, _ in servers:
                secs, micros = await server.time()
                now_ms = int(secs) * 1000 + int(micros) // 1000
                cut = f"{max(0, now_ms - int(older_than_s * 1000))}-0"
                async for key, room in _room_streams(server, keys):
                    result.rooms_scanned += 1
                    export = RoomExport(key, room, cut)
                    await _export_room(client, keys, export, gz, batch)
                    if export.exported:
                        rooms.append(export)
            gz.close()
            raw.flush()
            os.fsync(raw.fileno())
        result.rooms = rooms
        result.exported = sum(r.exported for r in rooms)
        await asyncio.to_thread(_publish, tmp, out_path, result.exported > 0)
        # Only now, with the export durable, remove what it holds.
        edits = RoomEdits(client, keys, maxlen=0)
        for done in rooms:
            result.trimmed += int(await client.xtrim(done.key, minid=next_id(done.last_id),
                                                     approximate=False))
            await edits.forget_upto(done.room, done.last_id)  # their fold state is in the file
        return result
    finally:
        tmp.unlink(missing_ok=True)
        for server, owned in servers:
            if owned:
                await server.aclose()
        await client.aclose()


def read_archive(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every line of an archive file (all gzip members), parsed."""
    with gzip.open(path, "rb") as f:
        return [orjson.loads(line) for line in f if line.strip()]
