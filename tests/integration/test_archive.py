"""Retention and archive: ``CHAT_HISTORY_MAX_AGE`` trims by age in the append script, and
``chatcluster archive`` exports exactly what it trims, is idempotent, keeps its file readable
by gzip, and loses nothing a sender appends while it runs.

Old messages are written with explicit stream ids in the past (the node's own field layout),
so nothing here sleeps to make messages old.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
import time
from typing import Any

import pytest

from node import config
from node.archive import archive, next_id, read_archive
from node.keys import Keys
from node.protocol import message_event, stream_id_tuple
from node.streams import RoomStreams

KEYS = Keys(16)  # the node's default CHAT_SHARDS
HOUR_MS = 3600 * 1000


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def add_old(redis: Any, room: str, n: int, ms: int, first_seq: int = 1) -> list[str]:
    """``n`` messages of ``room`` at time ``ms`` (explicit ids), as the append script stores them."""
    key = KEYS.room_stream(room)
    ids = []
    for i in range(n):
        fields = {"f": "old", "n": "Old Timer", "t": f"{room} old {i}", "s": first_seq + i}
        if i % 3 == 0:
            fields["c"] = f"cm-{room}-{i}"
        if i % 7 == 0:
            fields["k"] = "system"
        ids.append(_s(await redis.xadd(key, fields, id=f"{ms}-{i + 1}")))
    return ids


async def entries(redis: Any, room: str) -> list[tuple[str, dict[bytes, bytes]]]:
    return [(_s(sid), fields) for sid, fields in await redis.xrange(KEYS.room_stream(room))]


async def make_room(redis: Any, room: str) -> RoomStreams:
    streams = RoomStreams(redis, KEYS, maxlen=100_000, cmid_ttl_s=60)
    await streams.ensure_room(room, "open", room)
    return streams


# -- retention by age --------------------------------------------------------------------------

def test_history_max_age_setting_parses_durations():
    assert config.duration("30d") == 30 * 86400
    assert config.duration("12h") == 12 * 3600
    assert config.duration("90m") == 5400
    assert config.duration("45s") == 45
    assert config.duration("2.5") == 2.5
    assert config.load({}).history_max_age_s == 0  # off by default
    assert config.load({"CHAT_HISTORY_MAX_AGE": "7d"}).history_max_age_s == 7 * 86400
    for bad in ("soon", "-1h", "nan"):
        with pytest.raises(config.ConfigError, match="CHAT_HISTORY_MAX_AGE"):
            config.load({"CHAT_HISTORY_MAX_AGE": bad})


async def test_retention_by_age_trims_old_entries_and_keeps_recent_ones(redis_client):
    now_ms = int(time.time() * 1000)
    streams = await make_room(redis_client, "general")
    old = await add_old(redis_client, "general", 500, now_ms - 2 * HOUR_MS)
    recent = await add_old(redis_client, "general", 50, now_ms - 10 * 60 * 1000, first_seq=501)
    await redis_client.hset(KEYS.room_meta("general"), mapping={"seq": 550, "last_id": recent[-1]})

    # Off (0): an append trims nothing by age.
    kept_all = await streams.append("general", "alice", "Alice", "no age limit", None)
    assert len(await entries(redis_client, "general")) == 551

    aging = RoomStreams(redis_client, KEYS, maxlen=100_000, cmid_ttl_s=60, max_age_s=3600)
    appended = await aging.append("general", "alice", "Alice", "with an age limit", "c-1")
    left = [sid for sid, _ in await entries(redis_client, "general")]
    cut = (int(appended.id.split("-")[0]) - HOUR_MS, 0)
    old_left = [sid for sid in left if stream_id_tuple(sid) < cut]
    # Approximate (MINID ~): whole stream nodes go, so a node's worth of old entries may stay.
    assert len(old_left) < 150, len(old_left)
    assert old_left == old[len(old) - len(old_left):]  # oldest first, no holes
    # Everything younger than the cut stays, including the new message.
    assert left[len(old_left):] == recent + [kept_all.id, appended.id]
    assert appended.seq == 552 and not appended.duplicate
    # A duplicate send is still answered from the dedupe key, not appended again.
    again = await aging.append("general", "alice", "Alice", "with an age limit", "c-1")
    assert (again.id, again.duplicate) == (appended.id, True)


async def test_node_applies_history_max_age_on_send(start_nodes, clients, redis_client):
    """CHAT_HISTORY_MAX_AGE reaches the append script of a running node."""
    (node,) = start_nodes(1, CHAT_HISTORY_MAX_AGE="1h")
    alice = await clients(node.ws_url, user="alice")  # general exists once a user is welcomed
    now_ms = int(time.time() * 1000)
    await add_old(redis_client, "general", 500, now_ms - 2 * HOUR_MS)
    before = len(await entries(redis_client, "general"))
    ack = await alice.send("general", "trims the old ones")
    left = [sid for sid, _ in await entries(redis_client, "general")]
    assert before >= 500 and len(left) < 150, (before, len(left))
    assert left[-1] == ack["id"]


# -- archive -----------------------------------------------------------------------------------

ROOMS = ("general", "r-archive1", "dm:alice:bob")


async def seed(redis: Any) -> dict[str, list[str]]:
    """Old messages in three rooms (one spans several export pages) and recent ones."""
    now_ms = int(time.time() * 1000)
    recent: dict[str, list[str]] = {}
    for room, n in zip(ROOMS, (2500, 3, 1), strict=True):
        streams = await make_room(redis, room)
        await add_old(redis, room, n, now_ms - 3 * HOUR_MS)
        await redis.hset(KEYS.room_meta(room), mapping={"seq": n})
        recent[room] = [(await streams.append(room, "bob", "Bob", f"{room} recent {i}", None)).id
                        for i in range(2)]
    return recent


async def test_archive_exports_exactly_what_it_trims_and_is_idempotent(redis_server, redis_client, tmp_path):
    recent = await seed(redis_client)
    before = {room: await entries(redis_client, room) for room in ROOMS}
    out = tmp_path / "archive.jsonl.gz"

    result = await archive(redis_server.url, 3600, out, batch=1000)
    lines = read_archive(out)
    after = {room: await entries(redis_client, room) for room in ROOMS}
    assert result.exported == result.trimmed == len(lines) == 2504
    assert result.rooms_scanned == 3
    for room in ROOMS:
        assert [sid for sid, _ in after[room]] == recent[room]  # nothing newer than the cut went
        removed = [(sid, f) for sid, f in before[room] if sid not in recent[room]]
        exported = [line for line in lines if line["room"] == room]
        # The export is what was removed: every field, in stream order, nothing twice.
        want = []
        for sid, fields in removed:
            event = message_event(room, sid, fields)
            del event["type"]
            want.append(event)
        assert exported == want
    general = [line for line in lines if line["room"] == "general"]  # rooms come in SCAN order
    assert {"cmid", "kind"} <= set(general[0]) and "cmid" not in general[1] and "kind" not in general[1]

    # Twice is harmless: nothing older than the cut is left, nothing is exported or trimmed,
    # and the file is left as it was.
    content = out.read_bytes()
    second = await archive(redis_server.url, 3600, out)
    assert (second.exported, second.trimmed) == (0, 0)
    assert out.read_bytes() == content
    assert {room: await entries(redis_client, room) for room in ROOMS} == after

    # A later run with something to export adds to the file instead of truncating it.
    await add_old(redis_client, "r-late", 4, int(time.time() * 1000) - 3 * HOUR_MS)
    third = await archive(redis_server.url, 3600, out)
    assert (third.exported, third.trimmed) == (4, 4)
    both = read_archive(out)
    assert both[:len(lines)] == lines
    assert [line["text"] for line in both[len(lines):]] == [f"r-late old {i}" for i in range(4)]
    assert await entries(redis_client, "r-late") == []


async def test_archive_cli_writes_a_file_gzip_reads(redis_server, redis_client, tmp_path):
    await seed(redis_client)
    out = tmp_path / "cron.jsonl.gz"
    cmd = [sys.executable, "-m", "node", "archive", "--older-than", "1h", "--out", str(out),
           "--redis-url", redis_server.url]
    done = await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["exported"] == summary["trimmed"] == 2504 and summary["rooms_archived"] == 3
    # The standard tool reads it (and checks the CRC), as one JSON object per line.
    plain = await asyncio.to_thread(subprocess.run, ["gzip", "-dc", str(out)], capture_output=True,
                                    timeout=30)
    assert plain.returncode == 0, plain.stderr
    rows = [json.loads(line) for line in plain.stdout.decode().splitlines()]
    assert len(rows) == 2504 and {r["room"] for r in rows} == set(ROOMS)
    with gzip.open(out, "rt") as f:
        assert json.loads(f.readline()) == rows[0]
    # No stray temporary file next to it.
    assert sorted(p.name for p in tmp_path.iterdir() if "cron" in p.name) == ["cron.jsonl.gz"]

    bad = await asyncio.to_thread(subprocess.run, [*cmd[:4], "a while", *cmd[5:]],
                                  capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "older-than" in bad.stderr


async def test_archive_during_traffic_loses_nothing(start_nodes, clients, redis_client, tmp_path):
    """A sender chats while the archive runs with a cut of *now*: each acked message is either
    in the export or still in the stream, never both, never neither; receivers get them all."""
    (a,) = start_nodes(1)
    sender = await clients(a.ws_url, user="sender")
    receiver = await clients(a.ws_url, user="receiver")
    old_ms = int(time.time() * 1000) - 3 * HOUR_MS
    for i in range(20):  # enough old data that the archive takes a while
        await add_old(redis_client, f"r-busy{i}", 300, old_ms)

    acked: list[dict[str, Any]] = []
    stop = asyncio.Event()
    progress = asyncio.Condition()

    async def keep_sending() -> None:
        while not stop.is_set():
            reply = await sender.send("general", f"live {len(acked)}")
            async with progress:
                acked.append(reply)
                progress.notify_all()

    async def until_acked(n: int) -> None:
        async with asyncio.timeout(10), progress:
            await progress.wait_for(lambda: len(acked) >= n)

    sending = asyncio.create_task(keep_sending())
    await until_acked(30)
    during = len(acked)
    result = await archive(a.env["CHAT_REDIS_URL"], 0, tmp_path / "now.jsonl.gz")
    assert len(acked) > during, "no send overlapped the archive run"
    await until_acked(len(acked) + 30)
    stop.set()
    await sending

    exported = [line["id"] for line in read_archive(tmp_path / "now.jsonl.gz") if line["room"] == "general"]
    remaining = [sid for sid, _ in await entries(redis_client, "general")]
    sent = [m["id"] for m in acked]
    assert len(set(sent)) == len(sent)
    assert exported + remaining == sent  # in order, every one exactly once
    assert exported, "the cut of now exported nothing of general"
    assert result.exported == len(exported) + 20 * 300
    # Live delivery did not notice.
    got = []
    async with asyncio.timeout(15):
        while len(got) < len(sent):
            event = await receiver.next_event("message")
            if event["room"] == "general":
                got.append(event["id"])
    assert got == sent


def test_next_id_is_the_successor():
    assert next_id("5-0") == "5-1"
    assert next_id(f"5-{(1 << 64) - 1}") == "6-0"
