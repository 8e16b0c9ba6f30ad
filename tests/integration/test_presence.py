"""Presence, typing, unread counts and personal events across two nodes."""

from __future__ import annotations

import asyncio
import signal

import aiohttp

from .wire import op_count, until


def presence_of(user: str, status: str):
    return lambda e: e["type"] == "presence" and e.get("user", {}).get("id") == user and e.get("status") == status


async def test_second_tab_does_not_flap_presence(start_nodes, clients):
    a, b = start_nodes(2)
    watcher = await clients(a.ws_url, user="watcher")
    tab1 = await clients(b.ws_url, user="carol")
    event = await until(watcher, presence_of("carol", "online"))
    assert event["room"] == "general"
    tab2 = await clients(a.ws_url, user="carol")
    await tab1.close()
    # Carol is still online through tab2: no offline event; the next presence event the
    # watcher sees must be the one after tab2 closes too.
    await tab2.close()
    event = await until(watcher, lambda e: e["type"] == "presence" and e["user"]["id"] == "carol")
    assert event["status"] == "offline"
    where = await watcher.request("where", user="carol")
    assert where["online"] is False and isinstance(where["last_seen"], int)


async def test_killed_node_users_go_offline_within_the_ttl(start_nodes, clients):
    a, b = start_nodes(2, CHAT_PRESENCE_TTL=3)
    watcher = await clients(a.ws_url, user="watcher")
    await clients(b.ws_url, user="dave", reconnect=False)
    await until(watcher, presence_of("dave", "online"))
    assert (await watcher.request("where", user="dave"))["online"] is True
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    b.proc.signal(signal.SIGKILL)
    await until(watcher, presence_of("dave", "offline"), timeout=15)
    # TTL (3 s) plus one sweep interval at most.
    assert loop.time() - killed_at < 3 + 2.5
    who = await watcher.request("who", room="general")
    online = [u["id"] for u in who["online"]]
    assert "dave" not in online and "watcher" in online


async def test_typing_crosses_nodes_is_throttled_and_not_echoed(start_nodes, clients):
    a, b = start_nodes(2, CHAT_TYPING_INTERVAL_MS=60000)
    alice_a = await clients(a.ws_url, user="alice")
    alice_b = await clients(b.ws_url, user="alice")
    bob = await clients(b.ws_url, user="bob")
    first = await alice_a.request("typing", room="general")
    second = await alice_a.request("typing", room="general")
    assert first == {"sent": True} and second == {"sent": False}
    event = await until(bob, lambda e: e["type"] == "typing")
    assert event == {"type": "typing", "room": "general", "user": {"id": "alice", "name": "alice"}}
    # Throttled across nodes too: Alice's other session on node b cannot publish again.
    assert await alice_b.request("typing", room="general") == {"sent": False}
    # Never echoed to Alice's own sessions, never stored in history.
    await bob.send("general", "marker")
    for session in (alice_a, alice_b):
        event = await until(session, lambda e: e["type"] in ("typing", "message"))
        assert event["type"] == "message" and event["text"] == "marker"
    assert [m["text"] for m in (await bob.history("general"))["messages"]] == ["marker"]
    # A late joiner gets no replayed typing.
    late = await clients(a.ws_url, user="late")
    await alice_a.send("general", "second marker")
    event = await until(late, lambda e: e["type"] in ("typing", "message"))
    assert event["type"] == "message"


async def test_unread_counts_follow_read_markers_across_sessions(start_nodes, clients):
    a, b = start_nodes(2)
    alice = await clients(a.ws_url, user="alice")
    bob_a = await clients(a.ws_url, user="bob")
    bob_b = await clients(b.ws_url, user="bob")
    ids = [(await alice.send("general", f"u{i}"))["id"] for i in range(5)]
    read = await bob_a.request("read", room="general", id=ids[1])
    assert read == {"unread": 3, "read_id": ids[1], "mentions": 0}
    event = await until(bob_b, lambda e: e["type"] == "unread")
    assert event["room"] == "general" and event["unread"] == 3 and event["read_id"] == ids[1]
    # Markers only move forward.
    back = await bob_b.request("read", room="general", id=ids[0])
    assert back == {"unread": 3, "read_id": ids[1], "mentions": 0}
    fresh = await clients(b.ws_url, user="bob")
    general = [r for r in fresh.welcome["rooms"] if r["id"] == "general"][0]
    assert general["unread"] == 3 and general["seq"] == 5
    await bob_a.request("read", room="general", id=ids[4])
    again = await clients(a.ws_url, user="bob")
    assert [r for r in again.welcome["rooms"] if r["id"] == "general"][0]["unread"] == 0


async def post(url: str, body: dict, key: str = "test-api-key") -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.post(
        url, json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        return response.status, await response.json()


async def test_alert_to_offline_user_arrives_exactly_once_at_next_login(start_nodes, clients):
    a, b = start_nodes(2)
    online = await clients(a.ws_url, user="olive")
    status, body = await post(f"{b.http_url}/api/v1/alerts",
                              {"to": ["olive", "frank"], "kind": "email", "title": "New mail",
                               "body": "from the boss", "data": {"folder": "inbox"}})
    assert status == 200 and body["online"] == ["olive"] and body["queued"] == ["frank"]
    live = await until(online, lambda e: e["type"] == "alert")
    assert (live["kind"], live["title"], live["data"]) == ("email", "New mail", {"folder": "inbox"})
    frank = await clients(b.ws_url, user="frank")
    replayed = await until(frank, lambda e: e["type"] == "alert")
    assert replayed["id"] == body["id"] and replayed["body"] == "from the boss"
    await frank.close()
    # Next login, no cursor given: nothing replayed twice.
    frank2 = await clients(a.ws_url, user="frank")
    await post(f"{a.http_url}/api/v1/alerts", {"to": ["frank"], "kind": "call", "title": "Call from Ann"})
    event = await until(frank2, lambda e: e["type"] == "alert")
    assert event["kind"] == "call"


async def test_server_endpoints_check_the_key_and_inputs(start_nodes, clients):
    (a,) = start_nodes(1)
    alice = await clients(a.ws_url, user="alice")
    status, body = await post(f"{a.http_url}/api/v1/alerts", {"to": ["alice"], "title": "x"}, key="wrong")
    assert status == 401 and body["error"]["code"] == "unauthorized"
    status, body = await post(f"{a.http_url}/api/v1/alerts", {"to": [], "title": "x"})
    assert status == 400 and body["error"]["code"] == "bad_request"
    status, body = await post(f"{a.http_url}/api/v1/rooms/general/messages", {"text": "Deploy at 5", "as": "Ops bot"})
    assert status == 200 and body["seq"] >= 1
    event = await until(alice, lambda e: e["type"] == "message")
    assert event["kind"] == "system" and event["from"]["name"] == "Ops bot" and event["text"] == "Deploy at 5"
    status, body = await post(f"{a.http_url}/api/v1/rooms/r-nosuchroom0/messages", {"text": "x"})
    assert status == 404
    status, body = await post(f"{a.http_url}/api/v1/tokens", {"user": "zoe", "name": "Zoe", "ttl_s": 600})
    assert status == 200 and body["token"].count(".") == 2
    zoe = await clients(a.ws_url, token=body["token"])
    assert zoe.welcome["user"] == {"id": "zoe", "name": "Zoe"}


async def test_heartbeat_refreshes_every_session_in_few_scripts(redis_client):
    """One script per user shard and batch: every session's expiry and the online index move
    forward (never backward: ZADD GT), and the number of round trips is that of the batches."""
    from node.keys import Keys
    from node.presence import HEARTBEAT_BATCH, Presence
    from node.protocol import now_ms

    keys = Keys(16)
    presence = Presence(redis_client, keys, ttl_s=30)
    sessions = [(f"hb-user{i}", f"sess-{i}") for i in range(1000)]
    for user, session in sessions:
        await presence.start(user, user, session)
    far = now_ms() + 3_600_000
    await redis_client.zadd(keys.online_index(keys.user_shard("hb-user0")), {"hb-user0": far})
    # Sessions that ended after the node took its snapshot: the heartbeat must not revive them.
    ended = sessions[1::97]
    for user, session in ended:
        await presence.end(user, session)
    before = now_ms()
    missing = await presence.heartbeat(sessions, ttl_ms=600_000)
    assert sorted(missing) == sorted(ended)
    per_shard: dict[int, int] = {}
    for user, _ in sessions:
        per_shard[keys.user_shard(user)] = per_shard.get(keys.user_shard(user), 0) + 1
    calls = presence.heartbeat_scripts
    assert calls == sum(-(-n // HEARTBEAT_BATCH) for n in per_shard.values())
    assert calls < len(sessions) // 10
    for user, session in ended:
        assert await redis_client.zscore(keys.user_sessions(user), session) is None, user
        assert await redis_client.zscore(keys.online_index(keys.user_shard(user)), user) is None, user
    sessions = [pair for pair in sessions if pair not in ended]
    for user, session in sessions:
        expiry = await redis_client.zscore(keys.user_sessions(user), session)
        assert expiry >= before + 600_000, user
        assert 0 < await redis_client.pttl(keys.user_sessions(user))
        indexed = await redis_client.zscore(keys.online_index(keys.user_shard(user)), user)
        assert indexed == (far if user == "hb-user0" else expiry), user


async def test_heartbeat_scripts_are_in_flight_together(redis_client):
    """A heartbeat pass over many sessions keeps several scripts in flight (a pass must end
    well within the TTL even when each round trip is slow): the test holds every script at a
    gate until HEARTBEAT_CONCURRENCY of them are waiting at once, then lets them all through."""
    from node.keys import Keys
    from node.presence import HEARTBEAT_BATCH, HEARTBEAT_CONCURRENCY, Presence

    keys = Keys(16)
    presence = Presence(redis_client, keys, ttl_s=30)
    sessions = [(f"hc-user{i}", f"sess-{i}") for i in range(4 * 16 * HEARTBEAT_BATCH)]
    script = presence._heartbeat
    await presence.heartbeat(sessions[:1])  # the script is loaded: no NOSCRIPT stampede below
    waiting = 0
    most = 0
    gate = asyncio.Event()

    async def held(**kwargs):
        nonlocal waiting, most
        waiting += 1
        most = max(most, waiting)
        if waiting >= HEARTBEAT_CONCURRENCY:
            gate.set()
        await gate.wait()
        waiting -= 1
        return await script(**kwargs)

    presence._heartbeat = held
    await asyncio.wait_for(presence.heartbeat(sessions), 30)
    assert most == HEARTBEAT_CONCURRENCY


async def test_heartbeat_restarts_a_live_session_that_redis_lost(start_nodes, clients, redis_client):
    """A session still open on its node but gone from Redis (the node stalled past the TTL and a
    sweeper took the user offline, or Redis lost the key) is started again by the next heartbeat."""
    from node.keys import Keys

    (a,) = start_nodes(1, CHAT_PRESENCE_TTL=3)
    keys = Keys(16)
    zed = await clients(a.ws_url, user="zed")
    watcher = await clients(a.ws_url, user="watcher2")
    assert (await watcher.request("where", user="zed"))["online"] is True
    await redis_client.delete(keys.user_sessions("zed"))
    await redis_client.zrem(keys.online_index(keys.user_shard("zed")), "zed")
    assert (await watcher.request("where", user="zed"))["online"] is False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while not (await watcher.request("where", user="zed"))["online"]:
        assert loop.time() < deadline, "the heartbeat never restarted the live session"
        await asyncio.sleep(0.1)
    await zed.close()


async def test_presence_transitions_of_a_websocket_session_read_nothing(start_nodes, clients):
    """A WebSocket session's online and offline announcements go to the rooms the session is
    subscribed to, and whether a room is small enough for per-user events comes from member
    counts the node read in the last seconds (every hello reads them): a transition reads
    neither the user's rooms nor member counts from Redis, and still reaches every room."""
    a, b = start_nodes(2)
    watcher = await clients(b.ws_url, user="watcher")
    room = (await watcher.request("create_room", name="pair", visibility="closed",
                                  members=["erin"]))["room"]["id"]
    erin = await clients(a.ws_url, user="erin")  # her hello reads her rooms' member counts
    ops = ("user_rooms", "members")
    before = {op: await op_count(a.http_url, op) for op in ops}
    for status in ("online", "offline"):
        seen: set[str] = set()
        while seen != {"general", room}:  # one event per room, in any order
            seen.add((await until(watcher, presence_of("erin", status)))["room"])
        if status == "online":
            await erin.close()
    assert {op: await op_count(a.http_url, op) for op in ops} == before
