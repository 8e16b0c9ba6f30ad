"""Bad input over a raw WebSocket: every malformed or abusive frame gets the contract's error
reply (with the frame's ``ref`` when it had a valid one) or close code, and the node keeps
serving everyone else."""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest

from .wire import (
    assert_error,
    assert_node_serves,
    close_code,
    hello,
    next_of,
    next_reply,
    raw_connect,
    send_json,
)

LIMITS = {"CHAT_PROTOCOL_ERRORS_MAX": 3, "CHAT_MAX_TEXT_CHARS": 50, "CHAT_MAX_FRAME_BYTES": 4096,
          "CHAT_HELLO_TIMEOUT_S": 0.5}

# (frame as sent, expected error code, expected ref in the reply or None)
BAD_FRAMES: list[tuple[str, str, object]] = [
    ('{"type": "send", "ref": 1, "room": "general", "text": ', "bad_request", None),  # truncated
    ("not json at all", "bad_request", None),
    ('{"type": "ping", "ref": 1,}', "bad_request", None),  # trailing comma
    ("[1, 2, 3]", "bad_request", None),
    ('"ping"', "bad_request", None),
    ("42", "bad_request", None),
    ("null", "bad_request", None),
    ('{"type": "frobnicate", "ref": "u1"}', "bad_request", "u1"),
    ('{"ref": "m0"}', "bad_request", "m0"),  # no type
    ('{"type": 7, "ref": "m1"}', "bad_request", "m1"),
    ('{"type": "send", "ref": "m2", "room": "general"}', "bad_request", "m2"),
    ('{"type": "send", "ref": "m3", "text": "hi"}', "bad_request", "m3"),
    ('{"type": "send", "ref": "t1", "room": "general", "text": 5}', "bad_request", "t1"),
    ('{"type": "send", "ref": "t2", "room": ["general"], "text": "hi"}', "bad_request", "t2"),
    ('{"type": "send", "ref": "t3", "room": "general", "text": "hi", "cmid": 12}', "bad_request", "t3"),
    ('{"type": "history", "ref": "t4", "room": "general", "limit": "5"}', "bad_request", "t4"),
    ('{"type": "history", "ref": "t5", "room": "general", "limit": true}', "bad_request", "t5"),
    ('{"type": "history", "ref": "t6", "room": "general", "limit": 0}', "bad_request", "t6"),
    ('{"type": "history", "ref": "t7", "room": "general", "before": "yesterday"}', "bad_request", "t7"),
    ('{"type": "ping", "ref": {"a": 1}}', "bad_request", None),  # a ref that is not valid
    ('{"type": "ping", "ref": true}', "bad_request", None),
    ('{"type": "ping", "ref": 1.5}', "bad_request", None),
    ('{"type": "send", "ref": 7, "room": "general", "text": "' + "x" * 51 + '"}', "too_large", 7),
    ('{"type": "send", "ref": "e1", "room": "general", "text": ""}', "bad_request", "e1"),
    ('{"type": "send", "ref": "e2", "room": "general", "text": "   "}', "bad_request", "e2"),
    ('{"type": "send", "ref": "n1", "room": "general", "text": "a\\u0000b"}', "bad_request", "n1"),
    ('{"type": "send", "ref": "c1", "room": "general", "text": "hi", "cmid": "no spaces"}', "bad_request", "c1"),
    ('{"type": "send", "ref": "r1", "room": "not a room!", "text": "hi"}', "bad_request", "r1"),
    ('{"type": "send", "ref": "r2", "room": "r-doesnotexist", "text": "hi"}', "not_found", "r2"),
    ('{"type": "hello", "ref": "h2", "user": "mallory"}', "bad_request", "h2"),  # second hello
    ('{"type": "ping", "ref": -9007199254740991}', None, -9007199254740991),  # valid: ok reply
]


async def test_each_bad_frame_gets_its_error_reply_and_the_connection_survives(start_nodes):
    (a,) = start_nodes(1, **LIMITS)
    for i, (raw, code, ref) in enumerate(BAD_FRAMES):
        ws = await raw_connect(a.ws_url)
        try:
            await hello(ws, f"bad-{i}")
            await ws.send(raw)
            reply = await next_reply(ws)
            if code is None:
                assert reply["ok"] is True and reply["ref"] == ref, (raw, reply)
            else:
                assert_error(reply, code, ref)
            # One bad frame is not fatal: the same connection still answers.
            await send_json(ws, {"type": "ping", "ref": f"after-{i}"})
            assert await next_reply(ws) == {"type": "reply", "ok": True, "data": {}, "ref": f"after-{i}"}, raw
        finally:
            await ws.close()
    # Nothing above was stored as a message.
    ws = await raw_connect(a.ws_url)
    await hello(ws, "auditor")
    await send_json(ws, {"type": "history", "ref": "h", "room": "general"})
    assert (await next_reply(ws))["data"]["messages"] == []
    await ws.close()
    await assert_node_serves(a.ws_url)


async def test_binary_frame_is_refused_with_bad_request(start_nodes):
    (a,) = start_nodes(1, **LIMITS)
    ws = await raw_connect(a.ws_url)
    await hello(ws, "alice")
    await ws.send(b'{"type": "ping", "ref": 1}')  # valid JSON, but binary
    assert_error(await next_reply(ws), "bad_request", None)
    await send_json(ws, {"type": "ping", "ref": 2})
    assert (await next_reply(ws))["ref"] == 2
    await ws.close()
    await assert_node_serves(a.ws_url)


async def test_commands_before_hello_are_unauthorized_then_hello_works(start_nodes):
    (a,) = start_nodes(1, **LIMITS)
    ws = await raw_connect(a.ws_url)
    await send_json(ws, {"type": "send", "ref": "early", "room": "general", "text": "sneaky"})
    assert_error(await next_reply(ws), "unauthorized", "early")
    await send_json(ws, {"type": "ping", "ref": 3})
    assert_error(await next_reply(ws), "unauthorized", 3)
    welcome = await hello(ws, "alice")
    assert welcome["user"]["id"] == "alice"
    await send_json(ws, {"type": "send", "ref": "late", "room": "general", "text": "now it counts"})
    ack = await next_reply(ws)
    assert ack["ok"] is True and ack["ref"] == "late"
    message = await next_of(ws, "message")
    assert message["id"] == ack["data"]["id"] and message["text"] == "now it counts"
    # The early send was never stored.
    await send_json(ws, {"type": "history", "ref": "h", "room": "general"})
    assert [m["text"] for m in (await next_reply(ws))["data"]["messages"]] == ["now it counts"]
    await ws.close()
    await assert_node_serves(a.ws_url)


@pytest.mark.parametrize("before_hello", [True, False])
async def test_oversize_frame_closes_1009(start_nodes, before_hello):
    (a,) = start_nodes(1, **LIMITS)
    ws = await raw_connect(a.ws_url)
    if not before_hello:
        await hello(ws, "alice")
    await send_json(ws, {"type": "send", "ref": 1, "room": "general", "text": "y" * 5000})
    assert await close_code(ws) == 1009
    await assert_node_serves(a.ws_url)


def _token(secret: str, user: str, exp_offset: float) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time() + exp_offset)}, secret, algorithm="HS256")


async def test_jwt_mode_refuses_bad_tokens_with_4500(start_nodes):
    secret = "s3cret-for-this-test-0123456789abcdef"
    (a,) = start_nodes(1, CHAT_AUTH="jwt", CHAT_JWT_SECRET=secret, CHAT_JWT_LEEWAY_S=0, **LIMITS)
    bad_hellos = [
        {"type": "hello", "token": "not.a.jwt"},
        {"type": "hello", "token": _token("another-secret-0123456789abcdef0123", "alice", 3600)},
        {"type": "hello", "token": _token(secret, "alice", -3600)},  # expired
        {"type": "hello", "token": _token(secret, "not a user id!", 3600)},
        {"type": "hello", "user": "alice"},  # dev-style hello: refused outside dev mode
    ]
    for frame in bad_hellos:
        ws = await raw_connect(a.ws_url)
        await send_json(ws, frame)
        assert await close_code(ws) == 4500, frame
    # A valid token still gets in and can chat.
    ws = await raw_connect(a.ws_url)
    await send_json(ws, {"type": "hello", "token": _token(secret, "alice", 3600)})
    welcome = await next_of(ws, "welcome")
    assert welcome["user"]["id"] == "alice"
    await send_json(ws, {"type": "send", "ref": 1, "room": "general", "text": "signed"})
    ack = await next_reply(ws)
    assert ack["ok"] is True
    assert (await next_of(ws, "message"))["id"] == ack["data"]["id"]
    await ws.close()


async def test_no_hello_in_time_closes_4501(start_nodes):
    (a,) = start_nodes(1, **LIMITS)
    ws = await raw_connect(a.ws_url)
    start = time.monotonic()
    assert await close_code(ws, timeout=5) == 4501
    assert 0.4 <= time.monotonic() - start < 4.0
    await assert_node_serves(a.ws_url)


@pytest.mark.parametrize("before_hello", [True, False])
async def test_repeated_malformed_frames_close_4502(start_nodes, before_hello):
    (a,) = start_nodes(1, **LIMITS)
    ws = await raw_connect(a.ws_url)
    if not before_hello:
        await hello(ws, "alice")
    # CHAT_PROTOCOL_ERRORS_MAX=3: three error replies, the fourth violation closes.
    await ws.send('{"type": "ping", "ref": "x1"')
    await ws.send(b"\x00\x01")
    await send_json(ws, {"type": "nope", "ref": "x3"})
    await send_json(ws, {"type": "nope", "ref": "x4"})
    replies = []
    try:
        async with asyncio.timeout(5):
            while True:
                replies.append(await next_reply(ws))
    except Exception as exc:  # the close ends the loop
        assert not isinstance(exc, TimeoutError), "the node never closed the connection"
    assert [r["error"]["code"] for r in replies] == ["bad_request"] * 3
    assert [r.get("ref") for r in replies] == [None, None, "x3"]
    assert await close_code(ws) == 4502
    await assert_node_serves(a.ws_url)


async def test_rate_limit_replies_then_closes_4003(start_nodes):
    # 0.01 token/s: no token comes back during the test, so the counts below are exact.
    (a,) = start_nodes(1, CHAT_RATE_PER_S=0.01, CHAT_RATE_BURST=3, CHAT_RATE_STRIKES_MAX=2, **LIMITS)
    ws = await raw_connect(a.ws_url)
    await hello(ws, "spammer")
    for i in range(1, 7):
        await send_json(ws, {"type": "ping", "ref": i})
    replies = [await next_reply(ws) for _ in range(5)]
    assert [r["ok"] for r in replies[:3]] == [True, True, True]
    assert [r["ref"] for r in replies[:3]] == [1, 2, 3]
    for ref, reply in zip([4, 5], replies[3:], strict=True):
        assert_error(reply, "rate_limited", ref)
    assert await close_code(ws) == 4003  # the third strike
    await assert_node_serves(a.ws_url)


async def test_history_at_the_ends_of_the_id_space_is_an_empty_page(start_nodes, clients):
    (a,) = start_nodes(1)
    alice = await clients(a.ws_url, user="alice")
    await alice.send("general", "one")
    for bound in ({"before": "0-0"}, {"after": "18446744073709551615-18446744073709551615"}):
        page = await alice.request("history", room="general", **bound)
        assert page == {"messages": [], "more": False}, bound
