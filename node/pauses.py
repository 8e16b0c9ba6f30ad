"""Pause points: named awaits where a test can hold a coroutine to force an interleaving.

Races between a session being opened, a membership change, a connection closing and a reader
falling behind are tested deterministically: the test arms a point, waits until the code under
test has reached it, does the interfering thing, and releases it. Nothing sleeps and hopes.

In production no point is armed: :meth:`PausePoints.point` is one dict lookup on a handful of
non-hot awaits (opening a session, applying a membership change, a shard read).

Usage in a test (with a node running in the test's event loop)::

    gate = node.pauses.arm("session.rooms_read")
    task = asyncio.create_task(do_hello())
    await gate.reached()          # the hello is held right after reading the user's rooms
    ...                           # change the user's rooms meanwhile
    gate.release()
"""

from __future__ import annotations

import asyncio


class Gate:
    """One armed point: ``reached`` fires when a coroutine arrives, which then waits for
    ``release`` (unless the gate only observes: ``hold=False``). Holds once, then lets every
    later arrival through (so a loop that passes the point again is not stuck)."""

    def __init__(self, hold: bool) -> None:
        self._reached = asyncio.Event()
        self._released = asyncio.Event()
        self.hits = 0
        if not hold:
            self._released.set()

    async def _arrive(self) -> None:
        self.hits += 1
        first = not self._reached.is_set()
        self._reached.set()
        if first:
            await self._released.wait()

    async def reached(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self._reached.wait(), timeout)

    def release(self) -> None:
        self._released.set()


class PausePoints:
    def __init__(self) -> None:
        self._armed: dict[str, Gate] = {}

    def arm(self, name: str, hold: bool = True) -> Gate:
        gate = self._armed[name] = Gate(hold)
        return gate

    def disarm(self, name: str) -> None:
        """Later arrivals pass freely; a coroutine already held stays held until released."""
        self._armed.pop(name, None)

    async def point(self, name: str) -> None:
        """A place a test may hold; free when nothing is armed there."""
        gate = self._armed.get(name)
        if gate is not None:
            await gate._arrive()
