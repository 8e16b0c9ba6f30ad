"""Embedding the demo page: who may frame it and hand it a login, and host attributes as data.

Real chromium, real nodes. Two stand-in host applications on two origins (``localhost`` on two
ports; the node is on ``127.0.0.1``): one listed in ``CHAT_ALLOWED_ORIGINS``, one not. The
foreign one frames the chat and posts a login, as widget.js would; it must get nothing.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

# A host page that frames the chat at {src} and does what widget.js does: answers `ready` with a
# login, and also posts a login on its own once the frame has loaded.
FRAMING_PAGE = """<!doctype html><title>host</title>
<script>
  window.readySeen = false;
  addEventListener("message", (e) => {
    if (e.data && e.data.type === "chatcluster:ready") {
      window.readySeen = true;
      e.source.postMessage({type: "chatcluster:init", login: {user: "{user}", name: "Victim"}, store: {}}, "*");
    }
  });
</script>
<iframe id="chat" src="{src}" style="width:400px;height:500px"
  onload="this.contentWindow.postMessage({type: 'chatcluster:login', user: '{user}', name: 'Victim'}, '*')"></iframe>
"""


class HostApp:
    """A stand-in host application on an origin of its own: GET /frame?src=URL&user=ID serves
    FRAMING_PAGE; any other path serves ``pages[path]``."""

    def __init__(self) -> None:
        self.pages: dict[str, str] = {}
        pages = self.pages

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                from urllib.parse import parse_qs, urlsplit

                parts = urlsplit(self.path)
                if parts.path == "/frame":
                    q = {k: v[0] for k, v in parse_qs(parts.query).items()}
                    html = FRAMING_PAGE.replace("{src}", q["src"]).replace("{user}", q["user"])
                else:
                    html = pages.get(parts.path, "<!doctype html><title>empty</title>")
                body = html.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.origin = f"http://localhost:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def embed_env(*hosts: str) -> dict[str, str]:
    """Node settings that allow ``hosts`` to embed the chat. An explicit CHAT_ALLOWED_ORIGINS
    must also name the node's own origin (its page talks to its WebSocket and API), so the
    ports are chosen here rather than by the node."""
    http_port, ws_port = free_port(), free_port()
    return {"CHAT_HTTP_PORT": str(http_port), "CHAT_WS_PORT": str(ws_port),
            "CHAT_ALLOWED_ORIGINS": ",".join([f"http://127.0.0.1:{http_port}", *hosts])}


@pytest.fixture
def hosts() -> Iterator[tuple[HostApp, HostApp]]:
    allowed, foreign = HostApp(), HostApp()
    yield allowed, foreign
    allowed.close()
    foreign.close()


def chat_frame(page: Any, node: Any) -> Any:
    """The frame of ``page`` that holds (or was meant to hold) the chat."""
    page.wait_for_function("document.getElementById('chat') && document.getElementById('chat').contentWindow")
    handle = page.query_selector("#chat")
    frame = handle.content_frame()
    assert frame is not None
    return frame


def open_framed(ctx: Any, host: HostApp, node: Any, path: str, user: str,
                sockets: list[str] | None = None) -> tuple[Any, Any]:
    page = ctx.new_page()
    if sockets is not None:
        page.on("websocket", lambda ws: sockets.append(ws.url))
    from urllib.parse import quote

    page.goto(f"{host.origin}/frame?src={quote(node.http_url + path, safe='')}&user={user}")
    return page, chat_frame(page, node)


SETTLED = ("document.body && (document.body.dataset.frame === 'refused'"
           " || (window.chat && ['online', 'polling'].includes(window.chat.status)))")


@pytest.mark.parametrize("path", ["/?embed=1", "/static/index.html?embed=1"])
def test_a_foreign_parent_cannot_log_the_embedded_chat_in(start_nodes: Any, contexts: Any, hosts: Any,
                                                          path: str) -> None:
    allowed, foreign = hosts
    (node,) = start_nodes(1, **embed_env(allowed.origin))

    # The foreign host: whatever it posts, the chat does not sign in, opens no socket, and tells
    # the foreign page nothing (not even `ready`). "/" is not even rendered there (frame-ancestors,
    # see the next test); /static/index.html is, and app.js refuses the parent itself.
    sockets: list[str] = []
    page, frame = open_framed(contexts(), foreign, node, "/static/index.html?embed=1", "mallory", sockets)
    frame.wait_for_function(SETTLED)
    assert frame.evaluate("window.chat === undefined"), "a foreign parent signed the chat in"
    assert sockets == []
    assert page.evaluate("window.readySeen") is False
    assert frame.evaluate("document.body.dataset.frame") == "refused"
    # A login posted after the refusal is ignored as well.
    page.evaluate("document.getElementById('chat').contentWindow.postMessage("
                  "{type: 'chatcluster:login', user: 'mallory', name: 'M'}, '*')")
    frame.wait_for_function("document.querySelector('.frame-refused') !== null")
    assert frame.evaluate("window.chat === undefined")
    assert frame.evaluate("document.getElementById('app').hidden && document.getElementById('login').hidden")
    assert sockets == []

    # The allowed host: the frame loads, takes the login, and is online as that user.
    page, frame = open_framed(contexts(), allowed, node, path, "erin")
    frame.wait_for_function(SETTLED)
    assert frame.evaluate("window.chat && window.chat.userId") == "erin"
    assert frame.evaluate("document.body.dataset.frame") == "trusted"
    assert page.evaluate("window.readySeen") is True


def test_frame_ancestors_lets_only_allowed_origins_frame_the_demo_page(start_nodes: Any, contexts: Any,
                                                                        hosts: Any) -> None:
    allowed, foreign = hosts
    (node,) = start_nodes(1, **embed_env(allowed.origin))

    page, frame = open_framed(contexts(), allowed, node, "/?embed=1", "erin")
    frame.wait_for_function(SETTLED)
    assert frame.evaluate("window.chat.userId") == "erin"

    # A foreign origin framing "/": chromium refuses to render it at all (an error page in the
    # frame, not the chat), whatever app.js would have done.
    page = contexts().new_page()
    console: list[str] = []
    page.on("console", lambda msg: console.append(msg.text))
    from urllib.parse import quote

    page.goto(f"{foreign.origin}/frame?src={quote(node.http_url + '/?embed=1', safe='')}&user=mallory")
    frame = chat_frame(page, node)
    page.wait_for_function("document.readyState === 'complete'")  # the frame's load event too
    assert not frame.url.startswith(node.http_url), f"a foreign origin framed the chat: {frame.url}"
    assert frame.evaluate("typeof window.chat") == "undefined"
    assert page.evaluate("window.readySeen") is False
    if not any("frame-ancestors" in text for text in console):  # chromium's report of the refusal
        page.wait_for_event("console", predicate=lambda m: "frame-ancestors" in m.text, timeout=5_000)


# Markup in every attribute a host might fill from its own (user-controlled) data.
HOSTILE_LABEL = "Chat<img src=x onerror=\"window.pwned='label'\">'><img src=x onerror=\"window.pwned='quote'\">"
HOSTILE_COLOR = "red}</style><img src=x onerror=\"window.pwned='color'\"><style>"


def test_hostile_widget_attributes_are_shown_as_text(start_nodes: Any, contexts: Any, hosts: Any) -> None:
    allowed, _ = hosts
    (node,) = start_nodes(1, **embed_env(allowed.origin))
    import html

    allowed.pages["/hostile"] = (
        "<!doctype html><title>Host app</title><h1>Host</h1>"
        f'<script src="{node.http_url}/static/widget.js" data-user="erin" data-name="Erin"'
        f' data-label="{html.escape(HOSTILE_LABEL)}" data-color="{html.escape(HOSTILE_COLOR)}" async></script>')
    allowed.pages["/colour"] = (
        "<!doctype html><title>Host app</title>"
        f'<script src="{node.http_url}/static/widget.js" data-user="erin" data-color="rgb(1, 2, 3)" async></script>')

    page = contexts().new_page()
    page.goto(allowed.origin + "/hostile")
    page.locator("#chatcluster-widget .launcher").wait_for(state="attached")
    # The chat inside still works (so the widget did all its work, the iframe included).
    page.frame_locator("#chatcluster-widget iframe").locator("#status[data-status=online]").wait_for(state="attached")
    shadow = "document.getElementById('chatcluster-widget').shadowRoot"
    assert page.evaluate(f"{shadow}.querySelectorAll('img').length") == 0
    assert page.evaluate(f"{shadow}.querySelector('.launcher').getAttribute('aria-label')") == "Open " + HOSTILE_LABEL
    assert page.evaluate(f"{shadow}.querySelector('.panel').getAttribute('aria-label')") == HOSTILE_LABEL
    assert page.evaluate(f"{shadow}.querySelector('iframe').title") == HOSTILE_LABEL
    assert page.evaluate(f"{shadow}.querySelectorAll('style').length") == 1
    # Opening and closing still find their nodes; no handler of the injected markup ever ran.
    page.click("#chatcluster-widget .launcher")
    page.wait_for_function(f"{shadow}.querySelector('.launcher').getAttribute('aria-expanded') === 'true'")
    assert page.evaluate("window.pwned === undefined")
    # The hostile colour was not a colour: the default stays.
    assert page.evaluate(f"getComputedStyle({shadow}.querySelector('.launcher')).backgroundColor") == "rgb(79, 70, 229)"

    # A real colour still applies.
    page.goto(allowed.origin + "/colour")
    page.locator("#chatcluster-widget .launcher").wait_for(state="attached")
    assert page.evaluate(f"getComputedStyle({shadow}.querySelector('.launcher')).backgroundColor") == "rgb(1, 2, 3)"
