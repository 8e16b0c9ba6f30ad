"""Runs the JavaScript unit tests of the browser library (tests/js, ``node --test``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_js_unit_tests() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the JS unit tests (tests/js) need Node.js >= 20")
    assert list((ROOT / "tests" / "js").glob("*.test.mjs")), "no JS tests found"
    proc = subprocess.run([node, "--test", "tests/js/"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "# fail 0" in proc.stdout
