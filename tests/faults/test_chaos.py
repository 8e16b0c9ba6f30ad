"""The chaos soak (loadtest/chaos.py) in the suite: 3 nodes behind HAProxy, mixed traffic
(WebSocket users in general, created rooms and DMs, page reloads that resume from cursors,
HTTP long-polling users, alerts), while every few seconds Redis is SIGKILLed and restarted on
its AOF, a node is SIGKILLed and replaced, Redis kills every client connection, or Redis
refuses writes (maxmemory 1, noeviction) for a few seconds.

Fails if any node died by itself, if any session missed or received twice a message it was
not told it lost (``recovered: false``), if an acknowledged send is not in history, or if an
alert did not reach each recipient exactly once.

* ``test_short_chaos_...``: two faults of each kind, ~1-1.5 minutes, in the normal suite;
* ``test_chaos_soak``: the full soak (10 minutes, ``CHAT_SOAK_MINUTES`` to change it), only
  with ``CHAT_SOAK=1`` or ``-m soak``; on the cluster pass (``--redis-cluster``) it fails a
  master over as well.

The pauses between faults are the fault schedule; every wait for a state (nodes ready, sessions
caught up) is a polled condition with a deadline (see loadtest/chaos.py).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from loadtest.chaos import (
    SINGLE_KINDS,
    Ack,
    Chaos,
    ChaosConfig,
    Injector,
    PollUser,
    WsUser,
    run_chaos,
    summary,
)
from tests.conftest import use_cluster
from tests.ops.haproxy import haproxy_binary

pytestmark = pytest.mark.skipif(haproxy_binary() is None, reason="haproxy is not installed")


def report(result: dict) -> str:
    return summary(result) + "\n" + json.dumps(
        {k: result.get(k) for k in ("examples", "node_deaths", "fault_log")}, indent=1, default=str)[:12000]


@pytest.mark.standalone_only
@pytest.mark.timeout(360)
async def test_short_chaos_soak_loses_nothing_duplicates_nothing_and_no_node_dies(tmp_path: Path):
    cfg = ChaosConfig(duration_s=150, max_faults=2 * len(SINGLE_KINDS), seed=7,
                      fault_min_s=5, fault_max_s=8, maxmemory_hold_s=(2.0, 4.0),
                      ws_users=6, pollers=2, rooms=2, dms=3, settle_s=60,
                      workdir=tmp_path, out=tmp_path / "chaos.json", quiet=True,
                      command="tests/faults/test_chaos.py::test_short_chaos_soak_...")
    result = await run_chaos(cfg)
    print(summary(result))
    assert result["passed"], report(result)
    assert result["faults"] == dict.fromkeys(SINGLE_KINDS, 2), report(result)
    assert result["messages"]["acked"] >= 100 and result["alerts"]["acked"] >= 10, report(result)


def test_the_checks_find_losses_duplicates_and_excuse_only_what_was_reported():
    """The soak's checks on made-up sessions, so that a soak that passes means something."""
    chaos = Chaos(ChaosConfig(quiet=True))
    injector = Injector(chaos.cfg, None, chaos.log, random.Random(0))  # type: ignore[arg-type]
    ids = [f"{1000 + i}-0" for i in range(1, 11)]
    history = {"general": [{"id": i, "text": f"text {i}"} for i in ids]}

    def ws(name: str, received: list[str], reset_at: int | None = None, reset_to: str = "") -> WsUser:
        u = WsUser(name, "ws://unused", chaos.log)
        u.rec.record({"type": "welcome", "rooms": [{"id": "general", "last_id": "1000-0"}]})
        for n, i in enumerate(received):
            if n == reset_at:
                u.rec.record({"type": "room", "change": "updated", "recovered": False,
                              "room": {"id": "general", "last_id": reset_to}})
            u.rec.record({"type": "message", "room": "general", "id": i})
        return u

    lossy = ws("lossy", [i for i in ids if i != "1005-0"])
    twice = ws("twice", ids[:3] + ids[2:])
    told = ws("told", ids[:4] + ids[7:], reset_at=4, reset_to="1007-0")  # 1005..1007 reported lost
    again = ws("again", ids[:4] + ids[2:], reset_at=4, reset_to="1002-0")  # 1003, 1004 redelivered
    poller = PollUser("poller", "http://unused", chaos.log)
    poller._cursors_from({"general": {"epoch": "e", "id": "1000-0"}})
    for i in ids:
        poller.rec.record({"type": "message", "room": "general", "id": i})
    chaos.ws, chaos.pollers = [lossy, twice, told, again], [poller]
    chaos.members = {"general": [u.user for u in chaos.ws] + ["poller"]}
    chaos.acks = [Ack("lossy", "general", "gone", "1011-0", 0),
                  Ack("told", "general", "reported", "1012-0", told.rec.resets["general"][0])]
    chaos.alerts_acked = [{"id": "al-1", "to": ["lossy", "twice"], "at_ms": 0}]
    lossy.rec.record({"type": "alert", "id": "al-1"})
    lossy.rec.record({"type": "alert", "id": "al-1"})

    checked = chaos.check(history, injector)
    m, a = checked["messages"], checked["alerts"]
    assert (m["lost"], m["duplicated"], m["reported_lost"], m["redelivered_after_recovered_false"]) == (1, 1, 3, 2), m
    assert (m["acked_not_in_history"], m["acked_reported_lost"]) == (1, 1), m
    assert (a["lost"], a["duplicated"], a["delivered"]) == (1, 1, 0), a
    assert checked["sessions_checked"] == 5
    assert len(checked["failures"]) == 5, checked["failures"]  # missing, duplicated, ack, alert x2


def soak_requested(config: pytest.Config) -> bool:
    expr = (config.option.markexpr or "").replace("not soak", "")
    return os.environ.get("CHAT_SOAK") == "1" or "soak" in expr


@pytest.mark.soak
@pytest.mark.timeout(3600)
async def test_chaos_soak(request: pytest.FixtureRequest, tmp_path: Path):
    if not soak_requested(request.config):
        pytest.skip("the full chaos soak runs with CHAT_SOAK=1 or -m soak")
    minutes = float(os.environ.get("CHAT_SOAK_MINUTES", "10"))
    cluster = use_cluster(request.config)
    cfg = ChaosConfig(duration_s=minutes * 60, cluster=cluster, seed=int(os.environ.get("CHAT_SOAK_SEED", "1")),
                      workdir=tmp_path, out=tmp_path / "chaos.json", quiet=True,
                      command=f"CHAT_SOAK=1 CHAT_SOAK_MINUTES={minutes:g} pytest tests/faults/test_chaos.py"
                      + (" --redis-cluster" if cluster else ""))
    result = await run_chaos(cfg)
    print(summary(result))
    assert result["passed"], report(result)
    assert result["faults_injected"] >= 1, report(result)
