/* chatcluster embeddable widget: paste one line into any page of the host application.
 *
 *   <script src="https://chat.example.com/static/widget.js" data-user="alice" data-name="Alice" async></script>
 *
 * It adds a launcher button in a corner (with the unread count) that opens the chat panel: the
 * node's demo page in compact mode, in an iframe, inside a shadow root so that neither the
 * host's CSS nor ours leak. Login comes from data-token (JWT mode) or data-user/data-name (dev
 * mode) and is handed to the iframe by postMessage, never in a URL. See docs/widget.md.
 */
(function () {
  "use strict";
  var script = document.currentScript;
  if (!script || window.ChatCluster) return;
  var d = script.dataset;
  var server = (d.server || new URL(script.src, location.href).origin).replace(/\/$/, "");
  var serverOrigin = new URL(server).origin;
  if (!/^https?:$/.test(new URL(server).protocol)) return; // data-server is a chat node's URL, nothing else
  var side = d.position === "left" ? "left" : "right";
  // Host attributes are data, never markup or style sheet text: the label goes in through
  // setAttribute only, the colour through style.setProperty (which drops what is not a value).
  var label = d.label || "Chat";
  var login = d.token ? { token: d.token } : d.user ? { user: d.user, name: d.name || d.user } : null;

  var src = server + "/?embed=1" + (d.room ? "&room=" + encodeURIComponent(d.room) : "");
  var host = document.createElement("div");
  host.id = "chatcluster-widget";
  var root = host.attachShadow ? host.attachShadow({ mode: "open" }) : host;
  var style = document.createElement("style");
  style.textContent =
    ":host{all:initial}" +
    ".wrap{position:fixed;bottom:20px;" + side + ":20px;z-index:2147483000;font:14px/1.4 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif}" +
    ".launcher{width:56px;height:56px;border-radius:50%;border:0;background:#4f46e5;color:#fff;cursor:pointer;display:grid;place-items:center;" +
    "box-shadow:0 8px 24px rgba(20,20,50,.25);transition:transform .15s;position:relative;margin-" + side + ":0;float:" + side + "}" +
    ".launcher:hover{transform:scale(1.06)}.launcher svg{width:26px;height:26px}" +
    ".badge{position:absolute;top:-4px;right:-4px;min-width:20px;height:20px;padding:0 6px;border-radius:10px;background:#ef4444;color:#fff;" +
    "font:700 11px/20px system-ui,sans-serif;text-align:center;box-shadow:0 0 0 2px #fff}" +
    ".panel{position:absolute;bottom:72px;" + side + ":0;width:380px;height:580px;max-height:calc(100vh - 110px);max-width:calc(100vw - 40px);" +
    "border-radius:16px;overflow:hidden;background:#fff;box-shadow:0 16px 48px rgba(20,20,50,.28);transform-origin:bottom " + side + ";" +
    "transition:transform .2s ease,opacity .2s ease}" +
    ".panel.closed{transform:scale(.9) translateY(12px);opacity:0;pointer-events:none;visibility:hidden}" +
    "iframe{border:0;width:100%;height:100%;display:block}" +
    "[hidden]{display:none!important}" +
    "@media (max-width:480px){.panel{position:fixed;inset:0;width:auto;height:auto;max-height:none;max-width:none;border-radius:0;bottom:0}" +
    ".panel:not(.closed)+.launcher{display:none}}";

  function node(tag, attrs, ns) {
    var e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
    for (var k in attrs) if (Object.prototype.hasOwnProperty.call(attrs, k)) e.setAttribute(k, attrs[k]);
    for (var i = 3; i < arguments.length; i++) e.appendChild(arguments[i]);
    return e;
  }
  var SVG = "http://www.w3.org/2000/svg";
  var panel = node("div", { "class": "panel closed", role: "dialog", "aria-label": label });
  var badge = node("span", { "class": "badge", hidden: "" });
  var launcher = node("button", { "class": "launcher", "aria-label": "Open " + label, "aria-expanded": "false" }, null,
    node("svg", { viewBox: "0 0 24 24", fill: "none", stroke: "currentColor", "stroke-width": "2", "stroke-linecap": "round",
      "stroke-linejoin": "round" }, SVG, node("path", { d: "M21 12a8 8 0 0 1-11.6 7.1L4 20l1-4.6A8 8 0 1 1 21 12z" }, SVG)),
    badge);
  if (d.color) launcher.style.setProperty("background", d.color);
  root.appendChild(style);
  root.appendChild(node("div", { "class": "wrap" }, null, panel, launcher));
  var frame = null;

  // Browsers that deny storage to third-party iframes: the chat keeps its cursors and cached
  // messages in the host page's storage instead, under this prefix (it never leaves the browser).
  var prefix = "chatcluster-widget:" + serverOrigin + ":";
  function readStore() {
    var out = {};
    try {
      for (var i = 0; i < localStorage.length; i++) {
        var k = localStorage.key(i);
        if (k && k.indexOf(prefix) === 0) out[k.slice(prefix.length)] = localStorage.getItem(k);
      }
    } catch (e) { /* no storage */ }
    return out;
  }
  function writeStore(key, value) {
    try {
      if (value === null || value === undefined) localStorage.removeItem(prefix + key);
      else localStorage.setItem(prefix + key, String(value));
    } catch (e) { /* quota or no storage */ }
  }

  function load() {
    if (frame) return;
    frame = document.createElement("iframe");
    frame.title = label;
    frame.src = src;
    frame.allow = "clipboard-write";
    panel.appendChild(frame);
  }

  function setOpen(open) {
    if (open) load();
    panel.classList.toggle("closed", !open);
    launcher.setAttribute("aria-expanded", String(open));
    launcher.setAttribute("aria-label", (open ? "Close " : "Open ") + label);
    try { sessionStorage.setItem("chatcluster:widget-open", open ? "1" : ""); } catch (e) { /* no storage */ }
    if (open && frame && frame.contentWindow) frame.contentWindow.postMessage({ type: "chatcluster:focus" }, serverOrigin);
  }

  launcher.addEventListener("click", function () { setOpen(panel.classList.contains("closed")); });

  window.addEventListener("message", function (e) {
    if (e.origin !== serverOrigin || !frame || e.source !== frame.contentWindow || !e.data) return;
    if (e.data.type === "chatcluster:ready") {
      frame.contentWindow.postMessage({ type: "chatcluster:init", login: login, store: readStore() }, serverOrigin);
    } else if (e.data.type === "chatcluster:store" && typeof e.data.key === "string") {
      writeStore(e.data.key, e.data.value);
    } else if (e.data.type === "chatcluster:unread") {
      var n = Number(e.data.count) || 0;
      badge.hidden = n <= 0;
      badge.textContent = n > 99 ? "99+" : String(n);
    }
  });

  window.ChatCluster = {
    open: function () { setOpen(true); },
    close: function () { setOpen(false); },
    toggle: function () { setOpen(panel.classList.contains("closed")); },
    /** Sign in (or switch user) after the page loaded: {user, name} or {token}. */
    login: function (l) {
      login = l;
      if (frame && frame.contentWindow) frame.contentWindow.postMessage({ type: "chatcluster:login", user: l.user, name: l.name, token: l.token }, serverOrigin);
    },
    element: host,
  };

  function mount() {
    document.body.appendChild(host);
    var wasOpen = false;
    try { wasOpen = sessionStorage.getItem("chatcluster:widget-open") === "1"; } catch (e) { /* no storage */ }
    // Load the chat right away (hidden) so the unread badge is live, unless data-lazy is set.
    if (d.lazy === undefined) load();
    if (wasOpen || d.open === "true") setOpen(true);
  }
  if (document.body) mount();
  else document.addEventListener("DOMContentLoaded", mount);
})();
