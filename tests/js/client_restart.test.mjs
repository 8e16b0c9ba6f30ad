// A client closed while it starts, and replaced by the next one at once (the demo page in the
// widget's iframe given its login twice: `chatcluster:init`, then `chatcluster:login`). Both bugs
// left the next client idle for ever, without a connection, because a dead one held the lock.
//
// LockElection when the lock is granted after stop(): a browser decides the grant, then runs the
// callback in a later task, so an abort in between comes too late to cancel the request. The
// stopped election must hand the lock straight back.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ChatClient, LockElection } from "../../node/static/chatcluster.js";

// Exclusive, FIFO; the grant is decided at once and the callback runs in a later task.
class LateLocks {
  constructor() { this.held = false; this.queue = []; }
  request(name, options, cb) {
    return new Promise((resolve, reject) => {
      const entry = { cb, resolve, reject, signal: options.signal };
      options.signal.addEventListener("abort", () => {
        const i = this.queue.indexOf(entry);
        if (i >= 0) { this.queue.splice(i, 1); reject(new Error("AbortError")); }
      });
      this.queue.push(entry);
      this._grant();
    });
  }
  _grant() {
    if (this.held || !this.queue.length) return;
    const entry = this.queue.shift(); // granted: an abort from now on changes nothing
    this.held = true;
    setTimeout(() => {
      Promise.resolve(entry.cb()).then(entry.resolve, entry.reject).finally(() => {
        this.held = false;
        this._grant();
      });
    }, 0);
  }
}

async function until(cond, ms = 2000) {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error("timed out");
    await new Promise((r) => setTimeout(r, 5));
  }
}

test("a lock granted after stop() is given back, and the next election leads", async () => {
  const locks = new LateLocks();
  const first = [];
  const a = new LockElection(locks, "chat:erin", (l) => first.push(l));
  a.start();
  a.stop(); // the grant is already on its way
  const second = [];
  const b = new LockElection(locks, "chat:erin", (l) => second.push(l));
  b.start();
  await until(() => b.isLeader);
  assert.equal(a.isLeader, false);
  assert.deepEqual(first, []);
  assert.deepEqual(second, [true]);
  b.stop();
  await until(() => !locks.held);
});

test("a client closed while it fetches the config starts nothing afterwards", async () => {
  const realFetch = globalThis.fetch;
  let answer;
  globalThis.fetch = () => new Promise((resolve) => { answer = resolve; });
  const storage = new Map();
  const client = new ChatClient({
    user: "erin", httpUrl: "http://chat.invalid",
    storage: { getItem: (k) => storage.get(k) ?? null, setItem: (k, v) => storage.set(k, String(v)), removeItem: (k) => storage.delete(k) },
  });
  try {
    const started = client.start();
    client.close();
    answer({ json: async () => ({ auth: "dev", poll: {} }) });
    await started;
    // No election joined: in a browser it would have taken the user's Web Lock and, being
    // stopped, never led nor let go of it.
    assert.equal(client.election, undefined);
    assert.equal(client.isLeader, false);
    assert.equal(client.status, "stopped");
  } finally {
    globalThis.fetch = realFetch;
    if (client.election) client.election.stop();
    if (client.channel) client.channel.close();
  }
});
