#!/usr/bin/env python3
"""Webhook receiver: verify, deduplicate and handle the chat's webhook events (protocol 5.3).

    CHAT_WEBHOOK_SECRET=... webhook_receiver.py --port 9000

and run the nodes with ``CHAT_WEBHOOK_URL=http://this-host:9000/`` and the same secret. Each
event is printed once as one JSON line on stdout (a real application would store it, index it,
forward it...). What every receiver must do:

1. **Verify** the ``X-Chat-Signature`` header (``sha256=<hex HMAC-SHA256 of the raw body>``)
   against the raw bytes, before parsing them, with a constant-time comparison
   (``hmac.compare_digest``). A request without a valid signature is answered 401 and ignored.
2. **Deduplicate** by ``delivery``: delivery is at least once, so the same event may come again
   (a retry after a timeout, a node that died after sending it). Remember the ids already
   handled -- a bounded set, here the newest ``--remember`` ids; events older than
   ``CHAT_WEBHOOK_MAX_AGE`` are never sent again -- and answer a repeat 2xx without handling it.
3. **Answer 2xx quickly.** Anything else (or no answer within ``CHAT_WEBHOOK_TIMEOUT``) is
   retried with backoff, and the events of the same rooms wait behind it (order per room).

Only the standard library is used.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import sys
import threading
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SIGNATURE_HEADER = "X-Chat-Signature"
MAX_BODY_BYTES = 1 << 20


def verify(secret: bytes, body: bytes, header: str | None) -> bool:
    """Whether ``header`` is the signature of ``body`` (constant-time comparison)."""
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    return header is not None and hmac.compare_digest(expected.encode(), header.encode())


class Deduper:
    """The newest ``size`` delivery ids seen (thread-safe): ``first(id)`` is True only once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def first(self, delivery: str) -> bool:
        with self._lock:
            if delivery in self._seen:
                self._seen.move_to_end(delivery)
                return False
            self._seen[delivery] = None
            if len(self._seen) > self.size:
                self._seen.popitem(last=False)
            return True


def handle(event: dict, delivery: str) -> None:
    """The application's part. Here: one JSON line per event."""
    print(json.dumps({"delivery": delivery, "event": event}), flush=True)


def make_handler(secret: bytes, deduper: Deduper) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 < length <= MAX_BODY_BYTES:
                return self._answer(413 if length > MAX_BODY_BYTES else 400)
            body = self.rfile.read(length)
            if not verify(secret, body, self.headers.get(SIGNATURE_HEADER)):
                return self._answer(401)
            try:
                payload = json.loads(body)
                event, delivery = payload["event"], str(payload["delivery"])
            except (ValueError, KeyError, TypeError):
                return self._answer(400)
            if deduper.first(delivery):
                handle(event, delivery)
            self._answer(204)

        def _answer(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass  # stdout carries the events; no access log

    return Handler


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0: pick a free one")
    parser.add_argument("--remember", type=int, default=100_000, help="delivery ids kept for dedupe")
    args = parser.parse_args()
    secret = os.environ.get("CHAT_WEBHOOK_SECRET", "")
    if not secret:
        print("CHAT_WEBHOOK_SECRET is required", file=sys.stderr)
        return 2
    server = ThreadingHTTPServer((args.host, args.port), make_handler(secret.encode(), Deduper(args.remember)))
    print(f"listening on http://{args.host}:{server.server_address[1]}/", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
