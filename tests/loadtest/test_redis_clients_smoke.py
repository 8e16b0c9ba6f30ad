"""`python -m loadtest.redis_clients` end to end with a tiny op count, on one Redis and on a real
3-master Redis Cluster: every library that imports here runs every case, its replies are checked
against the data and agree across libraries, and the ordered pipelines keep submission order.
A library is skipped only when it does not import (coredis and valkey-glide come with
loadtest/requirements.txt, not with the dev extra). The checks themselves can fail: a library
whose replies are wrong is reported as incorrect and the command exits non-zero."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import OrderedDict, namedtuple
from pathlib import Path

import pytest

from loadtest import redis_clients as rc
from node.embedded import find_redis_server

REPO = Path(__file__).resolve().parents[2]

try:
    find_redis_server()
    HAVE_REDIS = True
except Exception:
    HAVE_REDIS = False

needs_redis = pytest.mark.skipif(not HAVE_REDIS, reason="needs redis-server")

AVAILABLE = ["redis-py"] + [name for name, module in (("coredis", "coredis"), ("glide", "glide"))
                            if importlib.util.find_spec(module) is not None]


def test_replies_normalise_to_one_shape() -> None:
    """Each library's shape of the same XREVRANGE / XREAD / SMEMBERS / SET reply compares equal."""
    entry = namedtuple("StreamEntry", "identifier field_values")  # coredis's shape
    redis_py = [(b"1-0", {b"f": b"a", b"t": b"x"})]
    glide_shape = {b"1-0": [[b"f", b"a"], [b"t", b"x"]]}
    coredis_shape = (entry(b"1-0", OrderedDict([(b"f", b"a"), (b"t", b"x")])),)
    assert rc.norm_entries(redis_py) == rc.norm_entries(glide_shape) == rc.norm_entries(coredis_shape)
    assert rc.norm_xread([[b"k", redis_py]]) == rc.norm_xread({b"k": glide_shape}) \
        == rc.norm_xread({"k": coredis_shape})
    assert rc.norm({b"b", b"a"}) == rc.norm([b"a", b"b"])
    assert rc.norm_ok(True) == rc.norm_ok("OK") == rc.norm_ok(b"OK") == b"OK"
    assert rc.norm_entries([(b"1-0", {b"f": b"b"})]) != rc.norm_entries(glide_shape)


@needs_redis
def test_benchmark_runs_and_libraries_agree(tmp_path: Path) -> None:
    out = tmp_path / "rc.json"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.redis_clients", "--scale", "0.003", "--reps", "1",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["correct"] is True
    assert sorted(doc["unavailable"]) == sorted({"coredis", "glide"} - set(AVAILABLE))
    assert doc["versions"]["redis_py_hiredis_available"] in (True, False)
    for name in ("single", "cluster"):
        topo = doc["topologies"][name]
        assert not topo["errors"], topo["errors"]
        for case in rc.CASES:
            variants = topo["summary"][case]
            libs = {row["lib"] for row in topo["runs"] if row["case"] == case}
            assert libs == set(AVAILABLE), (name, case, libs)
            assert all(s["correct"] and s["median_ops_per_cpu_s"] for s in variants.values()), variants
            samples = {json.dumps(row["sample_reply"]) for row in topo["runs"] if row["case"] == case}
            if case != "append":  # appends answer [seq, id]: ids differ, the shape is compared
                assert len(samples) == 1, (name, case, samples)
            else:
                assert {json.dumps(json.loads(s)[1]) for s in samples} == {'"bytes"'}, samples
        for variant in ("redis-py+AppendPipe", "coredis+pipeline", "glide+Batch"):
            if variant.split("+")[0] in AVAILABLE:
                probe = topo["probes"][variant]
                assert probe["order"]["in_order"], probe
                assert probe["noscript"]["ok"], probe


class WrongHello(rc.RedisPy):
    """redis-py whose hello answers one stale value: the benchmark must call that incorrect."""

    name = "wrong"
    variants = {"hello": ["wrong"]}

    async def hello(self, user: int) -> list:
        replies = await super().hello(user)
        replies[3] = b"stale"
        return replies


@needs_redis
async def test_a_wrong_reply_is_reported(tmp_path: Path) -> None:
    proc = rc.start_redis(0)
    try:
        port = int(proc.info["port"])
        topo = rc.Topology("single", "127.0.0.1", port, [("127.0.0.1", port)])
        cfg = rc.Config(hello_ops=8, reps=1)
        res = await rc.run_topology(topo, cfg, [rc.RedisPy, WrongHello], ["hello"], lambda _: None)
    finally:
        proc.stop(timeout=1)
    assert res["summary"]["hello"]["redis-py"]["correct"] is True
    assert res["summary"]["hello"]["wrong"]["correct"] is False
    assert any("stale" in p for row in res["runs"] if row["variant"] == "wrong" for p in row["problems"])
