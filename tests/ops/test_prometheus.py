"""Real Prometheus scraping real nodes: every dashboard expression and every alert rule is
evaluated through the query API. A panel that shows nothing (a metric the node does not export,
a typo, a label that does not exist) fails here rather than on an operator's screen."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from node.embedded import Proc, free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "grafana" / "dashboards" / "chatcluster.json"
RULES = REPO / "prometheus" / "rules" / "chatcluster.yml"
API_KEY = {"Authorization": "Bearer test-api-key"}
# What Grafana would put in for the template variables and its macros.
GRAFANA_VARS = {"$instance": ".*", "$__rate_interval": "30s", "$__interval": "5s", "$__range": "1m"}
METRIC_RE = re.compile(r"\b(chatcluster_[a-z0-9_]+)")

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus is not installed (apt-get install prometheus)")


def panel_exprs() -> list[tuple[str, str]]:
    """``(panel title, expression)`` of every target of every panel, rows included."""
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                out.append((panel["title"], target["expr"]))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return out


def substitute(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown template variable in {expr}"
    return expr


def rule_exprs() -> list[tuple[str, str]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(rule.get("alert") or rule["record"], rule["expr"]) for g in groups for rule in g["rules"]]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    procs: list[Proc] = []

    def start(http_urls: list[str]) -> str:
        port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "chatcluster", "metrics_path": "/metrics",
                                "static_configs": [{"targets": [u.split("://", 1)[1] for u in http_urls]}]}],
        }
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        assert PROMETHEUS is not None
        log = open(tmp_path / "prometheus.log", "ab")
        popen = subprocess.Popen(
            [PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        proc = Proc("prometheus", popen)
        procs.append(proc)
        wait_for_port("127.0.0.1", port, proc)
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.stop(timeout=5)


async def query(http: aiohttp.ClientSession, prom: str, expr: str) -> dict[str, Any]:
    async with http.post(prom + "/api/v1/query", data={"query": expr}) as response:
        body = await response.json()
    assert body["status"] == "success", f"{expr}: {body.get('errorType')}: {body.get('error')}"
    return body["data"]


async def until_data(http: aiohttp.ClientSession, prom: str, expr: str, deadline: float) -> list[Any]:
    """The query's result once it is non-empty (it may take a scrape or two after traffic)."""
    loop = asyncio.get_running_loop()
    while True:
        result = (await query(http, prom, expr))["result"]
        if result or loop.time() > deadline:
            return result
        await asyncio.sleep(0.25)  # waiting for the next scrape, with a deadline


async def make_traffic(http: aiohttp.ClientSession, a: Any, b: Any, clients: Any) -> None:
    """A little of everything the dashboard shows: chat across nodes, a failed command, a
    resume with replay, polls (empty and with events), an alert."""
    alice = await clients(a.ws_url, user="alice")
    bob = await clients(b.ws_url, user="bob")
    epoch = alice.welcome["rooms"][0]["epoch"]
    first = await alice.send("general", "hello")
    for i in range(5):
        await bob.send("general", f"reply {i}")
    for _ in range(6):
        await alice.next_event("message")
    try:
        await alice.request("join", room="r-doesnotexist")
    except Exception:
        pass  # the error reply is the point
    carol = await clients(b.ws_url, user="carol", cursors={"general": {"epoch": epoch, "id": first["id"]}})
    assert carol.welcome["recovered"] == {"general": True}
    dev = {"Authorization": "Bearer dev:dave"}
    poll: dict[str, Any] = {"wait_ms": 0, "interval_ms": 1000, "focused": True}
    for url in (a.http_url, b.http_url, a.http_url):
        async with http.post(url + "/api/v1/poll", json=poll, headers=dev) as response:
            assert response.status == 200
            body = await response.json()
        poll = {**poll, "cursors": body["cursors"], "personal": body["personal"],
                "interval_ms": body["next_poll_ms"]}
    await alice.send("general", "for the poller")
    async with http.post(b.http_url + "/api/v1/poll", json=poll, headers=dev) as response:
        assert (await response.json())["events"]
    async with http.post(a.http_url + "/api/v1/alerts", headers=API_KEY,
                         json={"to": ["alice", "dave"], "kind": "email", "title": "You have mail"}) as response:
        assert response.status == 200, await response.text()
    await alice.next_event("alert")


async def test_every_dashboard_panel_and_alert_rule_evaluates(start_nodes, clients, prometheus):
    a, b = start_nodes(2, CHAT_PRESENCE_TTL=3)  # heartbeats every second
    prom = prometheus([a.http_url, b.http_url])
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(30):
            while True:  # Prometheus is up and has scraped both nodes
                try:
                    data = await query(http, prom, 'sum(up{job="chatcluster"})')
                    if data["result"] and data["result"][0]["value"][1] == "2":
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        await make_traffic(http, a, b, clients)

        # Every metric a panel or rule names is one the node exports.
        async with http.get(a.http_url + "/metrics") as response:
            exposition = await response.text()
        exported = set(re.findall(r"^(chatcluster_[a-z0-9_]+)", exposition, re.MULTILINE))
        for title, expr in panel_exprs() + rule_exprs():
            for metric in METRIC_RE.findall(expr):
                assert metric in exported, f"{title}: {metric} is not exported by the node"

        deadline = asyncio.get_running_loop().time() + 20
        # The instance variable (label_values(chatcluster_build_info, instance)) finds both nodes.
        instances = await until_data(http, prom, "group by (instance) (chatcluster_build_info)", deadline)
        assert len(instances) == 2
        empty = []
        for title, expr in panel_exprs():
            if not await until_data(http, prom, substitute(expr), deadline):
                empty.append(f"{title}: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)

        for _name, expr in rule_exprs():
            await query(http, prom, expr)  # parses and evaluates (firing or not)
        # Prometheus loaded the rules file itself and evaluates every rule without error.
        async with asyncio.timeout(10):
            while True:
                async with http.get(prom + "/api/v1/rules") as response:
                    rules = [r for g in (await response.json())["data"]["groups"] for r in g["rules"]]
                if len(rules) == len(rule_exprs()) and all(r["health"] == "ok" for r in rules):
                    break
                assert all(r["health"] != "err" for r in rules), [r.get("lastError") for r in rules]
                await asyncio.sleep(0.2)
        firing = [r["name"] for r in rules if r["state"] == "firing"]
        assert firing == [], firing  # a healthy little cluster fires nothing


def test_promtool_checks_the_rules_and_config(tmp_path: Path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed")
    checked = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The compose config, with its rule_files pointed at the repo's rules.
    config = yaml.safe_load((REPO / "prometheus" / "prometheus.yml").read_text())
    config["rule_files"] = [str(RULES)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    checked = subprocess.run([promtool, "check", "config", str(local)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
