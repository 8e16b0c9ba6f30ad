"""Redis work per sent message and per presence heartbeat, for small and huge rooms (issue 3).

    python loadtest/redis_cost.py                       # defaults: 2 nodes, K=200, M=50
    python loadtest/redis_cost.py --nodes 1 --messages 500 --sessions 50 --window 10

Starts its own Redis (``start_redis``) and nodes (``start_node``, dev auth, CHAT_PRESENCE_TTL=3,
so a heartbeat every second), then measures, window by window:

* **per sent message** -- one ChatClient sends K messages (each with a ``cmid``, acked one by
  one) into an open room of 10 members and into one of 10,000 members (the same run); 4 more
  members of each room are connected (spread over the nodes) so fan-out really happens. The
  window ends when every connected member received all K.
* **per heartbeat** -- M sessions whose users are each in 1 room of 10, in the 10,000-member
  room, or in 200 rooms of M members; an idle window of ``--window`` seconds.
* **per presence transition** -- the same M sessions connecting (hello: resume work + presence
  start + online event) and disconnecting (presence end + offline event).

Each window starts with ``CONFIG RESETSTAT`` and ends with ``INFO commandstats`` / ``INFO
stats``: commandstats count the commands a Lua script runs (``xadd``, ``hincrby`` ...) as well
as the ``EVALSHA`` itself, and so does ``total_commands_processed``. To split client-issued
commands from in-script ones, and the measured action from the node's background loops, a
``MONITOR`` connection tallies the same window (from the RESETSTAT line to an ``ECHO`` marker):
``EVALSHA`` is named by its script's SHA1, in-script commands are attributed to the script that
ran them. *Background* is what runs whatever the clients do: the presence sweeper's script,
``PING`` (readiness watch), the heartbeat script (``EVALSHA``, with its ``ZADD``s and ``PEXPIRE``) outside the heartbeat
windows, and in message windows the periodic online counts of big rooms
(``SCARD``/``SMEMBERS``/``ZMSCORE``/``PFCOUNT``). Shard-reader ``XREAD``s are never background.

Results: Markdown tables on stdout, JSON in ``loadtest/results/redis_cost.json`` (``--json``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _node_source(src: str) -> dict[str, str]:
    """Like ``bench.py --node-src``: ``git:REF`` (default HEAD) measures a clean export of that
    commit's ``node/`` (other people's uncommitted edits are not measured); ``.`` the tree."""
    if src == ".":
        path = str(REPO)
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip() + " + working tree"
    elif src.startswith("git:"):
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", src[4:]], capture_output=True,
                                text=True, check=True).stdout.strip()
        path = os.path.join(tempfile.gettempdir(), f"chatcluster-bench-src-{commit[:12]}")
        if not os.path.isdir(os.path.join(path, "node")):
            os.makedirs(path, exist_ok=True)
            archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "node"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", path], input=archive, check=True)
    else:
        path, commit = os.path.abspath(src), "directory " + os.path.abspath(src)
    sys.path.insert(0, path)
    # `python -m node` resolves `node` from the child's cwd first: run the children there.
    os.chdir(path)
    return {"node_src": src, "node_path": path, "node_commit": commit}


def _argv_node_src(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg == "--node-src" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--node-src="):
            return arg.split("=", 1)[1]
    return "git:HEAD"


NODE_SOURCE = _node_source(_argv_node_src(sys.argv[1:]))

import redis.asyncio as aioredis  # noqa: E402

from node import config as node_config  # noqa: E402
from node import embedded  # noqa: E402
from node.client import ChatClient  # noqa: E402
from node.keys import Keys  # noqa: E402
from node.streams import RoomStreams  # noqa: E402

KEYS = Keys(16)
# Commands the measuring client itself sends in a window.
OWN = {"info", "config|resetstat", "config", "echo", "monitor", "client", "hello", "multi", "exec"}


def log(msg: str) -> None:
    print(f"[redis_cost {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def script_names() -> dict[str, str]:
    """SHA1 of every Lua script of the node -> a short name."""
    import importlib

    out = {}
    for mod_name in ("streams", "presence", "ephemeral", "personal", "unread"):
        mod = importlib.import_module(f"node.{mod_name}")
        for attr, value in vars(mod).items():
            if attr.endswith("_LUA") and isinstance(value, str):
                out[hashlib.sha1(value.encode()).hexdigest()] = attr[:-4].lower()
    return out


# -- measurement windows -----------------------------------------------------------------------

class Monitor:
    """Tallies MONITOR lines between a CONFIG RESETSTAT and an ECHO marker."""

    def __init__(self, url: str, scripts: dict[str, str]) -> None:
        self.url = url
        self.scripts = scripts
        self.active = False
        self.tally: Counter[tuple[str, str]] = Counter()  # (origin, name) -> calls
        self.seen_start = asyncio.Event()
        self.marker: str | None = None
        self.seen_marker = asyncio.Event()
        self._parent = "?"

    async def run(self) -> None:
        conn = aioredis.Redis.from_url(self.url)
        async with conn.monitor() as mon:
            async for item in mon.listen():
                self._line(item)

    def _line(self, item: dict[str, Any]) -> None:
        words = item["command"].split(" ")
        name = words[0].lower()
        lua = item.get("client_type") == "lua"
        if not lua and name == "echo" and "redis-cost-start" in item["command"]:
            self.tally.clear()
            self.active = True
            self.seen_start.set()
            return
        if not lua and name == "echo" and self.marker is not None and self.marker in item["command"]:
            self.active = False
            self.seen_marker.set()
            return
        if not self.active or (not lua and name in OWN):
            return
        if lua:
            self.tally[("script:" + self._parent, name)] += 1
            return
        if name == "evalsha" and len(words) > 1:
            self._parent = self.scripts.get(words[1], "unknown")
            name = "evalsha:" + self._parent
        self.tally[("client", name)] += 1


class Meter:
    def __init__(self, r: Any, mon: Monitor) -> None:
        self.r = r
        self.mon = mon
        self.n = 0

    async def start(self) -> float:
        # CONFIG is not shown by MONITOR: reset and mark in one transaction, nothing in between.
        self.mon.seen_start.clear()
        pipe = self.r.pipeline(transaction=True)
        pipe.config_resetstat()
        pipe.echo("redis-cost-start")
        await pipe.execute()
        await asyncio.wait_for(self.mon.seen_start.wait(), 10)
        return time.monotonic()

    async def stop(self, t0: float) -> dict[str, Any]:
        dur = time.monotonic() - t0
        self.n += 1
        marker = f"redis-cost-mark-{self.n}"
        self.mon.marker = marker
        self.mon.seen_marker.clear()
        pipe = self.r.pipeline(transaction=True)  # the marker and both snapshots at one instant
        pipe.echo(marker)
        pipe.info("commandstats")
        pipe.info("stats")
        _, cmdstats, stats = await pipe.execute()
        await asyncio.wait_for(self.mon.seen_marker.wait(), 10)
        tally = Counter(self.mon.tally)
        calls = {}
        usec = {}
        own = 1  # the INFO commandstats running is in INFO stats, not in its own snapshot
        for key, v in cmdstats.items():
            name = key.removeprefix("cmdstat_")
            if name in OWN or name.split("|")[0] in OWN:
                own += int(v["calls"])
                continue
            calls[name] = int(v["calls"])
            usec[name] = int(v["usec"])
        return {"seconds": dur, "cmdstats_calls": calls, "cmdstats_usec": usec,
                "total_commands_processed": int(stats["total_commands_processed"]) - own,
                "monitor": {f"{o} {n}": c for (o, n), c in sorted(tally.items())}}


BACKGROUND_ALWAYS = {("client", "ping"), ("client", "evalsha:sweep")}
HEARTBEAT = {("client", "evalsha:heartbeat")}  # the commands run inside it are background too
ONLINE_COUNTS = {("client", "scard"), ("client", "smembers"), ("client", "zmscore"), ("client", "pfcount")}


def split(window: dict[str, Any], background: set[tuple[str, str]]) -> dict[str, Any]:
    """Monitor tally of a window without the background: client-issued and in-script."""
    fg: Counter[str] = Counter()
    bg: Counter[str] = Counter()
    for key, calls in window["monitor"].items():
        origin, name = key.split(" ", 1)
        is_bg = ((origin, name) in background or origin == "script:sweep"
                 or (origin == "script:heartbeat" and ("client", "evalsha:heartbeat") in background))
        (bg if is_bg else fg)[key] += calls
    client = sum(c for k, c in fg.items() if k.startswith("client "))
    script = sum(c for k, c in fg.items() if k.startswith("script:"))
    usec_all = sum(window["cmdstats_usec"].values())
    monitor_total = sum(window["monitor"].values())
    return {"client": client, "script": script, "total": client + script, "breakdown": dict(fg),
            "background": dict(bg), "background_total": sum(bg.values()),
            "cmdstats_total": sum(window["cmdstats_calls"].values()), "monitor_total": monitor_total,
            "usec_all": usec_all}


# -- set-up helpers ----------------------------------------------------------------------------

async def add_members(r: Any, room: str, users: list[str]) -> None:
    """Exactly what ``join`` writes: the room's member set and each user's room set."""
    for i in range(0, len(users), 1000):
        chunk = users[i:i + 1000]
        pipe = r.pipeline(transaction=False)
        pipe.sadd(KEYS.room_members(room), *chunk)
        for user in chunk:
            pipe.sadd(KEYS.user_rooms(user), room)
        await pipe.execute()


async def make_room(r: Any, streams: RoomStreams, room: str) -> None:
    """A room as ``create_room`` makes it (metadata script + open directory entry)."""
    await streams.ensure_room(room, "open", room, "", int(time.time() * 1000))
    await r.hset(KEYS.room_directory(), room, room)


async def connect_all(urls: list[str], users: list[str], batch: int = 10) -> list[ChatClient]:
    clients: list[ChatClient] = []
    for i in range(0, len(users), batch):
        group = [ChatClient(urls[(i + j) % len(urls)], user=u, reconnect=False)
                 for j, u in enumerate(users[i:i + batch])]
        await asyncio.gather(*(c.start() for c in group))
        clients.extend(group)
    return clients


async def close_all(clients: list[ChatClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def receive(client: ChatClient, room: str, k: int, timeout: float) -> int:
    got = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while got < k:
        ev = await client.next_event("message", timeout=max(0.01, deadline - loop.time()))
        if ev.get("room") == room:
            got += 1
    return got


# -- the measurement -------------------------------------------------------------------------

async def measure(args: argparse.Namespace, redis_url: str, urls: list[str]) -> dict[str, Any]:
    r = aioredis.Redis.from_url(redis_url)
    streams = RoomStreams(r, KEYS, maxlen=10000, cmid_ttl_s=86400)
    mon = Monitor(redis_url, script_names())
    mon_task = asyncio.create_task(mon.run())
    await asyncio.sleep(0.3)
    meter = Meter(r, mon)
    out: dict[str, Any] = {"messages": {}, "heartbeats": {}}

    # ---- per sent message ------------------------------------------------------------------
    sender = ChatClient(urls[0], user="sender", reconnect=False)
    await sender.start()
    rooms = {}
    for label, size in (("10", 10), ("10000", args.big)):
        room = (await sender.request("create_room", name=f"cost {label}", visibility="open"))["room"]["id"]
        live = [f"m{label}-live{i}" for i in range(4)]
        synthetic = [f"m{label}-syn{i}" for i in range(size - 1 - len(live))]
        await add_members(r, room, live + synthetic)
        assert await r.scard(KEYS.room_members(room)) == size
        rooms[label] = (room, live)
    receivers: dict[str, list[ChatClient]] = {}
    for label, (_room, live) in rooms.items():
        receivers[label] = await connect_all(urls[1:] + urls[:1], live)
    await asyncio.sleep(2.0)
    for label, (room, _live) in rooms.items():
        log(f"room of {label}: idle window {args.window}s, then {args.messages} messages")
        t0 = await meter.start()
        await asyncio.sleep(args.window)
        idle = await meter.stop(t0)
        for c in [sender, *receivers[label]]:
            c.drain_events()
        t0 = await meter.start()
        waiters = [asyncio.create_task(receive(c, room, args.messages, 120))
                   for c in [sender, *receivers[label]]]
        for i in range(args.messages):
            await sender.send(room, f"message {i} to the room of {label}")
        await asyncio.gather(*waiters)
        win = await meter.stop(t0)
        bg = BACKGROUND_ALWAYS | HEARTBEAT | ONLINE_COUNTS
        out["messages"][label] = {"room": room, "members": int(await r.scard(KEYS.room_members(room))),
                                  "connected_members": 1 + len(receivers[label]), "k": args.messages,
                                  "window": win, "split": split(win, bg),
                                  "idle_window": idle, "idle_split": split(idle, BACKGROUND_ALWAYS)}
    await close_all([sender, *[c for cs in receivers.values() for c in cs]])
    await asyncio.sleep(2.0)

    # ---- per heartbeat, per transition ---------------------------------------------------------
    m = args.sessions
    big_room = rooms["10000"][0]
    sample: Any = await r.srandmember(KEYS.room_members(big_room), m + 10)
    big_members = [u.decode() for u in sample]
    big_users = [u for u in big_members if u.startswith("m10000-syn")][:m]
    small_users = [f"hb1-u{i}" for i in range(m)]
    for g in range(0, m, 10):  # rooms of 10 members: 10 heartbeating users each
        room = f"r-hbsmall{g // 10:03d}"
        await make_room(r, streams, room)
        await add_members(r, room, small_users[g:g + 10])
    many_users = [f"hb200-u{i}" for i in range(m)]
    for j in range(args.many_rooms):
        room = f"r-hbmany{j:03d}"
        await make_room(r, streams, room)
        await add_members(r, room, many_users)
    scenarios = [
        ("1 room of 10", small_users, 1, 10),
        (f"1 room of {args.big:,}", big_users, 1, args.big),
        (f"{args.many_rooms} rooms of {m}", many_users, args.many_rooms, m),
    ]
    for label, users, nrooms, size in scenarios:
        log(f"heartbeats: {m} sessions, each user in {label}")
        t0 = await meter.start()
        clients = await connect_all(urls, users)
        await asyncio.sleep(1.5)  # the spawned online announcements
        online = await meter.stop(t0)
        await asyncio.sleep(1.2)
        t0 = await meter.start()
        await asyncio.sleep(args.window)
        hb = await meter.stop(t0)
        t0 = await meter.start()
        await close_all(clients)
        await asyncio.sleep(1.5)  # the spawned offline announcements
        offline = await meter.stop(t0)
        await asyncio.sleep(1.0)
        out["heartbeats"][label] = {
            "sessions": m, "rooms_per_user": nrooms, "room_members": size,
            "rooms_with_events": nrooms if size <= args.presence_room_limit else 0,
            "idle_window": hb, "idle_split": split(hb, BACKGROUND_ALWAYS),
            "online_window": online, "online_split": split(online, BACKGROUND_ALWAYS | HEARTBEAT),
            "offline_window": offline, "offline_split": split(offline, BACKGROUND_ALWAYS | HEARTBEAT),
        }
    mon_task.cancel()
    await r.aclose()
    return out


# -- report ------------------------------------------------------------------------------------

def f2(x: float) -> str:
    return f"{x:.2f}"


def report(res: dict[str, Any], args: argparse.Namespace) -> str:
    lines: list[str] = []
    msgs = res["messages"]
    labels = list(msgs)
    k = {lb: msgs[lb]["k"] for lb in labels}
    keys = sorted({key for lb in labels for key in msgs[lb]["split"]["breakdown"]},
                  key=lambda s: (not s.startswith("client"), s))
    head = " | ".join(f"room of {msgs[lb]['members']:,}" for lb in labels)
    lines += [f"**Per sent message** ({args.messages} messages, acked one by one, {args.nodes} node(s), "
              "5 connected members per room; commands ÷ messages)", "",
              f"| command (who runs it) | {head} |", "|---|" + "---:|" * len(labels)]
    for key in keys:
        origin, name = key.split(" ", 1)
        who = "client" if origin == "client" else "inside " + origin.split(":", 1)[1] + ".lua"
        vals = " | ".join(f2(msgs[lb]["split"]["breakdown"].get(key, 0) / k[lb]) for lb in labels)
        lines.append(f"| `{name.upper() if origin == 'client' else name}` ({who}) | {vals} |")
    for title, field in (("**client-issued commands / message**", "client"),
                         ("**incl. commands run inside scripts**", "total")):
        vals = " | ".join(f"**{f2(msgs[lb]['split'][field] / k[lb])}**" for lb in labels)
        lines.append(f"| {title} | {vals} |")
    vals = " | ".join(f2(msgs[lb]["split"]["background_total"] / k[lb]) for lb in labels)
    lines.append(f"| background in the window (sweeper, PING, heartbeats, online counts) | {vals} |")
    vals = " | ".join(f2(msgs[lb]["window"]["total_commands_processed"] / k[lb]) for lb in labels)
    lines.append(f"| `total_commands_processed` / message (everything, incl. background) | {vals} |")
    vals = " | ".join(f"{msgs[lb]['split']['usec_all'] / k[lb]:.1f}" for lb in labels)
    lines.append(f"| Redis CPU µs / message (commandstats `usec`, everything) | {vals} |")
    lines.append("")

    hbs = res["heartbeats"]
    lines += [f"**Per heartbeat** ({args.sessions} sessions, CHAT_PRESENCE_TTL=3: a heartbeat per session "
              f"per second, {args.window:g} s idle window)", "",
              "| each user in | session-heartbeats | `EVALSHA` (client) / hb | `ZADD` / hb | `PEXPIRE` / hb | "
              "commands incl. in-script / hb | Redis µs / hb (`zadd`+`pexpire`) | "
              "other commands / s (background) | other Redis µs / s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, h in hbs.items():
        b = h["idle_split"]["breakdown"]
        n = b.get("script:heartbeat pexpire", 0) or 1
        e = b.get("client evalsha:heartbeat", 0)
        z, p = b.get("script:heartbeat zadd", 0), b.get("script:heartbeat pexpire", 0)
        us = h["idle_window"]["cmdstats_usec"]
        other = h["idle_split"]["total"] - e - z - p + h["idle_split"]["background_total"]
        lines.append(f"| {label} | {p} | {e / n:.3f} | {f2(z / n)} | {f2(p / n)} | **{f2((e + z + p) / n)}** | "
                     f"{(us.get('zadd', 0) + us.get('pexpire', 0)) / n:.1f} | "
                     f"{other / h['idle_window']['seconds']:.1f} | "
                     f"{(sum(us.values()) - us.get('zadd', 0) - us.get('pexpire', 0)) / h['idle_window']['seconds']:.0f} |")
    lines.append("")
    lines += ["**Per presence transition** (per user; a transition is the first session coming or the "
              f"last one going; rooms of ≤ CHAT_PRESENCE_ROOM_LIMIT={args.presence_room_limit} members "
              "get an event)", "",
              "| each user in | rooms with events | going offline: commands / user | of which | "
              "offline: Redis µs / user | coming online (whole hello): commands / user | of which "
              "presence (start script, PFADD, SCARD, eph XADD) | online: Redis µs / user |",
              "|---|---:|---:|---|---:|---:|---:|---:|"]
    for label, h in hbs.items():
        m = h["sessions"]
        off = h["offline_split"]
        on = h["online_split"]
        parts = ", ".join(f"{key.split(' ', 1)[1]} {f2(c / m)}" for key, c in sorted(off["breakdown"].items())
                          if c / m >= 0.05)
        pres = sum(c for key, c in on["breakdown"].items()
                   if key in ("client evalsha:start", "client pfadd", "client scard", "client xadd")
                   or key.startswith("script:start"))
        lines.append(f"| {label} | {h['rooms_with_events']} | **{f2(off['total'] / m)}** | {parts} | "
                     f"{off['usec_all'] / m:.0f} | {f2(on['total'] / m)} | {f2(pres / m)} | "
                     f"{on['usec_all'] / m:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--messages", type=int, default=200, help="K messages per room")
    ap.add_argument("--big", type=int, default=10000, help="members of the big room")
    ap.add_argument("--sessions", type=int, default=50, help="M heartbeating sessions")
    ap.add_argument("--many-rooms", type=int, default=200, help="rooms per user in the 'many' case")
    ap.add_argument("--window", type=float, default=10.0, help="idle window seconds")
    ap.add_argument("--node-src", default="git:HEAD", help="git:REF (default HEAD), '.', or a dir")
    ap.add_argument("--json", default=str(REPO / "loadtest" / "results" / "redis_cost.json"))
    args = ap.parse_args()
    args.presence_room_limit = 200

    redis_proc = embedded.start_redis()
    url = redis_proc.info["url"]
    env = {"CHAT_AUTH": "dev", "CHAT_HOST": "127.0.0.1", "CHAT_WS_PORT": "0", "CHAT_HTTP_PORT": "0",
           "CHAT_REDIS_URL": url, "CHAT_PRESENCE_TTL": "3", "CHAT_RATE_PER_S": "100000",
           "CHAT_RATE_BURST": "100000", "CHAT_LOG_LEVEL": "WARNING",
           "CHAT_PRESENCE_ROOM_LIMIT": str(args.presence_room_limit)}
    if "max_connections_per_ip" in node_config.FIELDS_BY_NAME:
        env["CHAT_MAX_CONNECTIONS_PER_IP"] = "0"
    procs = [redis_proc]
    try:
        for i in range(args.nodes):
            procs.append(embedded.start_node(env, name=f"node{i}"))
        urls = [f"ws://127.0.0.1:{p.info['ws_port']}/ws" for p in procs[1:]]
        log(f"redis {url}, nodes {urls}, node code {NODE_SOURCE['node_commit']}")
        res = asyncio.run(measure(args, url, urls))
    finally:
        for p in reversed(procs):
            p.stop()
    table = report(res, args)
    print(table)
    redis_version = subprocess.run([embedded.find_redis_server(), "--version"], capture_output=True,
                                   text=True).stdout.strip()
    doc = {"command": "python " + " ".join(["loadtest/redis_cost.py", *sys.argv[1:]]),
           "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
           "redis": redis_version, "args": vars(args), **NODE_SOURCE, "env": env | {"CHAT_REDIS_URL": "<own>"},
           "results": res, "markdown": table}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
