"""An asyncio Python client for chatcluster, used by the tests, the CLI and the load tools.

    async with ChatClient(["ws://127.0.0.1:8000/ws"], user="alice") as chat:
        await chat.send("general", "hello")
        event = await chat.next_event("message")

It keeps a cursor per room (epoch + last message id) and the personal cursor; when the
connection drops it reconnects with jittered exponential backoff (to the next URL of its list,
as a load balancer would), says ``hello`` with its cursors and so receives exactly the missed
messages. Sends that were not acknowledged are sent again with the same ``cmid``, which the
server deduplicates. Close codes 4500-4999 stop the client (user action needed).

With ``token_provider`` (an async callable returning a fresh JWT for the same user) the client
answers the server's ``token_expiring`` event with a ``refresh`` command, and reconnects with
the newest token.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


def _retry_after_s(value: str | None) -> float:
    """A refused handshake's ``Retry-After`` in seconds (delta-seconds only; capped at 60)."""
    try:
        return min(60.0, max(0.0, float(value))) if value else 0.0
    except ValueError:
        return 0.0


class ChatClientError(Exception):
    """An error reply from the server."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(Exception):
    """The connection dropped before the reply arrived."""


class Closed(Exception):
    """The client stopped for good (close code 4500-4999, or ``close()``)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"closed: {code} {reason}")
        self.code = code
        self.reason = reason


class ChatClient:
    def __init__(self, urls: str | Sequence[str], *, user: str | None = None, name: str | None = None,
                 token: str | None = None, cursors: dict[str, dict[str, str]] | None = None,
                 personal: dict[str, str] | None = None, reconnect: bool = True,
                 backoff_min: float = 0.05, backoff_max: float = 5.0, max_events: int = 100_000,
                 open_timeout: float = 10.0, client_name: str = "chatcluster-py/0.1",
                 token_provider: Callable[[], Awaitable[str]] | None = None,
                 ping_interval: float | None = 20.0, ping_timeout: float | None = 20.0) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self.user, self.name, self.token = user, name, token
        self.token_provider = token_provider
        self.refreshes = 0
        self._refresh_task: asyncio.Task[None] | None = None
        self.cursors: dict[str, dict[str, str]] = dict(cursors or {})
        self.personal: dict[str, str] | None = personal
        self.reconnect = reconnect
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self.open_timeout = open_timeout
        # Keepalive: a node that stops answering pings (hung, or a dead network path that sends
        # no RST) is given up after ping_interval + ping_timeout, and the client fails over.
        self.ping_interval, self.ping_timeout = ping_interval, ping_timeout
        self.client_name = client_name
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(max_events)
        self.welcome: dict[str, Any] | None = None
        self.welcomes = 0
        self.close_codes: list[int | None] = []
        self._url_index = 0
        self._refs = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ws: ClientConnection | None = None
        self._connected = asyncio.Event()
        self._closed: Closed | None = None
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.get_running_loop().create_future()
        self._retry_after = 0.0

    # -- lifecycle ------------------------------------------------------------------------
    async def __aenter__(self) -> ChatClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> dict[str, Any]:
        """Connect and wait for the first ``welcome``."""
        self._task = asyncio.get_running_loop().create_task(self._run())
        return await self._first

    async def close(self) -> None:
        self.reconnect = False
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        if self._closed is None:
            self._closed = Closed(1000, "client closed")
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    @property
    def url(self) -> str:
        return self.urls[self._url_index % len(self.urls)]

    def hello_frame(self) -> dict[str, Any]:
        hello: dict[str, Any] = {"type": "hello", "client": self.client_name}
        if self.token:
            hello["token"] = self.token
        else:
            hello["user"] = self.user
            if self.name:
                hello["name"] = self.name
        if self.cursors:
            hello["cursors"] = self.cursors
        if self.personal:
            hello["personal"] = self.personal
        return hello

    async def _run(self) -> None:
        backoff = self.backoff_min
        while True:
            try:
                await self._session()
                backoff = self.backoff_min
            except asyncio.CancelledError:
                raise
            except Closed as exc:
                self._finish(exc)
                return
            except (OSError, ConnectionClosed, InvalidStatus, TimeoutError, ConnectionLost) as exc:
                if isinstance(exc, ConnectionClosed):
                    self.close_codes.append(exc.rcvd.code if exc.rcvd else None)
                elif isinstance(exc, InvalidStatus):  # 503 overloaded/draining, 429: a floor
                    self._retry_after = _retry_after_s(exc.response.headers.get("Retry-After"))
                if not self.reconnect:
                    self._finish(Closed(None, type(exc).__name__))
                    return
            finally:
                self._ws = None
                self._connected.clear()
                for fut in self._pending.values():
                    if not fut.done():
                        fut.set_exception(ConnectionLost())
                self._pending.clear()
            if not self.reconnect:
                self._finish(self._closed or Closed(None))
                return
            self._url_index += 1
            delay = max(self._retry_after, random.uniform(0, backoff))  # full jitter
            self._retry_after = 0.0
            await asyncio.sleep(delay)
            backoff = min(self.backoff_max, backoff * 2)

    def _finish(self, exc: Closed) -> None:
        self._closed = exc
        if not self._first.done():
            self._first.set_exception(exc)
        with contextlib.suppress(asyncio.QueueFull):
            self.events.put_nowait({"type": "_closed", "code": exc.code, "reason": exc.reason})

    async def _session(self) -> None:
        async with connect(self.url, open_timeout=self.open_timeout, max_size=2**24,
                           compression=None, ping_interval=self.ping_interval,
                           ping_timeout=self.ping_timeout, close_timeout=2) as ws:
            self._ws = ws
            await ws.send(orjson.dumps(self.hello_frame()).decode())
            try:
                async for raw in ws:
                    self._on_frame(orjson.loads(raw))
            except ConnectionClosed:
                pass
            code = ws.close_code
            self.close_codes.append(code)
            if code is not None and 4500 <= code <= 4999:
                raise Closed(code, ws.close_reason or "")
            raise ConnectionLost()

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "reply":
            fut = self._pending.pop(frame.get("ref"), None)  # type: ignore[arg-type]
            if fut is not None and not fut.done():
                fut.set_result(frame)
            return
        if kind == "welcome":
            self.welcome = frame
            self.welcomes += 1
            for room in frame.get("rooms", []):
                cursor = self.cursors.get(room["id"])
                recovered = frame.get("recovered", {}).get(room["id"])
                if cursor is None or cursor.get("epoch") != room["epoch"] or recovered is False:
                    # No resumable cursor: start from where live delivery starts.
                    self.cursors[room["id"]] = {"epoch": room["epoch"], "id": room["last_id"]}
            personal = frame.get("personal")
            if isinstance(personal, dict) and "epoch" in personal:
                if not self.personal or self.personal.get("epoch") != personal["epoch"]:
                    self.personal = {"epoch": personal["epoch"], "id": personal.get("last_id", "0-0")}
            self._connected.set()
            if not self._first.done():
                self._first.set_result(frame)
        elif kind == "message":
            room = frame["room"]
            cursor = self.cursors.get(room)
            if cursor is not None:
                cursor["id"] = frame["id"]
        elif kind in ("edit", "delete") and "entry_id" in frame:
            # An edit or delete is an entry of its own: the cursor moves to it, not to `id`.
            cursor = self.cursors.get(frame["room"])
            if cursor is not None:
                cursor["id"] = frame["entry_id"]
        elif kind == "room" and isinstance(frame.get("room"), dict):
            room = frame["room"]
            if frame.get("change") == "removed":
                self.cursors.pop(room.get("id"), None)
            elif "epoch" in room:
                self.cursors[room["id"]] = {"epoch": room["epoch"], "id": room.get("last_id", "0-0")}
        elif kind == "reconnect":
            self._retry_after = frame.get("retry_after_ms", 0) / 1000.0
        elif kind == "token_expiring" and self.token_provider is not None:
            if self._refresh_task is None or self._refresh_task.done():
                self._refresh_task = asyncio.get_running_loop().create_task(self._refresh())
        if "pid" in frame and self.personal is not None:
            self.personal["id"] = frame["pid"]
        try:
            self.events.put_nowait(frame)
        except asyncio.QueueFull:
            pass  # the application is not consuming; drop rather than grow without bound

    async def _refresh(self) -> None:
        """Fetch a new token and hand it to the server; a failure leaves the server to close the
        connection (4500) when the refresh window ends."""
        assert self.token_provider is not None
        try:
            token = await self.token_provider()
            self.token = token
            await self.request("refresh", token=token)
            self.refreshes += 1
        except (ChatClientError, ConnectionLost, TimeoutError, Closed):
            pass

    # -- requests -------------------------------------------------------------------------
    async def wait_connected(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def request(self, kind: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """Send one command and return its reply's ``data``; raises :class:`ChatClientError`."""
        if self._closed is not None:
            raise self._closed
        await asyncio.wait_for(self._connected.wait(), timeout)
        ws = self._ws
        if ws is None:
            raise ConnectionLost()
        ref = next(self._refs)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[ref] = fut
        try:
            await ws.send(orjson.dumps({"type": kind, "ref": ref, **fields}).decode())
        except ConnectionClosed:
            self._pending.pop(ref, None)
            raise ConnectionLost() from None
        reply = await asyncio.wait_for(fut, timeout)
        if not reply.get("ok"):
            error = reply.get("error") or {}
            raise ChatClientError(error.get("code", "internal"), error.get("message", ""))
        return reply.get("data") or {}

    async def send(self, room: str, text: str, cmid: str | None = None, timeout: float = 30.0) -> dict[str, Any]:
        """Send a message; across reconnects it is retried with the same ``cmid`` until acked."""
        cmid = cmid or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                return await self.request("send", timeout=max(0.1, deadline - loop.time()),
                                          room=room, text=text, cmid=cmid)
            except (ConnectionLost, TimeoutError):
                if loop.time() >= deadline or self._closed is not None:
                    raise
                await asyncio.sleep(0.01)
            except ChatClientError as exc:
                if exc.code not in ("rate_limited", "unavailable") or loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.2 * (0.5 + random.random()))

    async def edit(self, room: str, message_id: str, text: str, timeout: float = 10.0) -> dict[str, Any]:
        """Replace the text of one's own message: ``{id, edited_at}``."""
        return await self.request("edit", timeout=timeout, room=room, id=message_id, text=text)

    async def delete(self, room: str, message_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """Delete one's own message (or any, as the room's owner or an admin): ``{id}``."""
        return await self.request("delete", timeout=timeout, room=room, id=message_id)

    async def history(self, room: str, *, before: str | None = None, after: str | None = None,
                      limit: int = 50) -> dict[str, Any]:
        fields: dict[str, Any] = {"room": room, "limit": limit}
        if before:
            fields["before"] = before
        if after:
            fields["after"] = after
        return await self.request("history", **fields)

    async def next_event(self, kind: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
        """The next event (of ``kind``, skipping others)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            event = await asyncio.wait_for(self.events.get(), max(0.0, deadline - loop.time()))
            if kind is None or event.get("type") == kind:
                return event

    def drain_events(self) -> list[dict[str, Any]]:
        out = []
        while not self.events.empty():
            out.append(self.events.get_nowait())
        return out
