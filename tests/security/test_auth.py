"""Token verification (no sockets): HS256 secret rotation, RS256/ES256 by PEM and by JWKS kid,
JWKS file rotation, and the tokens that must never pass."""

from __future__ import annotations

import base64
import json
import os
import time

import jwt
import pytest

from node import config
from node.auth import check_key_material, issue_token, refresh_identity, verify_token
from node.errors import Forbidden, Unauthorized

from .keys import ec_key, jwk, public_pem, rsa_key, sign

S1 = "first-secret-0123456789abcdef0123456789"
S2 = "second-secret-0123456789abcdef012345678"


def settings(**env: str) -> config.Settings:
    return config.load({"CHAT_JWT_LEEWAY_S": "0", **env})


def test_hs256_rotation_first_signs_all_verify():
    s = settings(CHAT_JWT_SECRET=f"{S1}, {S2}")
    token, _ = issue_token(s.jwt_secret, "alice")
    assert jwt.decode(token, S1, algorithms=["HS256"])["sub"] == "alice"  # signed with the first
    assert verify_token(s, token).user == "alice"
    assert verify_token(s, sign(S2, "bob")).user == "bob"  # the old secret still verifies
    with pytest.raises(Unauthorized):
        verify_token(s, sign("third-secret-0123456789abcdef0123456789", "eve"))
    # Once the old secret is dropped its tokens stop working.
    with pytest.raises(Unauthorized):
        verify_token(settings(CHAT_JWT_SECRET=S1), sign(S2, "bob"))


@pytest.mark.parametrize("make", [rsa_key, ec_key])
def test_public_key_pem(make, tmp_path):
    key = make()
    s = settings(CHAT_JWT_PUBLIC_KEY=public_pem(key))
    identity = verify_token(s, sign(key, "alice", name="Alice"))
    assert (identity.user, identity.name) == ("alice", "Alice")
    # The PEM may be given as a path, or with \n escapes (one-line environment variables).
    path = tmp_path / "key.pem"
    path.write_text(public_pem(key))
    assert verify_token(settings(CHAT_JWT_PUBLIC_KEY=str(path)), sign(key)).user == "alice"
    one_line = public_pem(key).replace("\n", "\\n")
    assert verify_token(settings(CHAT_JWT_PUBLIC_KEY=one_line), sign(key)).user == "alice"
    with pytest.raises(Unauthorized):
        verify_token(s, sign(make(), "alice"))  # another key pair


def _unsigned(header: dict, claims: dict) -> str:
    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64(header)}.{b64(claims)}."


def test_tokens_that_must_never_pass():
    key = rsa_key()
    pem = public_pem(key)
    s = settings(CHAT_JWT_PUBLIC_KEY=pem, CHAT_JWT_SECRET=S1)
    future = int(time.time()) + 3600
    bad = [
        _unsigned({"alg": "none", "typ": "JWT"}, {"sub": "alice", "exp": future}),
        _unsigned({"alg": "None"}, {"sub": "alice", "exp": future}),
        # Algorithm confusion: the public key used as an HMAC secret.
        _hmac_with(pem, {"sub": "alice", "exp": future}),
        sign(key, "alice", ttl=-10),                      # expired
        sign(key, "alice", alg="RS384"),                  # not an accepted algorithm
        jwt.encode({"sub": "alice"}, S1, algorithm="HS256"),                 # no exp
        jwt.encode({"exp": future}, S1, algorithm="HS256"),                  # no sub
        jwt.encode({"sub": "alice", "exp": "tomorrow"}, S1, algorithm="HS256"),
        jwt.encode({"sub": 42, "exp": future}, S1, algorithm="HS256"),
        jwt.encode({"sub": "not a user!", "exp": future}, S1, algorithm="HS256"),
        jwt.encode({"sub": "alice", "exp": future, "nbf": future}, S1, algorithm="HS256"),  # not yet
        "", "a.b", "a.b.c", "...", "x" * 10000, "eyJhbGciOiJIUzI1NiJ9.e30.",
    ]
    for token in bad:
        with pytest.raises(Unauthorized):
            verify_token(s, token)


def _hmac_with(secret: str, claims: dict) -> str:
    # PyJWT refuses PEM text as an HMAC key, so build the token by hand.
    import hashlib
    import hmac

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def test_leeway():
    late = sign(S1, "alice", ttl=-5)
    with pytest.raises(Unauthorized, match="expired"):
        verify_token(settings(CHAT_JWT_SECRET=S1), late)
    assert verify_token(settings(CHAT_JWT_SECRET=S1, CHAT_JWT_LEEWAY_S="30"), late).user == "alice"


def _write_jwks(path, keys) -> None:
    path.write_text(json.dumps({"keys": keys}))
    stamp = time.time_ns() + 1_000_000_000 * len(keys)
    os.utime(path, ns=(stamp, stamp))


def test_jwks_kid_selection_and_rotation(tmp_path):
    k1, k2, k3 = rsa_key(), ec_key(), rsa_key()
    private = jwk(k3, "private")
    private["d"] = "AAAA"
    path = tmp_path / "jwks.json"
    _write_jwks(path, [jwk(k1, "k1"), jwk(k2, "k2"), jwk(k3, "enc", use="enc"), private])
    s = settings(CHAT_JWKS_FILE=str(path))
    check_key_material(s)
    assert verify_token(s, sign(k1, "alice", kid="k1")).user == "alice"
    assert verify_token(s, sign(k2, "bob", kid="k2")).user == "bob"
    for token in (sign(k1, "alice", kid="k2"),         # kid of another key
                  sign(k3, "alice", kid="enc"),        # an encryption key
                  sign(k3, "alice", kid="private"),    # private key material is ignored
                  sign(k1, "alice", kid="nope"),
                  sign(k1, "alice")):                  # no kid, several keys
        with pytest.raises(Unauthorized):
            verify_token(s, token)
    # Rotation: k3 added, k1 removed; the file is re-read on the first unknown kid.
    _write_jwks(path, [jwk(k2, "k2"), jwk(k3, "k3")])
    deadline = time.monotonic() + 5
    while True:
        try:
            assert verify_token(s, sign(k3, "carol", kid="k3")).user == "carol"
            break
        except Unauthorized:
            assert time.monotonic() < deadline, "the rotated JWKS file was never re-read"
    with pytest.raises(Unauthorized):
        verify_token(s, sign(k1, "alice", kid="k1"))
    # A broken file keeps the last good keys.
    path.write_text("{not json")
    os.utime(path, ns=(time.time_ns() + 9_000_000_000,) * 2)
    assert verify_token(s, sign(k2, "bob", kid="k2")).user == "bob"


def test_key_material_checked_at_start(tmp_path):
    with pytest.raises(config.ConfigError, match="CHAT_JWT_PUBLIC_KEY"):
        check_key_material(settings(CHAT_JWT_PUBLIC_KEY="-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"))
    empty = tmp_path / "empty.json"
    empty.write_text('{"keys": []}')
    with pytest.raises(config.ConfigError, match="CHAT_JWKS_FILE"):
        check_key_material(settings(CHAT_JWKS_FILE=str(empty)))
    with pytest.raises(config.ConfigError, match="CHAT_JWKS_FILE"):
        config.require_auth_material(settings(CHAT_JWKS_FILE=str(tmp_path / "missing.json")))


def test_refresh_identity():
    s = settings(CHAT_JWT_SECRET=S1)
    current = verify_token(s, sign(S1, "alice", ttl=10))
    fresh = refresh_identity(s, current, sign(S1, "alice", ttl=3600))
    assert fresh.user == "alice" and fresh.expires_at > current.expires_at
    with pytest.raises(Forbidden):
        refresh_identity(s, current, sign(S1, "mallory", ttl=3600))
    for token in (None, "", 42, "garbage", sign(S1, "alice", ttl=-100)):
        with pytest.raises(Unauthorized):
            refresh_identity(s, current, token)


def test_audience_and_issuer():
    # Unset: aud and iss are not checked (a provider's token with an aud still passes).
    assert verify_token(settings(CHAT_JWT_SECRET=S1), sign(S1, "alice", aud="anything", iss="x")).user == "alice"
    s = settings(CHAT_JWT_SECRET=S1, CHAT_JWT_AUDIENCE="chat, chat-staging", CHAT_JWT_ISSUER="https://idp.example")
    for aud in ("chat", "chat-staging", ["other", "chat"]):
        assert verify_token(s, sign(S1, "alice", aud=aud, iss="https://idp.example")).user == "alice"
    with pytest.raises(Unauthorized, match="audience"):
        verify_token(s, sign(S1, "eve", aud="other", iss="https://idp.example"))
    with pytest.raises(Unauthorized, match="issuer"):
        verify_token(s, sign(S1, "eve", aud="chat", iss="https://evil.example"))
    for missing in ({"iss": "https://idp.example"}, {"aud": "chat"}):
        with pytest.raises(Unauthorized):
            verify_token(s, sign(S1, "eve", **missing))
    # Tokens the node signs itself carry what it requires.
    token, _ = issue_token(S1, "bob", audience="chat", issuer="https://idp.example")
    assert verify_token(s, token).user == "bob"
