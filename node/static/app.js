// The demo page: a small chat app on chatcluster.js, no framework.
// URL parameters: ?compact=1 (narrow layout, for the widget's iframe), ?embed=1 (compact, and
// takes its login from the parent page by postMessage), ?room=ID (room to open first),
// ?user=ID&name=NAME (dev auth login). A JWT may be given as #token=... (never in the query).

import {
  ChatClient, attachBadge, compareIds, dmPeer, mentionMatches, mentionParts, mentionQuery, mentionsUser, seenBy, userIdFromName,
} from "./chatcluster.js";

const $ = (sel) => document.querySelector(sel);
const params = new URLSearchParams(location.search);
const framed = window.parent !== window;
const embedded = params.has("embed") && framed;
const compact = params.has("compact") || params.has("embed");
const LOGIN_KEY = "chatcluster:login";
const ROOM_KEY = "chatcluster:room";

let config = { auth: "dev" };
let client = null;
let current = null;
let loadingOlder = false;
const typers = new Map(); // user id -> {name, until}
let lastTypingSent = 0;

// localStorage, or (a third-party iframe whose storage the browser denies) memory mirrored to
// the embedding page's widget.js, which keeps it in the host's own storage.
const memory = new Map();
const local = (() => { try { localStorage.getItem("x"); return localStorage; } catch { return null; } })();
const store = {
  getItem: (k) => (local ? local.getItem(k) : memory.has(k) ? memory.get(k) : null),
  setItem: (k, v) => {
    if (local) { local.setItem(k, v); return; }
    memory.set(k, String(v));
    toParent({ type: "chatcluster:store", key: k, value: String(v) });
  },
  removeItem: (k) => {
    if (local) { local.removeItem(k); return; }
    memory.delete(k);
    toParent({ type: "chatcluster:store", key: k, value: null });
  },
};

// -- framing ---------------------------------------------------------------------------------
// Framed (the widget's iframe), the page trusts its parent only once the node has said that the
// parent's origin is allowed (CHAT_ALLOWED_ORIGINS, matched by the node: GET
// /api/v1/config?parent=ORIGIN). Until then, and for ever if it is not, no message from the
// parent is taken (no login, no stored state) and none is sent to it; a framed page whose parent
// is refused shows nothing (the node's frame-ancestors header already stops browsers from
// rendering "/" there; this also covers /static/index.html and browsers without CSP).
let parentOrigin = null; // the parent's verified origin: the only one messages go to or come from
let frameRefused = false;
const framerHint = (() => {
  if (!framed) return null;
  // Authoritative where it exists (Chromium, Safari); else the referrer, a hint only: what the
  // parent sends is checked by its own event.origin, and postMessage delivers to the parent only
  // if it has the origin named.
  try { if (location.ancestorOrigins && location.ancestorOrigins.length) return location.ancestorOrigins[0]; } catch { /* none */ }
  try { return new URL(document.referrer).origin; } catch { return null; }
})();
const originChecks = new Map();
function parentAllowed(origin) {
  if (typeof origin !== "string" || !origin) return Promise.resolve(false);
  if (!originChecks.has(origin)) {
    originChecks.set(origin, fetch(`/api/v1/config?parent=${encodeURIComponent(origin)}`, { cache: "no-store" })
      .then((r) => (r.ok ? r.json() : {})).then((c) => c.parent_allowed === true, () => false));
  }
  return originChecks.get(origin);
}
function toParent(msg) {
  if (embedded && parentOrigin && !frameRefused) parent.postMessage(msg, parentOrigin);
}
function refuseFrame(origin) {
  frameRefused = true;
  parentOrigin = null;
  document.body.dataset.frame = "refused";
  const note = document.createElement("p");
  note.className = "frame-refused";
  note.textContent = `This chat may not be embedded in ${origin || "this page"}: the node's CHAT_ALLOWED_ORIGINS does not list it.`;
  document.body.append(note);
  console.warn(`chatcluster: refused to run framed by ${origin || "an unknown origin"} (not in CHAT_ALLOWED_ORIGINS)`);
}
document.body.classList.toggle("compact", compact);

// -- icons (inline SVG: no icon font, no emoji font needed) --------------------------------
const ICONS = {
  plus: '<path d="M12 5v14M5 12h14"/>',
  mail: '<rect x="3" y="5" width="18" height="14" rx="2"/><path d="m3 7 9 6 9-6"/>',
  search: '<circle cx="11" cy="11" r="7"/><path d="m20 20-3.5-3.5"/>',
  lock: '<rect x="5" y="11" width="14" height="10" rx="2"/><path d="M8 11V7a4 4 0 0 1 8 0v4"/>',
  hash: '<path d="M5 9h14M5 15h14M10 4 8 20M16 4l-2 16"/>',
  logout: '<path d="M15 4h3a2 2 0 0 1 2 2v12a2 2 0 0 1-2 2h-3M10 17l5-5-5-5M15 12H3"/>',
  menu: '<path d="M4 6h16M4 12h16M4 18h16"/>',
  send: '<path d="m22 2-7 20-4-9-9-4z"/><path d="M22 2 11 13"/>',
  users: '<circle cx="9" cy="8" r="4"/><path d="M2 21a7 7 0 0 1 14 0M16 4a4 4 0 0 1 0 8M22 21a7 7 0 0 0-4-6.3"/>',
  invite: '<circle cx="9" cy="8" r="4"/><path d="M2 21a7 7 0 0 1 14 0M19 8v6M16 11h6"/>',
  leave: '<path d="M9 4H6a2 2 0 0 0-2 2v12a2 2 0 0 0 2 2h3M16 17l5-5-5-5M21 12H9"/>',
  x: '<path d="M6 6l12 12M18 6 6 18"/>',
  email: '<rect x="3" y="5" width="18" height="14" rx="2"/><path d="m3 7 9 6 9-6"/>',
  call: '<path d="M22 16.9v3a2 2 0 0 1-2.2 2 19.8 19.8 0 0 1-8.6-3.1 19.5 19.5 0 0 1-6-6A19.8 19.8 0 0 1 2.1 4.2 2 2 0 0 1 4.1 2h3a2 2 0 0 1 2 1.7c.1.9.4 1.8.7 2.7a2 2 0 0 1-.5 2.1L8 9.8a16 16 0 0 0 6 6l1.3-1.3a2 2 0 0 1 2.1-.4c.9.3 1.8.6 2.7.7a2 2 0 0 1 1.7 2z"/>',
  voicemail: '<circle cx="6" cy="12" r="4"/><circle cx="18" cy="12" r="4"/><path d="M6 16h12"/>',
  system: '<circle cx="12" cy="12" r="3"/><path d="M19.4 15a1.7 1.7 0 0 0 .3 1.8l.1.1a2 2 0 1 1-2.8 2.8l-.1-.1a1.7 1.7 0 0 0-1.8-.3 1.7 1.7 0 0 0-1 1.5V21a2 2 0 1 1-4 0v-.1a1.7 1.7 0 0 0-1.1-1.5 1.7 1.7 0 0 0-1.8.3l-.1.1a2 2 0 1 1-2.8-2.8l.1-.1a1.7 1.7 0 0 0 .3-1.8 1.7 1.7 0 0 0-1.5-1H3a2 2 0 1 1 0-4h.1a1.7 1.7 0 0 0 1.5-1.1 1.7 1.7 0 0 0-.3-1.8l-.1-.1a2 2 0 1 1 2.8-2.8l.1.1a1.7 1.7 0 0 0 1.8.3H9a1.7 1.7 0 0 0 1-1.5V3a2 2 0 1 1 4 0v.1a1.7 1.7 0 0 0 1 1.5 1.7 1.7 0 0 0 1.8-.3l.1-.1a2 2 0 1 1 2.8 2.8l-.1.1a1.7 1.7 0 0 0-.3 1.8V9a1.7 1.7 0 0 0 1.5 1H21a2 2 0 1 1 0 4h-.1a1.7 1.7 0 0 0-1.5 1z"/>',
  message: '<path d="M21 12a8 8 0 0 1-11.6 7.1L4 20l1-4.6A8 8 0 1 1 21 12z"/>',
  info: '<circle cx="12" cy="12" r="9"/><path d="M12 11v5M12 8h.01"/>',
  more: '<circle cx="5" cy="12" r="1.6"/><circle cx="12" cy="12" r="1.6"/><circle cx="19" cy="12" r="1.6"/>',
  edit: '<path d="M12 20h9M16.5 3.5a2.1 2.1 0 0 1 3 3L7 19l-4 1 1-4z"/>',
  trash: '<path d="M3 6h18M8 6V4h8v2M6 6l1 14h10l1-14M10 11v6M14 11v6"/>',
  error: '<path d="M10.3 3.9 1.8 18a2 2 0 0 0 1.7 3h17a2 2 0 0 0 1.7-3L13.7 3.9a2 2 0 0 0-3.4 0zM12 9v4M12 17h.01"/>',
};

function icon(name) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("class", `ic ic-${name}`);
  svg.setAttribute("aria-hidden", "true");
  svg.innerHTML = ICONS[name] || ICONS.info;
  return svg;
}

for (const slot of document.querySelectorAll("[data-icon]")) slot.replaceWith(icon(slot.dataset.icon));

// -- helpers -------------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "dataset") Object.assign(e.dataset, v);
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== false && v != null) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c != null) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function hue(s) {
  let h = 0;
  for (const ch of String(s)) h = (h * 31 + ch.codePointAt(0)) % 360;
  return h;
}

function avatar(user) {
  const name = (user && (user.name || user.id)) || "?";
  const initials = name.split(/\s+/).map((w) => [...w][0] || "").join("").slice(0, 2).toUpperCase();
  const a = el("span", { class: "avatar", "aria-hidden": "true" }, initials);
  a.style.setProperty("--h", hue(user && user.id));
  return a;
}

function time(ts) {
  const d = new Date(ts || Date.now());
  const now = new Date();
  const hm = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return d.toDateString() === now.toDateString() ? hm : `${d.toLocaleDateString([], { month: "short", day: "numeric" })} ${hm}`;
}

const names = new Map(); // user id -> display name, learnt from messages and presence

function learnNames(list) {
  for (const m of list) if (m.from && m.from.id && m.from.name) names.set(m.from.id, m.from.name);
}

function roomLabel(r) {
  if (!r) return "";
  if (r.kind === "direct") {
    const peer = dmPeer(r.id, client.userId);
    return names.get(peer) || peer;
  }
  return r.name || r.id;
}

function roomIcon(r) {
  return r.kind === "closed" ? icon("lock") : r.kind === "direct" ? "" : icon("hash");
}

function roomText(r) {
  return `${r.kind === "direct" ? "@" : "#"}${roomLabel(r)}`;
}

function linkify(text) {
  const frag = document.createDocumentFragment();
  const re = /\bhttps?:\/\/[^\s<>"']+[^\s<>"'.,;:!?)\]]/g;
  let last = 0;
  for (const m of text.matchAll(re)) {
    frag.append(mentionify(text.slice(last, m.index)));
    frag.append(el("a", { href: m[0], target: "_blank", rel: "noopener noreferrer" }, m[0]));
    last = m.index + m[0].length;
  }
  frag.append(mentionify(text.slice(last)));
  return frag;
}

/** `@user` words as highlighted spans (text nodes only: user text never becomes HTML). */
function mentionify(text) {
  const frag = document.createDocumentFragment();
  for (const part of mentionParts(text)) {
    if (!part.mention) frag.append(part.text);
    else {
      const me = client && part.mention === client.userId;
      frag.append(el("span", { class: `mention${me ? " you" : ""}`, title: names.get(part.mention) || part.mention,
        dataset: { user: part.mention } }, part.text));
    }
  }
  return frag;
}

// -- toasts --------------------------------------------------------------------------------

export function toast({ title, body, kind = "info", timeout = 6000, onclick }) {
  const t = el("div", { class: `toast toast-${kind}`, role: "status", dataset: { kind } },
    el("span", { class: "toast-icon", "aria-hidden": "true" }, icon(ICONS[kind] ? kind : "info")),
    el("div", { class: "toast-main" },
      el("strong", { class: "toast-title" }, title || ""),
      body ? el("p", { class: "toast-body" }, body) : null),
    el("button", { class: "toast-close", "aria-label": "Dismiss", onclick: (e) => { e.stopPropagation(); hide(); } }, icon("x")));
  if (onclick) t.addEventListener("click", () => { onclick(); hide(); });
  $("#toasts").append(t);
  requestAnimationFrame(() => requestAnimationFrame(() => t.classList.add("in")));
  let gone = false;
  function hide() {
    if (gone) return;
    gone = true;
    t.classList.remove("in");
    t.classList.add("out");
    const remove = () => t.remove();
    t.addEventListener("transitionend", remove, { once: true });
    setTimeout(remove, 600);
  }
  setTimeout(hide, timeout);
  return t;
}

// -- login -----------------------------------------------------------------------------------
function savedLogin() {
  if (params.get("user")) return { user: params.get("user"), name: params.get("name") || params.get("user") };
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("token")) return { token: hash.get("token") };
  try { return JSON.parse(store.getItem(LOGIN_KEY) || "null"); } catch { return null; }
}

function showLogin(error = "") {
  $("#app").hidden = true;
  $("#login").hidden = false;
  const jwt = config.auth === "jwt";
  for (const f of document.querySelectorAll("[data-mode]")) f.hidden = f.dataset.mode !== (jwt ? "jwt" : "dev");
  $("#login-hint").textContent = jwt ? "Paste the access token your application gave you."
    : "Development mode: pick any name to join.";
  $("#login-error").textContent = error;
  (jwt ? $("#login-token") : $("#login-name")).focus();
}

$("#login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  let login;
  if (config.auth === "jwt") {
    const token = $("#login-token").value.trim();
    if (!token) return;
    login = { token };
  } else {
    const name = $("#login-name").value.trim();
    if (!name) return;
    login = { user: userIdFromName(name), name };
  }
  store.setItem(LOGIN_KEY, JSON.stringify(login));
  start(login);
});

$("#logout").addEventListener("click", () => {
  store.removeItem(LOGIN_KEY);
  if (client) client.close();
  client = null;
  showLogin();
});

// -- start -----------------------------------------------------------------------------------
async function start(login) {
  if (client) client.close();
  try {
    client = new ChatClient({ ...login, storage: store });
  } catch (err) {
    showLogin(err.message);
    return;
  }
  window.chat = client; // handy in the console, and for the tests
  $("#login").hidden = true;
  $("#app").hidden = false;
  $("#me-name").textContent = client.user.name;
  $("#me-avatar").replaceWith(Object.assign(avatar(client.user), { id: "me-avatar" }));
  bindClient(client);
  await client.start();
  if (!compact) attachBadge(client, { title: "chatcluster" });
  renderNodeInfo();
}

function bindClient(c) {
  c.on("sync", () => { if (c === client) { renderAll(); } });
  c.on("rooms", () => { renderRooms(); renderHeader(); });
  c.on("unread", renderRooms);
  c.on("status", renderStatus);
  c.on("outbox", () => { if (c === client) renderMessages(); });
  c.on("message", onMessage);
  c.on("typing", onTyping);
  c.on("presence", (p) => { renderRooms(); if (p.room === current) { renderHeader(); if (!$("#people").hidden) loadPeople(); } });
  c.on("room", onRoomEvent);
  c.on("edit", onChange);
  c.on("delete", onChange);
  c.on("receipt", onChange);
  c.on("reset", (e) => { if (e.room === current) openRoom(current); });
  c.on("notify", onNotify);
  c.on("focus", () => { if (current) client.markRead(current); });
  c.on("stopped", (e) => {
    if (e.code === 4500) {
      store.removeItem(LOGIN_KEY);
      showLogin("Your session is no longer valid; please sign in again.");
    } else {
      toast({ kind: "error", title: "Disconnected", body: `The server closed the connection (${e.code}). Reload to reconnect.`, timeout: 15000 });
    }
  });
}

function renderAll() {
  for (const id of client.rooms.keys()) learnNames(client.messages(id));
  $("#me-name").textContent = client.user.name || client.user.id;
  if (!current || !client.rooms.has(current)) {
    const wanted = params.get("room") || store.getItem(ROOM_KEY);
    current = client.rooms.has(wanted) ? wanted : client.rooms.has("general") ? "general" : client.rooms.keys().next().value || null;
    if (current) openRoom(current);
  } else {
    renderMessages();
    ensureMessages(current);
  }
  renderRooms();
  renderHeader();
  renderStatus();
}

function renderNodeInfo() {
  if (!client || !client.config) return;
  $("#node-info").textContent = `node ${client.config.node || "?"} · ${client.config.auth} auth`;
}

function renderStatus() {
  if (!client) return;
  const s = $("#status");
  s.dataset.status = client.status;
  s.dataset.transport = client.transport || "";
  s.dataset.leader = client.isLeader ? "1" : "0";
  const text = {
    idle: "Starting…", connecting: "Connecting…", online: "Online", polling: "Online (polling)",
    offline: "Reconnecting…", stopped: "Disconnected",
  }[client.status] || client.status;
  $("#status-text").textContent = text;
}

// -- rooms -----------------------------------------------------------------------------------
function sortedRooms() {
  return [...client.rooms.values()].sort((a, b) => {
    if (a.id === "general") return -1;
    if (b.id === "general") return 1;
    return roomLabel(a).localeCompare(roomLabel(b));
  });
}

function peerOnline(r) {
  const peer = dmPeer(r.id, client.userId);
  const p = client.presence.get(r.id);
  if (p && p.has(peer)) return p.get(peer) === "online";
  return (r.online || 0) >= 2;
}

const roomNames = new Map(); // room id -> label, kept for rooms gone from the client (a kick)

function renderRooms() {
  if (!client) return;
  const rooms = $("#room-list");
  const dms = $("#dm-list");
  rooms.replaceChildren();
  dms.replaceChildren();
  let total = 0;
  for (const r of sortedRooms()) {
    total += r.unread || 0;
    const direct = r.kind === "direct";
    const li = el("li", {},
      el("button", {
        class: `room${r.id === current ? " active" : ""}${r.unread ? " has-unread" : ""}`,
        dataset: { room: r.id }, onclick: () => openRoom(r.id),
      },
      direct ? el("span", { class: "dm-avatar" }, avatar({ id: dmPeer(r.id, client.userId), name: roomLabel(r) }),
        el("i", { class: `dot ${peerOnline(r) ? "on" : "off"}`, title: peerOnline(r) ? "online" : "offline" }))
        : el("span", { class: "room-icon" }, roomIcon(r)),
      el("span", { class: "room-name" }, roomLabel(r)),
      !direct && r.online ? el("span", { class: "room-online", title: `${r.online} online` }, el("i", { class: "dot on" })) : null,
      r.mentions ? el("span", { class: "badge mention", title: `${r.mentions} mention${r.mentions === 1 ? "" : "s"}` }, `@${r.mentions > 99 ? "99+" : r.mentions}`) : null,
      r.unread ? el("span", { class: "badge", title: `${r.unread} unread` }, r.unread > 99 ? "99+" : r.unread) : null));
    roomNames.set(r.id, roomText(r));
    (direct ? dms : rooms).append(li);
  }
  if (!dms.children.length) dms.append(el("li", { class: "muted empty" }, "No conversations yet"));
  const other = total - ((client.rooms.get(current) || {}).unread || 0);
  $("#menu-badge").hidden = other <= 0;
  $("#menu-badge").textContent = other > 99 ? "99+" : other;
  toParent({ type: "chatcluster:unread", count: total });
}

function renderHeader() {
  const r = client && client.rooms.get(current);
  if (!r) return;
  $("#room-name").replaceChildren(roomIcon(r), roomLabel(r));
  const kind = { general: "Everyone", open: "Open room", closed: "Private room", direct: "Direct message" }[r.kind] || "";
  $("#room-sub").textContent = r.kind === "direct" ? (peerOnline(r) ? "online" : "offline")
    : `${kind} · ${r.members || 0} member${r.members === 1 ? "" : "s"}`;
  $("#online-count").textContent = r.online || 0;
  $("#invite-btn").hidden = r.kind === "general" || r.kind === "direct";
  $("#leave-btn").hidden = r.kind === "general" || r.kind === "direct";
  $("#input").placeholder = r.kind === "direct" ? `Message ${roomLabel(r)}` : `Message #${roomLabel(r)}`;
}

function openRoom(id) {
  if (!client.rooms.has(id)) return;
  current = id;
  store.setItem(ROOM_KEY, id);
  typers.clear();
  renderTyping();
  renderRooms();
  renderHeader();
  renderMessages(true);
  ensureMessages(id);
  client.markRead(id);
  document.body.classList.remove("drawer-open");
  if (!$("#people").hidden) loadPeople();
}

/** Fetch what the room needs on first view; cached messages are never fetched again. */
async function ensureMessages(id) {
  const r = client.rooms.get(id);
  const list = client.messages(id);
  try {
    if (!list.length && r && r.last_id && r.last_id !== "0-0") await client.loadLatest(id);
    else if (list.length && list.length < 30 && r && r.more === undefined) await client.loadOlder(id);
    else return;
  } catch (err) {
    if (err.code !== "timeout") toast({ kind: "error", title: "Couldn't load messages", body: err.detail || err.message });
    return;
  }
  if (id === current) {
    renderMessages(true);
    client.markRead(id);
  }
}

async function loadOlder() {
  if (loadingOlder || !current) return;
  const r = client.rooms.get(current);
  if (r && r.more === false) return;
  loadingOlder = true;
  const scroller = $("#scroller");
  const fromBottom = scroller.scrollHeight - scroller.scrollTop;
  try {
    await client.loadOlder(current);
    renderMessages();
    scroller.scrollTop = scroller.scrollHeight - fromBottom;
  } catch (err) {
    toast({ kind: "error", title: "Couldn't load older messages", body: err.detail || err.message });
  } finally {
    loadingOlder = false;
  }
}

$("#load-older").addEventListener("click", loadOlder);
$("#scroller").addEventListener("scroll", () => {
  const s = $("#scroller");
  if (s.scrollTop < 40 && client && client.messages(current).length) loadOlder();
  if (atBottom()) $("#new-pill").hidden = true;
}, { passive: true });
$("#new-pill").addEventListener("click", () => { scrollToBottom(); $("#new-pill").hidden = true; });

function onRoomEvent(ev) {
  const r = ev.room || {};
  if (ev.change === "added" && r.kind !== "direct") {
    toast({ kind: "info", title: `You were added to ${roomText(r)}`, onclick: () => openRoom(r.id) });
  }
  if (ev.change === "removed" && ev.by && ev.by !== client.userId) {
    toast({ kind: "info", title: `You were removed from ${roomNames.get(r.id) || r.id}`, body: `by ${names.get(ev.by) || ev.by}` });
  }
  if (ev.change === "updated" && r.role && ev.by) {
    toast({ kind: "info", title: `You are now ${r.role === "admin" ? "an admin" : "a member"} of ${roomNames.get(r.id) || r.id}`, timeout: 4000 });
    if (r.id === current) { renderMessages(); if (!$("#people").hidden) loadPeople(); }
  }
  if (ev.change === "removed" && r.id === current) openRoom("general");
  if (ev.recovered === false && r.id === current) openRoom(current);
}

// -- messages ----------------------------------------------------------------------------------
function atBottom() {
  const s = $("#scroller");
  return s.scrollHeight - s.scrollTop - s.clientHeight < 60;
}

function scrollToBottom() {
  const s = $("#scroller");
  s.scrollTop = s.scrollHeight;
}

function messageItem(m, prev, pending = false, seen = false) {
  const mine = m.from && m.from.id === client.userId;
  const continued = prev && !prev.local && prev.from && m.from && prev.from.id === m.from.id && prev.kind !== "system"
    && m.kind !== "system" && (m.ts || 0) - (prev.ts || 0) < 5 * 60 * 1000;
  if (m.kind === "system" || m.local) {
    return el("li", { class: `msg system${m.local ? " local" : ""}`, dataset: { id: m.id || "" } },
      el("div", { class: "text" }, linkify(m.text)));
  }
  const msg = { ...m, room: m.room || current };
  const actions = !pending && (client.canEdit(msg) || client.canDelete(msg));
  return el("li", {
    class: `msg${mine ? " mine" : ""}${continued ? " continued" : ""}${pending ? " pending" : ""}${m.deleted ? " deleted" : ""}`
      + `${!m.deleted && mentionsUser(m, client.userId) ? " mentions-me" : ""}`,
    dataset: pending ? { cmid: m.cmid } : { id: m.id, cmid: m.cmid || "" },
  },
  continued ? el("span", { class: "gutter" }) : avatar(m.from),
  el("div", { class: "body" },
    continued ? null : el("div", { class: "meta" },
      el("strong", { class: "author" }, (m.from && (m.from.name || m.from.id)) || "?"),
      el("time", { datetime: new Date(m.ts || Date.now()).toISOString() }, time(m.ts))),
    m.deleted ? el("div", { class: "text tombstone" }, "Message deleted")
      : el("div", { class: "text" }, linkify(m.text || "")),
    m.edited_at && !m.deleted ? el("span", { class: "edited", title: `Edited ${time(m.edited_at)}` }, "(edited)") : null,
    pending ? el("span", { class: "sending" }, "sending…") : null,
    seen ? el("div", { class: "seen", title: "Read by the other member" }, "Seen") : null),
  actions ? el("button", { class: "icon-btn msg-more", type: "button", title: "Message actions", "aria-label": "Message actions",
    onclick: (e) => { e.stopPropagation(); openMessageMenu(e.currentTarget, msg); } }, icon("more")) : null);
}

// -- per-message actions (v1.1): edit your own messages, delete them (any, as owner/admin) ---------
const msgMenu = el("div", { class: "msg-menu", id: "msg-menu", role: "menu", hidden: true });
document.body.append(msgMenu);
document.addEventListener("click", (e) => { if (!msgMenu.contains(e.target)) msgMenu.hidden = true; });
addEventListener("keydown", (e) => { if (e.key === "Escape") msgMenu.hidden = true; });

function openMessageMenu(anchor, m) {
  const items = [];
  if (client.canEdit(m)) items.push(el("button", { type: "button", role: "menuitem", dataset: { action: "edit" }, onclick: () => { msgMenu.hidden = true; editMessage(m); } }, icon("edit"), "Edit"));
  if (client.canDelete(m)) items.push(el("button", { type: "button", role: "menuitem", class: "danger", dataset: { action: "delete" }, onclick: () => { msgMenu.hidden = true; deleteMessage(m); } }, icon("trash"), "Delete"));
  msgMenu.replaceChildren(...items);
  msgMenu.hidden = false;
  const r = anchor.getBoundingClientRect();
  msgMenu.style.top = `${Math.min(r.bottom + 4, innerHeight - msgMenu.offsetHeight - 8)}px`;
  msgMenu.style.left = `${Math.max(8, r.right - msgMenu.offsetWidth)}px`;
}

function editMessage(m) {
  const before = (client.messages(m.room).find((x) => x.id === m.id) || m).text || "";
  const area = el("textarea", { name: "text", rows: 3, required: true, maxlength: client.limits.max_text_chars || 4000 });
  area.value = before;
  dialog("Edit message", [el("label", { class: "field" }, el("span", {}, "Text"), area)], "Save", async (f) => {
    const text = String(f.get("text") || "").trim();
    if (!text || text === before) return;
    await client.edit(m.room, m.id, text);
  });
  area.focus();
  area.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); area.form.requestSubmit(); }
  });
}

function deleteMessage(m) {
  const preview = (client.messages(m.room).find((x) => x.id === m.id) || m).text || "";
  const theirs = m.from && m.from.id !== client.userId;
  dialog("Delete this message?", [
    el("p", { class: "muted" }, theirs ? `A message of ${m.from.name || m.from.id}, for everyone in the room:` : "For everyone in the room:"),
    el("blockquote", { class: "quote" }, preview.length > 200 ? preview.slice(0, 200) + "…" : preview),
  ], "Delete", () => client.delete(m.room, m.id));
}

const localNotes = new Map(); // room -> notes shown after the messages (text command output)

function renderMessages(scroll = false) {
  if (!client || !current) return;
  const stick = scroll || atBottom();
  const ol = $("#messages");
  const list = client.messages(current);
  learnNames(list);
  const items = [];
  let prev = null;
  // "Seen" under my last message of a direct room once the other member's marker reaches it.
  const room = client.rooms.get(current);
  let seenId = null;
  if (room && room.kind === "direct") {
    for (let i = list.length - 1; i >= 0; i--) {
      if (list[i].from && list[i].from.id === client.userId && !list[i].deleted) { seenId = list[i].id; break; }
    }
    if (seenId && !seenBy(room, seenId, client.userId)) seenId = null;
  }
  for (const m of list) {
    items.push(messageItem(m, prev, false, m.id === seenId));
    prev = m;
  }
  const ids = new Set(list.map((m) => m.cmid).filter(Boolean));
  for (const m of client.pending(current)) {
    if (ids.has(m.cmid)) continue;
    items.push(messageItem({ ...m, from: client.user }, prev, true));
    prev = { ...m, from: client.user };
  }
  for (const n of localNotes.get(current) || []) items.push(messageItem(n, null));
  ol.replaceChildren(...items);
  const r = client.rooms.get(current);
  const more = !r || r.more !== false;
  $("#load-older").hidden = !more || !list.length;
  $("#history-start").hidden = more;
  if (stick) scrollToBottom();
}

function onMessage(m) {
  learnNames([m]);
  typers.delete(m.from && m.from.id);
  renderTyping();
  renderRooms();
  if (m.room !== current) return;
  const stick = atBottom() || (m.from && m.from.id === client.userId);
  renderMessages();
  if (stick) scrollToBottom();
  else $("#new-pill").hidden = false;
  if (client.focused()) client.markRead(current, m.id);
}

/** An edit, a delete or a read receipt of the room on screen: draw it again. */
function onChange(ev) {
  if (ev.room !== current) return;
  const stick = atBottom();
  renderMessages();
  if (stick) scrollToBottom();
}

function onNotify(ev) {
  if (ev.type === "alert") {
    const room = ev.kind === "mention" && ev.data && ev.data.room; // v1.1: "X mentioned you in R"
    toast({ kind: ev.kind || "system", title: ev.title || "Alert", body: ev.body || "", timeout: 8000,
      onclick: room && client.rooms.has(room) ? () => openRoom(room) : undefined });
  } else if (ev.type === "message" && ev.room !== current) {
    const r = client.rooms.get(ev.room);
    const where = r && r.kind === "direct" ? "" : ` in #${roomLabel(r) || ev.room}`;
    const verb = mentionsUser(ev, client.userId) ? " mentioned you" : "";
    toast({ kind: "message", title: `${ev.from.name || ev.from.id}${verb}${where}`, body: ev.text.slice(0, 140), onclick: () => openRoom(ev.room) });
  }
}

// -- typing ----------------------------------------------------------------------------------
function onTyping(t) {
  if (t.room !== current || !t.user || t.user.id === client.userId) return;
  typers.set(t.user.id, { name: t.user.name || t.user.id, until: Date.now() + (client.limits.typing_ttl_ms || 6000) });
  renderTyping();
  setTimeout(renderTyping, (client.limits.typing_ttl_ms || 6000) + 50);
}

function renderTyping() {
  const now = Date.now();
  const names = [];
  for (const [id, t] of typers) {
    if (t.until < now) typers.delete(id);
    else names.push(t.name);
  }
  const box = $("#typing");
  if (!names.length) { box.replaceChildren(); box.classList.remove("on"); return; }
  const who = names.length === 1 ? `${names[0]} is` : names.length === 2 ? `${names[0]} and ${names[1]} are` : "Several people are";
  box.replaceChildren(el("span", { class: "dots" }, el("i"), el("i"), el("i")), ` ${who} typing…`);
  box.classList.add("on");
}

// -- composer and text commands ------------------------------------------------------------------
const input = $("#input");
input.addEventListener("keydown", (e) => {
  if (mentionKey(e)) return;
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("#composer").requestSubmit();
  }
});
input.addEventListener("input", () => {
  updateMentionPop();
  input.style.height = "auto";
  input.style.height = Math.min(input.scrollHeight, 160) + "px";
  const now = Date.now();
  if (client && current && input.value && !input.value.startsWith("/") && now - lastTypingSent > (client.limits.typing_interval_ms || 3000)) {
    lastTypingSent = now;
    client.typing(current);
  }
});

$("#composer").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || !client || !current) return;
  input.value = "";
  input.style.height = "auto";
  hideMentionPop();
  lastTypingSent = 0;
  if (text.startsWith("/") && !text.startsWith("//")) {
    await textCommand(text);
    return;
  }
  const room = current;
  try {
    const p = client.send(room, text.startsWith("//") ? text.slice(1) : text);
    renderMessages(true);
    await p;
  } catch (err) {
    toast({ kind: "error", title: "Message not sent", body: err.detail || err.message });
    renderMessages();
  }
});

// -- @ autocomplete (v1.1 mentions): the room's online members and the authors seen in it ---------
const mentionPop = el("ul", { class: "mention-pop", id: "mention-pop", role: "listbox", hidden: true });
$("#composer").before(mentionPop);
let mentionState = null; // {start, query, users, active}
input.addEventListener("blur", () => setTimeout(() => { if (document.activeElement !== input) hideMentionPop(); }, 150));
input.addEventListener("click", updateMentionPop);

function mentionUsers(room) {
  const seen = new Map();
  const cached = memberCache.get(room);
  for (const u of (cached && cached.users) || []) seen.set(u.id, { id: u.id, name: u.name || names.get(u.id) || u.id });
  for (const m of client.messages(room)) if (m.from && m.from.id && m.kind !== "system") seen.set(m.from.id, { id: m.from.id, name: m.from.name || m.from.id });
  const r = client.rooms.get(room);
  if (r && r.kind === "direct") { const peer = dmPeer(room, client.userId); seen.set(peer, { id: peer, name: names.get(peer) || peer }); }
  seen.delete(client.userId);
  return [...seen.values()];
}

function refreshMembers(room) {
  const cached = memberCache.get(room);
  if (cached && (cached.loading || Date.now() - cached.at < 30000)) return;
  memberCache.set(room, { ...(cached || { users: [] }), loading: true, at: Date.now() });
  client.who(room, 100).then((d) => {
    memberCache.set(room, { at: Date.now(), users: (d.online || []).map((u) => (typeof u === "string" ? { id: u } : u)) });
    if (room === current && document.activeElement === input) updateMentionPop();
  }, () => memberCache.set(room, { at: Date.now(), users: (cached && cached.users) || [] }));
}

function updateMentionPop() {
  if (!client || !current) return hideMentionPop();
  const q = mentionQuery(input.value, input.selectionStart ?? input.value.length);
  if (!q) return hideMentionPop();
  refreshMembers(current);
  const users = mentionMatches(mentionUsers(current), q.query);
  if (!users.length) return hideMentionPop();
  const active = mentionState && mentionState.query === q.query ? Math.min(mentionState.active, users.length - 1) : 0;
  mentionState = { ...q, users, active };
  mentionPop.replaceChildren(...users.map((u, i) => el("li", {
    role: "option", "aria-selected": i === active ? "true" : "false", class: i === active ? "active" : "", dataset: { user: u.id },
    onmousedown: (e) => { e.preventDefault(); pickMention(u); },
  }, avatar(u), el("span", {}, u.name || u.id), el("small", { class: "muted" }, `@${u.id}`))));
  mentionPop.hidden = false;
}

function hideMentionPop() {
  mentionState = null;
  mentionPop.hidden = true;
}

function pickMention(u) {
  const st = mentionState;
  if (!st) return;
  const caret = input.selectionStart ?? input.value.length;
  const text = `${input.value.slice(0, st.start)}@${u.id} ${input.value.slice(caret)}`;
  input.value = text;
  const at = st.start + u.id.length + 2;
  input.setSelectionRange(at, at);
  hideMentionPop();
  input.focus();
}

/** Keys of the open autocomplete (arrows, Enter/Tab to pick, Escape); true when handled. */
function mentionKey(e) {
  if (!mentionState || mentionPop.hidden || e.isComposing) return false;
  const n = mentionState.users.length;
  if (e.key === "ArrowDown" || e.key === "ArrowUp") {
    mentionState.active = (mentionState.active + (e.key === "ArrowDown" ? 1 : n - 1)) % n;
    [...mentionPop.children].forEach((li, i) => { li.classList.toggle("active", i === mentionState.active); li.setAttribute("aria-selected", String(i === mentionState.active)); });
  } else if (e.key === "Enter" || e.key === "Tab") {
    pickMention(mentionState.users[mentionState.active]);
  } else if (e.key === "Escape") {
    hideMentionPop();
  } else {
    return false;
  }
  e.preventDefault();
  return true;
}

function note(text, room = current) {
  const notes = localNotes.get(room) || [];
  notes.push({ local: true, text, ts: Date.now() });
  localNotes.set(room, notes.slice(-5));
  renderMessages(true);
}

async function resolveRoom(arg) {
  if (client.rooms.has(arg)) return arg;
  const name = arg.replace(/^#/, "").toLowerCase();
  for (const r of client.rooms.values()) if ((r.name || "").toLowerCase() === name) return r.id;
  const { rooms = [] } = await client.listRooms(name);
  const hit = rooms.find((r) => (r.name || "").toLowerCase() === name || r.id === arg);
  return hit ? hit.id : arg;
}

/** `/who`, `/rooms`, `/join ROOM`, `/where USER`: commands, never sent as messages. */
async function textCommand(text) {
  const [cmd, ...rest] = text.slice(1).split(/\s+/);
  const arg = rest.join(" ").trim();
  try {
    switch (cmd.toLowerCase()) {
      case "who": {
        const d = await client.who(current);
        const names = (d.online || []).map((u) => (typeof u === "string" ? u : u.name || u.id));
        note(`Online here (${d.count ?? names.length}): ${names.join(", ") || "nobody"}`);
        break;
      }
      case "rooms": {
        const d = await client.listRooms(arg || undefined);
        const list = (d.rooms || []).map((r) => `${roomText(r)} (${r.online || 0}/${r.members || 0})`);
        note(`Rooms: ${list.join(", ") || "none"}`);
        break;
      }
      case "join": {
        if (!arg) { note("Usage: /join ROOM"); break; }
        const id = await resolveRoom(arg);
        const d = await client.join(id);
        openRoom((d.room && d.room.id) || id);
        break;
      }
      case "where": {
        if (!arg) { note("Usage: /where USER"); break; }
        const d = await client.where(arg);
        const rooms = (d.rooms || []).map((r) => (typeof r === "string" ? r : roomLabel(r))).join(", ");
        note(d.online ? `${arg} is online${rooms ? ` in ${rooms}` : ""}.`
          : `${arg} is offline${d.last_seen ? `, last seen ${time(d.last_seen)}` : ""}${rooms ? `; rooms: ${rooms}` : ""}.`);
        break;
      }
      default:
        note(`Unknown command /${cmd}. Try /who, /rooms, /join ROOM or /where USER (start with // to send a slash).`);
    }
  } catch (err) {
    note(`/${cmd}: ${err.detail || err.message}`);
  }
}

// -- who's here ----------------------------------------------------------------------------------
const memberCache = new Map(); // room -> {at, users: [{id, name, role?}]} (online members, for @ completion)

async function loadPeople() {
  const ul = $("#people-list");
  const room = current;
  try {
    const d = await client.who(room, 100);
    memberCache.set(room, { at: Date.now(), users: (d.online || []).map((u) => (typeof u === "string" ? { id: u } : u)) });
    if (room !== current) return;
    const mine = client.roleIn(room);
    const items = (d.online || []).map((u) => {
      const raw = typeof u === "string" ? { id: u } : u;
      const user = { ...raw, name: raw.name && raw.name !== raw.id ? raw.name : names.get(raw.id) || (raw.id === client.userId ? client.user.name : raw.id) };
      if (user.name) names.set(user.id, user.name);
      const self = user.id === client.userId;
      // Moderation as the node allows it (docs/protocol.md, roles): the owner kicks anyone but
      // themselves and sets roles; an admin kicks members only.
      const canKick = !self && user.role && user.role !== "owner" && (mine === "owner" || (mine === "admin" && user.role === "member"));
      const canRole = !self && mine === "owner" && user.role && user.role !== "owner";
      return el("li", { dataset: { user: user.id, role: user.role || "" } }, avatar(user),
        el("span", { class: "person" }, user.name || user.id, el("small", { class: "muted" }, user.id)),
        user.role && user.role !== "member" ? el("span", { class: `role role-${user.role}` }, user.role) : null,
        el("i", { class: "dot on" }),
        el("span", { class: "person-actions" },
          !self ? el("button", { class: "btn soft small", type: "button", onclick: () => startDm(user.id) }, "Message") : null,
          canRole ? el("button", { class: "btn ghost small", type: "button", dataset: { action: "role" },
            onclick: () => changeRole(room, user, user.role === "admin" ? "member" : "admin") },
          user.role === "admin" ? "Make member" : "Make admin") : null,
          canKick ? el("button", { class: "btn ghost small danger", type: "button", dataset: { action: "kick" },
            onclick: () => kickMember(room, user) }, "Remove") : null));
    });
    ul.replaceChildren(...(items.length ? items : [el("li", { class: "muted" }, "Nobody else is here.")]));
  } catch (err) {
    ul.replaceChildren(el("li", { class: "muted" }, `Unavailable: ${err.detail || err.message}`));
  }
}

async function changeRole(room, user, role) {
  try {
    await client.setRole(room, user.id, role);
    toast({ kind: "info", title: `${user.name || user.id} is now ${role === "admin" ? "an admin" : "a member"}`, timeout: 3000 });
  } catch (err) {
    toast({ kind: "error", title: "Couldn't change the role", body: err.detail || err.message });
  }
  if (room === current && !$("#people").hidden) loadPeople();
}

function kickMember(room, user) {
  const r = client.rooms.get(room);
  dialog(`Remove ${user.name || user.id} from ${roomText(r)}?`, [
    el("p", { class: "muted" }, "They leave the room at once and may come back only when someone invites them."),
  ], "Remove", async () => {
    await client.kick(room, user.id);
    toast({ kind: "info", title: `Removed ${user.name || user.id}`, timeout: 3000 });
    if (room === current && !$("#people").hidden) loadPeople();
  });
}

$("#who-btn").addEventListener("click", () => {
  const p = $("#people");
  p.hidden = !p.hidden;
  if (!p.hidden) loadPeople();
});
$("#people-close").addEventListener("click", () => { $("#people").hidden = true; });

// -- dialogs ---------------------------------------------------------------------------------------
function dialog(title, fields, submitLabel, onSubmit) {
  const d = $("#dialog");
  const form = $("#dialog-form");
  const error = el("p", { class: "error" });
  form.replaceChildren(el("h2", {}, title), ...fields, error,
    el("div", { class: "dialog-actions" },
      el("button", { class: "btn ghost", value: "cancel", formnovalidate: true }, "Cancel"),
      submitLabel ? el("button", { class: "btn primary", value: "ok" }, submitLabel) : null));
  form.onsubmit = async (e) => {
    if (e.submitter && e.submitter.value === "cancel") return;
    e.preventDefault();
    try {
      await onSubmit(new FormData(form));
      d.close();
    } catch (err) {
      error.textContent = err.detail || err.message;
    }
  };
  d.showModal();
  const first = form.querySelector("input");
  if (first) first.focus();
}

const field = (label, attrs) => el("label", { class: "field" }, el("span", {}, label), el("input", attrs));

$("#new-room").addEventListener("click", () => dialog("Create a room", [
  field("Name", { name: "name", required: true, maxlength: 80, placeholder: "e.g. design-review" }),
  el("fieldset", { class: "choice" }, el("legend", {}, "Who can join"),
    el("label", {}, el("input", { type: "radio", name: "visibility", value: "open", checked: true }), " Anyone (open)"),
    el("label", {}, el("input", { type: "radio", name: "visibility", value: "closed" }), " Invited people only (closed)")),
  field("Members (optional, comma separated user ids)", { name: "members", placeholder: "bob, carol" }),
], "Create", async (f) => {
  const members = String(f.get("members") || "").split(/[\s,]+/).filter(Boolean);
  const d = await client.createRoom(String(f.get("name")).trim(), f.get("visibility"), members);
  if (d.room) openRoom(d.room.id);
}));

async function startDm(user) {
  const d = await client.dm(user);
  $("#people").hidden = true;
  if (d.room) openRoom(d.room.id);
}

$("#new-dm").addEventListener("click", () => dialog("Direct message", [
  field("User id", { name: "user", required: true, pattern: "[A-Za-z0-9_.@\\-]{1,64}", placeholder: "bob" }),
], "Start", (f) => startDm(String(f.get("user")).trim())));

$("#invite-btn").addEventListener("click", () => {
  const r = client.rooms.get(current);
  dialog(`Invite to ${roomText(r)}`, [
    field("User id", { name: "user", required: true, pattern: "[A-Za-z0-9_.@\\-]{1,64}", placeholder: "bob" }),
  ], "Invite", async (f) => {
    const user = String(f.get("user")).trim();
    await client.invite(current, user);
    toast({ kind: "info", title: `Invited ${user}`, timeout: 3000 });
  });
});

$("#leave-btn").addEventListener("click", async () => {
  const r = client.rooms.get(current);
  if (!r || !confirm(`Leave ${roomText(r)}?`)) return;
  try {
    await client.leave(current);
    openRoom("general");
  } catch (err) {
    toast({ kind: "error", title: "Couldn't leave", body: err.detail || err.message });
  }
});

$("#browse").addEventListener("click", async () => {
  const list = el("ul", { class: "browse-list" }, el("li", { class: "muted" }, "Loading…"));
  dialog("Browse rooms", [list], null, async () => {});
  try {
    const d = await client.listRooms();
    const rows = (d.rooms || []).filter((r) => r.kind !== "direct").map((r) => el("li", {},
      el("span", { class: "room-icon" }, roomIcon(r)), el("span", { class: "room-name" }, roomLabel(r)),
      el("small", { class: "muted" }, `${r.members || 0} members · ${r.online || 0} online`),
      client.rooms.has(r.id)
        ? el("button", { class: "btn ghost small", type: "button", onclick: () => { $("#dialog").close(); openRoom(r.id); } }, "Open")
        : el("button", { class: "btn primary small", type: "button", onclick: async () => {
          try { await client.join(r.id); $("#dialog").close(); openRoom(r.id); } catch (err) { toast({ kind: "error", title: "Couldn't join", body: err.detail || err.message }); }
        } }, "Join")));
    list.replaceChildren(...(rows.length ? rows : [el("li", { class: "muted" }, "No rooms yet. Create one!")]));
  } catch (err) {
    list.replaceChildren(el("li", { class: "muted" }, `Unavailable: ${err.detail || err.message}`));
  }
});

// -- phone drawer --------------------------------------------------------------------------------
$("#menu").addEventListener("click", () => document.body.classList.toggle("drawer-open"));
$("#scrim").addEventListener("click", () => document.body.classList.remove("drawer-open"));

// -- embedding -------------------------------------------------------------------------------------
if (embedded) {
  addEventListener("message", async (e) => {
    const d = e.data;
    if (e.source !== window.parent || !d || typeof d !== "object" || frameRefused) return;
    // Only from the parent, and only if its origin is allowed: a login or stored state from any
    // other page that frames this one is ignored.
    if (e.origin !== parentOrigin) {
      if (parentOrigin || (framerHint && e.origin !== framerHint) || !(await parentAllowed(e.origin))) return;
      if (frameRefused || (parentOrigin && parentOrigin !== e.origin)) return;
      parentOrigin = e.origin;
      document.body.dataset.frame = "trusted";
    }
    if (d.type === "chatcluster:focus") {
      if (client && current) client.markRead(current);
      input.focus();
      return;
    }
    if (d.type === "chatcluster:init") {
      for (const [k, v] of Object.entries(d.store || {})) if (!local && typeof v === "string") memory.set(k, v);
      if (initWaiter) initWaiter(d.login);
      return;
    }
    if (d.type !== "chatcluster:login") return;
    const login = d.token ? { token: d.token } : d.user ? { user: d.user, name: d.name || d.user } : null;
    if (!login) return;
    if (client && (client.token === login.token && (login.token || client.userId === login.user))) return;
    store.setItem(LOGIN_KEY, JSON.stringify(login));
    start(login);
  });
}

let initWaiter = null;

/** Embedded: the widget answers `ready` with the login and (storage denied) the saved state. */
function waitForInit(ms) {
  return new Promise((resolve) => {
    const t = setTimeout(() => resolve(null), ms);
    initWaiter = (login) => { clearTimeout(t); initWaiter = null; resolve(login || null); };
  });
}

// -- boot ------------------------------------------------------------------------------------------
(async function boot() {
  const parentCheck = framed && framerHint ? parentAllowed(framerHint) : null; // meanwhile
  try {
    config = await (await fetch("/api/v1/config", { cache: "no-store" })).json();
  } catch {
    config = { auth: "dev" };
  }
  if (parentCheck) {
    if (!(await parentCheck)) { refuseFrame(framerHint); return; }
    parentOrigin = parentOrigin || framerHint;
    document.body.dataset.frame = "trusted";
  } else if (framed && !embedded) {
    refuseFrame(null);
    return;
  }
  let fromHost = null;
  if (embedded) {
    const init = waitForInit(3000);
    // `ready` carries nothing: with the parent's origin unknown (no ancestorOrigins, no referrer)
    // it may go to any origin; the answer is taken only from an allowed one.
    parent.postMessage({ type: "chatcluster:ready" }, parentOrigin || "*");
    fromHost = await init;
    if (!parentOrigin) { refuseFrame(null); return; }
  }
  const login = fromHost && (fromHost.token || fromHost.user) ? fromHost : savedLogin();
  if (login && (login.token || login.user)) {
    if (fromHost) store.setItem(LOGIN_KEY, JSON.stringify(login));
    start(login);
  }
  else showLogin();
})();

// Keep the typing line fresh and the unread marker right when the tab comes back.
setInterval(renderTyping, 1000);
export { compareIds };
