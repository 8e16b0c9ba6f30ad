"""Settings: one frozen object built from ``CHAT_*`` environment variables and CLI flags.

Every field is declared once, in :class:`Settings`, with its type, environment name, default and
description (:data:`FIELDS` is derived from it). :func:`load` reads them, casts them, validates them and fails with
:class:`ConfigError` naming the key. The settings object is passed explicitly; there is no
global.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .protocol import MAX_DEPTH as MAX_JSON_DEPTH
from .protocol import MIN_DEPTH as MIN_JSON_DEPTH


class ConfigError(ValueError):
    """A configuration value is missing or malformed; the message names the key."""


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected a boolean (true/false)")


def _list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(raw: str) -> float:
    """Seconds from ``"30d"``, ``"12h"``, ``"90m"``, ``"45s"``, ``"2w"`` or a plain number."""
    value = raw.strip().lower()
    unit = _DURATION_UNITS.get(value[-1:]) if value else None
    number = value[:-1] if unit else value
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise ValueError("expected a duration such as 30d, 12h, 90m, 45s or seconds") from None
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError("expected a finite duration")
    return seconds


@dataclass(frozen=True)
class Field:
    name: str  # attribute name on Settings
    env: str  # environment variable
    cast: Callable[[str], Any]
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be > 0"


def _non_negative(value: Any) -> str | None:
    return None if value >= 0 else "must be >= 0"


def _port(value: int) -> str | None:
    return None if 0 <= value <= 65535 else "must be a port number (0..65535)"


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _redis_url(value: str) -> str | None:
    if value.startswith(("redis://", "rediss://", "redis+cluster://", "unix://")):
        return None
    return "must start with redis://, rediss://, redis+cluster:// or unix://"


def _http_url(value: str) -> str | None:
    if not value or value.startswith(("http://", "https://")):
        return None
    return "must start with http:// or https://"


def _default_node_id() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


def setting(
    env: str,
    cast: Callable[[str], Any],
    default: Any,
    help: str,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """One setting of :class:`Settings`: its default, and (as metadata) how to read it."""
    return dataclasses.field(
        default=default,
        metadata={
            "setting": {"env": env, "cast": cast, "default": default, "help": help, "check": check}
        },
    )


@dataclass(frozen=True)
class Settings:
    """Every setting, declared once: its type, environment variable, cast, default, help and
    check. ``FIELDS`` and the README table are derived from this."""

    redis_url: str = setting("CHAT_REDIS_URL", str, "redis://127.0.0.1:6379/0",
        "Redis URL: redis://, rediss://, or redis+cluster://host:port", _redis_url)
    redis_wait_replicas: int = setting("CHAT_REDIS_WAIT_REPLICAS", int, 0,
        "After each append, WAIT for this many replicas (up to 1 s) before a send is acked, so "
        "the ack survives a failover; fewer in time: acked with durable: false (0: off)", _non_negative)
    host: str = setting("CHAT_HOST", str, "0.0.0.0",
        "Address the WebSocket and HTTP servers bind to")
    ws_port: int = setting("CHAT_WS_PORT", int, 8000,
        "WebSocket port (0: pick a free one)", _port)
    http_port: int = setting("CHAT_HTTP_PORT", int, 8001,
        "HTTP port: API, polling, demo page, /metrics, /healthz (0: pick a free one)", _port)
    node_id: str = setting("CHAT_NODE_ID", str, "",
        "Node name in logs, metrics and welcome (default: host + random)")
    auth: str = setting("CHAT_AUTH", str, "jwt",
        "jwt, or dev (accepts hello with a bare user name)", _one_of("jwt", "dev"))
    jwt_secret: str = setting("CHAT_JWT_SECRET", str, "",
        "HS256 secret(s) for user tokens, comma-separated: the first signs, all verify "
        "(rotation)")
    jwt_public_key: str = setting("CHAT_JWT_PUBLIC_KEY", str, "",
        "PEM public key for RS256/ES256 tokens")
    jwks_file: str = setting("CHAT_JWKS_FILE", str, "",
        "JWKS file of RS256/ES256 public keys, chosen by the token's kid; re-read when it "
        "changes")
    jwt_leeway_s: float = setting("CHAT_JWT_LEEWAY_S", float, 30.0,
        "Clock skew accepted on exp (seconds)", _non_negative)
    jwt_audience: str = setting("CHAT_JWT_AUDIENCE", str, "",
        "Accepted aud values, comma-separated: when set, user tokens must name one (unset: aud "
        "not checked)")
    jwt_issuer: str = setting("CHAT_JWT_ISSUER", str, "",
        "Required iss of user tokens (unset: not checked); tokens the node signs carry it")
    token_refresh_window_s: float = setting("CHAT_TOKEN_REFRESH_WINDOW_S", float, 60.0,
        "A WebSocket whose token expired may send refresh for this long before it is closed "
        "4500", _non_negative)
    token_notice_s: float = setting("CHAT_TOKEN_NOTICE_S", float, 60.0,
        "token_expiring is sent this long before a live connection's token expires", _non_negative)
    api_key: str = setting("CHAT_API_KEY", str, "",
        "Bearer key for the server endpoints (alerts, tokens, system messages)")
    allowed_origins: tuple[str, ...] = setting("CHAT_ALLOWED_ORIGINS", _list, (),
        "Comma-separated browser origins allowed for WebSocket and CORS (*.example.com "
        "wildcards)")
    drain_seconds: float = setting("CHAT_DRAIN_SECONDS", float, 30.0,
        "On SIGTERM, closes (4001) are spread over this window", _non_negative)
    presence_ttl: int = setting("CHAT_PRESENCE_TTL", int, 30,
        "Seconds a session stays online without a heartbeat", _positive)
    history_maxlen: int = setting("CHAT_HISTORY_MAXLEN", int, 10000,
        "Messages kept per room (approximate trim)", _positive)
    history_max_age_s: float = setting("CHAT_HISTORY_MAX_AGE", duration, 0.0,
        "Messages older than this are trimmed from a room when it gets a new one (approximate):"
        " 30d, 12h, seconds; 0: keep them (CHAT_HISTORY_MAXLEN still applies)", _non_negative)
    max_text_chars: int = setting("CHAT_MAX_TEXT_CHARS", int, 4000,
        "Longest message text, in characters", _positive)
    max_frame_bytes: int = setting("CHAT_MAX_FRAME_BYTES", int, 65536,
        "Largest client frame; larger closes 1009", _positive)
    outbound_buffer_bytes: int = setting("CHAT_OUTBOUND_BUFFER_BYTES", int, 1 << 20,
        "Per-connection outbound buffer; a client over it is closed 4002", _positive)
    hello_timeout_s: float = setting("CHAT_HELLO_TIMEOUT_S", float, 10.0,
        "Time allowed for the first frame (hello)", _positive)
    replay_limit: int = setting("CHAT_REPLAY_LIMIT", int, 1000,
        "Most messages replayed per room on resume; a larger gap gives recovered: false", _positive)
    history_limit_max: int = setting("CHAT_HISTORY_LIMIT_MAX", int, 100,
        "Largest history page", _positive)
    shards: int = setting("CHAT_SHARDS", int, 16,
        "Virtual shards (hash tags) rooms are spread over; fixed for the life of the data", _positive)
    read_count: int = setting("CHAT_READ_COUNT", int, 512,
        "Entries per XREAD call of a shard reader", _positive)
    read_block_ms: int = setting("CHAT_READ_BLOCK_MS", int, 5000,
        "Longest block of a shard reader's XREAD", _positive)
    read_linger_ms: float = setting("CHAT_READ_LINGER_MS", float, 2.0,
        "After a shard read that returned entries, wait this long before the next one so busy "
        "rooms are read and written in batches (0: read again at once)", _non_negative)
    ping_interval_s: float = setting("CHAT_PING_INTERVAL_S", float, 20.0,
        "WebSocket ping interval", _positive)
    cmid_ttl_s: int = setting("CHAT_CMID_TTL_S", int, 86400,
        "How long a client message id deduplicates sends", _positive)
    max_connections: int = setting("CHAT_MAX_CONNECTIONS", int, 50000,
        "WebSocket connections per node", _positive)
    protocol_errors_max: int = setting("CHAT_PROTOCOL_ERRORS_MAX", int, 10,
        "Malformed frames tolerated per connection before close 4502", _positive)
    rate_per_s: float = setting("CHAT_RATE_PER_S", float, 20.0,
        "Commands per second per connection (token bucket)", _positive)
    rate_burst: int = setting("CHAT_RATE_BURST", int, 60,
        "Token bucket size per connection", _positive)
    rate_strikes_max: int = setting("CHAT_RATE_STRIKES_MAX", int, 20,
        "Rate-limited commands tolerated before close 4003", _positive)
    max_connections_per_ip: int = setting("CHAT_MAX_CONNECTIONS_PER_IP", int, 200,
        "WebSocket connections per client IP on one node, refused with HTTP 429 (0: no limit)", _non_negative)
    max_connections_per_user: int = setting("CHAT_MAX_CONNECTIONS_PER_USER", int, 20,
        "Live WebSocket sessions per user across the cluster; one more is closed 4003 (0: no "
        "limit)", _non_negative)
    max_hellos_in_progress: int = setting("CHAT_MAX_HELLOS_IN_PROGRESS", int, 200,
        "WebSocket handshakes admitted and not yet welcomed, per node; at the bound new "
        "handshakes are refused with HTTP 503 + Retry-After (0: no limit)", _non_negative)
    admission_max_lag_ms: int = setting("CHAT_ADMISSION_MAX_LAG_MS", int, 500,
        "Event-loop lag (last sample) over which new WebSocket handshakes are refused with HTTP"
        " 503 + Retry-After (0: off)", _non_negative)
    admission_retry_after_s: int = setting("CHAT_ADMISSION_RETRY_AFTER_S", int, 5,
        "Retry-After of a handshake refused for overload: uniform in 1..this many seconds", _positive)
    trusted_proxies: tuple[str, ...] = setting("CHAT_TRUSTED_PROXIES", _list, (),
        "Peer IPs whose X-Forwarded-For names the client (for the per-IP limits)")
    create_room_per_min: float = setting("CHAT_CREATE_ROOM_PER_MIN", float, 10.0,
        "create_room commands per minute per user and node (token bucket)", _positive)
    create_room_burst: int = setting("CHAT_CREATE_ROOM_BURST", int, 10,
        "create_room bucket size per user", _positive)
    http_max_body_bytes: int = setting("CHAT_HTTP_MAX_BODY_BYTES", int, 262144,
        "Largest HTTP API body (session and poll carry cursors); commands use "
        "CHAT_MAX_FRAME_BYTES", _positive)
    http_rate_per_s: float = setting("CHAT_HTTP_RATE_PER_S", float, 50.0,
        "HTTP API requests per second per client IP and node (token bucket); over it: 429", _positive)
    http_rate_burst: int = setting("CHAT_HTTP_RATE_BURST", int, 200,
        "HTTP API bucket size per client IP", _positive)
    typing_interval_ms: int = setting("CHAT_TYPING_INTERVAL_MS", int, 3000,
        "Least time between typing events per user and room", _positive)
    typing_ttl_ms: int = setting("CHAT_TYPING_TTL_MS", int, 6000,
        "How long clients show a typing indicator", _positive)
    receipts_room_limit: int = setting("CHAT_RECEIPTS_ROOM_LIMIT", int, 50,
        "Rooms with more members get no read receipts (direct rooms always do)", _non_negative)
    presence_room_limit: int = setting("CHAT_PRESENCE_ROOM_LIMIT", int, 200,
        "Rooms with more members get throttled online counts instead of presence events", _positive)
    poll_min_ms: int = setting("CHAT_POLL_MIN_MS", int, 1000,
        "Poll interval after activity", _positive)
    poll_max_ms: int = setting("CHAT_POLL_MAX_MS", int, 30000,
        "Longest poll interval", _positive)
    poll_decay: float = setting("CHAT_POLL_DECAY", float, 1.5,
        "Poll interval growth per empty poll", lambda v: None if v >= 1 else "must be >= 1")
    poll_unfocused_ms: int = setting("CHAT_POLL_UNFOCUSED_MS", int, 15000,
        "Least poll interval of an unfocused client", _positive)
    max_rooms_per_user: int = setting("CHAT_MAX_ROOMS_PER_USER", int, 500,
        "Rooms a user may be a member of", _positive)
    max_room_members: int = setting("CHAT_MAX_ROOM_MEMBERS", int, 10000,
        "Members of one created room", _positive)
    max_polls_per_user: int = setting("CHAT_MAX_POLLS_PER_USER", int, 4,
        "Long polls (wait_ms > 0) of one user waiting at once on one node; more get 429 (0 = "
        "off)", _non_negative)
    poll_cache_users: int = setting("CHAT_POLL_CACHE_USERS", int, 20000,
        "Polling users whose rooms and positions a node keeps between polls, so that an idle "
        "poll reads nothing from Redis (0 = off)", _non_negative)
    topic_linger_s: float = setting("CHAT_TOPIC_LINGER_S", float, 15.0,
        "Seconds a node keeps reading a room or personal stream after its last local session "
        "left, so that a reload or reconnect finds it read (0 = stop at once)", _non_negative)
    topic_linger_max: int = setting("CHAT_TOPIC_LINGER_MAX", int, 20000,
        "Streams a node keeps reading that way at most (past it, the last session's leaving "
        "stops the read at once)", _non_negative)
    max_json_depth: int = setting("CHAT_MAX_JSON_DEPTH", int, MAX_JSON_DEPTH,
        "Deepest nesting of a command frame (the frame object is level 1)", lambda v: None if MIN_JSON_DEPTH <= v <= 64 else f"must be {MIN_JSON_DEPTH}..64")
    personal_maxlen: int = setting("CHAT_PERSONAL_MAXLEN", int, 500,
        "Personal events (alerts, invitations) kept per user while offline", _positive)
    webhook_url: str = setting("CHAT_WEBHOOK_URL", str, "",
        "POST every message, edit, delete and membership change here (protocol 5.3; unset: "
        "webhooks off)", _http_url)
    webhook_secret: str = setting("CHAT_WEBHOOK_SECRET", str, "",
        "HMAC-SHA256 key of the X-Chat-Signature header (required with CHAT_WEBHOOK_URL)")
    webhook_max_age_s: float = setting("CHAT_WEBHOOK_MAX_AGE", duration, 86400.0,
        "An event not accepted (2xx) within this long is dropped and counted: 24h, 90m, "
        "seconds", _positive)
    webhook_timeout_s: float = setting("CHAT_WEBHOOK_TIMEOUT", duration, 10.0,
        "Longest webhook request (then retried with backoff)", _positive)
    webhook_lease_s: float = setting("CHAT_WEBHOOK_LEASE", duration, 30.0,
        "A shard's webhook deliveries move to another node this long after their node died "
        "(must exceed 2 x CHAT_WEBHOOK_TIMEOUT)", _positive)
    webhook_outbox_maxlen: int = setting("CHAT_WEBHOOK_OUTBOX_MAXLEN", int, 100000,
        "Undelivered webhook events kept per shard (approximate trim; older ones are lost)",
        _positive)
    abuse_closes_max: int = setting("CHAT_ABUSE_CLOSES_MAX", int, 20,
        "Abusive closes (1009, 4502, 4003) of one address within CHAT_ABUSE_WINDOW_S before its"
        " handshakes are refused (429) for CHAT_ABUSE_PENALTY_S; 0 disables", _non_negative)
    abuse_window_s: float = setting("CHAT_ABUSE_WINDOW_S", float, 60.0,
        "Window counting abusive closes per address", _positive)
    abuse_penalty_s: float = setting("CHAT_ABUSE_PENALTY_S", float, 30.0,
        "How long an abusive address is refused", _positive)
    gc_freeze: bool = setting("CHAT_GC_FREEZE", _bool, True,
        "Move start-up objects out of the cyclic GC and collect young objects less often (fewer"
        " stop-the-world pauses with many connections)")
    log_format: str = setting("CHAT_LOG_FORMAT", str, "json",
        "json (one object per line) or text", _one_of("json", "text"))
    log_level: str = setting("CHAT_LOG_LEVEL", str, "INFO",
        "Python log level", _one_of("DEBUG", "INFO", "WARNING", "ERROR"))
    dev_force: bool = setting("CHAT_DEV_FORCE", _bool, False,
        "Allow CHAT_AUTH=dev on a non-loopback address")

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def public_limits(self) -> dict[str, int]:
        """The limits a client needs to know, as sent in ``welcome.limits``."""
        return {
            "max_text_chars": self.max_text_chars,
            "max_frame_bytes": self.max_frame_bytes,
            "typing_interval_ms": self.typing_interval_ms,
            "typing_ttl_ms": self.typing_ttl_ms,
            "history_limit_max": self.history_limit_max,
            "replay_limit": self.replay_limit,
            "rate_per_s": int(self.rate_per_s),
            "rate_burst": self.rate_burst,
            "max_rooms_per_user": self.max_rooms_per_user,
            "max_room_members": self.max_room_members,
            "max_json_depth": self.max_json_depth,
            "max_polls_per_user": self.max_polls_per_user,
            "rate_strikes_max": self.rate_strikes_max,
            "protocol_errors_max": self.protocol_errors_max,
            "max_connections_per_user": self.max_connections_per_user,
            "max_connections_per_ip": self.max_connections_per_ip,
            "create_room_per_min": int(self.create_room_per_min),
            "create_room_burst": self.create_room_burst,
            "http_max_body_bytes": self.http_max_body_bytes,
            "http_rate_per_s": int(self.http_rate_per_s),
            "http_rate_burst": self.http_rate_burst,
            "token_refresh_window_s": int(self.token_refresh_window_s),
        }


FIELDS: tuple[Field, ...] = tuple(
    Field(f.name, **f.metadata["setting"]) for f in dataclasses.fields(Settings)
)
FIELDS_BY_NAME = {f.name: f for f in FIELDS}


def load(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Build settings from ``environ`` (default ``os.environ``) and ``overrides``.

    ``overrides`` maps field names to values that are either already typed (CLI flags parsed by
    argparse) or strings; ``None`` values are ignored. Raises :class:`ConfigError` naming the
    environment key of the first bad value.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field in FIELDS:
        raw: Any = env.get(field.env)
        if overrides and overrides.get(field.name) is not None:
            raw = overrides[field.name]
        if raw is None:
            value = field.default
        elif isinstance(raw, str):
            try:
                value = field.cast(raw)
            except ValueError as exc:
                raise ConfigError(f"{field.env}: cannot parse {raw!r}: {exc}") from None
        else:
            value = raw
        if field.check is not None:
            problem = field.check(value)
            if problem:
                raise ConfigError(f"{field.env}: {problem} (got {value!r})")
        values[field.name] = value
    if not values["node_id"]:
        values["node_id"] = _default_node_id()
    if values["poll_min_ms"] > values["poll_max_ms"]:
        raise ConfigError("CHAT_POLL_MIN_MS: must not exceed CHAT_POLL_MAX_MS")
    if values["webhook_url"] and not values["webhook_secret"]:
        raise ConfigError("CHAT_WEBHOOK_SECRET: required when CHAT_WEBHOOK_URL is set")
    if values["webhook_lease_s"] <= 2 * values["webhook_timeout_s"]:
        raise ConfigError("CHAT_WEBHOOK_LEASE: must exceed 2 x CHAT_WEBHOOK_TIMEOUT")
    return Settings(**values)


def require_auth_material(settings: Settings) -> None:
    """A production (jwt) node needs a key to verify tokens; fail at start-up otherwise."""
    if settings.auth == "jwt" and not (
        settings.jwt_secret or settings.jwt_public_key or settings.jwks_file
    ):
        raise ConfigError(
            "CHAT_JWT_SECRET: required when CHAT_AUTH=jwt "
            "(or set CHAT_JWT_PUBLIC_KEY or CHAT_JWKS_FILE)"
        )
    if settings.jwks_file and not os.path.isfile(settings.jwks_file):
        raise ConfigError(f"CHAT_JWKS_FILE: no such file ({settings.jwks_file!r})")


def markdown_table() -> str:
    """The configuration table of the README, generated from :data:`FIELDS`."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for f in FIELDS:
        default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        rows.append(f"| `{f.env}` | `{default}` | {f.help} |")
    return "\n".join(rows)
