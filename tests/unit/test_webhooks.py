"""The pure parts of node.webhooks: signatures, ids, backoff, shares, events, the Lua line."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from node import config
from node.keys import Keys
from node.webhooks import (
    BACKOFF_MAX_S,
    Outbox,
    backoff_s,
    delivery_id,
    fair_share,
    member_event,
    outbox_xadd,
    sign,
)


def test_signature_is_the_hmac_sha256_of_the_raw_body():
    body = b'{"event":{},"delivery":"s1-1-0"}'
    assert sign("k", body) == "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert sign("k", body) != sign("other", body) and sign("k", body) != sign("k", body + b" ")


def test_delivery_ids_name_the_shard_and_the_outbox_entry():
    assert delivery_id(3, "1700000000000-0") == "s3-1700000000000-0"
    assert delivery_id(3, "1700000000000-0") != delivery_id(4, "1700000000000-0")


def test_backoff_grows_and_is_capped():
    assert all(0.25 <= backoff_s(0) <= 0.5 for _ in range(100))
    assert all(backoff_s(n) <= BACKOFF_MAX_S for n in range(100))
    assert min(backoff_s(4) for _ in range(50)) > max(backoff_s(1) for _ in range(50))


def test_fair_share_covers_every_shard():
    assert fair_share(16, 1) == 16 and fair_share(16, 3) == 6 and fair_share(16, 0) == 16
    assert all(fair_share(16, n) * n >= 16 for n in range(1, 40))


def test_member_event_shape():
    fields = {b"r": b"r-abc", b"m": b"invited", b"u": b"carl", b"b": b"alice"}
    assert member_event(fields, "1700000000123-4") == {
        "type": "member", "room": "r-abc", "user": "carl", "change": "invited", "by": "alice",
        "ts": 1700000000123}
    assert "by" not in member_event({b"r": b"x", b"m": b"left", b"u": b"bob", b"b": b""}, "1-0")


def test_outbox_line_writes_only_when_enabled_and_in_the_rooms_slot():
    line = outbox_xadd("KEYS[5]", "ARGV[11]", "'r'", "ARGV[12]", "'i'", "id")
    assert line.startswith("if (ARGV[11] or '0') ~= '0' then redis.call('XADD', KEYS[5], 'MAXLEN', '~',")
    keys = Keys(16)
    off, on = Outbox(keys), Outbox(keys, 1000)
    assert (off.enabled, off.arg, on.enabled, on.arg) == (False, "0", True, "1000")
    assert on.key("r-abc").split(":")[1] == keys.room_stream("r-abc").split(":")[1]


def test_settings_need_a_secret_with_a_url_and_a_lease_longer_than_two_timeouts():
    base = {"CHAT_WEBHOOK_URL": "https://hooks.example.com/chat"}
    with pytest.raises(config.ConfigError, match="CHAT_WEBHOOK_SECRET"):
        config.load(base)
    with pytest.raises(config.ConfigError, match="CHAT_WEBHOOK_URL"):
        config.load({"CHAT_WEBHOOK_URL": "ftp://x", "CHAT_WEBHOOK_SECRET": "s"})
    with pytest.raises(config.ConfigError, match="CHAT_WEBHOOK_LEASE"):
        config.load({**base, "CHAT_WEBHOOK_SECRET": "s", "CHAT_WEBHOOK_TIMEOUT": "20s"})
    settings = config.load({**base, "CHAT_WEBHOOK_SECRET": "s", "CHAT_WEBHOOK_MAX_AGE": "2h"})
    assert settings.webhook_max_age_s == 7200 and config.load({}).webhook_max_age_s == 86400
