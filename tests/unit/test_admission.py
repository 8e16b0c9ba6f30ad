"""Admission control at the WebSocket handshake (WsServer.process_request), without sockets:
a node whose hellos queue refuses new handshakes with 503 + a jittered Retry-After."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.protocol import State

from node import config
from node.metrics import METRICS
from node.sink import Flusher
from node.status import NodeStatus
from node.supervise import ThrottledLog
from node.ws import WsServer

OVERLOADED = METRICS.hello_rejected.labels(reason="overloaded")


class FakeWs:
    def __init__(self, n: int) -> None:
        self.remote_address = (f"10.0.0.{n % 250}", 40000 + n)
        self.state = State.CONNECTING

    def respond(self, status: HTTPStatus, text: str) -> Response:
        return Response(status.value, status.phrase, Headers(), text.encode())


def server(**env: Any) -> WsServer:
    settings = config.load({"CHAT_AUTH": "dev", **{k: str(v) for k, v in env.items()}})
    return WsServer(settings, None, None, None, None, NodeStatus(settings.max_connections),  # type: ignore[arg-type]
                    Flusher(), ThrottledLog(logging.getLogger("test")))


def handshake(ws_server: WsServer, ws: FakeWs) -> Response | None:
    return ws_server.process_request(ws, Request("/ws", Headers()))  # type: ignore[arg-type]


def test_hellos_in_progress_are_bounded_until_welcomes_are_sent():
    s = server(CHAT_MAX_HELLOS_IN_PROGRESS=3, CHAT_ADMISSION_RETRY_AFTER_S=4)
    admitted = [FakeWs(i) for i in range(3)]
    assert all(handshake(s, ws) is None for ws in admitted)
    before = OVERLOADED._value.get()
    refused = [handshake(s, FakeWs(10 + i)) for i in range(20)]
    assert all(r is not None and r.status_code == 503 for r in refused)
    assert {int(r.headers["Retry-After"]) for r in refused if r} <= {1, 2, 3, 4}
    assert len({r.headers["Retry-After"] for r in refused if r}) > 1, "Retry-After is jittered"
    assert OVERLOADED._value.get() - before == 20
    assert b"\nchatcluster_hellos_in_progress 3.0\n" in METRICS.render()

    s.hellos.discard(admitted[0])  # its welcome was sent
    assert handshake(s, FakeWs(30)) is None
    admitted[1].state = State.CLOSED  # went away mid-handshake: its handler never runs
    assert handshake(s, FakeWs(31)) is None
    assert handshake(s, FakeWs(32)) is not None


def test_event_loop_lag_over_the_bound_refuses_handshakes():
    s = server(CHAT_ADMISSION_MAX_LAG_MS=500)
    s.status.loop_lag = 0.6  # type: ignore[misc]
    response = handshake(s, FakeWs(1))
    assert response is not None and response.status_code == 503 and "Retry-After" in response.headers
    s.status.loop_lag = 0.4  # type: ignore[misc]
    assert handshake(s, FakeWs(2)) is None


def test_zero_disables_both_bounds():
    s = server(CHAT_MAX_HELLOS_IN_PROGRESS=0, CHAT_ADMISSION_MAX_LAG_MS=0)
    s.status.loop_lag = 5.0  # type: ignore[misc]
    assert all(handshake(s, FakeWs(i)) is None for i in range(300))
