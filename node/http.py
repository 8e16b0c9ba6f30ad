"""HTTP transport (aiohttp.web): health, readiness, metrics, and the JSON API.

Every handler raises :class:`~node.errors.ChatError` for client errors; the error middleware
turns them into ``{"error": {"code", "message"}}`` with the error's HTTP status, and anything
unexpected into a bare 500. CORS is answered for the configured origins only.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from .errors import BadRequest, ChatError, TooLarge, error_body, status_of
from .metrics import METRICS
from .origins import origin_allowed
from .ratelimit import KeyedBuckets, client_ip

if TYPE_CHECKING:
    from .commands import Commands
    from .config import Settings
    from .personal import PersonalStreams
    from .poll import Poller
    from .presence import Presence
    from .rooms import Rooms
    from .status import NodeStatus

log = logging.getLogger("chatcluster.http")


@dataclass
class HttpContext:
    """What the HTTP transport uses of the node: its services and how it is doing."""

    settings: Settings
    commands: Commands
    poller: Poller
    rooms: Rooms
    personal: PersonalStreams
    presence: Presence
    status: NodeStatus
    ready: Callable[[], bool]
    redis_ok: Callable[[], bool]
    reader_lag: Callable[[], float]
    ws_port: int = 0
    http_port: int = 0


NODE_KEY: web.AppKey[HttpContext] = web.AppKey("node")
HTTP_BUCKETS_KEY: web.AppKey[KeyedBuckets] = web.AppKey("http_buckets")
STATIC_DIR = Path(__file__).parent / "static"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


class BodyTooLarge(TooLarge):
    """An HTTP body over its limit (counted as ``http_body_bytes``)."""


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request's body, at most ``limit`` bytes (``too_large`` otherwise, read no further)."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(f"body larger than {limit} bytes")
    # read(n) returns what has arrived, up to n: a body in several segments (chunked, or a slow
    # client) needs several reads, or it would be cut short and parsed half.
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    body = b"".join(chunks)
    if len(body) > limit:
        raise BodyTooLarge(f"body larger than {limit} bytes")
    return body


async def read_json(request: web.Request, limit: int) -> dict[str, Any]:
    """The request's JSON object body; ``bad_request``/``too_large`` otherwise."""
    body = await read_body(request, limit)
    if not body:
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest("malformed JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("body must be a JSON object")
    return data


def _cors_headers(ctx: HttpContext, request: web.Request) -> dict[str, str]:
    origin = request.headers.get("Origin")
    if not origin or not origin_allowed(origin, ctx.settings.allowed_origins, request.host):
        return {}
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Allow-Headers": "Authorization, Content-Type",
        "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
        "Access-Control-Max-Age": "600",
        "Vary": "Origin",
    }


def _rate_limited(request: web.Request) -> float | None:
    """CHAT_HTTP_RATE_PER_S per client IP on the API: None if the request may go on, else the
    seconds to wait. Long polls cost one token each like any request, so a polling client
    (at most one poll a second, plus its commands) stays far below the default."""
    ctx = request.app[NODE_KEY]
    buckets = request.app[HTTP_BUCKETS_KEY]
    ip = client_ip(request.remote, request.headers.get("X-Forwarded-For"), ctx.settings.trusted_proxies)
    if buckets.take(ip, time.monotonic()):
        return None
    return buckets.retry_after(ip)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request.app[NODE_KEY]
    cors = _cors_headers(ctx, request)
    if request.path.startswith("/api/") and request.method != "OPTIONS":
        wait = _rate_limited(request)
        if wait is not None:
            METRICS.rate_limited.labels(limit="http_requests_per_ip").inc()
            limited = json_response({"error": {"code": "rate_limited", "message": "too many requests"}}, 429)
            limited.headers["Retry-After"] = str(max(1, math.ceil(wait)))
            limited.headers.update(cors)
            return limited
    if request.method == "OPTIONS" and request.path.startswith("/api/"):
        if not cors:
            return json_response({"error": {"code": "forbidden", "message": "origin not allowed"}}, 403)
        return web.Response(status=204, headers=cors)
    origin = request.headers.get("Origin")
    if origin and request.path.startswith("/api/v1/") and not cors and request.method == "POST":
        METRICS.hello_rejected.labels(reason="origin").inc()
        return json_response({"error": {"code": "forbidden", "message": "origin not allowed"}}, 403)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status == 413:
            METRICS.rate_limited.labels(limit="http_body_bytes").inc()
        if exc.status >= 400:
            code = {404: "not_found", 405: "bad_request", 413: "too_large"}.get(exc.status, "bad_request")
            response = json_response({"error": {"code": code, "message": exc.reason}}, exc.status)
        else:
            raise
    except ChatError as exc:
        if isinstance(exc, BodyTooLarge):
            METRICS.rate_limited.labels(limit="http_body_bytes").inc()
        response = json_response({"error": error_body(exc)}, status_of(exc))
    except Exception:
        log.exception("HTTP handler failed", extra={"path": request.path})
        response = json_response({"error": {"code": "internal", "message": "internal error"}}, 500)
    response.headers.update(cors)
    if request.path.startswith("/api/"):
        METRICS.http_responses.labels(status=f"{response.status // 100}xx").inc()
    return response


async def healthz(request: web.Request) -> web.Response:
    return json_response({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    ctx = request.app[NODE_KEY]
    ready = ctx.ready()
    body = {"ready": ready, "draining": ctx.status.draining, "redis": ctx.redis_ok(),
            "connections": ctx.status.connections(), "node": ctx.settings.node_id}
    return json_response(body, 200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[NODE_KEY]
    # Sampled here rather than kept current: they are cheap to compute once per scrape.
    METRICS.ready.set(1 if ctx.ready() else 0)
    METRICS.reader_lag.set(ctx.reader_lag())
    return web.Response(body=METRICS.render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Prometheus-Format": "0.0.4"})


_CSP_SOURCE = re.compile(r"^(?:https?://)?(?:\*\.)?[a-z0-9.-]+(?::[0-9]{1,5})?\Z")


def _frame_ancestors(allowed: tuple[str, ...], host: str | None) -> str:
    """CSP ``frame-ancestors`` for the demo page: the origins of CHAT_ALLOWED_ORIGINS (what
    origins.origin_allowed accepts), so only they may frame it (the widget's iframe)."""
    sources = ["'self'"]
    for pattern in allowed:
        p = pattern.strip().rstrip("/").lower()
        if p == "*":
            sources.append("*")
        elif p != "null" and _CSP_SOURCE.match(p):  # "null" or junk: no origin CSP can name
            # A source without a scheme would mean the page's own scheme only: spell both out.
            sources.extend([p] if "://" in p else [f"http://{p}", f"https://{p}"])
    if not allowed and host:  # the default: the node's own host name, any scheme and port
        name = host.strip().lower()
        name = name.rsplit(":", 1)[0] if name.count(":") == 1 else name
        if _CSP_SOURCE.match(name) and "*" not in name:
            sources.extend([f"http://{name}:*", f"https://{name}:*"])
    return "frame-ancestors " + " ".join(dict.fromkeys(sources))


async def index(request: web.Request) -> web.StreamResponse:
    page = STATIC_DIR / "index.html"
    if not page.exists():
        raise web.HTTPNotFound(reason="demo page not installed")
    csp = _frame_ancestors(request.app[NODE_KEY].settings.allowed_origins, request.host)
    return web.FileResponse(page, headers={"Cache-Control": "no-cache", "Content-Security-Policy": csp})


async def client_config(request: web.Request) -> web.Response:
    """What the browser library needs to find the WebSocket and show the right login."""
    ctx = request.app[NODE_KEY]
    s = ctx.settings
    return json_response({
        "auth": s.auth, "node": s.node_id, "ws_port": ctx.ws_port, "http_port": ctx.http_port,
        "ws_path": "/ws", "limits": s.public_limits(),
        "poll": {"min_ms": s.poll_min_ms, "max_ms": s.poll_max_ms, "decay": s.poll_decay,
                 "unfocused_ms": s.poll_unfocused_ms},
        # ?parent=ORIGIN: may that origin frame the demo page and hand it a login (widget.js)?
        **({"parent_allowed": origin_allowed(request.query["parent"], s.allowed_origins, request.host)}
           if "parent" in request.query else {}),
    })


def build_app(ctx: HttpContext) -> web.Application:
    s = ctx.settings
    app = web.Application(middlewares=[error_middleware],
                          client_max_size=max(s.max_frame_bytes, s.http_max_body_bytes))
    app[NODE_KEY] = ctx
    app[HTTP_BUCKETS_KEY] = KeyedBuckets(s.http_rate_per_s, s.http_rate_burst)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", index)
    app.router.add_get("/api/v1/config", client_config)
    app.router.add_static("/static/", STATIC_DIR, append_version=False)
    from .api import add_routes  # api builds on this module's helpers

    add_routes(app, ctx)
    return app
