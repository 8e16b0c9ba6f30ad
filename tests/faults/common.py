"""Helpers of the fault suite: senders that count their acks, exact-sequence checks, a
bandwidth-throttling TCP proxy, and metric reads.

Every wait has a deadline; progress is signalled with conditions, never guessed with sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from typing import Any

import aiohttp

from node.client import ChatClient
from node.protocol import stream_id_tuple


class Sender:
    """Sends to ``room`` in a loop (each send retried with its cmid until acked) and records
    every ack; tests wait for progress with :meth:`until`."""

    def __init__(self, client: ChatClient, tag: str, room: str = "general", size: int = 0,
                 interval: float = 0.005) -> None:
        self.client, self.tag, self.room = client, tag, room
        self.interval = interval  # pacing, so a failover's gap stays within CHAT_REPLAY_LIMIT
        self.pad = "." * size
        self.acked: list[dict[str, Any]] = []
        self._progress = asyncio.Condition()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Sender:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            reply = await self.client.send(self.room, f"{self.tag}-{i}{self.pad}", timeout=30)
            i += 1
            if self.interval:
                await asyncio.sleep(self.interval)  # the send rate, not synchronisation
            async with self._progress:
                self.acked.append(reply)
                self._progress.notify_all()

    async def until(self, n: int, within: float = 20.0) -> None:
        """Wait until ``n`` sends were acked in total."""
        async with asyncio.timeout(within), self._progress:
            await self._progress.wait_for(lambda: len(self.acked) >= n or (self._task is not None and self._task.done()))
        if self._task is not None and self._task.done():
            self._task.result()  # a sender that died says why

    async def more(self, n: int, within: float = 20.0) -> None:
        await self.until(len(self.acked) + n, within)

    async def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 30)
        return self.acked


class Tracker:
    """Consumes a ChatClient's events as they come, keeping its messages and welcomes, so a test
    can wait for a reconnect without throwing away the messages that arrive meanwhile."""

    def __init__(self, client: ChatClient) -> None:
        self.client = client
        self.user = client.user
        self.messages: list[dict[str, Any]] = []
        self.welcomes: list[dict[str, Any]] = []
        self.welcome_at: list[int] = []  # len(messages) when each welcome arrived
        self._changed = asyncio.Condition()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            event = await self.client.events.get()
            async with self._changed:
                if event.get("type") == "message":
                    self.messages.append(event)
                elif event.get("type") == "welcome":
                    self.welcomes.append(event)
                    self.welcome_at.append(len(self.messages))
                self._changed.notify_all()

    async def until(self, predicate: Any, what: str, within: float = 15.0) -> None:
        try:
            async with asyncio.timeout(within), self._changed:
                await self._changed.wait_for(lambda: predicate(self))
        except TimeoutError:
            raise AssertionError(f"{self.user}: no {what} within {within} s (messages "
                                 f"{len(self.messages)}, welcomes {len(self.welcomes)}, close codes "
                                 f"{self.client.close_codes})") from None

    async def exact(self, ids: list[str], room: str = "general", within: float = 20.0) -> None:
        """Exactly ``ids`` of ``room`` were received, in order, once each (the client's first
        welcome counts: nothing from before it is expected)."""
        def in_room(t: Tracker) -> list[str]:
            return [m["id"] for m in t.messages if m["room"] == room]

        await self.until(lambda t: len(in_room(t)) >= len(ids), f"{len(ids)} messages", within)
        got = in_room(self)
        if got != ids:
            missing = [i for i in ids if i not in set(got)]
            dups = sorted({i for i in got if got.count(i) > 1})
            raise AssertionError(f"{self.user}: {len(missing)} missing (first {missing[:3]}), "
                                 f"{len(got) - len(ids)} extra, duplicates {dups[:3]}")

    def stop(self) -> None:
        self._task.cancel()


def expected_ids(*senders: Sender) -> list[str]:
    ids = sorted((m["id"] for s in senders for m in s.acked), key=stream_id_tuple)
    assert len(set(ids)) == len(ids), "two acks with one id: a retried send was appended twice"
    return ids


async def room_messages(client: ChatClient, n: int, room: str = "general",
                        within: float = 20.0) -> list[dict[str, Any]]:
    """The next ``n`` messages of ``room`` the client received."""
    got: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(within):
            while len(got) < n:
                event = await client.next_event("message", timeout=within)
                if event["room"] == room:
                    got.append(event)
    except TimeoutError:
        raise AssertionError(f"{client.user}: {len(got)} of {n} messages within {within} s "
                             f"(welcomes {client.welcomes}, close codes {client.close_codes}, "
                             f"recovered {client.welcome and client.welcome.get('recovered')})") from None
    return got


async def assert_exact_sequence(client: ChatClient, ids: list[str], room: str = "general") -> None:
    """The client received exactly ``ids``, in order, once each, and nothing else after them."""
    got = await room_messages(client, len(ids), room)
    got_ids = [m["id"] for m in got]
    if got_ids != ids:
        missing = sorted(set(ids) - set(got_ids), key=stream_id_tuple)
        dups = sorted({i for i in got_ids if got_ids.count(i) > 1})
        raise AssertionError(f"{client.user}: {len(missing)} missing (first {missing[:3]}), "
                             f"duplicates {dups[:3]}, in order: {got_ids == sorted(got_ids, key=stream_id_tuple)}")
    seqs = [m["seq"] for m in got]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"{client.user}: seq gaps"
    late = [e for e in client.drain_events() if e.get("type") == "message" and e.get("room") == room]
    assert not late, f"{client.user}: {len(late)} more messages than were sent (duplicates)"


async def metric(http_url: str, name: str, http: aiohttp.ClientSession | None = None) -> float:
    """One sample of a node's /metrics (exact name with labels, 0 if absent)."""
    async with contextlib.AsyncExitStack() as stack:
        if http is None:
            http = await stack.enter_async_context(aiohttp.ClientSession())
        async with http.get(http_url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as response:
            text = await response.text()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def wait_ready(http_url: str, status: int = 200, within: float = 10.0) -> None:
    """Poll ``/readyz`` until it answers ``status`` (polling an HTTP condition, with a deadline)."""
    async with aiohttp.ClientSession() as http, asyncio.timeout(within):
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(http_url + "/readyz", timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == status:
                        return
            await asyncio.sleep(0.05)


class ThrottledProxy:
    """A TCP proxy standing for a slow network link between clients and one node.

    Client -> node bytes pass untouched; node -> client bytes are paced at ``rate`` bytes/s.
    The proxy reads from the node only as fast as it forwards, with a small receive buffer on
    its node-side socket, so the node sees the back-pressure a real slow link gives it.
    ``reset()`` drops every proxied connection at once, the way a dying link does.
    """

    def __init__(self, host: str, port: int, rate: float, chunk: int = 512, rcvbuf: int = 4096) -> None:
        self.target = (host, port)
        self.rate, self.chunk, self.rcvbuf = rate, chunk, rcvbuf
        self.server: asyncio.Server | None = None
        self.port = 0
        self.bytes_down = 0
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def __aenter__(self) -> ThrottledProxy:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self._writers):  # the pipes end on the broken sockets
            writer.transport.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)  # before connect: small window
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.target)
            n_reader, n_writer = await asyncio.open_connection(sock=sock, limit=self.chunk)
        except OSError:
            sock.close()
            c_writer.close()
            self._tasks.discard(task)
            return
        c_writer.transport.set_write_buffer_limits(high=self.chunk)
        self._writers.update((c_writer, n_writer))
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pipe(c_reader, n_writer, throttle=False))
                tg.create_task(self._pipe(n_reader, c_writer, throttle=True))
        except* (OSError, EOFError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in (c_writer, n_writer):
                writer.transport.abort()
                self._writers.discard(writer)
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, throttle: bool) -> None:
        loop = asyncio.get_running_loop()
        started, sent = loop.time(), 0
        while True:
            data = await reader.read(self.chunk if throttle else 65536)
            if not data:
                raise EOFError
            if throttle:
                sent += len(data)
                self.bytes_down += len(data)
                # Bandwidth shaping (the link's speed), not synchronisation.
                await asyncio.sleep(max(0.0, started + sent / self.rate - loop.time()))
            writer.write(data)
            await writer.drain()


async def wait_for_states(lb: Any, want: dict[str, str], within: float = 10.0) -> None:
    """Poll HAProxy's stats until each named server has the wanted status in both backends."""
    from tests.ops.haproxy import server_states

    states: dict[Any, Any] = {}
    try:
        async with aiohttp.ClientSession() as http, asyncio.timeout(within):
            while True:
                async with http.get(lb.stats_url) as response:
                    states = server_states(await response.text())
                if all(states[(backend, name)]["status"] == status
                       for name, status in want.items() for backend in ("ws", "http")):
                    return
                await asyncio.sleep(0.05)  # polling HAProxy's view, with a deadline
    except TimeoutError:
        seen = {key: row["status"] for key, row in states.items()}
        raise AssertionError(f"HAProxy never saw {want}: {seen}") from None


class ParallelNodes:
    """Starts nodes concurrently (a node takes about a second to import and bind, and the fault
    tests need several) on the test's Redis; every one is stopped by :meth:`stop_all`."""

    def __init__(self, redis_url: str, log_dir: Any) -> None:
        self.redis_url, self.log_dir = redis_url, log_dir
        self.started: list[Any] = []
        self._count = 0

    async def start(self, n: int = 1, **env: Any) -> list[Any]:
        from node.embedded import start_node
        from tests.conftest import BASE_ENV, NodeHandle

        def one(i: int) -> Any:
            full = {**BASE_ENV, "CHAT_REDIS_URL": self.redis_url, "CHAT_NODE_ID": f"node-{i}",
                    **{k: str(v) for k, v in env.items()}}
            proc = start_node(full, name=f"node-{i}", log_path=str(self.log_dir / f"node-{i}.log"))
            return NodeHandle(proc, full)

        first = self._count + 1
        self._count += n
        handles = await asyncio.gather(*(asyncio.to_thread(one, first + k) for k in range(n)))
        self.started.extend(handles)
        return list(handles)

    def stop_all(self) -> None:
        for handle in self.started:
            handle.proc.stop(timeout=5)


OPEN_WS = 'chatcluster_connections_open{transport="ws"}'
