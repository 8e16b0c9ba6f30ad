"""Authentication: user JWTs (HS256 with a secret, RS256/ES256 with a public key), dev mode,
and the server API key. Tokens are never logged."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import Any

import jwt

from .config import Settings
from .errors import Unauthorized
from .keys import UserId
from .protocol import USER_ID_RE


@dataclass(frozen=True, slots=True)
class Identity:
    user: UserId
    name: str
    expires_at: float | None  # unix seconds; None in dev mode


def _name_of(claims: dict[str, Any], user: str) -> str:
    name = claims.get("name")
    if isinstance(name, str) and 1 <= len(name.strip()) <= 80:
        return name.strip()
    return user


def verify_token(settings: Settings, token: str) -> Identity:
    """Verify a user JWT; raises :class:`Unauthorized` (close 4500 / HTTP 401) if not valid."""
    if settings.jwt_public_key:
        key: str = settings.jwt_public_key
        algorithms = ["RS256", "ES256"]
    elif settings.jwt_secret:
        key = settings.jwt_secret
        algorithms = ["HS256"]
    else:
        raise Unauthorized("token authentication is not configured on this node")
    try:
        claims = jwt.decode(
            token, key, algorithms=algorithms, leeway=settings.jwt_leeway_s,
            options={"require": ["sub", "exp"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthorized("token expired") from None
    except jwt.PyJWTError:
        raise Unauthorized("invalid token") from None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not USER_ID_RE.match(sub):
        raise Unauthorized("invalid token subject")
    return Identity(UserId(sub), _name_of(claims, sub), float(claims["exp"]))


def dev_identity(user: Any, name: Any) -> Identity:
    if not isinstance(user, str) or not USER_ID_RE.match(user):
        raise Unauthorized("dev auth: user must match ^[A-Za-z0-9_.@-]{1,64}$")
    display = name.strip() if isinstance(name, str) and 1 <= len(name.strip()) <= 80 else user
    return Identity(UserId(user), display, None)


def authenticate_hello(settings: Settings, frame: dict[str, Any]) -> Identity:
    """The identity of a ``hello`` frame: its token, or in dev mode its bare ``user``."""
    token = frame.get("token")
    if isinstance(token, str) and token:
        return verify_token(settings, token)
    if settings.auth == "dev":
        return dev_identity(frame.get("user"), frame.get("name"))
    raise Unauthorized("token required")


def authenticate_bearer(settings: Settings, header: str | None) -> Identity:
    """The identity behind an ``Authorization: Bearer`` header of a user endpoint.

    In dev mode ``Bearer dev:<user>`` is accepted as well, for the demo page's polling.
    """
    if not header or not header.startswith("Bearer "):
        raise Unauthorized("missing bearer token")
    token = header[7:].strip()
    if settings.auth == "dev" and token.startswith("dev:"):
        return dev_identity(token[4:], None)
    return verify_token(settings, token)


def check_api_key(settings: Settings, header: str | None) -> None:
    """Server endpoints: compare the bearer key in constant time."""
    if not settings.api_key:
        raise Unauthorized("server API is disabled (CHAT_API_KEY not set)")
    presented = header[7:].strip() if header and header.startswith("Bearer ") else ""
    if not hmac.compare_digest(presented.encode(), settings.api_key.encode()):
        raise Unauthorized("invalid API key")


def issue_token(secret: str, user: str, name: str | None = None, ttl_s: int = 3600) -> tuple[str, int]:
    """Sign an HS256 user token; returns (token, expires_at)."""
    if not USER_ID_RE.match(user):
        raise ValueError("invalid user id")
    expires_at = int(time.time()) + int(ttl_s)
    claims: dict[str, Any] = {"sub": user, "exp": expires_at, "iat": int(time.time())}
    if name:
        claims["name"] = name
    return jwt.encode(claims, secret, algorithm="HS256"), expires_at
