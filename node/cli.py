"""The ``chatcluster`` command: ``node``, ``up``, ``token``, ``alert``, ``archive``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from . import config


def _flag(field: config.Field) -> str:
    return "--" + field.name.replace("_", "-")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (override CHAT_* environment variables)")
    for field in config.FIELDS:
        group.add_argument(_flag(field), dest=field.name, default=None, metavar=field.env,
                           help=field.help)


def _settings(args: argparse.Namespace) -> config.Settings:
    overrides = {f.name: getattr(args, f.name, None) for f in config.FIELDS}
    return config.load(overrides=overrides)


def cmd_node(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
        config.require_auth_material(settings)
        from .auth import check_key_material

        check_key_material(settings)
    except config.ConfigError as exc:
        print(f"chatcluster: configuration error: {exc}", file=sys.stderr)
        return 2
    import logging

    from . import log
    from .app import Node

    log.setup(settings.node_id, settings.log_format, settings.log_level)
    node_log = logging.getLogger("chatcluster.node")
    if settings.auth == "dev" and not _is_loopback(settings.host) and not settings.dev_force:
        message = ("CHAT_AUTH=dev accepts anyone by name; it is refused on a non-loopback "
                   "address (CHAT_HOST) unless CHAT_DEV_FORCE=true")
        node_log.error("refusing to start: " + message, extra={"host": settings.host})
        print(f"chatcluster: {message}", file=sys.stderr)
        return 2
    if settings.auth == "dev":
        node_log.warning("DEV AUTH: any client may claim any user name",
                         extra={"host": settings.host, "forced": not _is_loopback(settings.host)})

    async def main() -> None:
        await Node(settings).run()

    _run(main())
    return 0


def _is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the node reachable from this machine only."""
    import ipaddress

    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def _run(coro: Any) -> None:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(coro)


def cmd_up(args: argparse.Namespace) -> int:
    from .embedded import free_port, start_node, start_redis

    procs = []
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if args.redis_url:
            redis_url = args.redis_url
        else:
            redis_port = args.redis_port or free_port()
            redis = start_redis(redis_port)
            procs.append(redis)
            redis_url = redis.info["url"]
            print(f"redis   {redis_url}  (embedded, no persistence)")
        api_key = os.environ.get("CHAT_API_KEY") or secrets.token_urlsafe(16)
        jwt_secret = os.environ.get("CHAT_JWT_SECRET") or secrets.token_urlsafe(24)
        for i in range(args.nodes):
            if args.base_port:
                ws_port, http_port = args.base_port + 2 * i, args.base_port + 2 * i + 1
            else:
                ws_port, http_port = free_port(), free_port()
            env = {
                "CHAT_REDIS_URL": redis_url, "CHAT_HOST": args.host, "CHAT_AUTH": "dev",
                "CHAT_WS_PORT": str(ws_port), "CHAT_HTTP_PORT": str(http_port),
                "CHAT_NODE_ID": f"node-{i + 1}", "CHAT_API_KEY": api_key,
                "CHAT_JWT_SECRET": jwt_secret, "CHAT_LOG_FORMAT": "text",
                "CHAT_DRAIN_SECONDS": os.environ.get("CHAT_DRAIN_SECONDS", "5"),
            }
            node = start_node(env, name=f"node-{i + 1}")
            procs.append(node)
            print(f"node-{i + 1}  http://{args.host}:{node.info['http_port']}/  "
                  f"ws://{args.host}:{node.info['ws_port']}/ws")
        print(f"api key {api_key}  (CHAT_API_KEY, for chatcluster alert and the server API)")
        print("Ctrl-C stops everything.", flush=True)
        while not stopping:
            if any(not p.alive() for p in procs):
                dead = [p.name for p in procs if not p.alive()]
                print(f"chatcluster: {', '.join(dead)} exited; stopping", file=sys.stderr)
                return 1
            time.sleep(0.2)
        return 0
    except (FileNotFoundError, RuntimeError, TimeoutError) as exc:
        print(f"chatcluster: {exc}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(procs):
            proc.stop()
        print("stopped.")


def cmd_token(args: argparse.Namespace) -> int:
    from .auth import issue_token

    secret = os.environ.get("CHAT_JWT_SECRET", "")
    if not secret:
        print("chatcluster: CHAT_JWT_SECRET is not set", file=sys.stderr)
        return 2
    try:
        audience = os.environ.get("CHAT_JWT_AUDIENCE", "").split(",")[0].strip() or None
        token, _ = issue_token(secret, args.user, args.name, args.ttl, audience,
                               os.environ.get("CHAT_JWT_ISSUER") or None)
    except ValueError as exc:
        print(f"chatcluster: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


def _post(url: str, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {key}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def cmd_alert(args: argparse.Namespace) -> int:
    key = os.environ.get("CHAT_API_KEY", "")
    if not key:
        print("chatcluster: CHAT_API_KEY is not set", file=sys.stderr)
        return 2
    body: dict[str, Any] = {"to": [u.strip() for u in args.to.split(",") if u.strip()],
                            "kind": args.kind, "title": args.title}
    if args.body:
        body["body"] = args.body
    if args.data:
        body["data"] = json.loads(args.data)
    try:
        status, data = _post(args.url.rstrip("/") + "/api/v1/alerts", key, body)
    except OSError as exc:
        print(f"chatcluster: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data))
    return 0 if status == 200 else 1


def cmd_archive(args: argparse.Namespace) -> int:
    from .archive import archive

    try:
        older_than = config.duration(args.older_than)
        if older_than < 0:
            raise ValueError("must be >= 0")
        settings = config.load(overrides={"redis_url": args.redis_url})
    except ValueError as exc:  # ConfigError is a ValueError
        print(f"chatcluster: --older-than / configuration: {exc}", file=sys.stderr)
        return 2

    async def main() -> dict[str, Any]:
        result = await archive(settings.redis_url, older_than, args.out, shards=settings.shards)
        return result.summary()

    try:
        summary = asyncio.run(main())
    except Exception as exc:  # a cron job wants one line and a non-zero status
        print(f"chatcluster: archive failed, nothing was trimmed after the failure: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatcluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_node = sub.add_parser("node", help="run one production node (config from CHAT_* variables)")
    _add_setting_flags(p_node)
    p_node.set_defaults(func=cmd_node)

    p_up = sub.add_parser("up", help="run an embedded Redis and N local nodes (dev auth)")
    p_up.add_argument("--nodes", type=int, default=2)
    p_up.add_argument("--host", default="127.0.0.1")
    p_up.add_argument("--base-port", type=int, default=8000,
                      help="node i listens on BASE+2i (ws) and BASE+2i+1 (http); 0 picks free ports")
    p_up.add_argument("--redis-port", type=int, default=0, help="embedded Redis port (default: a free one)")
    p_up.add_argument("--redis-url", default="", help="use this Redis instead of an embedded one")
    p_up.set_defaults(func=cmd_up)

    p_token = sub.add_parser("token", help="print a user JWT signed with CHAT_JWT_SECRET")
    p_token.add_argument("user")
    p_token.add_argument("--name")
    p_token.add_argument("--ttl", type=int, default=3600, help="seconds")
    p_token.set_defaults(func=cmd_token)

    p_alert = sub.add_parser("alert", help="inject an alert for some users (uses CHAT_API_KEY)")
    p_alert.add_argument("--to", required=True, help="comma-separated user ids")
    p_alert.add_argument("--kind", default="system", help="email, call, voicemail, system...")
    p_alert.add_argument("--title", required=True)
    p_alert.add_argument("--body")
    p_alert.add_argument("--data", help="JSON object passed to the client as-is")
    p_alert.add_argument("--url", default=os.environ.get("CHAT_URL", "http://127.0.0.1:8001"),
                         help="a node's HTTP URL (CHAT_URL)")
    p_alert.set_defaults(func=cmd_alert)

    p_archive = sub.add_parser(
        "archive", help="export messages older than a cut to gzipped JSON lines, then trim them")
    p_archive.add_argument("--older-than", required=True,
                           help="age of the oldest message kept: 30d, 12h, 90m, seconds")
    p_archive.add_argument("--out", required=True,
                           help="FILE.jsonl.gz; an existing file is appended to, never truncated")
    p_archive.add_argument("--redis-url", default=None, help="overrides CHAT_REDIS_URL")
    p_archive.set_defaults(func=cmd_archive)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
