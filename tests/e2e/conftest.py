"""Real-browser fixtures: Debian's chromium driven by Playwright (never a downloaded browser).

The browser is launched once per test module and worker; every test opens its own contexts
(fresh storage, so each one is a separate browser profile as far as the page can tell) on
nodes of its own. Everything skips with a reason when chromium or playwright is missing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM = os.environ.get("CHAT_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (scripts/test installs Debian's chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright package is missing (pip install -e '.[dev]')")
    with sync_playwright() as pw:
        # Playwright gives every launch a fresh, empty user-data-dir of its own.
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def contexts(browser: Any) -> Iterator[Any]:
    """``contexts()`` makes a new browser context (its own storage); closed at teardown."""
    made: list[Any] = []

    def make(**kwargs: Any) -> Any:
        ctx = browser.new_context(**kwargs)
        ctx.set_default_timeout(15_000)
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.close()


class Frames:
    """Message ids a page received over WebSocket or polling (events, replays, history).

    Two independent witnesses: Playwright's network events (``ids``) and a listener the page's
    own WebSocket gets before the app's (``page_ids``). Either can drop a frame now and then
    (Playwright's frame events under load, the page's binding call while the page unloads),
    so a message counts as received when either saw it, and as received twice when one of them
    saw it twice.
    """

    HOOK = """(() => {
      const W = window.WebSocket;
      if (!W || W.__ccWatched) return;
      class Watched extends W {
        constructor(...args) {
          super(...args);
          this.addEventListener("message", (e) => {
            if (typeof e.data === "string") { try { window.__ccFrame(e.data); } catch (_) {} }
          });
        }
      }
      Watched.__ccWatched = true;
      window.WebSocket = Watched;
    })();"""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.page_ids: list[str] = []
        self._watched: set[int] = set()

    def take(self, data: Any, into: list[str] | None = None) -> None:
        into = self.ids if into is None else into
        if isinstance(data, list):
            for item in data:
                self.take(item, into)
            return
        if not isinstance(data, dict):
            return
        if data.get("type") == "message" and "id" in data:
            into.append(data["id"])
        if data.get("type") == "reply" and isinstance(data.get("data"), dict):
            for m in data["data"].get("messages", []) or []:
                into.append(m["id"])
        for key in ("events",):
            if isinstance(data.get(key), list):
                self.take(data[key], into)

    def received(self) -> set[str]:
        return set(self.ids) | set(self.page_ids)

    def twice(self) -> set[str]:
        return ({i for i in self.ids if self.ids.count(i) > 1}
                | {i for i in self.page_ids if self.page_ids.count(i) > 1})

    def watch(self, page: Any) -> None:
        if id(page) in self._watched:
            return
        self._watched.add(id(page))

        def on_ws(ws: Any) -> None:
            ws.on("framereceived", lambda payload: self.take(_loads(payload)))

        def on_response(resp: Any) -> None:
            if "/api/v1/" in resp.url and resp.request.method == "POST":
                try:
                    self.take(resp.json())
                except Exception:
                    pass

        page.on("websocket", on_ws)
        page.on("response", on_response)
        page.expose_function("__ccFrame", lambda payload: self.take(_loads(payload), self.page_ids))
        page.add_init_script(self.HOOK)


def _loads(payload: Any) -> Any:
    try:
        return json.loads(payload)
    except (TypeError, ValueError):
        return None


def open_chat(ctx: Any, node: Any, user: str, name: str | None = None, *, frames: Frames | None = None,
              init_script: str | None = None, page: Any = None) -> Any:
    """A page of the demo app on ``node``, logged in as ``user``, once it is connected."""
    page = page or ctx.new_page()
    if init_script:
        page.add_init_script(init_script)
    if frames is not None:
        frames.watch(page)
    page.goto(f"{node.http_url}/?user={user}&name={name or user.title()}")
    wait_connected(page)
    return page


def wait_connected(page: Any) -> None:
    page.wait_for_function("window.chat && ['online', 'polling'].includes(window.chat.status)")


def send(page: Any, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


MESSAGE_TEXTS = "[...document.querySelectorAll('#messages li.msg[data-id]:not(.local) .text')].map(e => e.textContent)"


def texts(page: Any) -> list[str]:
    return list(page.evaluate(MESSAGE_TEXTS))


def wait_texts(page: Any, expected: list[str], timeout: float = 15_000) -> None:
    """Wait until the page's message list is exactly ``expected`` (then assert it)."""
    page.wait_for_function(f"exp => JSON.stringify({MESSAGE_TEXTS}) === JSON.stringify(exp)", arg=expected,
                           timeout=timeout)
    assert texts(page) == expected
