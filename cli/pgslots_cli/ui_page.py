"""The page ``pgslots ui`` serves: one HTML file with its CSS and JavaScript, no build step. It reads
``/api/limits`` every second and ``/api/history`` every two, and draws the charts as SVG."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pgslots</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1b1f24; background: #f6f7f9; }
  header { display: flex; gap: 1em; align-items: center; padding: .6em 1.2em; background: #1b1f24; color: #fff; }
  header h1 { font-size: 1.1em; margin: 0; }
  header .status { margin-left: auto; font-size: .9em; opacity: .85; }
  header input { width: 18em; }
  main { padding: 1em 1.2em; }
  table { border-collapse: collapse; width: 100%; background: #fff; }
  th, td { text-align: left; padding: .35em .6em; border-bottom: 1px solid #e3e6ea; vertical-align: top; }
  th { font-weight: 600; background: #eef0f3; }
  .bar { width: 8em; height: .8em; background: #e3e6ea; display: inline-block; vertical-align: middle; }
  .bar i { display: block; height: 100%; background: #2f80ed; }
  .bar i.full { background: #d64545; }
  .gone { color: #8a6d00; font-size: 90%; }
  .paused { color: #b03a00; font-size: 90%; font-weight: 600; }
  .sub td { background: #fafbfc; font-size: .9em; color: #454c55; }
  .note { color: #8a5a00; margin: .5em 0; }
  .error { color: #b00020; margin: .5em 0; }
  svg { background: #fff; border: 1px solid #e3e6ea; }
  .legend span { margin-right: 1em; }
  button { font-size: .85em; }
  .muted { color: #6b7280; }
</style>
</head>
<body>
<header>
  <h1>pgslots</h1>
  <span id="mode" class="muted"></span>
  <label id="token-box" hidden>token <input id="token" type="password" autocomplete="off" placeholder="printed by pgslots ui"></label>
  <button id="create" hidden>create a limit</button>
  <span class="status" id="status">loading...</span>
</header>
<main>
  <div id="error" class="error"></div>
  <div id="note" class="note"></div>
  <table>
    <thead><tr><th>limit</th><th>occupancy</th><th>rate</th><th>waiters</th><th>grants/s</th><th>refusals/s</th>
      <th>totals</th><th>chart (last hour)</th><th></th></tr></thead>
    <tbody id="limits"></tbody>
  </table>
  <p class="legend muted"><span style="color:#2f80ed">&#9632; grants/s</span><span style="color:#d64545">&#9632; refusals/s</span>
    <span style="color:#27ae60">&#9632; utilisation (0-100%)</span></p>
</main>
<script>
"use strict";
let history = {}, admin = false;
const tokenInput = document.getElementById("token");
tokenInput.value = sessionStorage.getItem("pgslots-token") || "";
tokenInput.addEventListener("input", () => sessionStorage.setItem("pgslots-token", tokenInput.value));

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("data-")) node.setAttribute(k, v); else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}
function num(v, digits) { return Number(v).toLocaleString(undefined, {maximumFractionDigits: digits ?? 2}); }
function secs(s) { return s == null ? "" : s < 60 ? num(s, 1) + " s" : s < 3600 ? num(s / 60, 1) + " min" : num(s / 3600, 1) + " h"; }
function headers() {
  const h = {"Content-Type": "application/json"};
  if (tokenInput.value) h["Authorization"] = "Bearer " + tokenInput.value;
  return h;
}
async function getJSON(path) {
  const r = await fetch(path, {headers: headers(), cache: "no-store"});
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}
async function act(path, body, confirmText) {
  if (confirmText && !confirm(confirmText)) return;
  const r = await fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body || {})});
  const answer = await r.json();
  document.getElementById("note").textContent = r.ok ? answer.done : "Refused: " + answer.error;
  refresh();
}
function rateText(l) {
  const parts = [];
  if (l.window_seconds > 0) parts.push("window " + num(l.window_seconds) + " s");
  else if (l.slot_decay_per_second > 0) parts.push(num(l.slot_decay_per_second) + "/s decay");
  else parts.push("concurrency");
  if (l.window_seconds > 0 || l.slot_decay_per_second > 0) parts.push("margin " + num(l.margin_seconds) + " s");
  if (l.shadow) parts.push("shadow (" + l.shadow_refusals + " would-be refusals)");
  if (!l.active) parts.push("disabled");
  return parts.join(", ");
}
function chart(name) {
  const pts = history[name] || [], w = 220, h = 44;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h); svg.setAttribute("data-chart", name);
  if (pts.length < 2) return svg;
  const t0 = pts[0][0], t1 = pts[pts.length - 1][0], span = Math.max(1, t1 - t0);
  const top = Math.max(1, ...pts.map(p => Math.max(p[1], p[2])));
  const line = (i, scale, colour) => {
    const pl = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    pl.setAttribute("points", pts.map(p => ((p[0] - t0) / span * (w - 2) + 1).toFixed(1) + "," +
      (h - 2 - Math.min(1, p[i] / scale) * (h - 4)).toFixed(1)).join(" "));
    pl.setAttribute("fill", "none"); pl.setAttribute("stroke", colour); pl.setAttribute("stroke-width", "1.5");
    svg.append(pl);
  };
  line(3, 1, "#27ae60"); line(1, top, "#2f80ed"); line(2, top, "#d64545");
  return svg;
}
function lastRates(name) {
  const pts = history[name] || [];
  return pts.length ? pts[pts.length - 1] : null;
}
function holderRow(h) {
  const who = [h.host, h.pid && ("pid " + h.pid), h.application, h.holder && JSON.stringify(h.holder)].filter(Boolean).join(" \\u00b7 ");
  const row = el("tr", {className: "sub", "data-holder": h.lease_id},
    el("td", {}, "\\u21b3 holder"), el("td", {}, h.slots + " slot(s)"), el("td", {colSpan: 5}, who),
    el("td", {}, "held " + secs(h.held_seconds) + (h.expired ? " (expired)" : h.gone ? " (holder gone: reclaimable)" : "")), el("td"));
  if (admin) row.lastChild.append(el("button", {onclick: () => act("/api/leases/" + h.lease_id + "/release", {}, "Force-release this lease?")}, "release"));
  return row;
}
function limitRow(l, indent) {
  const gone = l.reclaimable_slots || 0, used = l.held_slots, cap = l.is_template ? l.limit * (l.instances || 0) : l.limit;
  const share = cap > 0 ? Math.min(1, used / cap) : (used > 0 ? 1 : 0);
  const bar = el("span", {className: "bar"}, el("i", {className: share >= 1 ? "full" : ""}));
  bar.firstChild.style.width = (share * 100).toFixed(1) + "%";
  const occupancy = el("span", {"data-occupancy": l.name}, num(used) + " / " + (l.is_template ? l.limit + " per key" : l.limit));
  if (l.paused_until) occupancy.append(el("span", {className: "paused", "data-paused": l.name, title: "nothing is granted before then"},
    " paused until " + new Date(l.paused_until).toLocaleTimeString() + (l.pause_reason ? " (" + l.pause_reason + ")" : "")));
  if (gone) occupancy.append(el("span", {className: "gone", "data-reclaimable": l.name, title: "held by nobody: their holders are gone, and the next caller that needs them takes them back"}, " +" + num(gone) + " reclaimable"));
  const rates = lastRates(l.name);
  const waiters = l.waiters ? l.waiters + " (oldest " + secs(l.oldest_waiter_seconds) + "; priorities " + (l.waiter_priorities || []).join(", ") + ")" : "0";
  const actions = el("td");
  if (admin && !indent) {
    actions.append(el("button", {"data-action": (l.active ? "disable:" : "enable:") + l.name,
      onclick: () => act("/api/limits/" + encodeURIComponent(l.name) + (l.active ? "/disable" : "/enable"))}, l.active ? "disable" : "enable"));
    actions.append(" ", el("button", {onclick: () => {
      const v = prompt("New limit for " + l.name, l.limit);
      if (v !== null) act("/api/limits/" + encodeURIComponent(l.name) + "/update", {limit: Number(v)});
    }}, "resize"));
    if (l.window_seconds > 0 || l.slot_decay_per_second > 0) actions.append(" ", el("button", {"data-margin": l.name, onclick: () => {
      const v = prompt("Margin in seconds for " + l.name + " (0 to 60; 0: exact on the database's clock)", l.margin_seconds);
      if (v !== null) act("/api/limits/" + encodeURIComponent(l.name) + "/update", {margin_seconds: Number(v)});
    }}, "margin"));
    actions.append(" ", el("button", {onclick: () => act("/api/limits/" + encodeURIComponent(l.name) + "/delete", {}, "Delete " + l.name + "?")}, "delete"));
  }
  return el("tr", {"data-limit": l.name},
    el("td", {}, (indent ? "\\u2003" : "") + l.name + (l.is_template ? " (" + (l.instances || 0) + " keys)" : "")),
    el("td", {}, bar, " ", occupancy, l.leases ? " \\u00b7 " + l.leases + " lease(s)" : ""),
    el("td", {}, rateText(l)), el("td", {}, waiters),
    el("td", {}, rates ? num(rates[1]) : "-"), el("td", {}, rates ? num(rates[2]) : "-"),
    el("td", {className: "muted"}, "granted " + num(l.grants_total, 0) + ", refused " + num(l.refusals_total, 0) +
      ", waited " + secs(l.wait_seconds_total) + ", expired " + l.expired_leases_total),
    el("td", {}, indent ? "" : chart(l.name)), actions);
}
async function refresh() {
  try {
    const data = await getJSON("/api/limits");
    admin = data.admin;
    document.getElementById("mode").textContent = admin ? "admin actions on (token required)" : "read-only";
    document.getElementById("token-box").hidden = !admin && tokenInput.value === "";
    document.getElementById("create").hidden = !admin;
    const body = document.getElementById("limits");
    const rows = [];
    for (const l of data.limits) {
      rows.push(limitRow(l, false));
      for (const h of l.holders) rows.push(holderRow(h));
      for (const k of l.busiest || []) {
        rows.push(limitRow(k, true));
        for (const h of k.holders) rows.push(holderRow(h));
      }
    }
    if (!rows.length) rows.push(el("tr", {}, el("td", {colSpan: 9}, "No limits yet: create one with 'pgslots create NAME -l N'.")));
    body.replaceChildren(...rows);
    document.getElementById("error").textContent = data.sample_error || "";
    if (data.holders_note) document.getElementById("note").textContent = data.holders_note;
    document.getElementById("status").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("error").textContent = "Cannot read the limits: " + e.message;
    if (String(e.message).includes("token")) document.getElementById("token-box").hidden = false;
  }
}
async function refreshHistory() {
  try { history = await getJSON("/api/history"); } catch (e) { /* shown by refresh */ }
}
document.getElementById("create").addEventListener("click", () => {
  const name = prompt("Name of the new limit (ending in * for a template):");
  if (!name) return;
  const limit = prompt("Slots:", "10");
  if (limit !== null) act("/api/limits", {name: name, limit: Number(limit)});
});
refreshHistory().then(refresh);
setInterval(refresh, 1000);
setInterval(refreshHistory, 2000);
</script>
</body>
</html>
"""
