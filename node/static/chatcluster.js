// chatcluster.js: the browser client of chatcluster (wire contract v1.1, docs/protocol.md).
// An ES module with no dependencies and no build step:
//
//   import { ChatClient } from "/static/chatcluster.js";
//   const chat = new ChatClient({ user: "alice", name: "Alice" });   // or { token: JWT }
//   chat.on("message", (m) => console.log(m.from.name, m.text));
//   await chat.start();
//   await chat.send("general", "hello");
//
// What it does for the page:
// - WebSocket first; falls back to HTTP polling when the WebSocket can't connect or keeps
//   dropping, remembers that for the browser session and tries the WebSocket again later.
// - Reconnects with jittered backoff; close codes 4000-4499 reconnect and resume, 4500-4999
//   stop; a `reconnect` event's retry_after_ms is honoured.
// - Keeps the cursors (per room {epoch, id} and the personal one) and the last messages of
//   every room in localStorage, so a reload, a navigation or a switch of node resumes exactly
//   where it stopped: nothing lost, nothing downloaded twice.
// - Unacknowledged sends are sent again with the same cmid (the server deduplicates).
// - One connection per browser and user: tabs elect a leader (Web Locks, else a heartbeat
//   protocol on BroadcastChannel) that holds the connection and relays events to the other
//   tabs; followers send their commands through it. Only the focused tab emits `notify`.
// - v1.1: edit()/delete() of messages (held messages follow the `edit`/`delete` events: edited
//   text with edited_at, or a tombstone {deleted: true} with no text, in memory and storage),
//   setRole()/kick()/members(), each room's `role`, `mentions` (unread messages that mention
//   this user) and `read_by` (other members' read markers, from summaries and `receipt` events).
//
// The pure parts (decay, backoff, close codes, ids, elections) are exported for unit tests.

export const VERSION = "1.1";
const CLIENT_NAME = `chatcluster-js/${VERSION}`;

// ---------------------------------------------------------------------------------------
// Pure helpers
// ---------------------------------------------------------------------------------------

/** Order of two stream ids ("ms-seq"): negative, zero or positive. */
export function compareIds(a, b) {
  const [am, as] = String(a).split("-");
  const [bm, bs] = String(b).split("-");
  if (am.length !== bm.length) return am.length - bm.length; // no leading zeros in stream ids
  if (am !== bm) return am < bm ? -1 : 1;
  const d = Number(as || 0) - Number(bs || 0);
  return d < 0 ? -1 : d > 0 ? 1 : 0;
}

export const DEFAULT_POLL = { min_ms: 1000, max_ms: 30000, decay: 1.5, unfocused_ms: 15000 };

/**
 * The next poll interval, the same arithmetic as the server's: the minimum after a poll that
 * returned events, else the previous interval times the decay, capped at the maximum; an
 * unfocused client waits at least the unfocused interval.
 */
export function nextPollDelay(previousMs, hadEvents, focused, cfg = DEFAULT_POLL) {
  const { min_ms: min, max_ms: max, decay, unfocused_ms: unfocused } = { ...DEFAULT_POLL, ...cfg };
  const prev = Number.isFinite(previousMs) && previousMs > 0 ? previousMs : min;
  let next = hadEvents ? min : Math.min(max, Math.max(min, Math.round(prev * decay)));
  if (!focused) next = Math.max(next, unfocused);
  return next;
}

/** Full-jitter exponential backoff: uniform in [0, min(max, base * 2^attempt)]. */
export function backoffDelay(attempt, { minMs = 500, maxMs = 15000 } = {}, random = Math.random) {
  const cap = Math.min(maxMs, minMs * 2 ** Math.max(0, attempt));
  return Math.round(random() * cap);
}

/** What a close code asks of the client: "reconnect" or "stop". */
export function closeAction(code) {
  return code >= 4500 && code <= 4999 ? "stop" : "reconnect";
}

/** The WebSocket URL for a page at `loc` (a Location) given the node's /api/v1/config. */
export function wsUrlFor(loc, config) {
  const scheme = loc.protocol === "https:" ? "wss:" : "ws:";
  const path = (config && config.ws_path) || "/ws";
  if (config && config.ws_port && String(loc.port) === String(config.http_port)) {
    return `${scheme}//${loc.hostname}:${config.ws_port}${path}`;
  }
  return `${scheme}//${loc.host}${path}`;
}

/** A valid user id made from a display name ("Zoë Smith" -> "zoe.smith"). */
export function userIdFromName(name) {
  const id = String(name).normalize("NFKD").replace(/[\u0300-\u036f]/g, "").trim().toLowerCase()
    .replace(/\s+/g, ".").replace(/[^a-z0-9_.@-]/g, "").slice(0, 64);
  return id || "user" + Math.floor(Math.random() * 1e6);
}

/** The `sub` claim of a JWT, without verifying it (the server does that). */
export function jwtSubject(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return JSON.parse(atob(part)).sub || null;
  } catch {
    return null;
  }
}

/** The other member of a direct room id `dm:a:b`. */
export function dmPeer(roomId, me) {
  const [, a, b] = String(roomId).split(":");
  return a === me ? b : a;
}

// -- mentions (protocol v1.1, 5.2): the same rule as the node's (node/mentions.py) -------------

/** `@word` at the start of the text or after whitespace; the word as a user id may go on. */
const MENTION_RE = /(?<!\S)@([A-Za-z0-9_.@-]{1,64})/g;
const USER_ID_RE = /^[A-Za-z0-9_.@-]{1,64}$/;
export const MAX_MENTIONS = 20; // @words considered per message, as on the node

/**
 * The user ids a text may mention, in text order (membership is the node's call): each of the
 * first MAX_MENTIONS `@words`, also without a trailing `.`, `-` or `@` ("@bob." names bob).
 */
export function mentionCandidates(text, author = null, cap = MAX_MENTIONS) {
  const out = [];
  let words = 0;
  for (const m of String(text || "").matchAll(MENTION_RE)) {
    const word = m[1];
    for (const user of [word, word.replace(/[.\-@]+$/, "")]) {
      if (user && user !== author && !out.includes(user) && USER_ID_RE.test(user)) out.push(user);
    }
    if (++words >= cap) break;
  }
  return out;
}

/** Whether a message event mentions `userId` (never one's own, never a system message). */
export function mentionsUser(msg, userId) {
  if (!msg || msg.kind === "system" || msg.deleted || !msg.from || msg.from.id === userId) return false;
  return mentionCandidates(msg.text, msg.from.id).includes(userId);
}

/**
 * A text cut into parts for display: `{text}` and `{text, mention: userId}` (the `@` and the
 * id, a trailing `.`/`-` left outside). Joined, the parts give the text back unchanged; render
 * each part as a text node (never as HTML).
 */
export function mentionParts(text) {
  const s = String(text || "");
  const parts = [];
  let last = 0;
  for (const m of s.matchAll(MENTION_RE)) {
    const user = m[1].replace(/[.\-@]+$/, "");
    if (!user || !USER_ID_RE.test(user)) continue;
    if (m.index > last) parts.push({ text: s.slice(last, m.index) });
    parts.push({ text: "@" + user, mention: user });
    last = m.index + 1 + user.length;
  }
  if (last < s.length || !parts.length) parts.push({ text: s.slice(last) });
  return parts;
}

/**
 * The `@` word being typed at `caret` in a composer: `{start, query}` (start: the index of the
 * `@`, query: what follows it up to the caret) or null when the caret is not in one.
 */
export function mentionQuery(text, caret = String(text).length) {
  const before = String(text).slice(0, caret);
  const m = /(?:^|\s)@([A-Za-z0-9_.@-]{0,64})$/.exec(before);
  if (!m) return null;
  return { start: caret - m[1].length - 1, query: m[1] };
}

/** Users whose id or name starts with (then contains) `query`, case-insensitive, at most `limit`. */
export function mentionMatches(users, query, limit = 8) {
  const q = String(query || "").toLowerCase();
  const scored = [];
  for (const u of users) {
    const id = u.id.toLowerCase();
    const name = String(u.name || "").toLowerCase();
    const rank = id.startsWith(q) ? 0 : name.startsWith(q) || name.split(/\s+/).some((w) => w.startsWith(q)) ? 1
      : id.includes(q) || name.includes(q) ? 2 : -1;
    if (rank >= 0) scored.push([rank, u]);
  }
  scored.sort((a, b) => a[0] - b[0] || a[1].id.localeCompare(b[1].id));
  return scored.slice(0, limit).map(([, u]) => u);
}

/** Whether a direct room's other member has read up to message `id` (from read_by/receipts). */
export function seenBy(room, id, userId) {
  if (!room || !id || !Array.isArray(room.read_by)) return false;
  return room.read_by.some((r) => r && r.id !== userId && r.read_id && r.read_id !== "0-0" && compareIds(r.read_id, id) >= 0);
}

/** A held message in the state an `edit` or `delete` leaves it (a tombstone keeps no text). */
export function foldChange(msg, change) {
  if (change.type === "delete") {
    const tomb = { room: msg.room, id: msg.id, seq: msg.seq, ts: msg.ts, from: msg.from, deleted: true };
    if (change.by) tomb.deleted_by = change.by;
    return tomb;
  }
  if (msg.deleted) return msg;
  return { ...msg, text: change.text, edited_at: change.edited_at };
}

function randomId(n = 12) {
  let s = "";
  while (s.length < n) s += Math.random().toString(36).slice(2);
  return s.slice(0, n);
}

// ---------------------------------------------------------------------------------------
// Leader election between the tabs of one user
// ---------------------------------------------------------------------------------------

/**
 * Election with the Web Locks API: whoever holds the exclusive lock is the leader, and the
 * browser hands the lock to the next tab in line when the leader's tab closes or crashes.
 * `onChange(isLeader)` is called on every change.
 */
export class LockElection {
  constructor(locks, name, onChange, onError = null) {
    this.onError = onError; // the lock manager refused (e.g. a third-party iframe without storage)
    this.locks = locks;
    this.name = name;
    this.onChange = onChange;
    this.isLeader = false;
    this._release = null;
    this._abort = null;
  }

  start() {
    const abort = this._abort = new AbortController();
    this.locks.request(this.name, { mode: "exclusive", signal: abort.signal }, () => {
      // Granted after stop() (the grant was already on its way when the abort came): give the
      // lock back at once, or this stopped election would hold it for ever and no tab would lead.
      if (abort.signal.aborted) return undefined;
      this.isLeader = true;
      this.onChange(true);
      return new Promise((resolve) => { this._release = resolve; });
    }).catch((err) => {
      if (!this._abort.signal.aborted && this.onError) this.onError(err);
    });
  }

  stop() {
    if (this._abort) this._abort.abort();
    const wasLeader = this.isLeader;
    this.isLeader = false;
    if (this._release) this._release();
    this._release = null;
    if (wasLeader) this.onChange(false);
  }
}

/**
 * Election over a BroadcastChannel, for browsers without Web Locks (or insecure origins).
 * The leader sends a heartbeat every `heartbeatMs`; a follower that hears none for
 * `timeoutMs` claims leadership, and wins if no heartbeat and no smaller claim arrives within
 * `claimMs`. Two leaders (a partition healed) resolve to the smaller id. A leader that stops
 * says `resign` so a successor takes over at once.
 */
export class ChannelElection {
  constructor(channel, onChange, opts = {}) {
    this.channel = channel;
    this.onChange = onChange;
    this.id = opts.id || `${Date.now().toString(36)}-${randomId(8)}`;
    this.heartbeatMs = opts.heartbeatMs ?? 1000;
    this.timeoutMs = opts.timeoutMs ?? 3000;
    this.claimMs = opts.claimMs ?? 250;
    this.now = opts.now || (() => Date.now());
    this.state = "idle"; // idle | follower | candidate | leader | stopped
    this.leaderId = null;
    this._lastHeartbeat = 0;
    this._tick = null;
    this._claimTimer = null;
    this._onMessage = (e) => this._receive(e.data);
  }

  get isLeader() { return this.state === "leader"; }

  start() {
    this.channel.addEventListener("message", this._onMessage);
    this.state = "follower";
    this._lastHeartbeat = this.now() - this.timeoutMs + 2 * this.claimMs; // short grace period
    this._post({ k: "who" });
    this._tick = setInterval(() => this._onTick(), Math.min(this.heartbeatMs, this.claimMs));
  }

  stop() {
    const wasLeader = this.isLeader;
    clearInterval(this._tick);
    clearTimeout(this._claimTimer);
    if (wasLeader) this._post({ k: "resign" });
    this.channel.removeEventListener("message", this._onMessage);
    this.state = "stopped";
    if (wasLeader) this.onChange(false);
  }

  _post(msg) { this.channel.postMessage({ ...msg, id: this.id, election: 1 }); }

  _onTick() {
    const now = this.now();
    if (this.state === "leader") {
      if (now - this._lastSent >= this.heartbeatMs) this._heartbeat();
    } else if (this.state === "follower" && now - this._lastHeartbeat > this.timeoutMs) {
      this._claim();
    }
  }

  _heartbeat() {
    this._lastSent = this.now();
    this._post({ k: "hb" });
  }

  _claim() {
    this.state = "candidate";
    this._post({ k: "claim" });
    clearTimeout(this._claimTimer);
    this._claimTimer = setTimeout(() => {
      if (this.state !== "candidate") return;
      this.state = "leader";
      this.leaderId = this.id;
      this._heartbeat();
      this.onChange(true);
    }, this.claimMs);
  }

  _follow(leaderId) {
    const wasLeader = this.isLeader;
    clearTimeout(this._claimTimer);
    this.state = "follower";
    this.leaderId = leaderId;
    this._lastHeartbeat = this.now();
    if (wasLeader) this.onChange(false);
  }

  _receive(msg) {
    if (!msg || !msg.election || msg.id === this.id || this.state === "stopped" || this.state === "idle") return;
    switch (msg.k) {
      case "hb":
        if (this.state === "leader") {
          if (msg.id < this.id) this._follow(msg.id); // two leaders: the smaller id wins
          else this._heartbeat();
        } else {
          this._follow(msg.id);
        }
        break;
      case "who":
        if (this.state === "leader") this._heartbeat();
        break;
      case "claim":
        if (this.state === "leader") this._heartbeat();
        else if (this.state === "candidate" && msg.id < this.id) this._follow(null);
        break;
      case "resign":
        if (this.state === "follower" && (this.leaderId === msg.id || this.leaderId === null)) {
          // Everyone claims at once; the smallest id wins the claim round.
          this._claim();
        }
        break;
    }
  }
}

/** The best election this browser supports for `name`. */
export function createElection(name, onChange, env = globalThis) {
  const channelOrAlone = () => {
    try {
      if (typeof env.BroadcastChannel === "function") {
        return new ChannelElection(new env.BroadcastChannel(name + ":election"), onChange);
      }
    } catch { /* denied */ }
    return { isLeader: true, start() { onChange(true); }, stop() {} }; // a lone tab
  };
  const locks = env.navigator && env.navigator.locks;
  if (locks && typeof locks.request === "function" && env.isSecureContext !== false) {
    // If the lock manager refuses at run time, fall back to the next best, started at once.
    const proxy = {
      inner: null,
      get isLeader() { return this.inner.isLeader; },
      start() { this.inner.start(); },
      stop() { this.inner.stop(); },
    };
    proxy.inner = new LockElection(locks, name, onChange, () => {
      proxy.inner = channelOrAlone();
      proxy.inner.start();
    });
    return proxy;
  }
  return channelOrAlone();
}

// ---------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------

export class ChatError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
    this.detail = message;
  }
}

class HttpError extends Error {
  constructor(status, body) {
    super(`HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

const PERSONAL_KINDS = new Set(["alert", "room", "unread"]);

/** Resolves after `ms`, or as soon as one of the signals aborts. */
function sleep(ms, ...signals) {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(t);
      for (const s of signals) s.removeEventListener("abort", done);
      resolve();
    };
    const t = setTimeout(done, ms);
    for (const s of signals) {
      if (s.aborted) return done();
      s.addEventListener("abort", done);
    }
  });
}

/**
 * Options: `user` + `name` (dev auth) or `token` (JWT); `httpUrl` (default: the page's
 * origin); `wsUrl` (default: window.CHATCLUSTER_WS_URL, else derived from /api/v1/config);
 * `transport` ("auto" | "ws" | "poll"); `tabs` (share one connection between tabs, default
 * true); `cachePerRoom` (messages kept per room in storage, default 200); `backoffMinMs`,
 * `backoffMaxMs`, `wsRetryMs` (how long polling lasts before the WebSocket is tried again);
 * `storage` (a localStorage-like object, for pages where localStorage is denied).
 */
export class ChatClient {
  constructor(opts = {}) {
    this.opts = {
      transport: "auto", tabs: true, cachePerRoom: 200, backoffMinMs: 300, backoffMaxMs: 15000,
      wsRetryMs: 60000, requestTimeoutMs: 30000, pollWaitMs: 0, ...opts,
    };
    this.token = opts.token || null;
    this.userId = opts.user || (this.token ? jwtSubject(this.token) : null);
    this.displayName = opts.name || null;
    if (!this.userId) throw new Error("ChatClient needs a user (dev auth) or a token with a sub");
    this.scope = `chatcluster:v1:${this.userId}`;
    this.tabId = randomId(10);
    this.config = null;
    this.user = { id: this.userId, name: this.displayName || this.userId };
    this.rooms = new Map(); // id -> summary (as in welcome) + local extras
    this.msgs = new Map(); // id -> messages, oldest first
    this.cursors = {}; // room -> {epoch, id}
    this.personal = null; // {epoch, id}
    this.seenPids = []; // recent personal event ids (dedupe across handovers)
    this.presence = new Map(); // room -> Map(user -> "online"|"offline")
    this.outbox = []; // unacknowledged sends: {room, text, cmid, ts}
    this.status = "idle"; // idle | connecting | online | polling | offline | stopped
    this.transport = null; // "ws" | "poll" | null
    this.isLeader = false;
    this.limits = { typing_interval_ms: 3000, typing_ttl_ms: 6000, max_text_chars: 4000 };
    this._handlers = new Map();
    this._queue = []; // requests waiting for / in flight on the transport (leader)
    this._refs = 0;
    this._wsPending = new Map();
    this._ready = false;
    this._stopped = false;
    this._session = null; // AbortController of the leader's transport loop
    this._kick = null;
    this._retryAt = 0;
    this._tabFocus = new Map(); // tab -> focused (leader's view of the other tabs)
    this._followerPending = new Map(); // ref -> {frame, resolve, reject, tries}
    this._handled = new Map(); // "tab:ref" -> Promise of reply (leader: dedupe re-sent commands)
    this._leaderTab = null;
    this._persistTimer = null;
    this._changes = new Map(); // "room id" -> the latest edit/delete of a message not held (bounded)
  }

  // -- events ---------------------------------------------------------------------------
  on(type, fn) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type).add(fn);
    return () => this.off(type, fn);
  }

  off(type, fn) { this._handlers.get(type)?.delete(fn); }

  emit(type, detail) {
    for (const fn of [...(this._handlers.get(type) || []), ...(this._handlers.get("*") || [])]) {
      try { fn(detail, type); } catch (err) { console.error("chatcluster handler failed", err); }
    }
  }

  // -- lifecycle ------------------------------------------------------------------------
  /** Load the stored state, fetch the config, and join (or lead) this user's tabs. */
  async start() {
    this._loadState();
    this.emit("sync", { source: "storage" });
    const base = this.httpUrl;
    try {
      const res = await fetch(base + "/api/v1/config", { cache: "no-store" });
      this.config = await res.json();
    } catch {
      this.config = { auth: this.token ? "jwt" : "dev", poll: DEFAULT_POLL };
    }
    this.pollConfig = { ...DEFAULT_POLL, ...(this.config.poll || {}) };
    // Closed while the config was on its way (the page switched user at once): start nothing, or
    // this dead client would join the election, take the lock and keep the next one from leading.
    if (this._stopped) return this;
    this._setupTabs();
    this._watchFocus();
    return this;
  }

  /** Stop for good in this tab (another tab takes the connection over). */
  close() {
    this._stopped = true;
    this._persistNow();
    this._stopLeading();
    if (this.election) this.election.stop();
    if (this.channel) {
      this._post({ k: "bye" });
      this.channel.close();
    }
    this._setStatus("stopped");
  }

  get httpUrl() {
    if (this.opts.httpUrl) return this.opts.httpUrl.replace(/\/$/, "");
    return globalThis.location ? globalThis.location.origin : "";
  }

  get wsUrl() {
    if (this.opts.wsUrl) return this.opts.wsUrl;
    if (globalThis.CHATCLUSTER_WS_URL) return globalThis.CHATCLUSTER_WS_URL;
    if (this.opts.httpUrl) {
      const u = new URL(this.opts.httpUrl);
      return wsUrlFor(u, this.config);
    }
    return wsUrlFor(globalThis.location, this.config);
  }

  focused() {
    return typeof document !== "undefined" && document.visibilityState === "visible" && document.hasFocus();
  }

  /** Whether any tab of this user is focused (what the leader reports to the server). */
  anyFocused() {
    if (this.focused()) return true;
    for (const f of this._tabFocus.values()) if (f) return true;
    return false;
  }

  // -- commands -------------------------------------------------------------------------
  /** Send one command; resolves with the reply's data, rejects with a ChatError. */
  async request(type, fields = {}) {
    const reply = await this._route({ type, ...fields });
    if (!reply || !reply.ok) {
      const e = (reply && reply.error) || {};
      throw new ChatError(e.code || "internal", e.message || "request failed");
    }
    return reply.data || {};
  }

  /** Send a message; until acknowledged it is kept (with its cmid) and sent again. */
  send(room, text, cmid = randomId(20)) {
    const item = { room, text, cmid, ts: Date.now(), from: this.user };
    this.outbox.push(item);
    this._persistSoon();
    this.emit("outbox", { room });
    return this.request("send", { room, text, cmid }).then((data) => {
      this._dropOutbox(cmid);
      return data;
    }, (err) => {
      if (err instanceof ChatError && err.code !== "timeout" && err.code !== "unavailable") {
        this._dropOutbox(cmid); // refused for good (too long, not a member...)
      }
      throw err;
    });
  }

  history(room, { before, after, limit = 50 } = {}) {
    const f = { room, limit };
    if (before) f.before = before;
    if (after) f.after = after;
    return this.request("history", f);
  }

  join(room) { return this.request("join", { room }).then((d) => { this._upsertRoom(d.room); return d; }); }
  leave(room) { return this.request("leave", { room }).then((d) => { this._removeRoom(room); return d; }); }
  createRoom(name, visibility = "open", members) {
    const f = { name, visibility };
    if (members && members.length) f.members = members;
    return this.request("create_room", f).then((d) => { this._upsertRoom(d.room); return d; });
  }
  invite(room, user) { return this.request("invite", { room, user }); }
  dm(user) { return this.request("dm", { user }).then((d) => { this._upsertRoom(d.room); return d; }); }
  listRooms(query) { return this.request("rooms", query ? { query } : {}); }
  who(room, limit) { return this.request("who", limit ? { room, limit } : { room }); }
  where(user) { return this.request("where", { user }); }
  ping() { return this.request("ping"); }

  // v1.1 (PROTOCOL.md 5.1). The held messages change when the `edit`/`delete` event arrives
  // (every session of the room gets it, this one too), so all tabs and transports agree.
  /** Edit one's own message; resolves with {id, edited_at}. */
  edit(room, id, text) { return this.request("edit", { room, id, text }); }
  /** Delete a message (one's own, or any as the room's owner/admin); resolves with {id}. */
  delete(room, id) { return this.request("delete", { room, id }); }
  /** Make a member `admin` or `member` (the room's owner only). */
  setRole(room, user, role) { return this.request("set_role", { room, user, role }); }
  /** Remove a member from the room (owner/admin); they may come back only when invited. */
  kick(room, user) { return this.request("kick", { room, user }); }
  /**
   * The room's online members as [{id, name, role?}] (the node's `who`; `role` is there in
   * created rooms), sorted by id.
   */
  members(room, limit = 100) { return this.who(room, limit).then((d) => d.online || []); }

  /** This user's role in a room: "owner" | "admin" | "member". */
  roleIn(room) { return (this.rooms.get(room) || {}).role || "member"; }

  /** Whether this user may delete `msg` (theirs, or any as the room's owner/admin). */
  canDelete(msg) {
    if (!msg || msg.deleted || msg.kind === "system" || !msg.id) return false;
    const role = this.roleIn(msg.room);
    return (msg.from && msg.from.id === this.userId) || role === "owner" || role === "admin";
  }

  /** Whether this user may edit `msg` (their own, not deleted, not a system message). */
  canEdit(msg) {
    return !!(msg && msg.id && !msg.deleted && msg.kind !== "system" && msg.from && msg.from.id === this.userId);
  }

  typing(room) {
    this._route({ type: "typing", room }, { noReply: true }).catch(() => {});
  }

  /** Mark a room read up to `id` (default: its newest message). */
  markRead(room, id) {
    const r = this.rooms.get(room);
    const list = this.msgs.get(room) || [];
    id = id || (list.length ? list[list.length - 1].id : r && r.last_id);
    if (!r || !id || id === "0-0") return Promise.resolve();
    if (r.unread === 0 && r.read_id && compareIds(r.read_id, id) >= 0) return Promise.resolve();
    r.unread = 0;
    r.mentions = 0;
    r.read_id = id;
    this.emit("rooms", {});
    this._broadcastLocal({ type: "unread", room, unread: 0, read_id: id, mentions: 0 });
    return this.request("read", { room, id }).then((d) => {
      if (typeof d.unread === "number" && d.unread !== r.unread) {
        r.unread = d.unread;
        this.emit("rooms", {});
      }
      if (typeof d.mentions === "number" && d.mentions !== r.mentions) {
        r.mentions = d.mentions;
        this.emit("rooms", {});
      }
      return d;
    }).catch(() => {});
  }

  /** The messages held for a room, oldest first (cached, replayed and live). */
  messages(room) { return this.msgs.get(room) || []; }

  /** Sends of a room not acknowledged yet. */
  pending(room) { return this.outbox.filter((m) => m.room === room); }

  unreadTotal() {
    let n = 0;
    for (const r of this.rooms.values()) n += r.unread || 0;
    return n;
  }

  /** Messages that mention this user, not read yet, over all rooms. */
  mentionTotal() {
    let n = 0;
    for (const r of this.rooms.values()) n += r.mentions || 0;
    return n;
  }

  /** Fetch the newest page of a room when nothing of it is held (first visit or reset). */
  async loadLatest(room, limit = 50) {
    const data = await this.history(room, { limit });
    this._mergeHistory(room, data.messages || [], true);
    const r = this.rooms.get(room);
    if (r) r.more = !!data.more;
    this.emit("history", { room, older: false });
    return data;
  }

  /** Fetch the page before the oldest message held; resolves false when there is no more. */
  async loadOlder(room, limit = 50) {
    const list = this.messages(room);
    if (!list.length) return (await this.loadLatest(room, limit)).more;
    const data = await this.history(room, { before: list[0].id, limit });
    this._mergeHistory(room, data.messages || [], false);
    const r = this.rooms.get(room);
    if (r) r.more = !!data.more;
    this.emit("history", { room, older: true, count: (data.messages || []).length });
    return !!data.more;
  }

  // -- routing: leader sends itself, followers ask the leader ------------------------------
  _route(frame, { noReply = false } = {}) {
    if (this.isLeader || !this.channel) return this._transportRequest(frame, noReply);
    return new Promise((resolve, reject) => {
      const ref = `${this.tabId}:${++this._refs}`;
      const item = { frame, resolve, reject, noReply, sentAt: 0 };
      item.timer = setTimeout(() => {
        this._followerPending.delete(ref);
        reject(new ChatError("timeout", "no answer from the leading tab"));
      }, this.opts.requestTimeoutMs);
      this._followerPending.set(ref, item);
      this._sendToLeader(ref, item);
    });
  }

  _sendToLeader(ref, item) {
    item.sentAt = Date.now();
    this._post({ k: "cmd", tab: this.tabId, ref, frame: item.frame, noReply: item.noReply });
    if (item.noReply) {
      this._followerPending.delete(ref);
      clearTimeout(item.timer);
      item.resolve({ ok: true, data: {} });
    }
  }

  _transportRequest(frame, noReply = false) {
    return new Promise((resolve, reject) => {
      const item = { frame, resolve, reject, noReply, sent: false };
      item.timer = setTimeout(() => {
        this._queue = this._queue.filter((x) => x !== item);
        reject(new ChatError("timeout", "no reply in time"));
      }, this.opts.requestTimeoutMs);
      this._queue.push(item);
      this._flushQueue();
    });
  }

  _settle(item, reply) {
    clearTimeout(item.timer);
    this._queue = this._queue.filter((x) => x !== item);
    item.resolve(reply);
  }

  _flushQueue() {
    if (!this._ready || !this.isLeader) return;
    for (const item of this._queue) {
      if (item.sent) continue;
      if (this.transport === "ws") this._wsDispatch(item);
      else this._httpDispatch(item);
    }
  }

  _wsDispatch(item) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return;
    const ref = ++this._refs;
    item.sent = true;
    item.ref = ref;
    ws.send(JSON.stringify(item.noReply ? item.frame : { ...item.frame, ref }));
    if (item.noReply) this._settle(item, { ok: true, data: {} });
    else this._wsPending.set(ref, item);
  }

  async _httpDispatch(item) {
    item.sent = true;
    try {
      const reply = await this._post_http("/api/v1/command", { ...item.frame, ref: ++this._refs });
      this._settle(item, reply);
      if (item.frame.type !== "typing" && item.frame.type !== "read") this._pokePoll();
    } catch (err) {
      if (err instanceof HttpError) {
        if (err.status === 401) this._authFailed(4500, "unauthorized");
        const reply = err.body && err.body.type === "reply" ? err.body
          : { type: "reply", ok: false, error: (err.body && err.body.error) || { code: "internal", message: err.message } };
        this._settle(item, reply);
      } else {
        item.sent = false; // network trouble: retried when the transport is ready again
      }
    }
  }

  // -- tabs --------------------------------------------------------------------------------
  _setupTabs() {
    const BC = globalThis.BroadcastChannel;
    if (!this.opts.tabs || typeof BC !== "function") {
      this.channel = null;
      this._becomeLeader();
      return;
    }
    try {
      this.channel = new BC(this.scope);
    } catch {
      this.channel = null; // denied (third-party iframe): this tab works alone
      this._becomeLeader();
      return;
    }
    this.channel.onmessage = (e) => this._onTabMessage(e.data);
    this.election = createElection(this.scope + ":leader", (leader) => {
      if (this._stopped) return;
      if (leader) this._becomeLeader();
      else this._stopLeading();
    });
    this.election.start();
    this._post({ k: "hello", tab: this.tabId, focused: this.focused() });
    if (typeof addEventListener === "function") {
      addEventListener("pagehide", () => { this._persistNow(); this._post({ k: "bye", tab: this.tabId }); });
    }
  }

  _post(msg) {
    if (this.channel) {
      try { this.channel.postMessage(msg); } catch { /* channel closed */ }
    }
  }

  _onTabMessage(msg) {
    if (!msg || this._stopped) return;
    switch (msg.k) {
      case "hello": // a tab opened: the leader tells it everything
        this._tabFocus.set(msg.tab, !!msg.focused);
        if (this.isLeader) this._post({ k: "leader", tab: this.tabId, to: msg.tab, state: this._snapshot() });
        break;
      case "bye":
        this._tabFocus.delete(msg.tab);
        break;
      case "focus":
        if (this.isLeader) {
          const before = this.anyFocused();
          this._tabFocus.set(msg.tab, !!msg.focused);
          if (!before && this.anyFocused()) this._pokePoll();
        }
        break;
      case "leader": // the leading tab announces itself (after an election or to a new tab)
        if (msg.tab === this.tabId) break;
        if (this.isLeader) break; // will be sorted out by the election
        if (msg.to && msg.to !== this.tabId && this._leaderTab === msg.tab) break;
        this._leaderTab = msg.tab;
        if (msg.state) this._restore(msg.state, "leader");
        this._setStatus(msg.state ? msg.state.status : this.status, msg.state && msg.state.transport);
        for (const [ref, item] of this._followerPending) this._sendToLeader(ref, item);
        this._post({ k: "focus", tab: this.tabId, focused: this.focused() });
        break;
      case "ev":
        if (!this.isLeader) this._apply(msg.ev, false);
        break;
      case "local":
        this._applyEvent(msg.ev);
        this.emit(msg.ev.type, msg.ev);
        if (this.isLeader) this._persistSoon();
        break;
      case "status":
        if (!this.isLeader) this._setStatus(msg.status, msg.transport);
        break;
      case "cmd":
        if (this.isLeader) this._serveTab(msg);
        break;
      case "reply": {
        if (msg.tab !== this.tabId) break;
        const item = this._followerPending.get(msg.ref);
        if (item) {
          this._followerPending.delete(msg.ref);
          clearTimeout(item.timer);
          item.resolve(msg.reply);
        }
        break;
      }
    }
  }

  _serveTab(msg) {
    const key = `${msg.tab}:${msg.ref}`;
    let p = this._handled.get(key);
    if (!p) {
      p = this._transportRequest(msg.frame, msg.noReply).catch((err) => ({
        type: "reply", ok: false, error: { code: err.code || "internal", message: err.detail || String(err) },
      }));
      this._handled.set(key, p);
      if (this._handled.size > 500) this._handled.delete(this._handled.keys().next().value);
    }
    if (!msg.noReply) p.then((reply) => this._post({ k: "reply", tab: msg.tab, ref: msg.ref, reply }));
  }

  _watchFocus() {
    if (typeof addEventListener !== "function" || typeof document === "undefined") return;
    const report = () => {
      const f = this.focused();
      if (f) this.emit("focus", {});
      if (this.isLeader) { if (f) this._pokePoll(); } else this._post({ k: "focus", tab: this.tabId, focused: f });
    };
    addEventListener("focus", report);
    addEventListener("blur", report);
    document.addEventListener("visibilitychange", report);
  }

  _becomeLeader() {
    if (this.isLeader || this._stopped) return;
    this.isLeader = true;
    this._leaderTab = this.tabId;
    // Commands waiting on the previous leader are now ours to send.
    for (const [ref, item] of this._followerPending) {
      this._followerPending.delete(ref);
      clearTimeout(item.timer);
      this._transportRequest(item.frame, item.noReply).then(item.resolve, item.reject);
    }
    this._loadCursorsIfNewer();
    this._post({ k: "leader", tab: this.tabId, state: this._snapshot() });
    this.emit("leader", { leader: true });
    this._session = new AbortController();
    this._run(this._session.signal);
  }

  _stopLeading() {
    if (!this.isLeader) return;
    this.isLeader = false;
    this._ready = false;
    if (this._session) this._session.abort();
    if (this._ws) { try { this._ws.close(1000, "tab closing"); } catch { /* already closed */ } }
    this.emit("leader", { leader: false });
  }

  // -- the leader's transport loop ---------------------------------------------------------
  _preferPolling() {
    if (this.opts.transport === "poll") return true;
    if (this.opts.transport === "ws") return false;
    if (typeof globalThis.WebSocket !== "function") return true;
    try {
      const saved = JSON.parse(sessionStorage.getItem("chatcluster:transport") || "null");
      return !!(saved && saved.mode === "poll");
    } catch {
      return false;
    }
  }

  _rememberTransport(mode) {
    try {
      if (mode === "poll") sessionStorage.setItem("chatcluster:transport", JSON.stringify({ mode, since: Date.now() }));
      else sessionStorage.removeItem("chatcluster:transport");
    } catch { /* storage unavailable */ }
  }

  async _run(signal) {
    let attempt = 0;
    let wsFailures = 0;
    let drops = [];
    while (!signal.aborted && !this._stopped) {
      if (this._preferPolling()) {
        const result = await this._runPoll(signal);
        if (result === "stop" || signal.aborted) return;
        if (result === "try-ws") { wsFailures = 0; drops = []; attempt = 0; continue; }
        await sleep(backoffDelay(attempt++, this._backoff()), signal);
        continue;
      }
      this._setStatus("connecting", "ws");
      const r = await this._runWs(signal);
      if (signal.aborted) return;
      if (r.stop) return this._authFailed(r.code, r.reason);
      const now = Date.now();
      if (r.welcomed) {
        wsFailures = 0;
        if (r.lasted < 10000) drops.push(now);
        drops = drops.filter((t) => now - t < 60000);
        attempt = r.lasted > 10000 ? 0 : attempt;
      } else {
        wsFailures++;
      }
      if (this.opts.transport !== "ws" && (wsFailures >= 2 || drops.length >= 3)) {
        this._rememberTransport("poll"); // for the rest of this browser session
        attempt = 0;
        continue;
      }
      this._setStatus("offline", "ws");
      const wait = Math.max(this._retryAt - Date.now(), backoffDelay(attempt++, this._backoff()));
      this._retryAt = 0;
      await sleep(wait, signal);
    }
  }

  _backoff() { return { minMs: this.opts.backoffMinMs, maxMs: this.opts.backoffMaxMs }; }

  _hello() {
    const hello = { type: "hello", client: CLIENT_NAME };
    if (this.token) hello.token = this.token;
    else {
      hello.user = this.userId;
      if (this.displayName) hello.name = this.displayName;
    }
    if (Object.keys(this.cursors).length) hello.cursors = this.cursors;
    if (this.personal) hello.personal = this.personal;
    return hello;
  }

  /** One WebSocket session; resolves when it ends with {welcomed, code, reason, lasted, stop}. */
  _runWs(signal) {
    return new Promise((resolve) => {
      let ws;
      let welcomed = false;
      let opened = 0;
      let pinger = null;
      try {
        ws = new WebSocket(this.wsUrl);
      } catch {
        resolve({ welcomed: false });
        return;
      }
      this._ws = ws;
      const openTimer = setTimeout(() => { if (!welcomed) ws.close(); }, 10000);
      const onAbort = () => { try { ws.close(1000, "leader stepped down"); } catch { /* closed */ } };
      signal.addEventListener("abort", onAbort, { once: true });
      ws.onopen = () => {
        opened = Date.now();
        ws.send(JSON.stringify(this._hello()));
      };
      ws.onmessage = (e) => {
        let frame;
        try { frame = JSON.parse(e.data); } catch { return; }
        if (frame.type === "reply") {
          const item = this._wsPending.get(frame.ref);
          if (item) {
            this._wsPending.delete(frame.ref);
            this._settle(item, frame);
          }
          return;
        }
        if (frame.type === "welcome") {
          welcomed = true;
          clearTimeout(openTimer);
          this._rememberTransport("ws");
        }
        if (frame.type === "reconnect") {
          this._retryAt = Date.now() + (frame.retry_after_ms || 0) + Math.random() * 250;
        }
        this._apply(frame, true);
        if (frame.type === "welcome") {
          this._ready = true;
          this._setStatus("online", "ws");
          this._resendOutbox();
          this._flushQueue();
          pinger = setInterval(() => this._heartbeat(ws), 25000);
        }
      };
      ws.onclose = (e) => {
        clearTimeout(openTimer);
        clearInterval(pinger);
        signal.removeEventListener("abort", onAbort);
        if (this._ws === ws) this._ws = null;
        this._ready = false;
        for (const item of this._wsPending.values()) item.sent = false; // sent again after the next welcome
        this._wsPending.clear();
        resolve({ welcomed, code: e.code, reason: e.reason, lasted: opened ? Date.now() - opened : 0,
          stop: closeAction(e.code) === "stop" });
      };
    });
  }

  _heartbeat(ws) {
    let answered = false;
    this._transportRequest({ type: "ping" }).then(() => { answered = true; }, () => {});
    setTimeout(() => { if (!answered && this._ws === ws) ws.close(4000, "no pong"); }, 10000);
  }

  _authFailed(code, reason) {
    this._ready = false;
    this._setStatus("stopped");
    this.emit("stopped", { code, reason });
    if (this._session) this._session.abort();
  }

  async _post_http(path, body, signal) {
    const auth = this.token ? this.token : `dev:${this.userId}`;
    const res = await fetch(this.httpUrl + path, {
      method: "POST", signal, cache: "no-store",
      headers: { "Content-Type": "application/json", Authorization: `Bearer ${auth}` },
      body: JSON.stringify(body),
    });
    let data = null;
    try { data = await res.json(); } catch { /* not JSON */ }
    if (!res.ok) throw new HttpError(res.status, data);
    return data;
  }

  _pokePoll() {
    this._pollInterval = this.pollConfig ? this.pollConfig.min_ms : DEFAULT_POLL.min_ms;
    if (this._kick) this._kick.abort();
  }

  /** Polling until aborted or the WebSocket is due for another try: "stop" | "try-ws" | "retry". */
  async _runPoll(signal) {
    this._setStatus("connecting", "poll");
    let welcome;
    try {
      const body = { cursors: this.cursors };
      if (this.personal) body.personal = this.personal;
      if (this.displayName && !this.token) body.name = this.displayName;
      welcome = await this._post_http("/api/v1/session", body, signal);
    } catch (err) {
      if (signal.aborted) return "stop";
      if (err instanceof HttpError && (err.status === 401 || err.status === 403)) {
        this._authFailed(4500, "unauthorized");
        return "stop";
      }
      this._setStatus("offline", "poll");
      return "retry";
    }
    const events = welcome.events || [];
    this._apply({ ...welcome, type: "welcome", events: undefined }, true);
    for (const ev of events) this._apply(ev, true);
    this._ready = true;
    this._setStatus("polling", "poll");
    this._resendOutbox();
    this._flushQueue();
    const cfg = this.pollConfig;
    this._pollInterval = cfg.min_ms;
    const wsAgainAt = Date.now() + this.opts.wsRetryMs;
    let failures = 0;
    while (!signal.aborted && !this._stopped) {
      this._kick = new AbortController();
      await sleep(this._pollInterval, this._kick.signal, signal);
      if (signal.aborted) break;
      if (this.opts.transport === "auto" && typeof globalThis.WebSocket === "function" && Date.now() >= wsAgainAt) {
        if (await this._probeWs()) {
          this._ready = false;
          this._rememberTransport("ws");
          return "try-ws";
        }
      }
      const focused = this.anyFocused();
      const interval = this._pollInterval;
      try {
        // The session id of the welcome (an extension of PROTOCOL.md 3): the node keeps one
        // presence entry per polling tab and skips heartbeats that the last one still covers.
        const body = { cursors: this.cursors, wait_ms: this.opts.pollWaitMs, interval_ms: interval, focused,
          session: welcome.session };
        if (this.personal) body.personal = this.personal;
        const r = await this._post_http("/api/v1/poll", body, signal);
        failures = 0;
        const evs = r.events || [];
        for (const ev of evs) this._apply(ev, true);
        if (r.cursors && typeof r.cursors === "object") {
          for (const [room, c] of Object.entries(r.cursors)) {
            if (this.rooms.has(room)) this.cursors[room] = c;
          }
        }
        if (r.personal && r.personal.epoch) this.personal = { epoch: r.personal.epoch, id: r.personal.id || r.personal.last_id || (this.personal && this.personal.id) || "0-0" };
        this._persistSoon();
        if (this._pollInterval === interval) {
          this._pollInterval = Number.isFinite(r.next_poll_ms) ? r.next_poll_ms
            : nextPollDelay(interval, evs.length > 0, focused, cfg);
        }
        if (this.status !== "polling") this._setStatus("polling", "poll");
        this._flushQueue();
      } catch (err) {
        if (signal.aborted) break;
        if (err instanceof HttpError && err.status === 401) {
          this._authFailed(4500, "unauthorized");
          return "stop";
        }
        failures++;
        this._pollInterval = nextPollDelay(interval, false, focused, cfg);
        if (failures >= 3) this._setStatus("offline", "poll");
        if (err instanceof HttpError && err.status === 410) return "retry"; // session unknown: start over
      }
    }
    this._ready = false;
    return "stop";
  }

  /** Whether a WebSocket can be opened now (opened, then closed at once). */
  _probeWs() {
    return new Promise((resolve) => {
      let ws;
      try { ws = new WebSocket(this.wsUrl); } catch { resolve(false); return; }
      const t = setTimeout(() => { try { ws.close(); } catch { /* closed */ } resolve(false); }, 5000);
      ws.onopen = () => { clearTimeout(t); ws.close(1000, "probe"); resolve(true); };
      ws.onerror = () => { clearTimeout(t); resolve(false); };
    });
  }

  _resendOutbox() {
    // Sends the page made before a reload or a drop: same cmid, so never published twice.
    for (const m of this.outbox) {
      const inFlight = this._queue.some((q) => q.frame.type === "send" && q.frame.cmid === m.cmid);
      if (!inFlight) {
        this._transportRequest({ type: "send", room: m.room, text: m.text, cmid: m.cmid })
          .then((reply) => { if (reply.ok || (reply.error && !["timeout", "unavailable"].includes(reply.error.code))) this._dropOutbox(m.cmid); })
          .catch(() => {});
      }
    }
  }

  _dropOutbox(cmid) {
    const n = this.outbox.length;
    this.outbox = this.outbox.filter((m) => m.cmid !== cmid);
    if (this.outbox.length !== n) {
      this._persistSoon();
      this.emit("outbox", {});
    }
  }

  _setStatus(status, transport) {
    if (transport !== undefined) this.transport = transport;
    if (this.status === status && transport === undefined) return;
    this.status = status;
    if (this.isLeader) this._post({ k: "status", status, transport: this.transport });
    this.emit("status", { status, transport: this.transport });
  }

  // -- the store: the same in every tab ------------------------------------------------------
  /** Apply a server event; the leader relays what it applied to the other tabs. */
  _apply(ev, fromServer) {
    if (!ev || typeof ev !== "object") return;
    const applied = this._applyEvent(ev);
    if (!applied) return;
    if (fromServer && this.isLeader) {
      if (ev.type === "welcome") this._post({ k: "leader", tab: this.tabId, state: this._snapshot() });
      else this._post({ k: "ev", ev });
      this._persistSoon();
    }
    if (ev.type === "welcome") {
      this.emit("welcome", ev);
      this.emit("sync", { source: "welcome" });
      return;
    }
    this.emit(ev.type, ev);
    if (this.focused() && (ev.type === "alert" || (ev.type === "message" && ev.from && ev.from.id !== this.userId))) {
      this.emit("notify", ev); // only the focused tab shows notifications
    }
  }

  /** A change made by this tab (a read marker) that every tab, the leader too, applies. */
  _broadcastLocal(ev) {
    this._post({ k: "local", ev });
    if (this.isLeader) this._persistSoon();
  }

  _applyEvent(ev) {
    if (PERSONAL_KINDS.has(ev.type) && ev.pid) {
      // By id, not by cursor: a first welcome's replay may lie below the stream's last id.
      if (this.seenPids.includes(ev.pid)) return false;
      this.seenPids.push(ev.pid);
      if (this.seenPids.length > 200) this.seenPids.shift();
      if (this.personal && (!this.personal.id || compareIds(ev.pid, this.personal.id) > 0)) this.personal.id = ev.pid;
    }
    switch (ev.type) {
      case "welcome": return this._applyWelcome(ev);
      case "message": return this._applyMessage(ev);
      case "unread": {
        const r = this.rooms.get(ev.room);
        if (r) {
          r.unread = ev.unread;
          if (ev.read_id) r.read_id = ev.read_id;
          if (typeof ev.mentions === "number") r.mentions = ev.mentions;
        }
        return true;
      }
      case "edit":
      case "delete":
        return this._applyChange(ev);
      case "receipt": {
        const r = this.rooms.get(ev.room);
        const uid = ev.user && (typeof ev.user === "string" ? ev.user : ev.user.id);
        if (!r || !uid || !ev.read_id || uid === this.userId) return false;
        const list = Array.isArray(r.read_by) ? r.read_by.filter((x) => x && x.id !== uid) : [];
        const had = (r.read_by || []).find((x) => x && x.id === uid);
        const readId = had && had.read_id && compareIds(had.read_id, ev.read_id) > 0 ? had.read_id : ev.read_id;
        list.push({ id: uid, read_id: readId });
        r.read_by = list.slice(-50); // receipts come from rooms of at most CHAT_RECEIPTS_ROOM_LIMIT members
        return true;
      }
      case "room": {
        const room = ev.room || {};
        const known = this.rooms.get(room.id);
        if (ev.change === "removed") this._removeRoom(room.id);
        else if (ev.change === "added" && known && (!room.epoch || room.epoch === known.epoch)) {
          // An invitation replayed after the welcome that already listed the room: its counts
          // (unread, mentions, seq) are older than the welcome's; take only what is missing.
          for (const [k, v] of Object.entries(room)) if (!(k in known)) known[k] = v;
          this.emit("rooms", {});
        } else {
          const cur = this.cursors[room.id];
          const reset = ev.recovered === false || (cur && room.epoch && cur.epoch !== room.epoch);
          this._upsertRoom(room, reset);
        }
        return true;
      }
      case "presence": {
        const r = this.rooms.get(ev.room);
        if (typeof ev.online === "number") {
          if (r) r.online = ev.online;
        } else if (ev.user) {
          const uid = typeof ev.user === "string" ? ev.user : ev.user.id;
          if (!this.presence.has(ev.room)) this.presence.set(ev.room, new Map());
          const m = this.presence.get(ev.room);
          const was = m.get(uid);
          m.set(uid, ev.status);
          if (r && was !== ev.status) {
            if (ev.status === "online" && was === "offline") r.online = (r.online || 0) + 1;
            if (ev.status === "offline") r.online = Math.max(0, (r.online || 0) - 1);
            if (ev.status === "online" && was === undefined && r.kind === "direct") r.online = Math.max(r.online || 0, 2);
          }
        }
        return true;
      }
      default:
        return true; // typing, alert, reconnect and extensions pass through
    }
  }

  _applyWelcome(w) {
    if (w.user) this.user = w.user;
    if (w.node) this.welcome_node = w.node;
    if (w.limits) this.limits = { ...this.limits, ...w.limits };
    const seen = new Set();
    for (const room of w.rooms || []) {
      seen.add(room.id);
      const cur = this.cursors[room.id];
      const recovered = (w.recovered || {})[room.id];
      const reset = !cur || cur.epoch !== room.epoch || recovered === false;
      this._upsertRoom(room, reset, true);
    }
    for (const id of [...this.rooms.keys()]) if (!seen.has(id)) this._removeRoom(id, true);
    const p = w.personal;
    if (p && p.epoch && (!this.personal || this.personal.epoch !== p.epoch)) {
      this.personal = { epoch: p.epoch, id: p.last_id || "0-0" };
    }
    return true;
  }

  _upsertRoom(room, reset = false, quiet = false) {
    if (!room || !room.id) return;
    const prev = this.rooms.get(room.id);
    const merged = { ...(prev || {}), ...room };
    this.rooms.set(room.id, merged);
    if (reset || !this.cursors[room.id]) {
      if (reset && this.msgs.get(room.id)?.length) {
        this.msgs.set(room.id, []); // the held messages can't be trusted any more: reload
        merged.more = undefined;
        if (!quiet) this.emit("reset", { room: room.id });
      }
      if (room.epoch) this.cursors[room.id] = { epoch: room.epoch, id: room.last_id || "0-0" };
    }
    if (prev && prev.unread > (room.unread ?? prev.unread)) merged.unread = room.unread;
    if (!quiet) this.emit("rooms", {});
  }

  _removeRoom(id, quiet = false) {
    this.rooms.delete(id);
    this.msgs.delete(id);
    delete this.cursors[id];
    if (!quiet) this.emit("rooms", {});
  }

  _applyMessage(m) {
    const cur = this.cursors[m.room];
    // At or before the cursor: already seen (a replay after a handover, a poll racing the socket).
    if (cur && compareIds(m.id, cur.id) <= 0) return false;
    const list = this.msgs.get(m.room) || [];
    if (list.length && list[list.length - 1].id === m.id) return false;
    const msg = { ...m };
    delete msg.type;
    if (!list.length || compareIds(list[list.length - 1].id, m.id) < 0) list.push(msg);
    else this._insertSorted(list, msg);
    this.msgs.set(m.room, list);
    if (cur) cur.id = compareIds(m.id, cur.id) > 0 ? m.id : cur.id;
    else if (this.rooms.get(m.room)?.epoch) this.cursors[m.room] = { epoch: this.rooms.get(m.room).epoch, id: m.id };
    const r = this.rooms.get(m.room);
    if (r) {
      r.last_id = m.id;
      if (typeof m.seq === "number") r.seq = m.seq;
      r.last_ts = m.ts;
      if (m.from && m.from.id !== this.userId && m.kind !== "system") r.unread = (r.unread || 0) + 1;
      if (mentionsUser(m, this.userId)) r.mentions = (r.mentions || 0) + 1;
    }
    if (m.cmid && m.from && m.from.id === this.userId) this._dropOutbox(m.cmid);
    return true;
  }

  /**
   * An `edit` or `delete` event: the held message takes its latest state (a deleted one keeps
   * no text, so neither memory nor storage does), and the room's cursor moves to the entry
   * (`entry_id`, an extension of the node's: the edit/delete entry's own stream id).
   */
  _applyChange(ev) {
    const cur = this.cursors[ev.room];
    const entry = ev.entry_id;
    if (entry && cur && compareIds(entry, cur.id) <= 0) return false; // seen already
    if (entry && cur) cur.id = entry;
    const list = this.msgs.get(ev.room) || [];
    const i = list.findIndex((x) => x.id === ev.id);
    if (i >= 0) list[i] = foldChange(list[i], ev);
    else {
      // Not held (yet): a history page on its way may have been read before this change.
      const key = `${ev.room} ${ev.id}`;
      this._changes.delete(key);
      this._changes.set(key, ev.type === "delete" ? { type: "delete", by: ev.by } : { type: "edit", text: ev.text, edited_at: ev.edited_at });
      if (this._changes.size > 200) this._changes.delete(this._changes.keys().next().value);
    }
    return true;
  }

  _insertSorted(list, msg) {
    if (list.some((x) => x.id === msg.id)) return;
    let i = list.length;
    while (i > 0 && compareIds(list[i - 1].id, msg.id) > 0) i--;
    list.splice(i, 0, msg);
  }

  _mergeHistory(room, messages, newest) {
    let list = this.msgs.get(room) || [];
    const have = new Set(list.map((m) => m.id));
    const add = messages.filter((m) => !have.has(m.id)).map((m) => {
      const change = this._changes.get(`${room} ${m.id}`);
      return change ? foldChange({ ...m, room }, change) : { ...m, room };
    });
    list = list.concat(add).sort((a, b) => compareIds(a.id, b.id));
    this.msgs.set(room, list);
    const r = this.rooms.get(room);
    const last = list[list.length - 1];
    if (last && r && (!r.last_id || compareIds(last.id, r.last_id) > 0)) r.last_id = last.id;
    if (this.isLeader) this._persistSoon();
  }

  // -- persistence (leader writes; everyone can read at start) ------------------------------
  _snapshot() {
    const msgs = {};
    for (const [room, list] of this.msgs) msgs[room] = list.slice(-this.opts.cachePerRoom);
    return {
      user: this.user, cursors: this.cursors, personal: this.personal, seenPids: this.seenPids, rooms: [...this.rooms.values()],
      msgs, outbox: this.outbox, limits: this.limits, status: this.status, transport: this.transport,
      saved: Date.now(),
    };
  }

  _restore(s, source) {
    if (!s || typeof s !== "object") return;
    this.user = s.user || this.user;
    this.cursors = s.cursors || {};
    this.personal = s.personal || null;
    this.seenPids = Array.isArray(s.seenPids) ? s.seenPids : [];
    this.rooms = new Map((s.rooms || []).map((r) => [r.id, r]));
    this.msgs = new Map(Object.entries(s.msgs || {}));
    if (Array.isArray(s.outbox)) {
      const mine = this.outbox.filter((m) => !s.outbox.some((o) => o.cmid === m.cmid));
      this.outbox = s.outbox.concat(mine);
    }
    if (s.limits) this.limits = { ...this.limits, ...s.limits };
    // Cursor and cache are saved together, so the cursor never runs ahead of the cache.
    for (const [room, list] of this.msgs) {
      const c = this.cursors[room];
      if (c && list.length && compareIds(list[list.length - 1].id, c.id) > 0) c.id = list[list.length - 1].id;
    }
    this.emit("sync", { source });
  }

  _storage() {
    if (this.opts.storage) return this.opts.storage;
    try { return globalThis.localStorage || null; } catch { return null; } // third-party iframe: denied
  }

  _loadState() {
    const ls = this._storage();
    if (!ls) return;
    try {
      const s = JSON.parse(ls.getItem(this.scope) || "null");
      if (s) this._restore(s, "storage");
    } catch { /* corrupt: start fresh */ }
  }

  /** A new leader adopts the stored cursors only if they are ahead of its own (never behind). */
  _loadCursorsIfNewer() {
    const ls = this._storage();
    if (!ls) return;
    try {
      const s = JSON.parse(ls.getItem(this.scope) || "null");
      if (!s || !s.cursors) return;
      let newer = false;
      for (const [room, c] of Object.entries(s.cursors)) {
        const mine = this.cursors[room];
        if (!mine || mine.epoch !== c.epoch || compareIds(c.id, mine.id) > 0) newer = true;
      }
      if (newer) this._restore(s, "storage");
    } catch { /* ignore */ }
  }

  _persistSoon() {
    if (!this.isLeader || this._persistTimer) return;
    this._persistTimer = setTimeout(() => this._persistNow(), 50);
  }

  _persistNow() {
    clearTimeout(this._persistTimer);
    this._persistTimer = null;
    if (!this.isLeader) return;
    const ls = this._storage();
    if (!ls) return;
    const snap = this._snapshot();
    try {
      ls.setItem(this.scope, JSON.stringify(snap));
    } catch {
      // Over quota: keep fewer (older ones go; the cursors still match the newest kept).
      for (const room of Object.keys(snap.msgs)) snap.msgs[room] = snap.msgs[room].slice(-20);
      try { ls.setItem(this.scope, JSON.stringify(snap)); } catch { /* give up: resume from server */ }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Title and favicon badge
// ---------------------------------------------------------------------------------------

/** Draws a chat bubble with an unread count badge; returns a data: URL. */
export function drawFavicon(count, color = "#4f46e5") {
  const c = document.createElement("canvas");
  c.width = c.height = 64;
  const g = c.getContext("2d");
  g.fillStyle = color;
  g.beginPath();
  g.moveTo(14, 8); g.lineTo(50, 8); g.quadraticCurveTo(58, 8, 58, 16); g.lineTo(58, 38);
  g.quadraticCurveTo(58, 46, 50, 46); g.lineTo(26, 46); g.lineTo(14, 58); g.lineTo(16, 46);
  g.quadraticCurveTo(6, 46, 6, 38); g.lineTo(6, 16); g.quadraticCurveTo(6, 8, 14, 8);
  g.fill();
  if (count > 0) {
    const label = count > 99 ? "99+" : String(count);
    g.fillStyle = "#ef4444";
    g.beginPath();
    g.arc(44, 44, 20, 0, Math.PI * 2);
    g.fill();
    g.fillStyle = "#fff";
    g.font = `bold ${label.length > 2 ? 20 : label.length > 1 ? 24 : 30}px system-ui, sans-serif`;
    g.textAlign = "center";
    g.textBaseline = "middle";
    g.fillText(label, 44, 46);
  }
  return c.toDataURL("image/png");
}

/**
 * Keeps the tab's title ("(3) Chat") and favicon in step with the unread total, and blinks
 * the title on new messages while the tab is unfocused. Returns a function that detaches it.
 */
export function attachBadge(client, { title = document.title, color } = {}) {
  let shown = -1;
  let blink = null;
  let link = document.querySelector("link[rel~='icon']");
  if (!link) {
    link = document.createElement("link");
    link.rel = "icon";
    document.head.appendChild(link);
  }
  const base = () => (client.unreadTotal() ? `(${client.unreadTotal()}) ${title}` : title);
  const update = () => {
    const n = client.unreadTotal();
    if (!blink) document.title = base();
    if (n !== shown) {
      shown = n;
      link.href = drawFavicon(n, color);
    }
  };
  const stopBlink = () => {
    clearInterval(blink);
    blink = null;
    document.title = base();
  };
  const onMessage = (m) => {
    update();
    if (client.focused() || blink || !m.from || m.from.id === client.userId) return;
    let on = false;
    blink = setInterval(() => {
      on = !on;
      document.title = on ? `💬 ${m.from.name || m.from.id}…` : base();
    }, 1000);
  };
  const offs = [client.on("rooms", update), client.on("unread", update), client.on("sync", update),
    client.on("message", onMessage), client.on("focus", stopBlink)];
  addEventListener("focus", stopBlink);
  update();
  return () => { offs.forEach((f) => f()); stopBlink(); removeEventListener("focus", stopBlink); };
}
