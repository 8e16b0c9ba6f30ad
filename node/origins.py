"""Origin checks for WebSocket handshakes and CORS (pure).

An origin is compared in its canonical form: ``scheme://host[:port]`` in lower case, the
default port (80 for http, 443 for https) left out. Anything that is not a serialised origin
as browsers send it -- a path, a query, user info, a trailing dot, characters outside a host
name, ``null`` -- is refused, whatever the list says (except ``null`` listed literally).

Patterns of ``CHAT_ALLOWED_ORIGINS``:

* ``https://chat.example.com`` (exact; ``:port`` if not the default one),
* ``https://*.example.com`` (any subdomain, at any depth, of ``example.com``, on the default
  port; not ``example.com`` itself, never ``evil-example.com``),
* ``*.example.com`` or ``chat.example.com`` without a scheme: http or https,
* ``*``: any origin but ``null``,
* ``null``: the opaque origin (sandboxed frames, ``file:`` pages) -- only when listed.
"""

from __future__ import annotations

import re

_DEFAULT_PORTS = {"http": 80, "https": 443}
_ORIGIN_RE = re.compile(
    r"^(?P<scheme>https?)://"
    r"(?P<host>[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
    r"|\[[0-9a-f:.]{2,45}\])"
    r"(?::(?P<port>[0-9]{1,5}))?\Z"
)
_PATTERN_RE = re.compile(
    r"^(?:(?P<scheme>https?)://)?"
    r"(?P<wild>\*\.)?"
    r"(?P<host>[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
    r"|\[[0-9a-f:.]{2,45}\])"
    r"(?::(?P<port>[0-9]{1,5}))?\Z"
)


def parse_origin(origin: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` of a serialised origin, or ``None`` if it is not one."""
    if len(origin) > 300:
        return None
    match = _ORIGIN_RE.match(origin.strip().lower())
    if match is None:
        return None
    scheme, host = match["scheme"], match["host"]
    port = int(match["port"]) if match["port"] else _DEFAULT_PORTS[scheme]
    if not 0 < port <= 65535:
        return None
    return scheme, host, port


def _pattern_matches(pattern: str, scheme: str, host: str, port: int) -> bool:
    match = _PATTERN_RE.match(pattern.strip().rstrip("/").lower())
    if match is None:
        return False
    p_scheme = match["scheme"]
    if p_scheme is not None and p_scheme != scheme:
        return False
    p_port = int(match["port"]) if match["port"] else _DEFAULT_PORTS[p_scheme or scheme]
    if p_port != port:
        return False
    if match["wild"]:
        return host.endswith("." + match["host"])
    return host == match["host"]


def origin_allowed(origin: str, allowed: tuple[str, ...], host: str | None = None) -> bool:
    """Whether a browser ``Origin`` may connect.

    ``allowed`` holds the patterns above. With no list configured, only same-host requests pass
    (the origin's host name equals the request's ``Host`` name; scheme and port may differ,
    since the demo page is served from the HTTP port and the socket from the WS port), which
    refuses cross-site WebSocket hijacking by default. Requests without an Origin header
    (non-browsers) are not checked here.
    """
    stripped = origin.strip().lower()
    if stripped == "null":
        return any(p.strip().lower() == "null" for p in allowed)
    parsed = parse_origin(stripped)
    if parsed is None:
        return False
    scheme, origin_host, port = parsed
    for pattern in allowed:
        if pattern.strip() == "*" or _pattern_matches(pattern, scheme, origin_host, port):
            return True
    if host is not None and not allowed:
        own = _host_name(host)
        return own is not None and own == origin_host
    return False


def _host_name(host: str) -> str | None:
    """The name part of a ``Host`` header (``chat.example.com:8000`` -> ``chat.example.com``)."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[:end + 1] if end > 0 else None
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name or None
