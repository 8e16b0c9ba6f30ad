"""Server targets the benchmark can drive. Each starts one server process on a free port.

A target is a name, a ``start`` that returns a running :class:`node.embedded.Proc` whose
``info["ws_port"]`` is set, and the client dialect its clients speak (only ``"ws-json"``, the
chatcluster protocol, so far; peers such as python-socketio or Node Socket.IO will bring their
own dialect and client implementation in :mod:`loadtest.wsclient`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from node.embedded import READY_RE, Proc, _drain_in_background

REPO = Path(__file__).resolve().parent.parent


def start_ready_process(name: str, argv: list[str], env: Mapping[str, str], log_path: str | None,
                        timeout: float = 30.0, src: str | None = None) -> Proc:
    """Start ``argv`` in its own process group; return once it printed the READY line."""
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, full_env.get("PYTHONPATH"), str(REPO)]))
    # `python -m` puts the working directory first on sys.path: run where `node` is the
    # package under test (see --node-src in bench.py), not the working tree.
    cwd = src or os.environ.get("CHATCLUSTER_BENCH_NODE_PATH", str(REPO))
    popen = subprocess.Popen(argv, env=full_env, stdout=subprocess.PIPE, cwd=cwd,
                             stderr=open(log_path, "ab") if log_path else None,
                             start_new_session=True)
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
            _drain_in_background(popen)
            return proc
    proc.stop()
    raise TimeoutError(f"{name} was not ready within {timeout}s")


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    dialect: str
    start: Callable[[str, int, str | None], Proc]  # (redis_url, shards, log_path) -> Proc


def _ours_env(redis_url: str, shards: int) -> dict[str, str]:
    return {
        "CHAT_REDIS_URL": redis_url, "CHAT_AUTH": "dev", "CHAT_HOST": "127.0.0.1",
        "CHAT_WS_PORT": "0", "CHAT_HTTP_PORT": "0", "CHAT_NODE_ID": "bench-node",
        "CHAT_SHARDS": str(shards), "CHAT_LOG_LEVEL": "WARNING",
        # Every bench client comes from 127.0.0.1: lift the per-IP connection cap.
        "CHAT_MAX_CONNECTIONS_PER_IP": "0",
        # Extra settings of a scenario (K=V,K=V), e.g. the idle scenario's CHAT_MAX_CONNECTIONS.
        **_env_items(os.environ.get("CHATCLUSTER_BENCH_NODE_ENV", "")),
    }


def _env_items(spec: str) -> dict[str, str]:
    out = {}
    for item in filter(None, spec.split(",")):
        k, _, v = item.partition("=")
        out[k.strip()] = v.strip()
    return out


def _start_ours(redis_url: str, shards: int, log_path: str | None) -> Proc:
    return start_ready_process("ours", [sys.executable, "-m", "node", "node"],
                               _ours_env(redis_url, shards), log_path)


def _start_patched(redis_url: str, shards: int, log_path: str | None) -> Proc:
    """A node from another source tree (``CHATCLUSTER_BENCH_PATCHED_SRC``, set by
    ``bench.py --patched-src DIR``), to measure a proposed change against ``ours`` in one run.
    Extra ``CHAT_*`` settings for it come from ``CHATCLUSTER_BENCH_PATCHED_ENV`` (``K=V,K=V``)."""
    src = os.environ.get("CHATCLUSTER_BENCH_PATCHED_SRC")
    if not src:
        raise SystemExit("target 'patched' needs --patched-src DIR")
    env = _ours_env(redis_url, shards)
    for item in filter(None, os.environ.get("CHATCLUSTER_BENCH_PATCHED_ENV", "").split(",")):
        k, _, v = item.partition("=")
        env[k.strip()] = v.strip()
    return start_ready_process("patched", [sys.executable, "-m", "node", "node"], env, log_path,
                               src=os.path.abspath(src))


def _start_naive(redis_url: str, shards: int, log_path: str | None) -> Proc:
    argv = [sys.executable, "-m", "loadtest.naive_server", "--redis-url", redis_url,
            "--port", "0", "--shards", str(shards)]
    return start_ready_process("naive", argv, {}, log_path)


PEERS = REPO / "loadtest" / "peers"


def _start_pysio(redis_url: str, shards: int, log_path: str | None) -> Proc:
    argv = [sys.executable, str(PEERS / "socketio_py.py"), "--redis", redis_url, "--port", "0"]
    return start_ready_process("pysio", argv, {}, log_path)


def _start_nodesio(redis_url: str, shards: int, log_path: str | None) -> Proc:
    if not (PEERS / "node_modules" / "@socket.io" / "redis-streams-adapter").is_dir():
        raise SystemExit("target 'nodesio' needs `bash loadtest/peers/install.sh` first")
    argv = ["node", str(PEERS / "socketio_node.js"), "--redis", redis_url, "--port", "0"]
    return start_ready_process("nodesio", argv, {}, log_path)


TARGETS: dict[str, Target] = {
    "ours": Target("ours", "chatcluster node (python -m node node), dev auth, uvloop",
                   "ws-json", _start_ours),
    "patched": Target("patched", "chatcluster node from --patched-src (a proposed change)",
                      "ws-json", _start_patched),
    "naive": Target("naive", "loadtest/naive_server.py: websockets.broadcast() per message",
                    "ws-json", _start_naive),
    "pysio": Target("pysio", "python-socketio 5 (aiohttp, uvloop) with AsyncRedisManager",
                    "sio", _start_pysio),
    "nodesio": Target("nodesio", "Node.js Socket.IO 4 with @socket.io/redis-streams-adapter",
                      "sio", _start_nodesio),
}
