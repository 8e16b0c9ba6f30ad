"""The HTTP polling fallback against real nodes: stateless across nodes, long-poll, decay, presence."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from .wire import metric, op_count


class Poller:
    """A minimal polling client speaking PROTOCOL.md section 3, alternating between nodes."""

    def __init__(self, http: aiohttp.ClientSession, urls: list[str], user: str) -> None:
        self.http = http
        self.urls = urls
        self.user = user
        self.turn = 0
        self.cursors: dict[str, Any] = {}
        self.personal: dict[str, Any] | None = None
        self.session = ""
        self.interval = 0
        self.requests = 0

    def url(self, path: str) -> str:
        self.turn += 1
        return self.urls[self.turn % len(self.urls)] + path

    async def call(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.requests += 1
        async with self.http.post(self.url(path), json=body,
                                  headers={"Authorization": f"Bearer dev:{self.user}"}) as response:
            return response.status, await response.json()

    async def start(self) -> dict[str, Any]:
        status, welcome = await self.call("/api/v1/session", {"name": self.user.title()})
        assert status == 200, welcome
        self.cursors = welcome["cursors"]
        self.personal = {"epoch": welcome["personal"]["epoch"], "id": welcome["personal"]["last_id"]}
        self.session = welcome["session"]
        return welcome

    async def poll(self, wait_ms: int = 0, focused: bool = True) -> list[dict[str, Any]]:
        status, body = await self.call("/api/v1/poll", {
            "cursors": self.cursors, "personal": self.personal, "wait_ms": wait_ms,
            "interval_ms": self.interval, "focused": focused, "session": self.session})
        assert status == 200, body
        self.cursors, self.personal, self.interval = body["cursors"], body["personal"], body["next_poll_ms"]
        return body["events"]


async def test_polls_across_nodes_lose_nothing_and_repeat_nothing(start_nodes, clients):
    a, b = start_nodes(2)
    sender = await clients(a.ws_url, user="sender")
    async with aiohttp.ClientSession() as http:
        poller = Poller(http, [a.http_url, b.http_url], "pat")
        welcome = await poller.start()
        assert welcome["type"] == "welcome" and welcome["user"]["id"] == "pat"
        got: list[str] = []
        for batch in range(5):
            for i in range(7):
                await sender.send("general", f"p{batch}-{i}")
            # A poll answers from the node's read position: entries appended a moment ago may
            # come with the next poll (a long poll waits for them), never twice, never lost.
            while len(got) < 7 * (batch + 1):
                events = await poller.poll(wait_ms=5000)
                assert events, "a long poll came back empty while messages were due"
                got += [e["text"] for e in events if e["type"] == "message"]
        assert got == [f"p{b}-{i}" for b in range(5) for i in range(7)]
        assert await poller.poll() == []


async def test_long_poll_wakes_on_a_message_and_on_an_alert(start_nodes, clients):
    a, b = start_nodes(2)
    sender = await clients(b.ws_url, user="sender")
    async with aiohttp.ClientSession() as http:
        poller = Poller(http, [a.http_url], "lou")
        await poller.start()
        waiting = asyncio.create_task(poller.poll(wait_ms=20000))
        await asyncio.sleep(0)  # let the poll go out; the wake-up below is what the test awaits
        await sender.send("general", "wake up")
        events = await asyncio.wait_for(waiting, 10)
        assert [e["text"] for e in events] == ["wake up"]
        waiting = asyncio.create_task(poller.poll(wait_ms=20000))
        async with http.post(f"{b.http_url}/api/v1/alerts",
                             json={"to": ["lou"], "kind": "call", "title": "Incoming call"},
                             headers={"Authorization": "Bearer test-api-key"}) as response:
            assert response.status == 200
        events = await asyncio.wait_for(waiting, 10)
        assert [(e["type"], e["title"]) for e in events] == [("alert", "Incoming call")]
        assert "pid" in events[0] and poller.personal["id"] == events[0]["pid"]


async def test_interval_decays_while_idle_and_snaps_back(start_nodes, clients):
    (a,) = start_nodes(1, CHAT_POLL_MIN_MS=100, CHAT_POLL_MAX_MS=1000, CHAT_POLL_DECAY=2,
                       CHAT_POLL_UNFOCUSED_MS=800)
    sender = await clients(a.ws_url, user="sender")
    async with aiohttp.ClientSession() as http:
        poller = Poller(http, [a.http_url], "ida")
        await poller.start()
        poller.interval = 100
        seen = []
        for _ in range(5):
            assert await poller.poll() == []
            seen.append(poller.interval)
        assert seen == [200, 400, 800, 1000, 1000]
        await sender.send("general", "activity")
        assert len(await poller.poll()) == 1
        assert poller.interval == 100
        await poller.poll(focused=False)
        assert poller.interval == 800


async def test_polling_user_is_online_and_commands_share_the_dispatcher(start_nodes, clients):
    a, b = start_nodes(2)
    watcher = await clients(a.ws_url, user="watcher")
    async with aiohttp.ClientSession() as http:
        poller = Poller(http, [b.http_url], "polly")
        await poller.start()
        where = await watcher.request("where", user="polly")
        assert where["online"] is True
        status, reply = await poller.call("/api/v1/command", {"type": "send", "ref": "r1", "room": "general", "text": "via http"})
        assert status == 200 and reply["ok"] and reply["ref"] == "r1"
        event = await watcher.next_event("message")
        assert event["text"] == "via http" and event["from"]["id"] == "polly"
        status, reply = await poller.call("/api/v1/command", {"type": "history", "ref": 2, "room": "dm:a:b"})
        assert status == 404 and reply == {"type": "reply", "ok": False, "ref": 2,
                                           "error": {"code": "not_found", "message": "no such room"}}
        status, reply = await poller.call("/api/v1/command", {"type": "send", "room": "general"})
        assert status == 400 and reply["error"]["code"] == "bad_request"
        async with http.post(f"{a.http_url}/api/v1/poll", json={}, headers={}) as response:
            assert response.status == 401


async def idle_requests(node_url: str, scale: float, minutes: float) -> int:
    """Requests a focused idle polling client makes over ``minutes`` (intervals scaled by ``scale``)."""
    async with aiohttp.ClientSession() as http:
        poller = Poller(http, [node_url], "idle")
        await poller.start()
        loop = asyncio.get_running_loop()
        end = loop.time() + minutes * 60 * scale
        poller.interval = 0
        while True:
            await poller.poll()
            if loop.time() + poller.interval / 1000 > end:
                return poller.requests - 1  # the session request is not a poll
            await asyncio.sleep(poller.interval / 1000)  # the client honouring next_poll_ms


async def test_idle_client_makes_at_most_30_requests_in_10_minutes(start_nodes):
    # Every interval scaled down by 100 (defaults 1000/30000/15000 ms -> 10/300/150 ms):
    # ten minutes become six seconds; the number of requests is what the defaults give.
    scale = 0.01
    (a,) = start_nodes(1, CHAT_POLL_MIN_MS=10, CHAT_POLL_MAX_MS=300, CHAT_POLL_UNFOCUSED_MS=150)
    count = await idle_requests(a.http_url, scale, 10)
    assert count <= 30, count
    assert count >= 20, count  # and it does keep polling


async def test_epoch_change_is_reported_to_a_poller(start_nodes, clients, redis_server):
    (a,) = start_nodes(1)
    sender = await clients(a.ws_url, user="sender")
    async with aiohttp.ClientSession() as http:
        poller = Poller(http, [a.http_url], "eve")
        await poller.start()
        poller.cursors["general"]["epoch"] = "stale-epoch"
        events = await poller.poll()
        assert events[0]["type"] == "room" and events[0]["recovered"] is False
        assert poller.cursors["general"]["epoch"] != "stale-epoch"
        await sender.send("general", "after")
        assert [e["text"] for e in await poller.poll()] == ["after"]



async def test_a_large_gap_is_paged_over_polls_not_dropped(start_nodes, clients):
    (a,) = start_nodes(1, CHAT_REPLAY_LIMIT=50)
    sender = await clients(a.ws_url, user="sender")
    async with aiohttp.ClientSession() as http:
        poller = Poller(http, [a.http_url], "pam")
        await poller.start()
        sent = [(await sender.send("general", f"g{i}"))["id"] for i in range(120)]
        pages = [await poller.poll() for _ in range(4)]
        assert [len(p) for p in pages] == [50, 50, 20, 0]
        assert [e["id"] for page in pages for e in page] == sent
        assert all(e["type"] == "message" for page in pages for e in page)


async def test_typing_and_presence_do_not_wake_a_long_poll(start_nodes, clients):
    """Ephemeral events are not part of polling: a waiting long poll sleeps through them and
    returns with the next message (it used to return empty, making every waiter poll again)."""
    (a,) = start_nodes(1)
    typist = await clients(a.ws_url, user="typist")
    witness = await clients(a.ws_url, user="witness")
    async with aiohttp.ClientSession() as http:
        poller = Poller(http, [a.http_url], "sleepy")
        await poller.start()
        waiting = asyncio.create_task(poller.poll(wait_ms=20000))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while True:  # until the node holds the poll
            async with http.get(a.http_url + "/metrics") as response:
                if "chatcluster_polls_waiting 1.0" in await response.text():
                    break
            assert loop.time() < deadline
            await asyncio.sleep(0.05)
        await typist.request("typing", room="general")
        while True:  # the node has dispatched the typing event (the witness got it)
            event = await witness.next_event(timeout=10)
            if event["type"] == "typing":
                break
        await clients(a.ws_url, user="newcomer")  # a presence transition in general, too
        await typist.send("general", "now wake up")
        events = await asyncio.wait_for(waiting, 10)
        assert [e.get("text") for e in events] == ["now wake up"], events


async def redis_reads(http_url: str) -> dict[str, float]:
    """Redis calls a poll makes to collect (the room metadata is left out: a shard reader that
    starts reads it once, asynchronously, for its rooms)."""
    return {op: await op_count(http_url, op) for op in ("user_rooms", "personal", "replay")}


async def test_an_idle_poll_reads_nothing_from_redis_and_still_sees_every_change(start_nodes, clients):
    a, b = start_nodes(2)
    owner = await clients(b.ws_url, user="owner")
    room = (await owner.request("create_room", name="side", visibility="closed"))["room"]["id"]
    await owner.request("create_room", name="shared", visibility="closed", members=["idle"])
    async with aiohttp.ClientSession() as http:
        poller = Poller(http, [a.http_url], "idle")
        await poller.start()
        # The debounced "online" announcement reads the user's rooms once: let it happen first.
        while (await owner.next_event("presence")).get("user", {}).get("id") != "idle":
            pass
        assert await poller.poll() == []  # collected from Redis: the node keeps what it learnt
        hits = await metric(a.http_url, 'chatcluster_poll_cache_total{result="hit"}')
        reads = await redis_reads(a.http_url)
        beats = await metric(a.http_url, "chatcluster_presence_heartbeats_total")
        for _ in range(4):
            assert await poller.poll() == []
        assert await metric(a.http_url, 'chatcluster_poll_cache_total{result="hit"}') == hits + 4
        assert await redis_reads(a.http_url) == reads
        # Nor a presence heartbeat: the first poll's keeps the user online well past the next.
        assert await metric(a.http_url, "chatcluster_presence_heartbeats_total") == beats
        assert (await owner.request("where", user="idle"))["online"] is True

        # A message: the node's position is past the cursor; the poll reads only that room's
        # new entries (one replay read), not the user's rooms or personal stream again.
        await owner.send("general", "news")
        waiting = await poller.poll(wait_ms=10000)
        assert [e.get("text") for e in waiting] == ["news"]
        after = await redis_reads(a.http_url)
        assert (after["user_rooms"], after["personal"]) == (reads["user_rooms"], reads["personal"])
        assert after["replay"] == reads["replay"] + 1
        # A membership change made on the other node reaches the idle poller (personal event),
        # and the new room's messages follow.
        await owner.request("invite", room=room, user="idle")
        events = await poller.poll(wait_ms=10000)
        assert [(e["type"], e.get("change")) for e in events] == [("room", "added")]
        assert room in poller.cursors
        behind = dict(poller.cursors)
        await owner.send(room, "in the side room")
        events = await poller.poll(wait_ms=10000)
        assert [e.get("text") for e in events] == ["in the side room"]
        # Idle again, now in two rooms: answered from the node's positions.
        hits = await metric(a.http_url, 'chatcluster_poll_cache_total{result="hit"}')
        assert await poller.poll() == []
        assert await metric(a.http_url, 'chatcluster_poll_cache_total{result="hit"}') == hits + 1
        # A cursor behind the node's position (a client back from another node) is never
        # answered from the cache.
        poller.cursors = behind
        events = await poller.poll()
        assert [e.get("text") for e in events] == ["in the side room"]
