"""`python -m loadtest.bench mixed` end to end for ours only, tiny (20 DMs, 10 small rooms, 2 big
rooms of 30, 100 msgs/s, 10 pollers, 5 typists, 4 reconnects/s, 3 s window; ~20 s): every
message reaches every WebSocket client and poller once, in order (the clients' seq checks), and
every part of the mix ran. A lost or duplicated message, a failed reconnect or poll, or a client
that missed a message fails it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("psutil") is None,
                                reason="needs the loadtest extra (psutil)")

REPO = Path(__file__).resolve().parents[2]


def test_mixed_ours_smoke(tmp_path: Path) -> None:
    out = tmp_path / "mixed.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "mixed", "--target", "ours", "--quick",
         "--duration", "3", "--warmup", "2", "--dms", "20", "--small-rooms", "10",
         "--big-size", "30", "--rate", "100", "--pollers", "10", "--typists", "5",
         "--node-src", ".", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=55)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["scenario"] == "mixed"
    (row,) = doc["rows"]
    assert "error" not in row, row
    assert row["system"] == "ours"
    # Nothing lost, nothing twice, every client caught up with every room it is in.
    assert row["lost"] == 0 and row["dups"] == 0, row
    assert row["caught_up"], row
    assert row["ws_closed"] == 0
    assert row["ws_latency_samples"] == row["ws_latency_expected"] > 0
    assert row["messages_in_window"] == 300
    # Every part ran: polls delivered, reconnects welcomed without failures, typing sent.
    assert row["poll_delivered_per_s"] > 0 and not row["poll_errors"], row
    assert row["churn_achieved_per_s"] > 0 and not row["churn_failures"], row
    assert row["typing"]["connected"] == 5 and row["typing"]["sent"] > 0, row["typing"]
    assert row["not_run"] == []
    assert row["complete"], row
    assert "node CPU per message" in proc.stdout
