"""Webhooks (protocol 5.3) from real nodes to a real HTTP receiver in the test.

The receiver is an aiohttp server on a free port. It records every request (raw body, signature,
parsed payload) and answers by a policy the test sets; "hold" keeps requests open until the
test releases them. Nothing waits on time: every wait is for a condition of the receiver, a
client or Redis, with a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import signal
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from node.keys import Keys

SECRET = "test-webhook-secret"


class Receiver:
    """A webhook endpoint. ``policy(payload, attempt)`` -> HTTP status, or ``None`` to hold
    the request open until :meth:`release` (``attempt``: 1 for the first request of a delivery id)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []  # every request, in arrival order
        self.accepted: list[dict[str, Any]] = []  # payloads answered 2xx, in answer order
        self.policy: Callable[[dict[str, Any], int], int | None] = lambda payload, attempt: 200
        self.held = 0
        self.release_status = 200
        self._released = asyncio.Event()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"

    async def stop(self) -> None:
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()

    def release(self, status: int = 200) -> None:
        """Answer the held requests with ``status`` (and hold no more)."""
        self.release_status = status
        self._released.set()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        payload = json.loads(body)
        attempt = 1 + sum(1 for r in self.requests if r["payload"]["delivery"] == payload["delivery"])
        record = {"body": body, "signature": request.headers.get("X-Chat-Signature"), "payload": payload}
        self.requests.append(record)
        status = self.policy(payload, attempt)
        if status is None:
            self.held += 1
            await self._notify()
            await self._released.wait()
            status = self.release_status
        if 200 <= status < 300:
            self.accepted.append(payload)
        await self._notify()
        return web.Response(status=status)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)

        await asyncio.wait_for(wait(), timeout)

    def events(self, room: str | None = None) -> list[dict[str, Any]]:
        """Accepted events, deduplicated by delivery id (first kept), optionally of one room."""
        seen: set[str] = set()
        out = []
        for payload in self.accepted:
            if payload["delivery"] in seen:
                continue
            seen.add(payload["delivery"])
            if room is None or payload["event"]["room"] == room:
                out.append(payload["event"])
        return out


@pytest.fixture
async def receiver():
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


def hook_env(receiver: Receiver, **extra: Any) -> dict[str, Any]:
    return {"CHAT_WEBHOOK_URL": receiver.url, "CHAT_WEBHOOK_SECRET": SECRET,
            "CHAT_WEBHOOK_TIMEOUT": "1", "CHAT_WEBHOOK_LEASE": "3", **extra}


def signed(record: dict[str, Any]) -> bool:
    expected = "sha256=" + hmac.new(SECRET.encode(), record["body"], hashlib.sha256).hexdigest()
    return record["signature"] is not None and hmac.compare_digest(expected, record["signature"])


def texts(events: list[dict[str, Any]]) -> list[str]:
    return [e["text"] for e in events if e["type"] == "message"]


async def metric(nodes: list[Any], name: str, labels: str = "") -> float:
    """A metric summed over the nodes' /metrics (nodes that are gone are skipped)."""
    total = 0.0
    async with aiohttp.ClientSession() as http:
        for node in nodes:
            if not node.proc.alive():
                continue
            async with http.get(node.http_url + "/metrics") as response:
                for line in (await response.text()).splitlines():
                    if line.startswith(name + labels + " "):
                        total += float(line.rsplit(" ", 1)[1])
    return total


async def until_metric(nodes: list[Any], name: str, labels: str, predicate: Callable[[float], bool],
                       timeout: float = 20.0) -> float:
    """Scrape until ``predicate(value)``; the nodes count after answering, not before."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await metric(nodes, name, labels)
        if predicate(value):
            return value
        assert loop.time() < deadline, f"{name}{labels} stayed at {value}"
        await asyncio.sleep(0.05)


async def settled(nodes: list[Any], shards: int = 16) -> None:
    """Every node holds its fair share of the webhook leases (no hand-over during the test)."""
    for node in nodes:
        await until_metric([node], "chatcluster_webhook_shards", "", lambda v: v == shards // len(nodes))


async def test_messages_and_membership_changes_are_delivered_signed_in_order_once(
        start_nodes, clients, receiver):
    a, b = start_nodes(2, **hook_env(receiver))
    await settled([a, b])
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(b.ws_url, user="bob")
    room = (await alice.request("create_room", name="Ops", visibility="open", members=["carl"]))["room"]["id"]
    await bob.request("join", room=room)
    for i in range(5):
        await alice.send(room, f"a{i}")
        await bob.send(room, f"b{i}")
    await alice.request("kick", room=room, user="carl")
    await bob.request("leave", room=room)
    await bob.send("general", "hello general")
    dm = (await alice.request("dm", user="bob"))["room"]["id"]
    await alice.send(dm, "psst")

    def done() -> bool:
        return (any(e["type"] == "member" and e["change"] == "left" for e in receiver.events(room))
                and "psst" in texts(receiver.events(dm)) and "hello general" in texts(receiver.events("general")))

    await receiver.wait_for(done)
    assert all(signed(r) for r in receiver.requests)
    # Healthy endpoint: each event once, every delivery id distinct.
    deliveries = [r["payload"]["delivery"] for r in receiver.requests]
    assert len(deliveries) == len(set(deliveries))
    events = receiver.events(room)
    summary = [(e["type"], e.get("change") or e.get("text"), e["user"] if e["type"] == "member" else e["from"]["id"])
               for e in events]
    assert summary == ([("member", "joined", "alice"), ("member", "invited", "carl"), ("member", "joined", "bob")]
                       + [("message", f"{who}{i}", name) for i in range(5) for who, name in (("a", "alice"), ("b", "bob"))]
                       + [("member", "kicked", "carl"), ("member", "left", "bob")])
    assert events[1]["by"] == "alice" and "by" not in events[0]
    assert events[-2]["by"] == "alice" and "by" not in events[-1]
    message = events[3]
    assert set(message) >= {"type", "room", "id", "seq", "ts", "from", "text"} and message["seq"] == 1
    # Stream order is delivery order: ids ascend.
    ids = [e["id"] for e in events if e["type"] == "message"]
    assert ids == sorted(ids, key=lambda s: tuple(map(int, s.split("-"))))
    dm_events = receiver.events(dm)
    assert [(e["type"], e.get("change"), e.get("user")) for e in dm_events[:2]] == [
        ("member", "joined", "alice"), ("member", "invited", "bob")]
    await until_metric([a, b], "chatcluster_webhook_deliveries_total", '{result="delivered"}',
                       lambda v: v == len(receiver.requests))
    assert await metric([a, b], "chatcluster_webhook_deliveries_total", '{result="retried"}') == 0


async def test_a_failed_attempt_is_retried_with_the_same_delivery_id(start_nodes, clients, receiver):
    # Each delivery fails twice (500), then is accepted.
    receiver.policy = lambda payload, attempt: 500 if attempt <= 2 else 204
    (a,) = start_nodes(1, **hook_env(receiver))
    alice = await clients(a.ws_url, user="alice")
    for i in range(3):
        await alice.send("general", f"m{i}")
    await receiver.wait_for(lambda: texts(receiver.events("general")) == ["m0", "m1", "m2"])
    attempts = [r["payload"]["delivery"] for r in receiver.requests]
    # Three attempts per event, one event after the other (the next waits for the first).
    assert attempts == [d for d in dict.fromkeys(attempts) for _ in range(3)]
    assert all(signed(r) for r in receiver.requests)
    bodies = {r["payload"]["delivery"]: r["body"] for r in receiver.requests}
    assert all(r["body"] == bodies[r["payload"]["delivery"]] for r in receiver.requests)
    assert await metric([a], "chatcluster_webhook_deliveries_total", '{result="retried"}') == 6
    await until_metric([a], "chatcluster_webhook_deliveries_total", '{result="delivered"}', lambda v: v == 3)


async def test_an_event_older_than_the_max_age_is_dropped_and_counted(start_nodes, clients, receiver):
    receiver.policy = lambda payload, attempt: 500 if payload["event"].get("text") == "doomed" else 200
    (a,) = start_nodes(1, **hook_env(receiver, CHAT_WEBHOOK_MAX_AGE="1s"))
    alice = await clients(a.ws_url, user="alice")
    await alice.send("general", "doomed")
    await until_metric([a], "chatcluster_webhook_deliveries_total", '{result="dropped"}', lambda v: v == 1)
    # Retried until it was too old (more than once), then given up: the next event goes.
    assert sum(r["payload"]["event"].get("text") == "doomed" for r in receiver.requests) >= 2
    await alice.send("general", "after")
    await receiver.wait_for(lambda: "after" in texts(receiver.events("general")))
    assert texts(receiver.events("general")) == ["after"]
    assert await metric([a], "chatcluster_webhook_deliveries_total", '{result="dropped"}') == 1
    await until_metric([a], "chatcluster_webhook_lag_seconds", "", lambda v: v == 0)


async def test_a_blocked_endpoint_does_not_hold_up_chat_delivery(start_nodes, clients, receiver):
    receiver.policy = lambda payload, attempt: None  # hold every request open
    a, b = start_nodes(2, **hook_env(receiver, CHAT_WEBHOOK_TIMEOUT="30", CHAT_WEBHOOK_LEASE="90"))
    await settled([a, b])
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(b.ws_url, user="bob")
    await alice.send("general", "first")
    await receiver.wait_for(lambda: receiver.held == 1)
    for i in range(20):
        await alice.send("general", f"m{i}")
    got = []
    while len(got) < 21:
        event = await bob.next_event("message")
        got.append(event["text"])
    assert got == ["first"] + [f"m{i}" for i in range(20)]
    # Every message reached Bob while the endpoint still held the first request: nothing else
    # of the shard was sent, nothing accepted.
    assert receiver.held == 1 and len(receiver.requests) == 1 and receiver.accepted == []
    assert await metric([a, b], "chatcluster_webhook_lag_seconds") > 0
    receiver.release()
    receiver.policy = lambda payload, attempt: 200
    await receiver.wait_for(lambda: len(texts(receiver.events("general"))) == 21)
    assert texts(receiver.events("general")) == got


async def test_a_node_killed_mid_delivery_loses_nothing(start_nodes, clients, receiver, redis_client):
    receiver.policy = lambda payload, attempt: None
    a, b = start_nodes(2, **hook_env(receiver, CHAT_WEBHOOK_TIMEOUT="2", CHAT_WEBHOOK_LEASE="5"))
    await settled([a, b])
    alice_a = await clients(a.ws_url, user="alice")
    alice_b = await clients(b.ws_url, user="alice")
    for i in range(5):
        await alice_a.send("general", f"m{i}")
    await receiver.wait_for(lambda: receiver.held >= 1)
    held = receiver.requests[0]["payload"]
    assert held["event"]["text"] == "m0"
    keys = Keys(16)
    lease = await redis_client.get(keys.webhook_lease(keys.room_shard("general")))
    holder_id = lease.decode().split("/")[0]
    holder, survivor, client = (a, b, alice_b) if holder_id == a.node_id else (b, a, alice_a)
    assert holder.node_id == holder_id
    holder.proc.signal(signal.SIGKILL)
    holder.proc.popen.wait(10)
    receiver.policy = lambda payload, attempt: 200
    receiver.release(503)  # the dead node never got an answer: none of its requests counts
    await client.send("general", "after the kill")
    await receiver.wait_for(lambda: "after the kill" in texts(receiver.events("general")), timeout=60)
    assert texts(receiver.events("general")) == [f"m{i}" for i in range(5)] + ["after the kill"]
    # The survivor sent m0 again, with the same delivery id.
    again = [r for r in receiver.requests[1:] if r["payload"]["delivery"] == held["delivery"]]
    assert again and again[-1]["body"] == receiver.requests[0]["body"]
    lease = await redis_client.get(keys.webhook_lease(keys.room_shard("general")))
    assert lease.decode().split("/")[0] == survivor.node_id


async def test_a_message_removed_before_its_delivery_is_never_sent(start_nodes, clients, receiver, redis_client):
    # The outbox references stream entries: once a delete removed a message's entry (XDEL, as
    # the delete command does), its text is nowhere in Redis and is not sent.
    receiver.policy = lambda payload, attempt: None
    (a,) = start_nodes(1, **hook_env(receiver, CHAT_WEBHOOK_TIMEOUT="20", CHAT_WEBHOOK_LEASE="60"))
    alice = await clients(a.ws_url, user="alice")
    await alice.send("general", "m0")
    await receiver.wait_for(lambda: receiver.held == 1)
    secret = await alice.send("general", "secret")
    await alice.send("general", "m2")
    keys = Keys(16)
    assert await redis_client.xdel(keys.room_stream("general"), secret["id"]) == 1
    receiver.policy = lambda payload, attempt: 200
    receiver.release()
    await receiver.wait_for(lambda: "m2" in texts(receiver.events("general")))
    assert texts(receiver.events("general")) == ["m0", "m2"]
    assert all(b"secret" not in r["body"] for r in receiver.requests)
    assert await metric([a], "chatcluster_webhook_deliveries_total", '{result="gone"}') == 1


async def test_the_outbox_is_capped_while_the_endpoint_is_down(start_nodes, clients, receiver, redis_client):
    receiver.policy = lambda payload, attempt: None
    (a,) = start_nodes(1, **hook_env(receiver, CHAT_WEBHOOK_TIMEOUT="20", CHAT_WEBHOOK_LEASE="60",
                                     CHAT_WEBHOOK_OUTBOX_MAXLEN="10"))
    alice = await clients(a.ws_url, user="alice")
    await alice.send("general", "m0")
    await receiver.wait_for(lambda: receiver.held == 1)
    for i in range(1, 400):
        await alice.send("general", f"m{i}")
    keys = Keys(16)
    outbox = keys.webhook_outbox(keys.room_shard("general"))
    # Approximate trimming (whole stream nodes of 100 entries): bounded, far below 400.
    assert await redis_client.xlen(outbox) <= 10 + 100
    receiver.policy = lambda payload, attempt: 200
    receiver.release()
    await receiver.wait_for(lambda: "m399" in texts(receiver.events("general")))
    got = texts(receiver.events("general"))
    assert got[0] == "m0" and len(got) < 200
    # What is left is in order; the loss is counted and the delivered entries are trimmed.
    assert got[1:] == [f"m{i}" for i in range(400 - len(got) + 1, 400)]
    assert await metric([a], "chatcluster_webhook_outbox_overflows_total") == 1
    await until_metric([a], "chatcluster_webhook_lag_seconds", "", lambda v: v == 0)
    assert await redis_client.xlen(outbox) <= 100


async def test_a_node_that_stops_hands_its_shards_over_at_once(start_nodes, clients, receiver):
    # A lease of a minute: only the stopping node giving its leases back explains a quick takeover.
    a, b = start_nodes(2, **hook_env(receiver, CHAT_WEBHOOK_TIMEOUT="20", CHAT_WEBHOOK_LEASE="60"))
    await settled([a, b])
    a.proc.stop(timeout=10)
    await until_metric([b], "chatcluster_webhook_shards", "", lambda v: v == 16, timeout=20)
    bob = await clients(b.ws_url, user="bob")
    await bob.send("general", "still delivered")
    await receiver.wait_for(lambda: "still delivered" in texts(receiver.events("general")))
