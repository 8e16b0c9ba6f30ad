"""The browser client, the demo page and the widget in a real chromium against real nodes.

No mocks: the pages talk to nodes started as subprocesses on a Redis of their own. Waits are
Playwright waits on conditions (the DOM, network events), never fixed sleeps.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .conftest import Frames, open_chat, send, wait_connected, wait_texts

NO_WEBSOCKET = "delete window.WebSocket; Object.defineProperty(window, 'WebSocket', {value: undefined});"


def http_post(url: str, body: dict[str, Any], api_key: str = "test-api-key") -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def metric(node: Any, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(f"{node.http_url}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_two_users_across_nodes_reload_loses_nothing_and_repeats_nothing(start_nodes: Any, contexts: Any) -> None:
    n1, n2 = start_nodes(2)
    alice = open_chat(contexts(), n1, "alice", "Alice")
    frames = Frames()
    bob_ctx = contexts()
    bob = open_chat(bob_ctx, n2, "bob", "Bob", frames=frames)

    send(alice, "hi bob")
    wait_texts(bob, ["hi bob"])
    send(bob, "hi alice, from node 2")
    wait_texts(alice, ["hi bob", "hi alice, from node 2"])

    # Bob navigates away; Alice keeps talking; Bob comes back (same profile, same node).
    bob.goto("about:blank")
    for i in range(3):
        send(alice, f"while away {i}")
    expected = ["hi bob", "hi alice, from node 2"] + [f"while away {i}" for i in range(3)]
    wait_texts(alice, expected)
    bob = open_chat(bob_ctx, n2, "bob", "Bob", page=bob)
    wait_texts(bob, expected)

    # A reload while a message is on its way, then a switch of node.
    send(alice, "during reload")
    bob.reload()
    wait_connected(bob)
    expected.append("during reload")
    wait_texts(bob, expected)
    # A switch of node (as behind a load balancer: same page origin, same storage, the
    # WebSocket now reaching node 1).
    bob.goto("about:blank")
    send(alice, "after the switch")
    expected.append("after the switch")
    wait_texts(alice, expected)
    bob = open_chat(bob_ctx, n2, "bob", "Bob", page=bob,
                    init_script=f"window.CHATCLUSTER_WS_URL = {json.dumps(n1.ws_url)};")
    wait_texts(bob, expected)
    assert bob.evaluate("chat.welcome_node") == n1.node_id
    send(bob, "bye")
    expected.append("bye")
    wait_texts(alice, expected)
    wait_texts(bob, expected)

    # Every message reached Bob's pages once, over four page loads and two nodes. The one
    # exception allowed: the message that was on the wire when the page unloaded (received by
    # the browser, never by the page's script) is downloaded again after the reload.
    ids = dict(bob.evaluate("[...document.querySelectorAll('#messages li.msg[data-id]')]"
                            ".map(e => [e.querySelector('.text').textContent, e.dataset.id])"))
    twice = frames.twice()
    assert twice <= {ids["during reload"]}, (twice, ids)
    # Every message shown was seen arriving by one of the two witnesses (Frames); the capture of
    # that same frame can be lost by both while the page unloads (the old page's script got it
    # and the new page shows it from its own state).
    missed = set(ids.values()) - frames.received()
    assert missed <= {ids["during reload"]} and frames.received() <= set(ids.values()), (missed, ids)
    assert len(frames.received() | missed) == len(expected)


def wait_polls(page: Any, polls: list[int], count: int) -> None:
    """Wait (on request events, no sleeping) until ``count`` polls were made."""
    while len(polls) < count:
        page.wait_for_event("request", predicate=lambda r: r.url.endswith("/api/v1/poll"), timeout=10_000)


def test_without_websocket_it_chats_by_polling_that_decays_and_snaps_back(start_nodes: Any, contexts: Any) -> None:
    (node,) = start_nodes(1, CHAT_POLL_MIN_MS=200, CHAT_POLL_MAX_MS=1600, CHAT_POLL_UNFOCUSED_MS=200)
    ctx = contexts()
    page = ctx.new_page()
    # Each poll says how long the page waited before making it (``interval_ms``, the value its
    # timer was set to). Those are what the test checks, not wall-clock gaps: on a loaded machine
    # a timer fires late, never early, and a late one says nothing about the decay.
    polls: list[int] = []
    page.on("request", lambda r: polls.append(int(r.post_data_json["interval_ms"]))
            if r.url.endswith("/api/v1/poll") else None)
    alice = open_chat(ctx, node, "alice", "Alice", init_script=NO_WEBSOCKET, page=page)
    assert alice.evaluate("typeof WebSocket") == "undefined"
    assert alice.evaluate("[chat.transport, chat.status]") == ["poll", "polling"]
    bob = open_chat(contexts(), node, "bob", "Bob")

    send(bob, "are you there?")
    wait_texts(alice, ["are you there?"])
    send(alice, "yes, by polling")
    wait_texts(bob, ["are you there?", "yes, by polling"])
    wait_texts(alice, ["are you there?", "yes, by polling"])

    # Idle: the polls space out (x1.5 each, up to the maximum).
    start = len(polls)
    while len(polls) < start + 12 and (len(polls) == start or polls[-1] < 1600):
        wait_polls(alice, polls, len(polls) + 1)
    idle, seen = polls[start:], len(polls)
    while idle[1:2] == [200]:  # the poll after the one that brought the last message
        idle.pop(0)
    assert idle[0] == 200, idle
    # A busy node (loop lag over 100 ms: Status.load_factor) stretches an interval, never
    # shortens it: seen once in CI as 200, 690 (= 300 x 2.3), 1035, 1552, 1600.
    assert all(b >= min(1600, a * 1.5) - 1 for a, b in zip(idle, idle[1:], strict=False)), idle
    assert idle[-1] >= 1600, idle

    # A new message: the poll that brings it resets the interval to the minimum.
    send(bob, "wake up")
    wait_texts(alice, ["are you there?", "yes, by polling", "wake up"])
    wait_polls(alice, polls, len(polls) + 1)
    after = polls[seen:]
    while after and after[0] == 1600:  # idle at the maximum until the poll that brought it
        after.pop(0)
    assert after and after[0] == 200, polls[start:]


def test_two_tabs_of_one_user_share_one_connection(start_nodes: Any, contexts: Any) -> None:
    (node,) = start_nodes(1)
    ctx = contexts()
    sockets: list[Any] = []
    tabs = []
    for _ in range(2):
        page = ctx.new_page()
        page.on("websocket", lambda ws: sockets.append(ws))
        tabs.append(open_chat(ctx, node, "alice", "Alice", page=page))
    first, second = tabs
    assert len(sockets) == 1
    assert metric(node, "chatcluster_connections_open", '{transport="ws"}') == 1
    assert first.evaluate("chat.isLeader") is True
    assert second.evaluate("chat.isLeader") is False

    bob = open_chat(contexts(), node, "bob", "Bob")
    send(second, "from the second tab")  # a follower: sent through the leading tab
    for page in (first, second, bob):
        wait_texts(page, ["from the second tab"])
    send(bob, "to both tabs")
    for page in (first, second):
        wait_texts(page, ["from the second tab", "to both tabs"])

    # The leading tab closes: the other one takes the connection over and resumes.
    first.close()
    second.wait_for_function("chat.isLeader && chat.status === 'online'")
    assert len(sockets) == 2
    send(bob, "after the handover")
    send(second, "still here")
    expected = ["from the second tab", "to both tabs", "after the handover", "still here"]
    wait_texts(second, expected)
    wait_texts(bob, expected)


def test_alert_slides_in_as_a_toast_once(start_nodes: Any, contexts: Any) -> None:
    (node,) = start_nodes(1)
    page = open_chat(contexts(), node, "alice", "Alice")
    status, body = http_post(f"{node.http_url}/api/v1/alerts", {
        "to": ["alice"], "kind": "email", "title": "New mail from Carol", "body": "Quarterly report"})
    assert status == 200, body
    toast = page.locator(".toast", has_text="New mail from Carol")
    toast.wait_for(state="visible")
    page.wait_for_function("document.querySelector('.toast.in .toast-title')?.textContent === 'New mail from Carol'")
    assert "Quarterly report" in toast.inner_text()
    toast.locator(".toast-close").click()
    page.wait_for_function("!document.querySelector('.toast')")  # slid out and removed

    # After a reload the alert is not shown again; a new one is.
    page.reload()
    wait_connected(page)
    http_post(f"{node.http_url}/api/v1/alerts", {"to": ["alice"], "kind": "call", "title": "Missed call from Dan"})
    page.locator(".toast", has_text="Missed call from Dan").wait_for(state="visible")
    assert page.locator(".toast", has_text="New mail from Carol").count() == 0


def test_screenshots_desktop_and_phone(start_nodes: Any, contexts: Any, tmp_path: Path) -> None:
    """Renders the demo page with some life in it (a layout check). With
    CHAT_SCREENSHOTS_DIR=docs/screenshots it refreshes the pictures in the docs."""
    (node,) = start_nodes(1)
    out = Path(os.environ.get("CHAT_SCREENSHOTS_DIR") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    carol = open_chat(contexts(), node, "carol", "Carol Danvers")
    bob = open_chat(contexts(), node, "bob", "Bob Marley")
    conversation = [
        (carol, "Morning all! The new cluster is live on three nodes."),
        (bob, "Nice. Did the failover drill go well?"),
        (carol, "Killed node-2 mid-conversation: clients resumed on node-1 and nothing was lost."),
        (bob, "And nothing twice?"),
        (carol, "Nothing twice. Cursors per room plus the cmid on every send."),
    ]
    for i, (page, text) in enumerate(conversation):
        send(page, text)  # one at a time: two pages sending at once would race for the order
        wait_texts(page, [t for _, t in conversation[: i + 1]])
    wait_texts(bob, [t for _, t in conversation])
    # v1.1 in the picture: an edited message, a deleted one, a mention badge in another room.
    send(carol, "Deploying to the wrong cluster, hold on")
    shown = [t for _, t in conversation]
    wait_texts(carol, shown + ["Deploying to the wrong cluster, hold on"])
    ids = carol.evaluate("[...document.querySelectorAll('#messages li.msg[data-id]')].map(e => e.dataset.id)")
    carol.evaluate("ids => chat.edit('general', ids[2], 'Killed node-2 mid-conversation: clients resumed on node-1, "
                   "nothing lost.').then(() => chat.delete('general', ids[5]))", ids)
    shown[2] = "Killed node-2 mid-conversation: clients resumed on node-1, nothing lost."
    shown.append("Message deleted")
    wait_texts(bob, shown)
    launch = carol.evaluate("chat.createRoom('launch-plan', 'closed', ['alice']).then(d => d.room.id)")
    for page, call in ((carol, "chat.createRoom('design-review', 'open')"),
                       (carol, f"chat.send('{launch}', '@alice the launch checklist is ready for review')"),
                       (bob, "chat.dm('alice')")):
        page.evaluate(f"{call}.catch(() => null)")

    desktop = open_chat(contexts(viewport={"width": 1280, "height": 800}), node, "alice", "Alice Liddell")
    wait_texts(desktop, shown)
    desktop.locator(f"[data-room='{launch}'] .badge.mention").wait_for()
    send(bob, "@alice can you review the widget docs today?")
    desktop.locator("#messages li.msg", has_text="widget docs").wait_for()
    desktop.fill("#input", "Sure, after lunch")
    desktop.evaluate("document.activeElement.blur()")
    for close in desktop.locator(".toast .toast-close").all():
        close.click()
    desktop.wait_for_function("!document.querySelector('.toast')")
    desktop.click("#who-btn")
    desktop.locator("#people-list li", has_text="bob").wait_for()
    desktop.screenshot(path=str(out / "desktop.png"))

    phone = open_chat(contexts(viewport={"width": 390, "height": 844}, device_scale_factor=2,
                               is_mobile=True, has_touch=True), node, "dan", "Dan")
    phone.locator("#messages li.msg", has_text="widget docs").wait_for()
    phone.screenshot(path=str(out / "phone.png"))
    assert (out / "desktop.png").stat().st_size > 10_000
    assert (out / "phone.png").stat().st_size > 10_000


def serve_host_page(html: str | list[str]) -> tuple[str, ThreadingHTTPServer]:
    """A stand-in for the host application: any page, on another origin than the node (``html``
    in a list: read at each request, so it may be completed once the server's origin is known)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            page = html[0] if isinstance(html, list) else html
            body = page.replace("{path}", self.path).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://localhost:{server.server_address[1]}", server


def test_widget_embeds_the_chat_in_a_host_page(start_nodes: Any, contexts: Any) -> None:
    from .test_embed_security import embed_env

    html = ["<!doctype html><title>Host app</title><h1>Host page {path}</h1>"]
    host, server = serve_host_page(html)
    (node,) = start_nodes(1, **embed_env(host))  # only an allowed origin may embed the chat
    html[0] += f'<script src="{node.http_url}/static/widget.js" data-user="erin" data-name="Erin" async></script>'
    try:
        page = contexts().new_page()
        page.goto(host + "/orders")
        chat = page.frame_locator("iframe[title=Chat]")
        chat.locator("#status[data-status=online]").wait_for(state="attached")
        bob = open_chat(contexts(), node, "bob", "Bob")
        send(bob, "hello Erin")
        badge = page.locator("#chatcluster-widget .badge")
        badge.wait_for(state="visible")
        assert badge.inner_text() == "1"

        page.click("#chatcluster-widget .launcher")
        chat.locator("#messages li.msg", has_text="hello Erin").wait_for()
        badge.wait_for(state="hidden")  # opening the panel marks the room read
        chat.locator("#input").fill("hi Bob, from the widget")
        chat.locator("#input").press("Enter")
        wait_texts(bob, ["hello Erin", "hi Bob, from the widget"])

        # Another page of the host application: the panel stays open, the messages are there.
        page.goto(host + "/invoices")
        chat.locator("#messages li.msg", has_text="from the widget").wait_for()
        assert page.locator("#chatcluster-widget .panel.closed").count() == 0
    finally:
        server.shutdown()
