"""`python -m loadtest.bench compare` end to end, as small as it gets (ours only, one churn case,
1 s window; ~15-25 s): one results JSON with a row per system, the plot and the table are
written, and every scenario is in the one registry."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("psutil") is None or importlib.util.find_spec("matplotlib") is None,
    reason="needs the loadtest extra (psutil, matplotlib)")

REPO = Path(__file__).resolve().parents[2]


def test_compare_quick_smoke(tmp_path: Path) -> None:
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.bench", "compare", "--quick", "--systems", "ours",
         "--cases", "churn-fresh", "--window", "1", "--out", str(out), "--node-src", "."],
        cwd=REPO, capture_output=True, text=True, timeout=55)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["scenario"] == "compare"
    assert doc["systems"] == ["ours"]
    assert not [r for r in doc["runs"] if "error" in r], doc["runs"]
    rows = [r for r in doc["rows"] if r["case"] == "churn-fresh" and r["system"] == "ours"]
    assert len(rows) == 1
    # Figures depend on the machine's load (a busy CI box may complete no session in a 1 s
    # window): check the row's shape, not its values.
    for key in ("cpu_ms_per_op", "p50_ms", "p99_ms", "kept_up", "achieved", "offered"):
        assert key in rows[0]
    assert rows[0]["offered"] == 150
    assert out.with_suffix(".png").stat().st_size > 1000
    table = out.with_suffix(".md").read_text()
    assert "fresh user" in table and "ms/session" in table
    # The one registry: built-in and module scenarios side by side, all on the command line.
    listing = subprocess.run([sys.executable, "-m", "loadtest.bench", "--help"], cwd=REPO,
                             capture_output=True, text=True, timeout=30).stdout
    for name in ("fanout", "scaling", "idle", "churn", "polling", "compare"):
        assert name in listing
