"""chatcluster node: a stateless WebSocket chat node on Redis Streams."""

__version__ = "0.1.0"
