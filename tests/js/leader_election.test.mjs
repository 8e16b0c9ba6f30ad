// Leader election between tabs: the BroadcastChannel protocol (on Node's real
// BroadcastChannel, which links channels of one name inside the process) and the Web Locks one.
import { test } from "node:test";
import assert from "node:assert/strict";
import { ChannelElection, LockElection, createElection } from "../../node/static/chatcluster.js";

const FAST = { heartbeatMs: 40, timeoutMs: 150, claimMs: 40 };
let seq = 0;

function tabs(n, name = `election-${process.pid}-${++seq}`) {
  const made = [];
  for (let i = 0; i < n; i++) {
    const channel = new BroadcastChannel(name);
    const tab = { changes: [], channel };
    tab.election = new ChannelElection(channel, (leader) => tab.changes.push(leader), { ...FAST, id: `tab-${i}` });
    made.push(tab);
  }
  return made;
}

function until(cond, ms = 3000) {
  return new Promise((resolve, reject) => {
    const start = Date.now();
    const t = setInterval(() => {
      if (cond()) { clearInterval(t); resolve(); } else if (Date.now() - start > ms) { clearInterval(t); reject(new Error("timed out")); }
    }, 5);
  });
}

const leaders = (ts) => ts.filter((t) => t.election.isLeader);

function close(ts) {
  for (const t of ts) {
    if (t.election.state !== "stopped") t.election.stop();
    t.channel.close();
  }
}

test("a lone tab becomes leader", async () => {
  const ts = tabs(1);
  ts[0].election.start();
  await until(() => ts[0].election.isLeader);
  assert.deepEqual(ts[0].changes, [true]);
  close(ts);
});

test("tabs starting together elect exactly one leader, and it stays one", async () => {
  const ts = tabs(4);
  for (const t of ts) t.election.start();
  await until(() => leaders(ts).length === 1);
  await new Promise((r) => setTimeout(r, 400)); // several heartbeat periods
  assert.equal(leaders(ts).length, 1);
  const leader = leaders(ts)[0];
  for (const t of ts) if (t !== leader) assert.equal(t.election.leaderId, leader.election.id);
  close(ts);
});

test("a tab opened later follows the existing leader", async () => {
  const [a, b] = tabs(2);
  a.election.start();
  await until(() => a.election.isLeader);
  b.election.start();
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(b.election.isLeader, false);
  assert.equal(b.election.leaderId, a.election.id);
  close([a, b]);
});

test("when the leader stops (resign), a follower takes over at once", async () => {
  const ts = tabs(3);
  ts[0].election.start();
  await until(() => ts[0].election.isLeader);
  ts[1].election.start();
  ts[2].election.start();
  await new Promise((r) => setTimeout(r, 100));
  ts[0].election.stop();
  assert.deepEqual(ts[0].changes, [true, false]);
  await until(() => leaders(ts).length === 1);
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(leaders(ts).length, 1);
  close(ts);
});

test("when the leader dies silently, a follower takes over after the timeout", async () => {
  const [a, b] = tabs(2);
  a.election.start();
  await until(() => a.election.isLeader);
  b.election.start();
  await new Promise((r) => setTimeout(r, 100));
  // A crash: no resign, the heartbeats just stop.
  clearInterval(a.election._tick);
  a.election.channel.removeEventListener("message", a.election._onMessage);
  const t0 = Date.now();
  await until(() => b.election.isLeader);
  assert.ok(Date.now() - t0 >= FAST.timeoutMs - 60, "took over before the timeout");
  close([a, b]);
});

test("two leaders after a partition resolve to the smaller id", async () => {
  const name = `split-${process.pid}-${++seq}`;
  const [a, b] = tabs(2, name);
  // Each one alone first: both lead.
  const ca = a.channel; const cb = b.channel;
  a.election.channel = { postMessage() {}, addEventListener() {}, removeEventListener() {} };
  b.election.channel = { postMessage() {}, addEventListener() {}, removeEventListener() {} };
  a.election.start();
  b.election.start();
  await until(() => a.election.isLeader && b.election.isLeader);
  // The partition heals.
  for (const t of [a, b]) {
    t.election.channel = t.channel;
    t.channel.addEventListener("message", t.election._onMessage);
  }
  await until(() => leaders([a, b]).length === 1);
  assert.equal(leaders([a, b])[0].election.id, "tab-0");
  assert.deepEqual(b.changes, [true, false]);
  a.election.stop(); b.election.stop();
  ca.close(); cb.close();
});

// A minimal Web Locks manager (exclusive mode, FIFO, AbortSignal), as browsers implement it.
class Locks {
  constructor() { this.held = new Map(); this.queues = new Map(); }
  request(name, options, cb) {
    return new Promise((resolve, reject) => {
      const entry = { cb, resolve, reject };
      if (options.signal) {
        options.signal.addEventListener("abort", () => {
          const q = this.queues.get(name) || [];
          const i = q.indexOf(entry);
          if (i >= 0) { q.splice(i, 1); reject(new Error("AbortError")); }
        });
      }
      if (!this.queues.has(name)) this.queues.set(name, []);
      this.queues.get(name).push(entry);
      this._grant(name);
    });
  }
  _grant(name) {
    if (this.held.get(name)) return;
    const entry = (this.queues.get(name) || []).shift();
    if (!entry) return;
    this.held.set(name, true);
    Promise.resolve(entry.cb()).then(entry.resolve, entry.reject).finally(() => {
      this.held.set(name, false);
      this._grant(name);
    });
  }
}

test("Web Locks: one holder at a time, handed on when it stops", async () => {
  const locks = new Locks();
  const changes = [[], [], []];
  const es = changes.map((c) => new LockElection(locks, "chat:alice", (l) => c.push(l)));
  for (const e of es) e.start();
  await until(() => es.filter((e) => e.isLeader).length === 1);
  assert.ok(es[0].isLeader);
  es[0].stop();
  await until(() => es[1].isLeader);
  assert.equal(es[2].isLeader, false);
  es[2].stop(); // a follower leaving the queue changes nothing
  assert.equal(es[1].isLeader, true);
  es[1].stop();
  assert.deepEqual(changes, [[true, false], [true, false], []]);
});

test("createElection prefers Web Locks, then BroadcastChannel, then a lone leader", async () => {
  const locks = new Locks();
  assert.ok(createElection("x", () => {}, { navigator: { locks }, isSecureContext: true }).inner instanceof LockElection);
  const bc = createElection(`y-${process.pid}`, () => {}, { BroadcastChannel, isSecureContext: false, navigator: { locks } });
  assert.ok(bc instanceof ChannelElection);
  bc.channel.close();
  let led = null;
  createElection("z", (l) => { led = l; }, {}).start();
  assert.equal(led, true);
});

test("a lock manager that refuses (third-party iframe) falls back to the channel election", async () => {
  const refusing = { request: () => Promise.reject(new Error("SecurityError")) };
  const changes = [];
  const e = createElection(`refused-${process.pid}`, (l) => changes.push(l), { navigator: { locks: refusing }, BroadcastChannel });
  e.start();
  await until(() => e.isLeader, 5000);
  assert.ok(e.inner instanceof ChannelElection);
  e.stop();
  e.inner.channel.close();
  assert.deepEqual(changes, [true, false]);
});
