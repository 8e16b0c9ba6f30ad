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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow fault tests (the reconnect storm saturates both cores for half a minute, which would
    starve the other xdist worker's tests) run only when asked: ``CHAT_TEST_SLOW=1`` or
    ``-m slow``."""
    import os

    if os.environ.get("CHAT_TEST_SLOW") == "1" or "slow" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="slow: set CHAT_TEST_SLOW=1 or -m slow")
    here = Path(__file__).parent
    for item in items:
        if item.get_closest_marker("slow") and here in Path(str(item.fspath)).parents:
            item.add_marker(skip)
