#!/usr/bin/env python3
"""Telephony hook: announce an incoming call to the callee in chat.

A PBX (Asterisk AGI, FreeSWITCH, a SIP provider's webhook...) runs this when a call rings:

    telephony_hook.py --callee bob --caller "+31 20 123 4567" --caller-name "Ann (Sales)"

It injects a ``call`` alert with the caller in ``data``; the browser shows it as a toast at
once if Bob is online. If he is not, the alert waits in his personal stream and he sees the
missed call at his next login. The same can be done from a shell with the CLI:

    chatcluster alert --to bob --kind call --title "Call from Ann (Sales)" --body "+31 20 123 4567"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.request


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callee", required=True, help="chat user id of the person being called")
    parser.add_argument("--caller", required=True, help="calling number")
    parser.add_argument("--caller-name", default="")
    parser.add_argument("--url", default=os.environ.get("CHAT_URL", "http://127.0.0.1:8001"))
    args = parser.parse_args()
    who = args.caller_name or args.caller
    body = {
        "to": [args.callee],
        "kind": "call",
        "title": f"Incoming call from {who}",
        "body": args.caller,
        "data": {"caller": args.caller, "caller_name": args.caller_name},
    }
    request = urllib.request.Request(
        args.url.rstrip("/") + "/api/v1/alerts", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {os.environ['CHAT_API_KEY']}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        result = json.loads(response.read())
    print("ringing in chat" if result.get("online") else "callee offline: alert kept for next login")
    return 0


if __name__ == "__main__":
    sys.exit(main())
