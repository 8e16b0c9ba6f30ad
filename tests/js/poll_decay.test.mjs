// The client-side poll decay and the other pure helpers of chatcluster.js.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  nextPollDelay, backoffDelay, closeAction, compareIds, wsUrlFor, userIdFromName, dmPeer, jwtSubject, DEFAULT_POLL,
} from "../../node/static/chatcluster.js";

const cfg = { min_ms: 1000, max_ms: 30000, decay: 1.5, unfocused_ms: 15000 };

test("activity snaps the interval back to the minimum", () => {
  assert.equal(nextPollDelay(20000, true, true, cfg), 1000);
  assert.equal(nextPollDelay(1000, true, true, cfg), 1000);
});

test("empty polls grow the interval by the decay factor up to the maximum", () => {
  const seen = [];
  let ms = cfg.min_ms;
  for (let i = 0; i < 12; i++) {
    ms = nextPollDelay(ms, false, true, cfg);
    seen.push(ms);
  }
  assert.deepEqual(seen.slice(0, 4), [1500, 2250, 3375, 5063]);
  assert.equal(Math.max(...seen), 30000);
  assert.equal(seen.at(-1), 30000);
  for (let i = 1; i < seen.length; i++) assert.ok(seen[i] >= seen[i - 1]);
});

test("an unfocused client waits at least the unfocused interval, with or without events", () => {
  assert.equal(nextPollDelay(1000, true, false, cfg), 15000);
  assert.equal(nextPollDelay(1000, false, false, cfg), 15000);
  assert.equal(nextPollDelay(20000, false, false, cfg), 30000);
});

test("garbage in gives the minimum, and defaults apply", () => {
  assert.equal(nextPollDelay(undefined, false, true, cfg), 1500);
  assert.equal(nextPollDelay(-5, true, true), DEFAULT_POLL.min_ms);
  assert.equal(nextPollDelay(100, false, true, { min_ms: 200, max_ms: 1600, decay: 1.5, unfocused_ms: 200 }), 200);
});

test("backoff is full jitter under an exponential cap", () => {
  assert.equal(backoffDelay(0, { minMs: 500, maxMs: 15000 }, () => 1), 500);
  assert.equal(backoffDelay(3, { minMs: 500, maxMs: 15000 }, () => 1), 4000);
  assert.equal(backoffDelay(30, { minMs: 500, maxMs: 15000 }, () => 1), 15000);
  assert.equal(backoffDelay(5, { minMs: 500, maxMs: 15000 }, () => 0), 0);
});

test("close codes: 4000-4499 reconnect, 4500-4999 stop, others reconnect", () => {
  for (const code of [1000, 1001, 1006, 1009, 1011, 1013, 4000, 4001, 4002, 4003, 4499]) assert.equal(closeAction(code), "reconnect", code);
  for (const code of [4500, 4501, 4502, 4999]) assert.equal(closeAction(code), "stop", code);
});

test("stream ids compare numerically", () => {
  assert.ok(compareIds("9-0", "10-0") < 0);
  assert.ok(compareIds("1732200000000-10", "1732200000000-9") > 0);
  assert.equal(compareIds("5-5", "5-5"), 0);
});

test("WebSocket URL: the node's WS port when served by the node, else the same host", () => {
  const config = { ws_port: 8000, http_port: 8001, ws_path: "/ws" };
  assert.equal(wsUrlFor(new URL("http://chat.local:8001/"), config), "ws://chat.local:8000/ws");
  assert.equal(wsUrlFor(new URL("https://chat.example.com/app"), config), "wss://chat.example.com/ws");
  assert.equal(wsUrlFor(new URL("http://127.0.0.1:9999/"), config), "ws://127.0.0.1:9999/ws");
});

test("ids from names, DM peers, JWT subjects", () => {
  assert.equal(userIdFromName("Zoë Smith"), "zoe.smith");
  assert.match(userIdFromName("!!!"), /^user\d+$/);
  assert.equal(dmPeer("dm:alice:bob", "alice"), "bob");
  assert.equal(dmPeer("dm:alice:bob", "bob"), "alice");
  const payload = Buffer.from(JSON.stringify({ sub: "carol" })).toString("base64url");
  assert.equal(jwtSubject(`x.${payload}.y`), "carol");
  assert.equal(jwtSubject("nonsense"), null);
});
