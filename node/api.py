"""The JSON API on the HTTP port (PROTOCOL.md section 3).

User endpoints (``Authorization: Bearer <user JWT>``, or ``Bearer dev:<user>`` in dev mode):
``/api/v1/session``, ``/api/v1/command`` (the same dispatcher as the WebSocket), ``/api/v1/poll``.
Server endpoints (``Authorization: Bearer <CHAT_API_KEY>``): ``/api/v1/alerts``,
``/api/v1/rooms/{room}/messages``, ``/api/v1/tokens``.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import orjson
from aiohttp import web

from . import protocol
from .auth import Identity, audiences_of, authenticate_bearer, check_api_key, issue_token
from .commands import Caller, refused
from .errors import BadRequest, ChatError, NotFound, Unauthorized
from .http import NODE_KEY, HttpContext, json_response, read_body, read_json
from .metrics import METRICS
from .poll import Poller
from .protocol import check_display_name, check_room_id, check_text, check_user_id, now_ms

SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")
ALERT_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}\Z")
MAX_ALERT_RECIPIENTS = 1000
MAX_ALERT_DATA_BYTES = 8192
POLLER_KEY: web.AppKey[Poller] = web.AppKey("poller")


def _ctx(request: web.Request) -> HttpContext:
    return request.app[NODE_KEY]


def _user(request: web.Request) -> Identity:
    ctx = _ctx(request)
    return authenticate_bearer(ctx.settings, request.headers.get("Authorization"))


def _session_id(body: dict[str, Any]) -> str:
    session = body.get("session")
    if isinstance(session, str) and SESSION_RE.match(session):
        return session
    return "p-" + secrets.token_hex(6)


# -- user endpoints ------------------------------------------------------------------------
async def session(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    identity = _user(request)
    body = await read_json(request, ctx.settings.http_max_body_bytes)
    if ctx.settings.auth == "dev" and isinstance(body.get("name"), str) and identity.expires_at is None:
        identity = Identity(identity.user, check_display_name(body["name"]), None)
    return json_response(await request.app[POLLER_KEY].session(identity, body, _session_id(body)))


async def command(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    identity = _user(request)
    raw = await read_body(request, ctx.settings.max_frame_bytes)
    try:
        frame = protocol.parse_frame(raw, ctx.settings.max_json_depth)
    except ChatError as exc:
        outcome = refused(protocol.loose_ref(raw), exc)
    else:
        outcome = await ctx.commands.execute(Caller(identity, "http", "http"), frame)
    return json_response(outcome.envelope(), outcome.status)


async def poll(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    identity = _user(request)
    body = await read_json(request, ctx.settings.http_max_body_bytes)
    open_polls = METRICS.connections_open.labels(transport="poll")
    open_polls.inc()
    try:
        return json_response(await request.app[POLLER_KEY].poll(identity, body, _session_id(body)))
    finally:
        open_polls.dec()


# -- server endpoints ----------------------------------------------------------------------
def _server(request: web.Request) -> None:
    check_api_key(_ctx(request).settings, request.headers.get("Authorization"))


async def alerts(request: web.Request) -> web.Response:
    _server(request)
    ctx = _ctx(request)
    body = await read_json(request, 65536)
    to = body.get("to")
    if not isinstance(to, list) or not to or len(to) > MAX_ALERT_RECIPIENTS:
        raise BadRequest(f"to must be a list of 1..{MAX_ALERT_RECIPIENTS} user ids")
    users = list(dict.fromkeys(check_user_id(u) if isinstance(u, str) else check_user_id("") for u in to))
    kind = body.get("kind", "system")
    if not isinstance(kind, str) or not ALERT_KIND_RE.match(kind):
        raise BadRequest("kind must match ^[a-z][a-z0-9_]{0,31}$ (email, call, voicemail, system...)")
    title = body.get("title")
    if not isinstance(title, str) or not 1 <= len(title.strip()) <= 200:
        raise BadRequest("title must be 1..200 characters")
    event: dict[str, Any] = {"type": "alert", "id": "al-" + secrets.token_hex(8), "kind": kind,
                             "title": title, "ts": now_ms()}
    if body.get("body") is not None:
        if not isinstance(body["body"], str) or len(body["body"]) > ctx.settings.max_text_chars:
            raise BadRequest(f"body must be a string of at most {ctx.settings.max_text_chars} characters")
        event["body"] = body["body"]
    if body.get("data") is not None:
        if not isinstance(body["data"], dict) or len(orjson.dumps(body["data"])) > MAX_ALERT_DATA_BYTES:
            raise BadRequest(f"data must be a JSON object of at most {MAX_ALERT_DATA_BYTES} bytes")
        event["data"] = body["data"]
    await ctx.personal.publish_many(users, event)
    online = await ctx.presence.online_users(users)
    METRICS.alerts.inc(len(users))
    return json_response({"id": event["id"], "online": [u for u in users if online.get(u)],
                          "queued": [u for u in users if not online.get(u)]})


async def system_message(request: web.Request) -> web.Response:
    _server(request)
    ctx = _ctx(request)
    room = check_room_id(request.match_info["room"])
    body = await read_json(request, ctx.settings.max_frame_bytes)
    text = body.get("text")
    if not isinstance(text, str):
        raise BadRequest("text is required")
    check_text(text, ctx.settings.max_text_chars)
    sender = body.get("as", "System")
    if not isinstance(sender, str):
        raise BadRequest("as must be a display name")
    sender = check_display_name(sender)
    meta = await ctx.rooms.streams.meta(room)
    if meta is None and room != "general":
        raise NotFound("no such room")
    appended = await ctx.rooms.publish(room, "system", sender, text, None, kind="system")
    return json_response({"id": appended.id, "seq": appended.seq, "ts": appended.ts})


async def tokens(request: web.Request) -> web.Response:
    _server(request)
    ctx = _ctx(request)
    if not ctx.settings.jwt_secret:
        raise Unauthorized("this node verifies tokens with a public key; sign them with your private key")
    body = await read_json(request, 4096)
    user = body.get("user")
    if not isinstance(user, str):
        raise BadRequest("user is required")
    check_user_id(user)
    name = body.get("name")
    if name is not None and not isinstance(name, str):
        raise BadRequest("name must be a string")
    ttl = body.get("ttl_s", 3600)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 60 <= ttl <= 30 * 86400:
        raise BadRequest("ttl_s must be an integer 60..2592000")
    audiences = audiences_of(ctx.settings)
    token, expires_at = issue_token(ctx.settings.jwt_secret, user, check_display_name(name) if name else None, ttl,
                                    audiences[0] if audiences else None, ctx.settings.jwt_issuer or None)
    return json_response({"token": token, "expires_at": expires_at})


def add_routes(app: web.Application, ctx: HttpContext) -> None:
    app[POLLER_KEY] = ctx.poller
    app.router.add_post("/api/v1/session", session)
    app.router.add_post("/api/v1/command", command)
    app.router.add_post("/api/v1/poll", poll)
    app.router.add_post("/api/v1/alerts", alerts)
    app.router.add_post("/api/v1/rooms/{room}/messages", system_message)
    app.router.add_post("/api/v1/tokens", tokens)
