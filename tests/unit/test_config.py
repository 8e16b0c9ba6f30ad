import pytest

from node import config


def test_defaults_match_the_contract():
    s = config.load({})
    assert (s.ws_port, s.http_port, s.drain_seconds, s.presence_ttl, s.history_maxlen) == (8000, 8001, 30.0, 30, 10000)
    assert (s.poll_min_ms, s.poll_max_ms, s.poll_decay, s.poll_unfocused_ms) == (1000, 30000, 1.5, 15000)
    assert s.auth == "jwt"


@pytest.mark.parametrize("key, value", [
    ("CHAT_WS_PORT", "eighty"), ("CHAT_WS_PORT", "70000"), ("CHAT_AUTH", "none"),
    ("CHAT_REDIS_URL", "http://x"), ("CHAT_POLL_DECAY", "0.5"), ("CHAT_PRESENCE_TTL", "0"),
])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(config.ConfigError) as info:
        config.load({key: value})
    assert key in str(info.value)


def test_overrides_beat_environment_and_settings_are_frozen():
    s = config.load({"CHAT_WS_PORT": "9000"}, {"ws_port": "9100"})
    assert s.ws_port == 9100
    with pytest.raises(AttributeError):
        s.ws_port = 1  # type: ignore[misc]


def test_jwt_mode_needs_a_key():
    with pytest.raises(config.ConfigError, match="CHAT_JWT_SECRET"):
        config.require_auth_material(config.load({}))


def test_json_depth_is_bounded_below_by_the_contracts_own_frames():
    from node.config import ConfigError, load

    assert load({"CHAT_MAX_JSON_DEPTH": "12"}).max_json_depth == 12
    for bad in ("3", "65"):
        with pytest.raises(ConfigError, match="CHAT_MAX_JSON_DEPTH"):
            load({"CHAT_MAX_JSON_DEPTH": bad})
