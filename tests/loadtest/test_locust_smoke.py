"""A short headless Locust run against a real local cluster (Redis + 2 nodes).

The run must pass (exit 0: every message arrived once, in order, per receiving session), and a
run whose users deliberately drop (or duplicate) one received message must fail: the check that
guards the load test can fail.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Never import locust here: it monkey-patches the process with gevent (that breaks pytest-xdist).
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("locust") is None or importlib.util.find_spec("websocket") is None,
    reason="needs the loadtest extra (locust, websocket-client)")

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"

NODE_ENV = {
    # All Locust users come from 127.0.0.1 and chat faster than people.
    "CHAT_MAX_CONNECTIONS_PER_IP": "0",
    "CHAT_HTTP_RATE_PER_S": "100000",
    "CHAT_HTTP_RATE_BURST": "100000",
}


def run_locust(nodes, tmp_path: Path, users: int, seconds: int, fault: str = "",
               extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    ws_urls = ",".join(n.ws_url for n in nodes)
    http_urls = ",".join(n.http_url for n in nodes)
    env = {**os.environ, "CHAT_LOCUST_FAULT": fault, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "-u", str(users), "-r", "10", "-t", f"{seconds}s", "--stop-timeout", "3",
            "--host", nodes[0].http_url, f"--chat-ws-urls={ws_urls}", f"--chat-http-urls={http_urls}",
            # Busier than people, so that a short run has traffic in every kind of room.
            "--chat-wait-min", "0.2", "--chat-wait-max", "0.6", "--chat-poll-wait-ms", "2000",
            "--chat-max-p99-ms", "5000", "--only-summary",
            "--csv", str(tmp_path / f"locust{fault}"), *extra]
    try:
        # Under the 120 s test timeout, so that a run that does not end shows its output.
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=100,
                              cwd=str(tmp_path))
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"locust did not end within 100 s\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-8000:]}")


def _explain(res: subprocess.CompletedProcess[str]) -> str:
    return f"exit {res.returncode}\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-6000:]}"


def test_headless_run_passes(start_nodes, tmp_path: Path) -> None:
    nodes = start_nodes(2, **NODE_ENV)
    res = run_locust(nodes, tmp_path, users=20, seconds=15)
    assert res.returncode == 0, _explain(res)
    assert "chatcluster verdict" in res.stdout + res.stderr, _explain(res)
    stats = (tmp_path / "locust_stats.csv").read_text()
    # Every kind of traffic happened: WS and poll receipts, commands, resumes.
    for needle in ("WS recv,general", "poll recv,general", "WS cmd,send", "WS connect,resume",
                   "WS cmd,edit", "WS cmd,delete", "WS fold,edit", "WS fold,delete"):
        assert needle in stats, f"{needle} missing from the stats:\n{stats}"


@pytest.mark.parametrize("fault", ["drop", "dup", "dupfold"])
def test_lost_or_duplicated_message_fails_the_run(start_nodes, tmp_path: Path, fault: str) -> None:
    nodes = start_nodes(2, **NODE_ENV)
    # Edits and deletes often enough that a short run has some to duplicate.
    extra: tuple[str, ...] = ("--chat-edit-weight", "20", "--chat-delete-weight", "10") if fault == "dupfold" else ()
    if fault == "drop":
        # No deletes: a hole that a delete event accounts for is no gap (a message deleted before
        # a poll or replay read it), so the dropped message, deleted later by its author, went
        # unreported in about one run in four (seen in CI and locally, before this session's
        # changes too).
        extra = ("--chat-delete-weight", "0")
    # The drop is caught by the next message the user gets in the room: leave time for it on a
    # loaded machine, where users start late.
    res = run_locust(nodes, tmp_path, users=6, seconds=9 if fault == "drop" else 6, fault=fault, extra=extra)
    assert res.returncode != 0, _explain(res)
    out = res.stdout + res.stderr
    assert "FAIL" in out, _explain(res)
    # dupfold: "duplicate edit" or "duplicate delete", whichever event came first. drop: a
    # gap, or -- when the dropped message was the user's own and no later one showed the hole
    # before the run ended -- the own message that never arrived.
    words = {"drop": ("gap", "never arrived"), "dup": ("duplicate seq",),
             "dupfold": ("duplicate edit", "duplicate delete")}[fault]
    assert any(w in out for w in words), _explain(res)
