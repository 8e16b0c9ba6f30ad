"""What the node says of itself: draining, event-loop lag, load. Shared by the transports
(refusing handshakes, asking polls to come back later) without giving them the node."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class NodeStatus:
    max_connections: int
    draining: bool = False
    loop_lag: float = 0.0  # seconds, last sample
    connections: Callable[[], int] = field(default=lambda: 0)  # open WebSocket connections

    def load_factor(self) -> float:
        """>1 when the node is busy: polling clients are asked to come back later."""
        factor = 1.0
        if self.loop_lag > 0.1:
            factor = 1.0 + min(3.0, self.loop_lag / 0.1)
        if self.connections() > 0.9 * self.max_connections:
            factor = max(factor, 2.0)
        return factor
