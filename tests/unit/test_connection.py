"""The connection's protocol state without sockets: frames and the time in, actions out."""

from __future__ import annotations

import orjson
import pytest

from node import config
from node.connection import Close, ConnectionCore, OpenSession, Refresh, Run, Send, State


def core(now: float = 0.0, **env: object) -> ConnectionCore:
    settings = config.load({"CHAT_AUTH": "dev", "CHAT_HELLO_TIMEOUT_S": "10", "CHAT_PROTOCOL_ERRORS_MAX": "2",
                            "CHAT_RATE_PER_S": "1", "CHAT_RATE_BURST": "2", "CHAT_RATE_STRIKES_MAX": "1",
                            **{k: str(v) for k, v in env.items()}})
    return ConnectionCore(settings, now)


def reply(action: object) -> dict:
    assert isinstance(action, Send), action
    return orjson.loads(action.payload)


def opened(c: ConnectionCore) -> ConnectionCore:
    assert isinstance(c.receive('{"type":"hello","user":"a"}', 0.0), OpenSession)
    c.opened()
    return c


def test_hello_first_then_commands():
    c = core()
    err = reply(c.receive('{"type":"send","room":"general","text":"x","ref":1}', 0.0))
    assert err["error"]["code"] == "unauthorized" and err["ref"] == 1
    action = c.receive('{"type":"hello","user":"a","ref":"h"}', 0.0)
    assert isinstance(action, OpenSession) and action.ref == "h" and c.state is State.OPENING
    c.opened()
    run = c.receive('{"type":"send","room":"general","text":"x","ref":2}', 0.0)
    assert isinstance(run, Run) and run.ref == 2 and run.frame["text"] == "x"
    assert isinstance(c.receive('{"type":"refresh","token":"t"}', 0.0), Refresh)


def test_the_hello_deadline_closes_4501():
    c = core(now=100.0)
    assert c.hello_overdue(109.9) is None
    assert c.hello_overdue(110.0) == Close(4501, "no hello in time")
    assert c.state is State.CLOSED


def test_protocol_errors_are_answered_then_close_4502():
    c = opened(core())
    assert reply(c.receive(b"\x00binary", 0.0))["error"]["code"] == "bad_request"
    bad = reply(c.receive('{"type":"nope","ref":7}', 0.0))
    assert bad["error"]["code"] == "bad_request" and bad["ref"] == 7
    assert c.receive("{not json", 0.0) == Close(4502, "protocol violation")


def test_json_depth_is_refused_as_bad_request():
    c = opened(core(CHAT_MAX_JSON_DEPTH=4))
    deep = '{"type":"send","room":"general","text":"x","cmid":{"a":{"b":{"c":1}}}}'
    assert reply(c.receive(deep, 0.0))["error"]["message"] == "frame nested too deeply"


def test_rate_limit_answers_then_closes_4003():
    c = opened(core())
    frame = '{"type":"ping","ref":1}'
    assert isinstance(c.receive(frame, 0.0), Run)
    assert isinstance(c.receive(frame, 0.0), Run)  # the burst of 2
    assert reply(c.receive(frame, 0.0))["error"]["code"] == "rate_limited"  # strike 1
    assert c.receive(frame, 0.0) == Close(4003, "rate limit exceeded")  # strike 2 > 1


def test_the_bucket_refills_with_time():
    c = opened(core())
    for _ in range(2):
        assert isinstance(c.receive('{"type":"ping"}', 0.0), Run)
    assert isinstance(c.receive('{"type":"ping"}', 1.0), Run)


@pytest.mark.parametrize("expires_at,now,notice_at,close_at", [
    (1000.0, 0.0, 1000.0 + 30 - 60, 1000.0 + 30 + 60),  # leeway 30, notice 60, window 60
    (1000.0, 1010.0, 1010.0, 1090.0),  # already inside the notice period: at once
])
def test_token_times(expires_at, now, notice_at, close_at):
    c = opened(core())
    times = c.token_times(expires_at, now)
    assert times is not None and (times.notice_at, times.close_at) == (notice_at, close_at)
    assert orjson.loads(times.notice) == {"type": "token_expiring", "expires_at": 1000, "close_at": int(close_at)}
    assert c.token_times(None, now) is None
    assert c.token_expired() == Close(4500, "token expired")
