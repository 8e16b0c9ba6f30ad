"""Hypothesis runs of the pure parsing code (atheris does not install here): the frame parser,
the field checks, cursors, read markers, client IPs. Each either returns a well-formed value or
raises a ChatError with a contract code -- nothing else, whatever the input."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node import protocol
from node.auth import dev_identity
from node.errors import ChatError, Unauthorized
from node.opener import parse_cursors
from node.ratelimit import KeyedBuckets, TokenBucket, client_ip
from node.unread import parse_marker, unread_count

from .strategies import command, json_value, room_ids, stream_ids, user_ids

FAST = settings(max_examples=400, deadline=None)
CODES = {"bad_request", "too_large"}


@FAST
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300),
                 command().map(json.dumps), json_value.map(json.dumps),
                 st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
                 st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n)))
def test_parse_frame_total(data):
    try:
        frame = protocol.parse_frame(data)
    except ChatError as exc:
        assert exc.code in CODES
        return
    assert isinstance(frame, dict) and frame["type"] in protocol.COMMANDS
    assert protocol._depth(frame, protocol.MAX_DEPTH) <= protocol.MAX_DEPTH
    ref = protocol.ref_of(frame)
    assert ref is None or isinstance(ref, (str, int))


@FAST
@given(room_ids, user_ids, stream_ids, st.text(max_size=100))
def test_field_checks_accept_only_clean_values(room, user, sid, text):
    for check, value in ((protocol.check_room_id, room), (protocol.check_user_id, user),
                         (protocol.check_stream_id, sid)):
        try:
            assert check(value) == value
        except ChatError as exc:
            assert exc.code == "bad_request"
            continue
        assert value == value.strip() and "\n" not in value and "\x00" not in value
    try:
        protocol.check_text(text, 50)
    except ChatError as exc:
        assert exc.code in CODES
    try:
        ok_sid = protocol.check_stream_id(sid)
    except ChatError:
        return
    ms, seq = protocol.stream_id_tuple(ok_sid)
    assert 0 <= ms < 2**64 and 0 <= seq < 2**64  # what Redis accepts


@pytest.mark.parametrize("value", ["alice\n", "general\n", "1-1\n", "r-abcd\n", "dm:a:b\n"])
def test_trailing_newline_is_not_an_id(value):
    """Regression: the id patterns ended in ``$``, which matches before a final newline."""
    with pytest.raises(ChatError):
        protocol.check_user_id(value)
    with pytest.raises(ChatError):
        protocol.check_room_id(value)
    with pytest.raises(ChatError):
        protocol.check_stream_id(value)
    with pytest.raises(Unauthorized):
        dev_identity(value, None)
    assert protocol.parse_cursor({"epoch": "e1\n", "id": "1-1"}) is None


@pytest.mark.parametrize("sid", ["18446744073709551616-0", "0-18446744073709551616", "99999999999999999999-1"])
def test_stream_ids_beyond_64_bits(sid):
    """Regression: such ids passed the check and made Redis fail (an internal error)."""
    with pytest.raises(ChatError):
        protocol.check_stream_id(sid)
    assert protocol.parse_cursor({"epoch": "e", "id": sid}) is None
    assert protocol.check_stream_id("18446744073709551615-18446744073709551615")


@FAST
@given(json_value | st.fixed_dictionaries({"epoch": st.text(max_size=70), "id": stream_ids}))
def test_parse_cursor_total(value):
    cursor = protocol.parse_cursor(value)
    if cursor is not None:
        epoch, sid = cursor
        assert protocol.EPOCH_RE.match(epoch) and protocol.stream_id_ok(sid)


@FAST
@given(json_value | st.dictionaries(room_ids, json_value, max_size=8))
def test_parse_cursors_total(value):
    out = parse_cursors(value)
    assert len(out) <= 1000
    for room, cursor in out.items():
        assert isinstance(room, str) and protocol.parse_cursor({"epoch": cursor[0], "id": cursor[1]}) == cursor


@FAST
@given(st.one_of(st.none(), st.text(max_size=60), st.binary(max_size=60),
                 st.integers(), st.builds(lambda a, b: f"{a} {b}", stream_ids, st.integers(-10**30, 10**30))),
       st.integers(0, 2**40))
def test_parse_marker_total(raw, seq):
    sid, read_seq = parse_marker(raw)
    assert isinstance(sid, str) and isinstance(read_seq, int) and read_seq >= 0
    assert unread_count(seq, raw) >= 0


ips = st.one_of(st.ip_addresses().map(str), st.sampled_from(["", "unknown", "1.2.3.4, 5.6.7.8", " ", "::1"]),
                st.text(max_size=20))


@FAST
@given(ips, st.none() | st.lists(ips, max_size=5).map(", ".join) | st.text(max_size=50),
       st.lists(st.sampled_from(["10.0.0.1", "10.0.0.2", "::1"]), max_size=3).map(tuple))
def test_client_ip_is_the_peer_or_a_forwarded_address(peer, forwarded, trusted):
    ip = client_ip(peer, forwarded, trusted)
    if not trusted or (peer or "unknown") not in trusted:
        assert ip == (peer or "unknown")  # an untrusted peer cannot choose its address
    elif ip != peer:
        ipaddress.ip_address(ip)
        assert ip not in trusted and ip in (forwarded or "")


def test_client_ip_takes_the_rightmost_untrusted_hop():
    trusted = ("10.0.0.1", "10.0.0.2")
    assert client_ip("10.0.0.1", "6.6.6.6, 1.2.3.4, 10.0.0.2", trusted) == "1.2.3.4"
    assert client_ip("9.9.9.9", "1.2.3.4", trusted) == "9.9.9.9"
    assert client_ip("10.0.0.1", "garbage", trusted) == "10.0.0.1"


@FAST
@given(st.lists(st.tuples(st.floats(0, 100), st.floats(0.1, 3)), max_size=50), st.floats(0.1, 100), st.integers(1, 50))
def test_token_bucket_never_exceeds_its_budget(steps, rate, burst):
    bucket = TokenBucket(rate, burst)
    now, spent = 0.0, 0.0
    for dt, cost in steps:
        now += dt
        if bucket.take(now, cost):
            spent += cost
    assert spent <= burst + rate * now + 1e-6
    assert 0 <= bucket.tokens <= burst


def test_keyed_buckets_stay_bounded():
    buckets = KeyedBuckets(1.0, 2, max_keys=100)
    for i in range(1000):
        buckets.take(f"ip-{i}", float(i) / 1000)
    assert len(buckets.buckets) <= 100
    assert buckets.take("x", 0.0) and buckets.take("x", 0.0) and not buckets.take("x", 0.0)
    assert buckets.retry_after("x") == pytest.approx(1.0)
