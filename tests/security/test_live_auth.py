"""Authentication on live nodes: RS256/ES256 by JWKS kid, the token_expiring/refresh window
(close 4500 without a refresh), the Python client's token provider, and the dev-auth start check."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import aiohttp
import jwt

from ..integration.wire import close_code, next_of, next_reply, raw_connect, send_json
from .keys import ec_key, jwk, rsa_key, sign

SECRET = "live-secret-0123456789abcdef0123456789"
JWT_ENV = {"CHAT_AUTH": "jwt", "CHAT_JWT_SECRET": SECRET, "CHAT_JWT_LEEWAY_S": 0}


def hs(user: str, ttl: float) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time() + ttl)}, SECRET, algorithm="HS256")


async def test_jwks_tokens_over_ws_and_http(start_nodes, tmp_path):
    rsa, ec = rsa_key(), ec_key()
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk(rsa, "r1"), jwk(ec, "e1")]}))
    (a,) = start_nodes(1, CHAT_AUTH="jwt", CHAT_JWKS_FILE=str(path), CHAT_JWT_SECRET="")
    for key, kid, user in ((rsa, "r1", "rsa-user"), (ec, "e1", "ec-user")):
        ws = await raw_connect(a.ws_url)
        await send_json(ws, {"type": "hello", "token": sign(key, user, kid=kid, name="N")})
        assert (await next_of(ws, "welcome"))["user"] == {"id": user, "name": "N"}
        await ws.close()
    ws = await raw_connect(a.ws_url)
    await send_json(ws, {"type": "hello", "token": sign(rsa, "x", kid="e1")})  # wrong kid
    assert await close_code(ws) == 4500
    async with aiohttp.ClientSession() as http:
        ok = await http.post(a.http_url + "/api/v1/command", json={"type": "ping"},
                             headers={"Authorization": "Bearer " + sign(ec, "ec-user", kid="e1")})
        assert ok.status == 200
        bad = await http.post(a.http_url + "/api/v1/command", json={"type": "ping"},
                              headers={"Authorization": "Bearer " + sign(ec_key(), "ec-user", kid="e1")})
        assert bad.status == 401 and (await bad.json())["error"]["code"] == "unauthorized"
        # This node verifies with public keys only: it cannot mint tokens.
        minted = await http.post(a.http_url + "/api/v1/tokens", json={"user": "x"},
                                 headers={"Authorization": "Bearer test-api-key"})
        assert minted.status == 401


async def test_token_expiring_then_refresh_or_close_4500(start_nodes):
    (a,) = start_nodes(1, CHAT_TOKEN_NOTICE_S=1, CHAT_TOKEN_REFRESH_WINDOW_S=1, **JWT_ENV)
    ttl = 2
    keeper, lapser = await raw_connect(a.ws_url), await raw_connect(a.ws_url)
    for ws, user in ((keeper, "keeper"), (lapser, "lapser")):
        await send_json(ws, {"type": "hello", "token": hs(user, ttl)})
        welcome = await next_of(ws, "welcome")
        assert welcome["limits"]["token_refresh_window_s"] == 1
    notice = await next_of(keeper, "token_expiring", timeout=5)
    assert notice["expires_at"] <= int(time.time()) + ttl and notice["close_at"] == notice["expires_at"] + 1
    # A token for someone else, or a bad one: refused, the connection stays.
    await send_json(keeper, {"type": "refresh", "ref": "r0", "token": hs("mallory", 3600)})
    reply = await next_reply(keeper)
    assert reply["ok"] is False and reply["error"]["code"] == "forbidden"
    await send_json(keeper, {"type": "refresh", "ref": "r1", "token": "garbage"})
    reply = await next_reply(keeper)
    assert reply["ok"] is False and reply["error"]["code"] == "unauthorized"
    await send_json(keeper, {"type": "refresh", "ref": "r2"})
    assert (await next_reply(keeper))["error"]["code"] == "bad_request"
    await send_json(keeper, {"type": "refresh", "ref": "r3", "token": hs("keeper", 3600)})
    reply = await next_reply(keeper)
    assert reply["ok"] is True and reply["data"]["expires_at"] > time.time() + 3000
    # The one that did not refresh is closed 4500 after expiry + window ...
    started = time.monotonic()
    assert await close_code(lapser, timeout=8) == 4500
    assert time.monotonic() - started <= 5
    # ... at the same moment the refreshed one would have been; it still answers.
    await send_json(keeper, {"type": "ping", "ref": "alive"})
    assert (await next_reply(keeper))["ok"] is True
    await keeper.close()
    # A refresh over HTTP makes no sense (tokens travel with every request).
    async with aiohttp.ClientSession() as http:
        r = await http.post(a.http_url + "/api/v1/command", json={"type": "refresh", "token": hs("keeper", 60)},
                            headers={"Authorization": "Bearer " + hs("keeper", 60)})
        assert r.status == 400


async def test_python_client_refreshes_with_its_token_provider(start_nodes, clients):
    (a,) = start_nodes(1, CHAT_TOKEN_NOTICE_S=1, CHAT_TOKEN_REFRESH_WINDOW_S=1, **JWT_ENV)
    calls = []

    async def provider() -> str:
        calls.append(time.time())
        return hs("carol", 3600)

    carol = await clients(a.ws_url, token=hs("carol", 2), token_provider=provider, reconnect=False)
    witness = await raw_connect(a.ws_url)
    await send_json(witness, {"type": "hello", "token": hs("witness", 2)})
    await next_of(witness, "welcome")
    assert await close_code(witness, timeout=8) == 4500  # the old expiry and window are over
    assert carol.refreshes == 1 and len(calls) == 1
    ack = await carol.send("general", "still here")
    assert ack["seq"] >= 1
    assert carol.close_codes == []


def _node_cmd(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "CHAT_WS_PORT": "0", "CHAT_HTTP_PORT": "0", "CHAT_LOG_FORMAT": "json",
            "CHAT_REDIS_URL": "redis://127.0.0.1:1/0", **env}
    return subprocess.run([sys.executable, "-m", "node", "node"], env=full, capture_output=True,
                          text=True, timeout=30)


def test_dev_auth_refuses_a_public_address():
    for host in ("0.0.0.0", "::", "192.0.2.10"):
        done = _node_cmd({"CHAT_AUTH": "dev", "CHAT_HOST": host})
        assert done.returncode == 2, (host, done.stderr)
        assert "CHAT_DEV_FORCE" in done.stderr
        assert any("refusing to start" in line for line in done.stderr.splitlines()), done.stderr
    # jwt mode without key material does not start either.
    done = _node_cmd({"CHAT_AUTH": "jwt", "CHAT_JWT_SECRET": "", "CHAT_HOST": "127.0.0.1"})
    assert done.returncode == 2 and "CHAT_JWT_SECRET" in done.stderr


async def test_dev_auth_forced_starts_and_says_so(start_nodes, tmp_path):
    (a,) = start_nodes(1, CHAT_HOST="0.0.0.0", CHAT_DEV_FORCE="true")
    ws = await raw_connect(a.ws_url)
    await send_json(ws, {"type": "hello", "user": "anyone"})
    assert (await next_of(ws, "welcome"))["user"]["id"] == "anyone"
    await ws.close()
    log = (tmp_path / "node-1.log").read_text()
    warning = [json.loads(line) for line in log.splitlines() if "DEV AUTH" in line]
    assert warning and warning[0]["level"] in ("WARNING", "warning") and warning[0].get("forced") is True


async def test_loopback_dev_auth_logs_a_warning(start_nodes, tmp_path):
    start_nodes(1, CHAT_HOST="127.0.0.1")
    assert "DEV AUTH" in (tmp_path / "node-1.log").read_text()
