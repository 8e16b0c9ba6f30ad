"""The origin check (pure): exact and wildcard patterns, and the bypasses it must refuse."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.origins import origin_allowed, parse_origin

ALLOWED = ("https://chat.example.com", "https://*.example.org", "http://localhost:3000",
           "*.example.net", "https://app.example.io:8443")


@pytest.mark.parametrize("origin", [
    "https://chat.example.com",
    "HTTPS://CHAT.EXAMPLE.COM",             # case-insensitive
    "https://chat.example.com:443",         # the default port is the same origin
    "https://a.example.org",
    "https://deep.a.example.org",           # any depth
    "http://localhost:3000",
    "http://x.example.net",                 # scheme-less pattern: http or https
    "https://x.example.net",
    "https://app.example.io:8443",
])
def test_allowed(origin):
    assert origin_allowed(origin, ALLOWED)


@pytest.mark.parametrize("origin", [
    "https://evil-example.org",             # suffix without the dot
    "https://evilexample.org",
    "https://example.org",                  # the wildcard is for subdomains only
    "https://example.org.evil.com",
    "https://a.example.org.evil.com",
    "https://a.example.org.",               # trailing dot
    "https://chat.example.com.",
    "http://chat.example.com",              # other scheme
    "https://chat.example.com:8443",        # other port
    "https://a.example.org:444",
    "http://localhost:3001",
    "http://localhost",
    "https://app.example.io",               # default port, pattern has 8443
    "https://chat.example.com/path",        # not a serialised origin
    "https://chat.example.com/",
    "https://chat.example.com?x=1",
    "https://chat.example.com#x",
    "https://user@chat.example.com",        # user info
    "https://evil.com@chat.example.com",
    "https://chat.example.com@evil.com",
    "https://evil.com\\.example.org",
    "https://evil.com%2e.example.org",
    "https://a.example.org\x00",
    "https://a.example.org evil",
    "null",
    "",
    "file://",
    "chrome-extension://abcdef",
    "ws://chat.example.com",
    "javascript://chat.example.com",
    "https://",
    "https://*.example.org",                # a pattern is not an origin
    "https://chat.example.com:99999",
    "https://chat.example.com:0",
    "https://chat.example.com:",
    "https://-x.example.org",
    "https://x-.example.org",
    "https://" + "a" * 64 + ".example.org",  # label too long
])
def test_refused(origin):
    assert not origin_allowed(origin, ALLOWED)


def test_null_only_when_listed():
    assert not origin_allowed("null", ("*",))
    assert origin_allowed("null", ("null",))
    assert origin_allowed("https://anything.test", ("*",))
    assert not origin_allowed("https://a.b/c", ("*",))


def test_same_host_default_without_a_list():
    assert origin_allowed("http://chat.local:8001", (), host="chat.local:8000")
    assert origin_allowed("https://chat.local", (), host="CHAT.LOCAL")
    assert not origin_allowed("http://evil.test:8000", (), host="chat.local:8000")
    assert not origin_allowed("http://chat.local.evil.test", (), host="chat.local")
    assert origin_allowed("http://[::1]:8001", (), host="[::1]:8000")
    assert not origin_allowed("http://[::2]:8001", (), host="[::1]:8000")
    assert not origin_allowed("http://chat.local", (), host=None)
    # A configured list replaces the same-host rule.
    assert not origin_allowed("http://chat.local", ("https://other.test",), host="chat.local")


def test_malformed_patterns_match_nothing():
    for pattern in ("https://*", "*.", "https://*.*.com", "https://a.*.com", "", " ", "https://", "**.x.com"):
        assert not origin_allowed("https://a.x.com", (pattern,)), pattern


def test_parse_origin():
    assert parse_origin("https://A.Example.com") == ("https", "a.example.com", 443)
    assert parse_origin("http://x:80") == ("http", "x", 80)
    assert parse_origin("http://[::1]:9") == ("http", "[::1]", 9)
    assert parse_origin("https://x/") is None


labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@settings(max_examples=300, deadline=None)
@given(st.lists(labels, min_size=1, max_size=3), st.sampled_from(["http", "https"]),
       st.one_of(st.none(), st.integers(1, 65535)))
def test_wildcard_matches_exactly_the_subdomains(sub, scheme, port):
    host = ".".join(sub)
    origin = f"{scheme}://{host}.example.org" + (f":{port}" if port else "")
    default = port is None or port == 443
    assert origin_allowed(origin, ("https://*.example.org",)) == (scheme == "https" and default)
    # Gluing the label to the suffix (no dot) is never a subdomain.
    assert not origin_allowed(f"https://{host}example.org", ("https://*.example.org",))
    assert not origin_allowed(f"https://{host}-example.org", ("https://*.example.org",))


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=80))
def test_arbitrary_text_never_crashes_and_never_passes_a_strict_list(text):
    result = origin_allowed(text, ALLOWED)
    if result:
        parsed = parse_origin(text)
        assert parsed is not None
        # Whatever passed is a clean origin of one of the patterns.
        assert parsed[1].endswith((".example.org", ".example.net")) or parsed[1] in (
            "chat.example.com", "localhost", "app.example.io", "example.net")
