"""Authentication: user JWTs, dev mode, and the server API key. Tokens are never logged.

Token keys, chosen by the token's header (never by its claims):

* ``HS256`` -- ``CHAT_JWT_SECRET``, a comma-separated list: the first secret signs
  (:func:`issue_token`), every one verifies, so a secret is rotated by prepending the new one,
  waiting out the longest token lifetime, then dropping the old one.
* ``RS256``/``ES256`` -- ``CHAT_JWT_PUBLIC_KEY`` (a PEM, or the path of a PEM file), and/or
  ``CHAT_JWKS_FILE`` (a JWKS document; the key is chosen by the token's ``kid``). The file is
  re-read when it changes, so JWKS rotation is: add the new key, start signing with it, remove
  the old key once its tokens have expired.

Each key only verifies its own algorithm family (an RSA key RS256, an EC key ES256, a secret
HS256), so a public key can never be used as an HMAC secret (algorithm confusion), and ``none``
is never accepted.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .config import ConfigError, Settings
from .errors import Forbidden, Unauthorized
from .keys import UserId
from .protocol import USER_ID_RE

log = logging.getLogger("chatcluster.auth")

ASYMMETRIC = ("RS256", "ES256")
MAX_TOKEN_CHARS = 8192
JWKS_RECHECK_S = 1.0  # least time between two stat() calls of the JWKS file


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


def hs_secrets(settings_or_secret: Settings | str) -> list[str]:
    """The HS256 secrets, signing secret first."""
    raw = settings_or_secret if isinstance(settings_or_secret, str) else settings_or_secret.jwt_secret
    return [part.strip() for part in raw.split(",") if part.strip()]


def _alg_of_key(key: Any) -> str | None:
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1":
        return "ES256"
    return None


# -- key material, parsed once per value (the settings object is immutable) -------------------
_PEM_CACHE: dict[str, tuple[Any, str]] = {}


def _public_key(pem: str) -> tuple[Any, str]:
    """(key, algorithm) of ``CHAT_JWT_PUBLIC_KEY``: a PEM (``\\n`` escapes allowed) or its path."""
    cached = _PEM_CACHE.get(pem)
    if cached is not None:
        return cached
    text = pem
    if "-----BEGIN" not in text and os.path.isfile(text):
        with open(text, encoding="ascii") as f:
            text = f.read()
    text = text.replace("\\n", "\n")
    try:
        key = load_pem_public_key(text.encode())
    except ValueError as exc:
        raise ConfigError(f"CHAT_JWT_PUBLIC_KEY: not a PEM public key ({exc})") from None
    alg = _alg_of_key(key)
    if alg is None:
        raise ConfigError("CHAT_JWT_PUBLIC_KEY: must be an RSA or P-256 EC public key")
    _PEM_CACHE[pem] = (key, alg)
    return key, alg


@dataclass
class _Jwks:
    """The keys of one JWKS file, re-read when its mtime or size changes."""

    path: str
    keys: dict[str, tuple[Any, str]] = field(default_factory=dict)  # kid -> (key, alg)
    stamp: tuple[int, int] = (0, 0)
    checked: float = float("-inf")
    lock: threading.Lock = field(default_factory=threading.Lock)

    def load(self) -> None:
        with open(self.path, "rb") as f:
            doc = json.loads(f.read())
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise ValueError("a JWKS document is an object with a keys list")
        keys: dict[str, tuple[Any, str]] = {}
        for entry in doc["keys"]:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            if entry.get("kty") not in ("RSA", "EC") or "d" in entry:
                continue  # symmetric keys and private keys have no place in a JWKS file here
            try:
                jwk = jwt.PyJWK(entry)
            except jwt.PyJWTError:
                continue
            alg = _alg_of_key(jwk.key)
            if alg is None or entry.get("alg", alg) != alg:
                continue
            keys[str(entry.get("kid", ""))] = (jwk.key, alg)
        self.keys = keys

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.checked < JWKS_RECHECK_S:
            return
        with self.lock:
            if now - self.checked < JWKS_RECHECK_S and not force:
                return
            self.checked = now
            try:
                st = os.stat(self.path)
                stamp = (st.st_mtime_ns, st.st_size)
                if stamp != self.stamp:
                    self.load()
                    self.stamp = stamp
                    log.info("JWKS loaded", extra={"keys": len(self.keys)})
            except (OSError, ValueError) as exc:
                # Keep the last good keys: a half-written file must not lock everyone out.
                log.warning("JWKS file unreadable; keeping the previous keys",
                            extra={"error": type(exc).__name__})

    def find(self, kid: str | None) -> tuple[Any, str] | None:
        self.refresh()
        if kid is None:
            return next(iter(self.keys.values())) if len(self.keys) == 1 else None
        found = self.keys.get(kid)
        if found is None and time.monotonic() - self.checked >= 0.05:
            self.refresh(force=True)  # a new kid: the file may have been rotated just now
            found = self.keys.get(kid)
        return found


_JWKS_CACHE: dict[str, _Jwks] = {}


def _jwks(path: str) -> _Jwks:
    cache = _JWKS_CACHE.get(path)
    if cache is None:
        cache = _JWKS_CACHE[path] = _Jwks(path)
    return cache


def check_key_material(settings: Settings) -> None:
    """Parse the configured keys at start-up; raises :class:`ConfigError` naming the key."""
    if settings.jwt_public_key:
        _public_key(settings.jwt_public_key)
    if settings.jwks_file:
        jwks = _jwks(settings.jwks_file)
        try:
            jwks.load()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"CHAT_JWKS_FILE: cannot read {settings.jwks_file!r}: {exc}") from None
        if not jwks.keys:
            raise ConfigError("CHAT_JWKS_FILE: no RS256/ES256 signing key in the file")


def _candidates(settings: Settings, header: dict[str, Any]) -> list[tuple[Any, str]]:
    alg = header.get("alg")
    if alg == "HS256":
        return [(secret, "HS256") for secret in hs_secrets(settings)]
    if alg not in ASYMMETRIC:
        return []
    out: list[tuple[Any, str]] = []
    kid = header.get("kid")
    if settings.jwks_file:
        found = _jwks(settings.jwks_file).find(kid if isinstance(kid, str) else None)
        if found is not None:
            out.append(found)
    if settings.jwt_public_key:
        out.append(_public_key(settings.jwt_public_key))
    return [(key, key_alg) for key, key_alg in out if key_alg == alg]


def verify_token(settings: Settings, token: str) -> Identity:
    """Verify a user JWT; raises :class:`Unauthorized` (close 4500 / HTTP 401) if not valid."""
    if not (settings.jwt_secret or settings.jwt_public_key or settings.jwks_file):
        raise Unauthorized("token authentication is not configured on this node")
    if len(token) > MAX_TOKEN_CHARS:
        raise Unauthorized("invalid token")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise Unauthorized("invalid token") from None
    candidates = _candidates(settings, header)
    if not candidates:
        raise Unauthorized("invalid token")
    claims: dict[str, Any] | None = None
    audiences = audiences_of(settings)
    issuer = settings.jwt_issuer or None
    required = ["sub", "exp"] + (["aud"] if audiences else []) + (["iss"] if issuer else [])
    for key, alg in candidates:
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], leeway=settings.jwt_leeway_s,
                audience=audiences or None, issuer=issuer,
                # Without CHAT_JWT_AUDIENCE a token's aud is not checked (PyJWT would otherwise
                # refuse every token that has one, as most identity providers' tokens do).
                options={"require": required, "verify_aud": bool(audiences)},
            )
            break
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.InvalidSignatureError:
            continue  # try the next secret of the rotation
        except jwt.InvalidAudienceError:
            raise Unauthorized("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("token issuer not accepted") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthorized("invalid token") from None
    if claims is None:
        raise Unauthorized("invalid token")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not USER_ID_RE.match(sub):
        raise Unauthorized("invalid token subject")
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        raise Unauthorized("invalid token")
    return Identity(UserId(sub), _name_of(claims, sub), float(exp))


def refresh_identity(settings: Settings, current: Identity, token: Any) -> Identity:
    """The identity of a ``refresh`` frame's token: valid and for the same user, else an error
    (``unauthorized`` for a bad token, ``forbidden`` for another user's)."""
    if not isinstance(token, str) or not token:
        raise Unauthorized("token required")
    if current.expires_at is None:
        raise Forbidden("this session has no token to refresh")
    identity = verify_token(settings, token)
    if identity.user != current.user:
        raise Forbidden("a refresh token must be for the same user")
    return identity


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


def audiences_of(settings: Settings) -> list[str]:
    return [a.strip() for a in settings.jwt_audience.split(",") if a.strip()]


def issue_token(secret: str, user: str, name: str | None = None, ttl_s: int = 3600,
                audience: str | None = None, issuer: str | None = None) -> tuple[str, int]:
    """Sign an HS256 user token with the first secret of ``secret`` (a comma-separated list);
    returns (token, expires_at). ``audience``/``issuer`` set the aud/iss claims."""
    if not USER_ID_RE.match(user):
        raise ValueError("invalid user id")
    secrets_ = hs_secrets(secret)
    if not secrets_:
        raise ValueError("no HS256 secret")
    expires_at = int(time.time()) + int(ttl_s)
    claims: dict[str, Any] = {"sub": user, "exp": expires_at, "iat": int(time.time())}
    if name:
        claims["name"] = name
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secrets_[0], algorithm="HS256"), expires_at
