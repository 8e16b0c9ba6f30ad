"""The outbound side of a connection, without sockets: ordering of held and immediate frames,
overflow, and a flusher that survives a broken socket (issue 12)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from websockets.protocol import State

from node.sink import Flusher, Sink


class Transport:
    def __init__(self, broken: bool = False) -> None:
        self.written: list[bytes] = []
        self.broken = broken
        self.reading = True  # False: the client takes nothing, everything stays buffered

    def write(self, data: bytes) -> None:
        if self.broken:
            raise RuntimeError("socket gone")
        self.written.append(data)

    def get_write_buffer_size(self) -> int:
        return 0 if self.reading else sum(map(len, self.written))


class Ws:
    def __init__(self, broken: bool = False) -> None:
        self.transport = Transport(broken)
        self.protocol: Any = type("P", (), {"state": State.OPEN})()


@pytest.fixture
def flusher() -> Flusher:
    return Flusher(asyncio.new_event_loop())


def sink_of(flusher: Flusher, broken: bool = False, limit: int = 1000) -> tuple[Sink, list[str]]:
    events: list[str] = []
    return Sink(Ws(broken), flusher, limit, lambda: events.append("overflow")), events


def test_frames_of_one_tick_leave_in_one_write(flusher):
    sink, _ = sink_of(flusher)
    sink.push(b"a")
    sink.push(b"b")
    flusher.flush()
    assert sink.transport.written == [b"ab"]


def test_held_live_frames_follow_the_replay(flusher):
    sink, _ = sink_of(flusher)
    sink.hold()
    sink.push(b"live1")
    sink.push_now(b"welcome")
    sink.hold()  # holds nest: a second replay
    sink.push_now(b"replay")
    sink.release()
    sink.push(b"live2")
    flusher.flush()
    assert sink.transport.written == [b"welcomereplay"]
    sink.release()
    flusher.flush()
    assert sink.transport.written == [b"welcomereplay", b"live1live2"]


def test_a_client_that_does_not_read_is_cut_off_once(flusher):
    sink, events = sink_of(flusher, limit=10)
    sink.transport.reading = False
    sink.push(b"x" * 8)
    sink.push(b"y" * 8)  # over the limit within one tick: written at once, and not taken
    sink.push(b"z")
    flusher.flush()
    assert events == ["overflow"] and sink.closed and sink.transport.written == [b"x" * 8 + b"y" * 8]


def test_a_burst_larger_than_the_buffer_reaches_a_client_that_reads(flusher):
    sink, events = sink_of(flusher, limit=10)
    for part in (b"x" * 8, b"y" * 8, b"z"):
        sink.push(part)
    flusher.flush()
    assert events == [] and b"".join(sink.transport.written) == b"x" * 8 + b"y" * 8 + b"z"


def test_held_frames_over_the_limit_cut_the_sink_off(flusher):
    sink, events = sink_of(flusher, limit=10)
    sink.hold()
    sink.push(b"x" * 11)
    assert events == ["overflow"] and sink.closed


def test_a_broken_sink_does_not_stop_the_others(flusher):
    broken, events = sink_of(flusher, broken=True)
    fine, _ = sink_of(flusher)
    broken.push(b"1")
    fine.push(b"2")
    flusher.flush()
    assert fine.transport.written == [b"2"]
    assert events == ["overflow"]
    fine.push(b"3")  # marked again: its list was not left behind
    flusher.flush()
    assert fine.transport.written == [b"2", b"3"]
