"""Who may frame the demo page: its ``Content-Security-Policy: frame-ancestors`` header, and the
``/api/v1/config?parent=ORIGIN`` answer the page uses to trust (or not) the page that frames it.

Both follow CHAT_ALLOWED_ORIGINS as node.origins matches it (see test_origins.py): exact origins,
``https://*.example.com`` wildcards, scheme-less patterns (http or https), ``*``; with no list,
the node's own host name only.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from typing import Any

import pytest

from node.http import _frame_ancestors

ALLOWED = ("https://chat.example.com", "https://*.example.org", "*.example.net", "http://localhost:3000",
           "https://app.example.io:8443", "null")


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, dict(resp.headers), resp.read()


def frame_ancestors(headers: dict[str, str]) -> list[str]:
    csp = headers.get("Content-Security-Policy", "")
    directives = [d.strip() for d in csp.split(";") if d.strip()]
    found = [d.split()[1:] for d in directives if d.split()[0] == "frame-ancestors"]
    assert len(found) == 1, csp
    return found[0]


@pytest.mark.parametrize(("allowed", "host", "expected"), [
    (ALLOWED, "chat.example.com", [
        "'self'", "https://chat.example.com", "https://*.example.org", "http://*.example.net",
        "https://*.example.net", "http://localhost:3000", "https://app.example.io:8443"]),
    (("*",), "chat.example.com", ["'self'", "*"]),
    # The default: like the origin check, the node's own host name on any scheme and port.
    ((), "127.0.0.1:8001", ["'self'", "http://127.0.0.1:*", "https://127.0.0.1:*"]),
    ((), "chat.example.com", ["'self'", "http://chat.example.com:*", "https://chat.example.com:*"]),
    ((), "[::1]:8001", ["'self'"]),  # CSP has no IPv6 literals: the page's own origin only
    # Nothing from the list or the Host header ever adds a directive or a keyword.
    (("https://a.example.com; script-src *", "'unsafe-inline'", "https://b.example.com/path"),
     "x.example.com", ["'self'"]),
    ((), "evil.example.com; script-src *", ["'self'"]),
])
def test_frame_ancestors_value(allowed: tuple[str, ...], host: str, expected: list[str]) -> None:
    value = _frame_ancestors(allowed, host)
    assert value == "frame-ancestors " + " ".join(expected)
    assert ";" not in value and "," not in value


def test_the_demo_page_may_be_framed_by_the_allowed_origins_only(start_nodes: Any) -> None:
    (node,) = start_nodes(1, CHAT_ALLOWED_ORIGINS=",".join(ALLOWED))
    for path in ("/", "/?embed=1", "/?embed=1&room=general"):
        status, headers, body = get(node.http_url + path)
        assert status == 200 and b"<html" in body
        assert frame_ancestors(headers) == [
            "'self'", "https://chat.example.com", "https://*.example.org", "http://*.example.net",
            "https://*.example.net", "http://localhost:3000", "https://app.example.io:8443"]

    (default,) = start_nodes(1)
    _, headers, _ = get(default.http_url + "/")
    assert frame_ancestors(headers) == ["'self'", "http://127.0.0.1:*", "https://127.0.0.1:*"]


PARENTS = [
    ("https://chat.example.com", True),
    ("https://a.b.example.org", True),
    ("http://x.example.net", True),
    ("http://localhost:3000", True),
    ("null", True),  # listed literally
    ("https://evil.example.com", False),
    ("https://example.org", False),
    ("https://evil-example.org", False),
    ("http://chat.example.com", False),
    ("http://localhost:3001", False),
    ("https://chat.example.com/", False),
    ("", False),
]


def test_config_says_whether_a_parent_may_embed(start_nodes: Any) -> None:
    (node,) = start_nodes(1, CHAT_ALLOWED_ORIGINS=",".join(ALLOWED))
    for parent, allowed in PARENTS:
        _, _, body = get(f"{node.http_url}/api/v1/config?parent={urllib.parse.quote(parent, safe='')}")
        assert json.loads(body)["parent_allowed"] is allowed, parent
    _, _, plain = get(f"{node.http_url}/api/v1/config")
    assert "parent_allowed" not in json.loads(plain)


def test_config_parent_default_is_the_nodes_own_host(start_nodes: Any) -> None:
    (node,) = start_nodes(1)
    for parent, allowed in (("http://127.0.0.1:1234", True), ("https://127.0.0.1", True),
                            ("http://localhost:1234", False), ("https://evil.example.com", False)):
        _, _, body = get(f"{node.http_url}/api/v1/config?parent={urllib.parse.quote(parent, safe='')}")
        assert json.loads(body)["parent_allowed"] is allowed, parent
