"""Render ``deploy/haproxy.cfg`` (the compose config, the one source of truth) for local nodes
and run Debian's ``haproxy`` with it.

Rendering changes addresses and timings only, never a routing rule: the ``bind`` ports become
free local ports, each ``server NAME HOST:8000|8001`` line points at that node's local WS or
HTTP port (and ``check port 8001`` at its HTTP port), health checks run every ``inter``, the
Docker DNS resolvers section is dropped (the servers are IP literals here), and ``maxconn`` is
lowered to what the test machine's file-descriptor limit allows.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from node.embedded import Proc, free_port, wait_for_port

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "haproxy.cfg"
WS_PORT, HTTP_PORT = 8000, 8001  # the node ports the template (and compose) use
PUBLIC_PORT, INTERNAL_PORT = 8080, 8404
SERVER_RE = re.compile(r"^(\s*server\s+)(\S+)\s+([^\s:]+):(\d+)(.*)$")
SECTION_RE = re.compile(r"^(global|defaults|frontend|backend|listen|resolvers|peers|userlist)\b")


@dataclass(frozen=True)
class NodePorts:
    ws: int
    http: int


def render(nodes: Mapping[str, NodePorts], *, public_port: int, internal_port: int,
           inter: str = "200ms", host: str = "127.0.0.1", template: Path = TEMPLATE) -> str:
    """The template with ``nodes`` (template server name -> local ports) filled in.

    Raises ``ValueError`` if the template and ``nodes`` disagree on the servers, so a template
    change the renderer does not understand fails loudly instead of testing something else.
    """
    out: list[str] = []
    section = ""
    rendered: dict[str, set[int]] = {name: set() for name in nodes}
    binds = 0
    for line in template.read_text().splitlines():
        stripped = line.strip()
        if SECTION_RE.match(line):
            section = stripped.split()[0]
        if section == "resolvers":
            continue
        if section == "global" and stripped.startswith("maxconn"):
            line = "    maxconn 4000"
        elif stripped.startswith("default-server"):
            line = re.sub(r"\b(inter|fastinter|downinter)\s+\S+", rf"\1 {inter}", line)
            line = re.sub(r"\s+resolvers\s+\S+", "", line)
        elif stripped.startswith("bind "):
            port = int(stripped.split()[1].rsplit(":", 1)[1])
            local = {PUBLIC_PORT: public_port, INTERNAL_PORT: internal_port}.get(port)
            if local is None:
                raise ValueError(f"unexpected bind in the template: {stripped}")
            line = f"    bind {host}:{local}"
            binds += 1
        elif (m := SERVER_RE.match(line)) is not None:
            prefix, name, _, port, rest = m.groups()
            if name not in nodes:
                raise ValueError(f"template server {name} has no local node")
            ports = nodes[name]
            target = {WS_PORT: ports.ws, HTTP_PORT: ports.http}[int(port)]
            rest = re.sub(rf"\bport {HTTP_PORT}\b", f"port {ports.http}", rest)
            line = f"{prefix}{name} {host}:{target}{rest}"
            rendered[name].add(int(port))
        out.append(line)
    missing = {name for name, ports in rendered.items() if ports != {WS_PORT, HTTP_PORT}}
    if missing or binds != 2:
        raise ValueError(f"template does not route to both ports of {sorted(missing)} (binds: {binds})")
    return "\n".join(out) + "\n"


@dataclass
class HAProxy:
    proc: Proc
    port: int
    internal_port: int

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stats_url(self) -> str:
        return f"http://127.0.0.1:{self.internal_port}/stats;csv"


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None)


def start_haproxy(nodes: Mapping[str, NodePorts], workdir: Path, inter: str = "200ms") -> HAProxy:
    binary = haproxy_binary()
    assert binary, "haproxy is not installed"
    public, internal = free_port(), free_port()
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(render(nodes, public_port=public, internal_port=internal, inter=inter))
    check = subprocess.run([binary, "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    log = open(workdir / "haproxy.log", "ab")
    popen = subprocess.Popen([binary, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    proc = Proc("haproxy", popen)
    wait_for_port("127.0.0.1", public, proc)
    wait_for_port("127.0.0.1", internal, proc)
    return HAProxy(proc, public, internal)


def server_states(stats_csv: str) -> dict[tuple[str, str], dict[str, str]]:
    """``(backend, server) -> row`` of HAProxy's CSV stats (``status``, ``check_status``...)."""
    lines = stats_csv.splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("svname") not in ("FRONTEND", "BACKEND", None):
            rows[(row["pxname"], row["svname"])] = row
    return rows
