"""Origin checks for WebSocket handshakes and CORS (pure)."""

from __future__ import annotations

from urllib.parse import urlsplit


def origin_allowed(origin: str, allowed: tuple[str, ...], host: str | None = None) -> bool:
    """Whether a browser ``Origin`` may connect.

    ``allowed`` holds exact origins (``https://chat.example.com``), wildcard subdomain patterns
    (``https://*.example.com``) or ``*``. With no list configured, only same-origin requests pass
    (the origin's host name equals the request's ``Host`` name; ports may differ, since the
    demo page is served from the HTTP port), which refuses cross-site WebSocket hijacking by
    default. Requests without an Origin header (non-browsers) are not checked here.
    """
    origin = origin.strip().rstrip("/").lower()
    if "*" in allowed:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    for pattern in allowed:
        pattern = pattern.strip().rstrip("/").lower()
        if pattern == origin:
            return True
        if "://*." in pattern:
            scheme, _, rest = pattern.partition("://*.")
            if parts.scheme == scheme and (parts.netloc.endswith("." + rest)):
                return True
    if host is not None and not allowed:
        host_name = urlsplit("//" + host.strip().lower()).hostname
        return parts.hostname == host_name
    return False
