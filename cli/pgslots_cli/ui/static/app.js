// pgslots ui: reads /api/limits every second and /api/history every two, and draws what they say.
// Every figure is the server's: this file formats and draws, it does not compute slots or rates.
// Text that callers chose (names, holders, reasons) is always set as text, never as markup.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
let latest = null;    // the last /api/limits answer
let history = null;   // the last /api/history answer
let admin = false;

const tokenInput = document.getElementById("token");
tokenInput.value = sessionStorage.getItem("pgslots-token") || "";
tokenInput.addEventListener("input", () => sessionStorage.setItem("pgslots-token", tokenInput.value));

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "className") node.className = v;
    else if (k === "onclick") node.addEventListener("click", v);
    else if (k === "hidden") node.hidden = v;
    else if (k === "colSpan") node.colSpan = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}
function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
function num(v, digits) {
  if (v === null || v === undefined) return "-";
  const d = digits === undefined ? 2 : digits;
  return Number.isInteger(v) ? String(v) : Number(v).toFixed(d).replace(/\.?0+$/, "");
}
function secs(v) {
  if (v === null || v === undefined) return "-";
  if (v < 1) return Math.round(v * 1000) + " ms";
  if (v < 120) return v.toFixed(1) + " s";
  if (v < 7200) return Math.round(v / 60) + " min";
  return (v / 3600).toFixed(1) + " h";
}
function clock(t) { return new Date(t * 1000).toLocaleTimeString(); }
function headers() {
  const h = {"Content-Type": "application/json"};
  if (tokenInput.value) h["Authorization"] = "Bearer " + tokenInput.value;
  return h;
}
async function getJSON(path) {
  const r = await fetch(path, {headers: headers()});
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
function limitPath(name, action) { return "/api/limits/" + encodeURIComponent(name) + "/" + action; }

// ---- the table of limits ------------------------------------------------------------------------

function kindText(l) {
  const parts = [];
  if (l.is_template) parts.push("template: " + l.limit + " per key");
  if (l.window_seconds > 0) parts.push(l.limit + " per " + num(l.window_seconds) + " s window");
  else if (l.slot_decay_per_second > 0) parts.push(num(l.slot_decay_per_second) + "/s, bursts of " + l.limit);
  else if (!l.is_template) parts.push("concurrency");
  if (l.window_seconds > 0 || l.slot_decay_per_second > 0) parts.push("margin " + num(l.margin_seconds) + " s");
  if (l.shadow) parts.push("shadow (" + l.shadow_refusals + " would-be refusals)");
  if (!l.active) parts.push("disabled");
  return parts.join(", ");
}
function lastRates(name) {
  const s = history && history.limits[name];
  if (!s || !s.t.length) return null;
  const i = s.t.length - 1;
  return {grants: s.grants[i], refusals: s.refusals[i]};
}
function occupancy(l) {
  const share = l.capacity > 0 ? Math.min(1, l.held_slots / l.capacity) : (l.held_slots > 0 ? 1 : 0);
  const bar = el("span", {className: "bar", title: num(l.held_slots) + " of " + l.capacity + " slots held"}, el("i"));
  bar.firstChild.style.width = (share * 100).toFixed(1) + "%";
  if (share >= 1) bar.firstChild.className = "full";
  const of = l.is_template ? l.limit + " per key" : String(l.limit);
  const cell = el("td", {"data-label": "slots held", className: "wide"}, bar, el("span", {"data-occupancy": l.name}, num(l.held_slots) + " / " + of));
  if (l.is_template) cell.append(" \u00b7 " + (l.instances || 0) + " key(s)");
  if (l.leases) cell.append(" \u00b7 " + l.leases + " lease(s)");
  if (l.reclaimable_slots) cell.append(el("div", {className: "gone", "data-reclaimable": l.name,
    title: "held by nobody: their holders are gone, and the next caller that needs them takes them back"},
    "+" + l.reclaimable_slots + " reclaimable (holders gone)"));
  if (l.paused_until) cell.append(el("div", {className: "paused", "data-paused": l.name, title: "nothing is granted before then"},
    "paused until " + new Date(l.paused_until).toLocaleTimeString() + (l.pause_reason ? " (" + l.pause_reason + ")" : "")));
  if (l.paused_keys) cell.append(el("div", {className: "paused"}, l.paused_keys + " key(s) paused"));
  return cell;
}
function actions(l) {
  if (!admin || l.template) return el("td", {className: "empty"});
  const cell = el("td", {"data-label": "actions", className: "wide"});
  cell.append(el("button", {type: "button", "data-action": (l.active ? "disable:" : "enable:") + l.name,
    onclick: () => act(limitPath(l.name, l.active ? "disable" : "enable"))}, l.active ? "disable" : "enable"));
  cell.append(el("button", {type: "button", onclick: () => {
    const v = prompt("New limit for " + l.name, l.limit);
    if (v !== null) act(limitPath(l.name, "update"), {limit: Number(v)});
  }}, "resize"));
  if (l.window_seconds > 0 || l.slot_decay_per_second > 0) cell.append(el("button", {type: "button", "data-margin": l.name, onclick: () => {
    const v = prompt("Margin in seconds for " + l.name + " (0 to 60; 0: exact on the database's clock)", l.margin_seconds);
    if (v !== null) act(limitPath(l.name, "update"), {margin_seconds: Number(v)});
  }}, "margin"));
  cell.append(el("button", {type: "button", onclick: () => act(limitPath(l.name, "delete"), {}, "Delete " + l.name + "?")}, "delete"));
  return cell;
}
function limitRow(l, isKey) {
  const rates = lastRates(l.name);
  const waiting = l.waiters ? l.waiters + " (oldest " + secs(l.oldest_waiter_seconds) + "; priorities " +
    (l.waiter_priorities || []).join(", ") + ")" : "0";
  const name = el("a", {href: "#limit=" + encodeURIComponent(l.name)}, l.name);
  return el("tr", {"data-limit": l.name, className: isKey ? "key" : ""},
    el("td", {"data-label": isKey ? "key" : "limit", className: "wide"}, name, l.active ? null : el("span", {className: "state"}, " disabled")),
    occupancy(l),
    el("td", {"data-label": "kind", className: "wide"}, kindText(l)),
    el("td", {"data-label": "waiters"}, waiting),
    el("td", {"data-label": "grants/s"}, rates ? num(rates.grants) : "-"),
    el("td", {"data-label": "refusals/s"}, rates ? num(rates.refusals) : "-"),
    el("td", {"data-label": "totals", className: "muted wide"}, "granted " + l.grants_total + ", refused " + l.refusals_total +
      ", waited " + secs(l.wait_seconds_total) + ", taken back " + l.expired_leases_total),
    isKey ? el("td", {className: "empty"}) : actions(l));
}
function fields(h) {
  const out = el("span", {className: "fields"});
  for (const [k, v] of h.fields) out.append(el("span", {}, el("b", {}, k + " "), v));
  return out;
}
function holderText(h) {
  return [h.host || "?", "pid " + (h.pid === null ? "?" : h.pid), h.application || "-"].join(" \u00b7 ");
}
function holderRow(h) {
  const state = h.gone ? el("span", {className: "gone"}, " holder gone: reclaimable") :
    (h.expired ? el("span", {className: "gone"}, " expired") : null);
  const cell = el("td", {colSpan: 8, "data-label": "holder", className: "wide"}, h.slots + " slot(s) \u00b7 " + holderText(h),
    h.fields.length ? " \u00b7 " : null, h.fields.length ? fields(h) : null, " \u00b7 held " + secs(h.held_seconds), state);
  if (admin) cell.append(" ", el("button", {type: "button", onclick: () =>
    act("/api/leases/" + h.lease_id + "/release", {}, "Force-release this lease?")}, "release"));
  return el("tr", {className: "sub", "data-holder": h.lease_id}, cell);
}
function renderTable() {
  const rows = [];
  for (const l of latest.limits) {
    rows.push(limitRow(l, false));
    for (const h of l.holders) rows.push(holderRow(h));
    for (const k of l.busiest || []) {
      rows.push(limitRow(k, true));
      for (const h of k.holders) rows.push(holderRow(h));
    }
  }
  if (!rows.length) rows.push(el("tr", {}, el("td", {colSpan: 8}, "No limits yet: create one with 'pgslots create NAME -l N'.")));
  document.getElementById("limits").replaceChildren(...rows);
}

// ---- charts ---------------------------------------------------------------------------------------

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}
// One chart: one scale (yMax, or the series' largest value made round), time across from `from` to
// `to`, values on the left axis, times below, and a readout of every series under the pointer.
function chart(title, unit, series, times, from, to, yMax) {
  const W = 560, H = 200, L = 52, R = 10, T = 10, B = 30;
  const top = yMax !== undefined ? yMax : niceMax(Math.max(0, ...series.flatMap((s) => s.values)));
  const x = (t) => L + (W - L - R) * (to > from ? (t - from) / (to - from) : 1);
  const y = (v) => T + (H - T - B) * (1 - Math.min(v, top) / top);
  const svg = svgEl("svg", {viewBox: "0 0 " + W + " " + H, class: "chart", role: "img", "aria-label": title});
  for (const f of [0, 0.5, 1]) {
    const v = top * f;
    svg.append(svgEl("line", {x1: L, x2: W - R, y1: y(v), y2: y(v), class: f === 0 ? "axis" : "grid"}));
    svg.append(svgEl("text", {x: L - 6, y: y(v) + 4, "text-anchor": "end"}, num(v)));
  }
  svg.append(svgEl("line", {x1: L, x2: L, y1: T, y2: H - B, class: "axis"}));
  for (let i = 0; i <= 3; i++) {
    const t = from + (to - from) * i / 3;
    svg.append(svgEl("text", {x: x(t), y: H - 8, "text-anchor": i === 0 ? "start" : (i === 3 ? "end" : "middle")}, clock(t)));
  }
  for (const s of series) {
    const pts = times.map((t, i) => x(t).toFixed(1) + "," + y(s.values[i]).toFixed(1)).join(" ");
    svg.append(svgEl("polyline", {points: pts, class: s.cls}));
  }
  const cursor = svgEl("line", {x1: -10, x2: -10, y1: T, y2: H - B, class: "cursor"});
  svg.append(cursor);
  const readout = el("div", {className: "readout"}, times.length ? "Point at the chart for its values." : "No samples yet.");
  svg.addEventListener("mousemove", (e) => {
    if (!times.length) return;
    const box = svg.getBoundingClientRect();
    const at = from + (to - from) * ((e.clientX - box.left) * W / box.width - L) / (W - L - R);
    let best = 0;
    for (let i = 1; i < times.length; i++) if (Math.abs(times[i] - at) < Math.abs(times[best] - at)) best = i;
    cursor.setAttribute("x1", x(times[best]));
    cursor.setAttribute("x2", x(times[best]));
    readout.textContent = clock(times[best]) + ": " + series.map((s) => s.name + " " + num(s.values[best]) + " " + unit).join(", ");
  });
  const legend = el("span", {className: "legend"});
  for (const s of series) legend.append(el("span", {className: s.cls}, "\u25a0 " + s.name + " "));
  return el("figure", {"data-chart": title}, el("figcaption", {}, title + " (" + unit + ")", legend), svg, readout);
}

// ---- one limit's view -------------------------------------------------------------------------------

function findLimit(name) {
  for (const l of latest.limits) {
    if (l.name === name) return l;
    for (const k of l.busiest || []) if (k.name === name) return k;
  }
  return null;
}
function renderDetail(name) {
  const l = findLimit(name);
  document.getElementById("detail-name").textContent = name;
  if (!l) {
    document.getElementById("detail-summary").textContent = "Not shown now: it is gone, or a key that is not among its template's busiest.";
    document.getElementById("charts").replaceChildren();
    document.getElementById("detail-holders").replaceChildren();
    document.getElementById("detail-keys").replaceChildren();
    return;
  }
  document.getElementById("detail-summary").textContent = kindText(l) + " \u00b7 " + num(l.held_slots) + " of " + l.capacity +
    " slots held \u00b7 " + l.waiters + " waiting \u00b7 granted " + l.grants_total + ", refused " + l.refusals_total +
    (l.paused_until ? " \u00b7 paused until " + new Date(l.paused_until).toLocaleTimeString() : "");
  const s = (history && history.limits[name]) || {t: [], grants: [], refusals: [], waited: [], held: [], waiters: []};
  const now = Date.now() / 1000;
  const from = history ? Math.max(history.since, now - 3600) : now - 60;
  document.getElementById("detail-range").textContent = history ?
    "From " + clock(from) + " to " + clock(now) + ": " + secs(now - from) + " since pgslots ui started sampling (every " +
    num(history.interval) + " s; an hour at most)." : "";
  document.getElementById("charts").replaceChildren(
    chart("Slots held", "slots", [{name: "held", cls: "held", values: s.held}], s.t, from, now, Math.max(1, l.capacity)),
    chart("Grants and refusals", "per second", [{name: "grants", cls: "grants", values: s.grants}, {name: "refusals", cls: "refusals", values: s.refusals}], s.t, from, now),
    chart("Waiters queued", "waiters", [{name: "waiters", cls: "waiters", values: s.waiters}], s.t, from, now),
    chart("Time spent waiting", "seconds per second", [{name: "waited", cls: "waited", values: s.waited}], s.t, from, now));
  const holders = l.holders.map((h) => el("tr", {"data-holder": h.lease_id},
    el("td", {"data-label": "slots"}, String(h.slots)), el("td", {"data-label": "host"}, h.host || "?"),
    el("td", {"data-label": "pid"}, h.pid === null ? "?" : String(h.pid)), el("td", {"data-label": "application"}, h.application || "-"),
    el("td", {"data-label": "holder's fields"}, fields(h)),
    el("td", {"data-label": "held for"}, secs(h.held_seconds), h.gone ? el("span", {className: "gone"}, " holder gone: reclaimable") : null),
    el("td", {}, admin ? el("button", {type: "button", onclick: () => act("/api/leases/" + h.lease_id + "/release", {}, "Force-release this lease?")}, "release") : "")));
  if (!holders.length) holders.push(el("tr", {}, el("td", {colSpan: 7}, latest.holders_note || "Nobody holds it now.")));
  document.getElementById("detail-holders").replaceChildren(...holders);
  const keys = document.getElementById("detail-keys");
  keys.replaceChildren();
  if (l.is_template) {
    keys.append(el("h3", {}, "Busiest keys (of " + (l.instances || 0) + ")"));
    const list = el("ul");
    for (const k of l.busiest || []) list.append(el("li", {}, el("a", {href: "#limit=" + encodeURIComponent(k.name)}, k.name),
      " \u00b7 " + num(k.held_slots) + " / " + k.limit + " held, " + k.waiters + " waiting"));
    keys.append(list);
  }
}

// ---- refreshing -------------------------------------------------------------------------------------

function shownLimit() {
  const m = location.hash.match(/^#limit=(.*)$/);
  return m ? decodeURIComponent(m[1]) : null;
}
function render() {
  if (!latest) return;
  const name = shownLimit();
  document.getElementById("overview").hidden = name !== null;
  document.getElementById("detail").hidden = name === null;
  if (name === null) renderTable(); else renderDetail(name);
}
async function refresh() {
  try {
    latest = await getJSON("/api/limits");
    admin = latest.admin;
    document.getElementById("mode").textContent = admin ? "admin actions on (token required)" : "read-only";
    document.getElementById("token-box").hidden = !admin && tokenInput.value === "";
    document.getElementById("create").hidden = !admin;
    document.getElementById("error").textContent = latest.sample_error || "";
    if (latest.holders_note) document.getElementById("note").textContent = latest.holders_note;
    document.getElementById("status").textContent = "updated " + new Date().toLocaleTimeString();
    render();
  } catch (e) {
    document.getElementById("error").textContent = "Cannot read the limits: " + e.message;
    if (String(e.message).includes("token")) document.getElementById("token-box").hidden = false;
  }
}
async function refreshHistory() {
  try { history = await getJSON("/api/history"); } catch (e) { /* the next refresh says why */ }
}
document.getElementById("create").addEventListener("click", () => {
  const name = prompt("Name of the new limit (ending in * for a template):");
  if (!name) return;
  const limit = prompt("Slots:", "10");
  if (limit !== null) act("/api/limits", {name: name, limit: Number(limit)});
});
window.addEventListener("hashchange", render);
refreshHistory().then(refresh);
setInterval(refresh, 1000);
setInterval(refreshHistory, 2000);
