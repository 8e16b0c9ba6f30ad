"""The example scripts in examples/ against a real node."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=30)


async def test_mail_cron_announces_each_new_mail_once(start_nodes, clients, tmp_path):
    (a,) = start_nodes(1)
    bob = await clients(a.ws_url, user="bob")
    maildir = tmp_path / "mail" / "bob" / "new"
    maildir.mkdir(parents=True)
    (maildir / "1700000000.M1.host").write_text("From: Ann <ann@example.com>\nSubject: Quarterly numbers\n\nHi\n")
    env = {"CHAT_URL": a.http_url, "CHAT_API_KEY": "test-api-key"}
    first = await asyncio.to_thread(run, [str(ROOT / "examples/mail_cron.py"), str(tmp_path / "mail")], env)
    assert first.returncode == 0, first.stderr
    event = await bob.next_event("alert")
    assert event["kind"] == "email" and "Ann" in event["title"] and event["body"] == "Quarterly numbers"
    again = await asyncio.to_thread(run, [str(ROOT / "examples/mail_cron.py"), str(tmp_path / "mail")], env)
    assert again.returncode == 0 and again.stdout == ""


async def test_telephony_hook_and_cli_alert_reach_an_offline_user_at_login(start_nodes, clients):
    (a,) = start_nodes(1)
    env = {"CHAT_URL": a.http_url, "CHAT_API_KEY": "test-api-key"}
    hook = await asyncio.to_thread(run, [str(ROOT / "examples/telephony_hook.py"), "--callee", "carl",
                                         "--caller", "+31 20 123 4567", "--caller-name", "Ann"], env)
    assert hook.returncode == 0 and "offline" in hook.stdout, hook.stderr
    cli = await asyncio.to_thread(run, ["-m", "node", "alert", "--to", "carl", "--kind", "voicemail",
                                        "--title", "New voicemail", "--url", a.http_url], env)
    assert cli.returncode == 0, cli.stderr
    carl = await clients(a.ws_url, user="carl")
    first = await carl.next_event("alert")
    second = await carl.next_event("alert")
    assert (first["kind"], first["data"]["caller"]) == ("call", "+31 20 123 4567")
    assert second["kind"] == "voicemail"


async def test_cli_token_signs_a_token_the_node_accepts(start_nodes, clients):
    (a,) = start_nodes(1, CHAT_AUTH="jwt")
    result = await asyncio.to_thread(run, ["-m", "node", "token", "tina", "--name", "Tina T", "--ttl", "600"],
                                     {"CHAT_JWT_SECRET": "test-jwt-secret"})
    assert result.returncode == 0, result.stderr
    tina = await clients(a.ws_url, token=result.stdout.strip())
    assert tina.welcome["user"] == {"id": "tina", "name": "Tina T"}


async def test_webhook_receiver_verifies_signatures_and_handles_each_delivery_once(start_nodes, clients):
    import hashlib
    import hmac
    import json

    import aiohttp

    secret = "example-webhook-secret"
    receiver = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "examples/webhook_receiver.py"), "--port", "0",
        env={**os.environ, "CHAT_WEBHOOK_SECRET": secret},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert receiver.stdout is not None and receiver.stderr is not None
        banner = (await asyncio.wait_for(receiver.stderr.readline(), 10)).decode()
        url = banner.split("listening on ", 1)[1].strip()
        (a,) = start_nodes(1, CHAT_WEBHOOK_URL=url, CHAT_WEBHOOK_SECRET=secret)
        alice = await clients(a.ws_url, user="alice")
        await alice.send("general", "to the webhook")
        line = json.loads(await asyncio.wait_for(receiver.stdout.readline(), 30))
        assert line["event"]["text"] == "to the webhook" and line["event"]["from"]["id"] == "alice"
        # The same delivery again (a retry) is answered 2xx and not handled twice; a forged or
        # unsigned body is refused.
        body = json.dumps({"event": {"type": "message", "room": "general", "text": "forged"},
                           "delivery": line["delivery"]}).encode()
        good = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        async with aiohttp.ClientSession() as http:
            for signature, status in ((good, 204), ("sha256=" + "0" * 64, 401), (None, 401)):
                headers = {"X-Chat-Signature": signature} if signature else {}
                async with http.post(url, data=body, headers=headers) as response:
                    assert response.status == status
            fresh = json.dumps({"event": {"type": "message", "text": "last"}, "delivery": "x-1"}).encode()
            sig = "sha256=" + hmac.new(secret.encode(), fresh, hashlib.sha256).hexdigest()
            async with http.post(url, data=fresh, headers={"X-Chat-Signature": sig}) as response:
                assert response.status == 204
        # The next line printed is the fresh delivery: the duplicate and the forgeries were not.
        after = json.loads(await asyncio.wait_for(receiver.stdout.readline(), 10))
        assert after["delivery"] == "x-1"
    finally:
        receiver.kill()
        await receiver.wait()
