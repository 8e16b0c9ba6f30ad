#!/usr/bin/env python3
"""Cron job: announce new e-mail to chat users.

Run every minute from cron; it looks for new messages in each user's Maildir ``new/`` folder
and injects one ``email`` alert per new message through the cluster's server API. Users who
are offline get the alert at their next login (it is kept in their personal stream).

    * * * * *  CHAT_URL=http://chat-lb:8001 CHAT_API_KEY=... /usr/local/bin/mail_cron.py /srv/mail

``/srv/mail/<user>/new/<file>`` is a standard Maildir. A state file remembers what was
announced, so a message is announced once even if the job runs twice.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path


def post_alert(url: str, key: str, users: list[str], title: str, body: str, data: dict) -> dict:
    request = urllib.request.Request(
        url.rstrip("/") + "/api/v1/alerts",
        data=json.dumps({"to": users, "kind": "email", "title": title, "body": body, "data": data}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def main(root: str) -> int:
    url = os.environ.get("CHAT_URL", "http://127.0.0.1:8001")
    key = os.environ["CHAT_API_KEY"]
    state_path = Path(os.environ.get("MAIL_CRON_STATE", Path(root) / ".announced.json"))
    announced: set[str] = set(json.loads(state_path.read_text())) if state_path.exists() else set()
    for user_dir in sorted(Path(root).iterdir()):
        new_dir = user_dir / "new"
        if not new_dir.is_dir():
            continue
        for path in sorted(new_dir.iterdir()):
            ident = f"{user_dir.name}/{path.name}"
            if ident in announced:
                continue
            with path.open("rb") as handle:
                message = email.message_from_binary_file(handle, policy=email.policy.default)
            sender = str(message.get("From", "someone"))[:100]
            subject = str(message.get("Subject", "(no subject)"))[:150]
            try:
                result = post_alert(url, key, [user_dir.name], f"New mail from {sender}", subject,
                                    {"folder": "inbox", "file": path.name})
            except urllib.error.URLError as exc:
                print(f"cannot reach {url}: {exc}", file=sys.stderr)
                return 1
            announced.add(ident)
            where = "live" if result.get("online") else "queued"
            print(f"{ident}: alert {result.get('id')} ({where})")
    state_path.write_text(json.dumps(sorted(announced)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/var/mail/maildirs"))
