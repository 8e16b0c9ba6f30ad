"""Static checks of what `docker compose up` runs (no Docker here): the compose file, the node's
Dockerfile, and how the HAProxy, Prometheus and Grafana files it mounts fit together."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
NODES = ("node1", "node2", "node3")


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def services() -> dict[str, Any]:
    return compose()["services"]


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """``(host path, container path)`` of the service's bind mounts (named volumes skipped)."""
    out = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith((".", "/")):
            out.append((source, target))
    return out


def host_path_of(service: dict[str, Any], container_path: str) -> Path | None:
    """The repo file a container path of the service comes from, through its bind mounts."""
    path = PurePosixPath(container_path)
    for source, target in mounts(service):
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return REPO / source / path.relative_to(target)
    return None


def published(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}


def test_compose_has_the_whole_stack():
    s = services()
    assert set(s) >= {"redis", *NODES, "haproxy", "prometheus", "grafana", "locust"}
    assert 8080 in published(s["haproxy"])
    assert 3000 in published(s["grafana"])
    assert 9090 in published(s["prometheus"])
    assert 8089 in published(s["locust"])
    for name in NODES:  # nodes are reached through HAProxy (and Prometheus), never directly
        assert not s[name].get("ports"), name


def test_every_mounted_host_path_exists():
    for name, service in services().items():
        for source, target in mounts(service):
            assert (REPO / source).exists(), f"{name}: {source} (mounted at {target}) is not in the repo"


def test_redis_persists():
    redis = services()["redis"]
    command = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    assert re.search(r"--appendonly\s+yes", command)
    assert any(v.split(":")[1] == "/data" for v in redis["volumes"])  # on a volume
    assert "healthcheck" in redis


def test_nodes_build_from_the_dockerfile_and_are_configured_alike():
    s = services()
    dockerfile = REPO / "Dockerfile"
    ignore = (REPO / ".dockerignore").read_text().split()
    text = dockerfile.read_text()
    for copied in re.findall(r"^COPY\s+(.+)\s+\S+$", text, re.MULTILINE):
        for source in copied.split():
            assert (REPO / source).exists(), f"Dockerfile copies {source}, which is missing"
            assert f"!{source.rstrip('/')}" in {i.rstrip("/") for i in ignore}, \
                f".dockerignore keeps {source} out of the build context"
    ids = set()
    for name in NODES:
        node = s[name]
        build = node["build"] if isinstance(node["build"], dict) else {"context": node["build"]}
        assert (REPO / build["context"] / build.get("dockerfile", "Dockerfile")).resolve() == dockerfile
        env = node["environment"]
        assert env["CHAT_REDIS_URL"].startswith("redis://redis:")
        ids.add(env["CHAT_NODE_ID"])
        grace = int(node["stop_grace_period"].rstrip("s"))
        assert grace > float(env["CHAT_DRAIN_SECONDS"]), f"{name} would be killed mid-drain"
        # HAProxy's address is the one proxy the nodes trust for X-Forwarded-For.
        lb_ip = s["haproxy"]["networks"]["chat"]["ipv4_address"]
        assert env["CHAT_TRUSTED_PROXIES"] == lb_ip
        assert node["depends_on"]["redis"]["condition"] == "service_healthy"
    assert ids == set(NODES)


def test_haproxy_config_routes_to_the_compose_nodes():
    s = services()
    cfg_path = host_path_of(s["haproxy"], "/usr/local/etc/haproxy/haproxy.cfg")
    assert cfg_path is not None and cfg_path.resolve() == REPO / "deploy" / "haproxy.cfg"
    cfg = cfg_path.read_text()
    backends = dict(re.findall(r"^backend (\S+)\n(.*?)(?=^\S|\Z)", cfg, re.MULTILINE | re.DOTALL))
    for backend, port_var in (("ws", "CHAT_WS_PORT"), ("http", "CHAT_HTTP_PORT")):
        servers = re.findall(r"^\s*server (\S+) (\S+):(\d+)(.*)$", backends[backend], re.MULTILINE)
        assert [srv[0] for srv in servers] == list(NODES)
        for name, host, port, options in servers:
            env = s[name]["environment"]
            assert host == name and int(port) == int(env[port_var])
            assert "check" in options.split()
            if backend == "ws":  # the WebSocket backend is health-checked on the HTTP port
                assert f"port {env['CHAT_HTTP_PORT']}" in options
        assert "http-check send meth GET uri /readyz" in backends[backend]
    assert "balance leastconn" in backends["ws"]
    assert re.search(r"timeout tunnel\s+(\d+)s", cfg) and int(re.search(r"timeout tunnel\s+(\d+)s", cfg)[1]) > 20
    assert "on-marked-down shutdown-sessions" not in cfg  # a drain is the node's job
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if Path(haproxy).exists():
        checked = subprocess.run([haproxy, "-c", "-f", str(cfg_path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_prometheus_scrapes_every_node_and_loads_the_rules():
    s = services()
    prom = s["prometheus"]
    config_flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    config_path = host_path_of(prom, config_flag.split("=", 1)[1])
    assert config_path is not None and config_path.exists()
    config = yaml.safe_load(config_path.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "chatcluster")
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {f"{n}:{s[n]['environment']['CHAT_HTTP_PORT']}" for n in NODES}
    rule_files = [host_path_of(prom, pattern) for pattern in config["rule_files"]]
    matched = [p for pattern in rule_files if pattern is not None for p in pattern.parent.glob(pattern.name)]
    assert REPO / "prometheus" / "rules" / "chatcluster.yml" in matched


def test_grafana_is_provisioned_with_the_dashboard_as_home():
    grafana = services()["grafana"]
    env = grafana["environment"]
    home = host_path_of(grafana, env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home is not None and home.resolve() == REPO / "grafana" / "dashboards" / "chatcluster.json"
    provisioning = host_path_of(grafana, "/etc/grafana/provisioning")
    assert provisioning is not None and provisioning.resolve() == REPO / "grafana" / "provisioning"
    providers = yaml.safe_load((provisioning / "dashboards" / "chatcluster.yml").read_text())["providers"]
    for provider in providers:
        folder = host_path_of(grafana, provider["options"]["path"])
        assert folder is not None and (folder / "chatcluster.json").exists()
    datasource = datasources()[0]
    assert datasource["url"] == "http://prometheus:9090"


def test_locust_runs_the_mounted_loadtest_folder():
    locust = services()["locust"]
    command = locust["command"]
    locustfile = command[command.index("-f") + 1]
    host_file = host_path_of(locust, locustfile)
    assert host_file is not None and host_file.parent.is_dir()  # the file itself may come later
    assert "http://haproxy:8080" in command


# -- the Grafana dashboard --------------------------------------------------------------------

def datasources() -> list[dict[str, Any]]:
    path = REPO / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
    return yaml.safe_load(path.read_text())["datasources"]


def all_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(all_panels(panel.get("panels", [])))
    return out


@pytest.fixture
def dashboard() -> dict[str, Any]:
    return json.loads((REPO / "grafana" / "dashboards" / "chatcluster.json").read_text())


def test_dashboard_uses_the_provisioned_datasource(dashboard):
    uid = datasources()[0]["uid"]
    assert datasources()[0]["type"] == "prometheus"
    panels = [p for p in all_panels(dashboard["panels"]) if p["type"] != "row"]
    assert len(panels) >= 20
    for panel in panels:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", {"uid": uid})["uid"] == uid, panel["title"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == uid


def test_every_dashboard_panel_has_targets(dashboard):
    ids = [p["id"] for p in all_panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    for wanted in ("Cluster overview", "Per node", "Redis", "Polling"):
        assert any(r.startswith(wanted) for r in rows), rows
    for panel in all_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
    names = {v["name"] for v in dashboard["templating"]["list"]}
    assert "instance" in names
    per_node = [p for p in all_panels(dashboard["panels"]) if p["type"] != "row"]
    assert all('instance=~"$instance"' in t["expr"] for p in per_node for t in p["targets"])
    latency = [t["expr"] for p in per_node for t in p["targets"] if "delivery_latency" in t["expr"]]
    assert any(e.startswith("histogram_quantile(0.99") for e in latency)
