"""Rate limits (pure): token buckets, buckets per key, connection counts per key, client IPs.

Every refusal is counted in ``chatcluster_rate_limited_total{limit=...}`` with ``limit`` taken
from :data:`LIMITS` only (a bounded label set).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable
from typing import Any

# The label values of chatcluster_rate_limited_total.
LIMITS = (
    "commands",              # per-connection command bucket (rate_limited replies, then 4003)
    "connections_per_ip",    # WebSocket handshakes refused with HTTP 429
    "connections_per_user",  # hello refused, close 4003
    "create_room",           # create_room bucket per user
    "http_requests_per_ip",  # HTTP API bucket per client IP (429)
    "http_body_bytes",       # HTTP body over its limit (413)
    "frame_bytes",           # WebSocket frame over CHAT_MAX_FRAME_BYTES (close 1009)
    "text_chars",            # message text over CHAT_MAX_TEXT_CHARS (too_large)
    "json_depth",            # frame nested deeper than the parser allows
    "rooms_per_user",        # CHAT_MAX_ROOMS_PER_USER reached
    "polls_per_user",        # long polls of one user waiting on one node (429)
    "room_members",          # CHAT_MAX_ROOM_MEMBERS reached
    "abuse_penalty",         # handshake refused: the address was cut off for abuse repeatedly
)


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: int, now: float = 0.0) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens if there are enough; never blocks."""
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def retry_after(self, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are back (after a refused :meth:`take`)."""
        return max(0.0, (cost - self.tokens) / self.rate) if self.rate > 0 else float("inf")

    def full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class KeyedBuckets:
    """One :class:`TokenBucket` per key (user, IP), in bounded memory.

    A bucket that has refilled completely is indistinguishable from a new one, so it is dropped
    when the table grows past ``max_keys``; if every bucket is still draining, the oldest half
    is dropped (a flooder from that many addresses gets fresh buckets, which is the best a
    bounded table can do).
    """

    __slots__ = ("rate", "burst", "max_keys", "buckets")

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.buckets: dict[Hashable, TokenBucket] = {}

    def take(self, key: Hashable, now: float, cost: float = 1.0) -> bool:
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.max_keys:
                self._prune(now)
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now, cost)

    def retry_after(self, key: Hashable) -> float:
        bucket = self.buckets.get(key)
        return bucket.retry_after() if bucket is not None else 0.0

    def _prune(self, now: float) -> None:
        self.buckets = {k: b for k, b in self.buckets.items() if not b.full(now)}
        if len(self.buckets) >= self.max_keys:
            keep = list(self.buckets.items())[len(self.buckets) // 2:]
            self.buckets = dict(keep)


class Counts:
    """Live counts per key (connections per IP); keys at zero are dropped."""

    __slots__ = ("counts",)

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def get(self, key: str) -> int:
        return self.counts.get(key, 0)

    def add(self, key: str) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def remove(self, key: str) -> None:
        left = self.counts.get(key, 0) - 1
        if left > 0:
            self.counts[key] = left
        else:
            self.counts.pop(key, None)


def client_ip(peer: str | None, forwarded_for: str | None, trusted: tuple[str, ...]) -> str:
    """The client's address for per-IP limits.

    The peer address, unless the peer is a trusted proxy: then the right-most address of
    ``X-Forwarded-For`` that is not itself a trusted proxy (addresses to its left were written
    by the client and prove nothing). Garbage in the header falls back to the peer.
    """
    peer = peer or "unknown"
    if not trusted or peer not in trusted or not forwarded_for:
        return peer
    for part in reversed(forwarded_for.split(",")[-16:]):
        candidate = part.strip()
        try:
            ipaddress.ip_address(candidate)
        except ValueError:
            return peer
        if candidate not in trusted:
            return candidate
    return peer


class PenaltyBox:
    """Addresses that keep getting cut off for abuse are refused for a while (pure).

    ``record`` counts an abusive close (frame too large, protocol violations, rate limit) of an
    address within a sliding ``window_s``; at ``max_strikes`` the address is blocked for
    ``penalty_s``. A flooder that reconnects after every close then costs a refused handshake,
    not a session (hello, Redis work, presence) each time. ``max_strikes == 0`` disables it.
    At most ``max_keys`` addresses are remembered (the oldest are forgotten first).
    """

    __slots__ = ("max_strikes", "window_s", "penalty_s", "max_keys", "_strikes", "_blocked")

    def __init__(self, max_strikes: int, window_s: float, penalty_s: float, max_keys: int = 100_000) -> None:
        self.max_strikes = max_strikes
        self.window_s = window_s
        self.penalty_s = penalty_s
        self.max_keys = max_keys
        self._strikes: dict[str, tuple[float, int]] = {}  # ip -> (window start, count)
        self._blocked: dict[str, float] = {}  # ip -> blocked until

    def record(self, ip: str, now: float) -> bool:
        """Count one abusive close; True if the address is now blocked."""
        if not self.max_strikes or not ip:
            return False
        start, count = self._strikes.get(ip, (now, 0))
        if now - start > self.window_s:
            start, count = now, 0
        count += 1
        if count >= self.max_strikes:
            self._strikes.pop(ip, None)
            self._blocked[ip] = now + self.penalty_s
            self._bound(self._blocked)
            return True
        self._strikes[ip] = (start, count)
        self._bound(self._strikes)
        return False

    def blocked_for(self, ip: str, now: float) -> float:
        """Seconds the address stays refused (0: not blocked)."""
        until = self._blocked.get(ip)
        if until is None:
            return 0.0
        if now >= until:
            del self._blocked[ip]
            return 0.0
        return until - now

    def _bound(self, table: dict[str, Any]) -> None:
        while len(table) > self.max_keys:
            table.pop(next(iter(table)))
