"""Fixtures of the fault suite (the shared ones are in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .common import ParallelNodes


@pytest.fixture
def parallel_nodes(redis_server, tmp_path: Path) -> Iterator[ParallelNodes]:
    """``await parallel_nodes.start(n, **env)``: nodes started concurrently, stopped at teardown."""
    nodes = ParallelNodes(redis_server.url, tmp_path)
    yield nodes
    nodes.stop_all()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a heavy test (over ~20 s); deselect with -m 'not slow'")
