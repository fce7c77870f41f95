// The live page: opens the WebSocket at /live and draws each snapshot the server pushes (at most
// a few a second): the headline numbers, the busiest keys, the waits-for graph, the last
// deadlocks. No library; the graph uses a circle layout, stable by session id.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
let sortByWait = false;
let lastSnapshot = null;

function label(entry) {
  return entry.name || entry.session.slice(0, 8);
}

function seconds(ms) {
  return ms < 1000 ? ms + " ms" : (ms / 1000).toFixed(1) + " s";
}

function el(tag, attrs, text) {
  const node = tag.startsWith("svg:")
    ? document.createElementNS(SVG, tag.slice(4))
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function entrySpan(entry, timeMs) {
  const span = el("span", { class: "entry " + entry.mode, "data-session": entry.session,
                            title: entry.session });
  span.append(label(entry) + " " + entry.mode + " ");
  span.append(el("span", { class: "time" }, seconds(timeMs)));
  return span;
}

function renderKeys(snapshot) {
  const body = document.querySelector("#keys tbody");
  const keys = snapshot.keys.slice();
  if (sortByWait) keys.sort((a, b) => b.longest_wait_ms - a.longest_wait_ms);
  body.replaceChildren(...keys.map((key) => {
    const row = el("tr", { "data-key": key.key });
    row.append(el("td", { class: "key" }, key.key));
    const holders = el("td", { class: "holders" });
    key.holders.forEach((h) => holders.append(entrySpan(h, h.held_ms)));
    const waiters = el("td", { class: "waiters" });
    key.waiters.forEach((w) => waiters.append(entrySpan(w, w.waiting_ms)));
    row.append(holders, waiters);
    return row;
  }));
  if (keys.length === 0) {
    const row = el("tr", { class: "empty" });
    row.append(el("td", { colspan: "3" }, "no lock is held"));
    body.append(row);
  }
  const more = document.getElementById("more-keys");
  more.dataset.more = String(snapshot.more_keys);
  more.textContent = snapshot.more_keys > 0 ? snapshot.more_keys + " more keys not shown" : "";
}

// The order of the nodes around the circle: each holder followed by those waiting for it, depth
// first, so that a chain of waits sits side by side instead of crossing the circle.
function circleOrder(ids, edges) {
  const waitersOf = new Map();
  const waiting = new Set();
  for (const e of edges) {
    waiting.add(e.waiter);
    if (!waitersOf.has(e.holder)) waitersOf.set(e.holder, []);
    waitersOf.get(e.holder).push(e.waiter);
  }
  const order = [];
  const seen = new Set();
  const visit = (id) => {
    if (seen.has(id)) return;
    seen.add(id);
    order.push(id);
    for (const w of (waitersOf.get(id) || []).sort()) visit(w);
  };
  ids.filter((id) => !waiting.has(id)).forEach(visit);
  ids.forEach(visit);
  return order;
}

function renderGraph(snapshot) {
  // Nodes: every session holding or waiting for a listed key.
  const sessions = new Map();
  const waiting = new Set();
  for (const key of snapshot.keys) {
    for (const h of key.holders) sessions.set(h.session, h);
    for (const w of key.waiters) { sessions.set(w.session, sessions.get(w.session) || w); waiting.add(w.session); }
  }
  const ids = circleOrder([...sessions.keys()].sort(), snapshot.edges);
  const cx = 300, cy = 210, r = ids.length > 1 ? 160 : 0;
  const at = new Map(ids.map((id, i) => {
    const angle = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(ids.length, 1);
    return [id, { x: cx + r * Math.cos(angle), y: cy + r * Math.sin(angle) }];
  }));
  const nodes = ids.map((id) => {
    const p = at.get(id);
    const g = el("svg:g", { class: "node" + (waiting.has(id) ? " waiting" : ""), "data-session": id,
                            transform: `translate(${p.x.toFixed(1)},${p.y.toFixed(1)})` });
    g.append(el("svg:title", {}, id));
    g.append(el("svg:circle", { r: "26" }));
    const text = label(sessions.get(id));
    g.append(el("svg:text", {}, text.length > 9 ? text.slice(0, 8) + "…" : text));
    return g;
  });
  const edges = snapshot.edges.map((edge) => {
    const a = at.get(edge.waiter), b = at.get(edge.holder);
    const g = el("svg:g", { class: "edge", "data-waiter": edge.waiter, "data-holder": edge.holder,
                            "data-key": edge.key });
    if (!a || !b) return g;
    const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy) || 1;
    const ux = dx / len, uy = dy / len;
    const x1 = a.x + ux * 28, y1 = a.y + uy * 28, x2 = b.x - ux * 30, y2 = b.y - uy * 30;
    g.append(el("svg:path", { class: "link", d: `M ${x1.toFixed(1)} ${y1.toFixed(1)} L ${x2.toFixed(1)} ${y2.toFixed(1)}` }));
    g.append(el("svg:text", { x: ((x1 + x2) / 2 - uy * 10).toFixed(1), y: ((y1 + y2) / 2 + ux * 10).toFixed(1) }, edge.key));
    return g;
  });
  document.getElementById("nodes").replaceChildren(...nodes);
  document.getElementById("edges").replaceChildren(...edges);
}

function cycleDrawing(cycle) {
  const svg = el("svg:svg", { viewBox: "0 0 220 120" });
  const n = cycle.length, cx = 110, cy = 60, r = n > 1 ? 42 : 0;
  const points = cycle.map((_, i) => {
    const angle = -Math.PI / 2 + (2 * Math.PI * i) / n;
    return { x: cx + r * Math.cos(angle), y: cy + r * Math.sin(angle) };
  });
  // Each member waits for the next one's key holder: arrows around the cycle.
  points.forEach((a, i) => {
    const b = points[(i + 1) % n];
    const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy) || 1;
    const ux = dx / len, uy = dy / len;
    svg.append(el("svg:path", { d: `M ${(a.x + ux * 15).toFixed(1)} ${(a.y + uy * 15).toFixed(1)} L ${(b.x - ux * 16).toFixed(1)} ${(b.y - uy * 16).toFixed(1)}` }));
  });
  cycle.forEach((m, i) => {
    svg.append(el("svg:circle", { cx: points[i].x.toFixed(1), cy: points[i].y.toFixed(1), r: "14",
                                  class: i === 0 ? "victim" : "" }));
    svg.append(el("svg:text", { x: points[i].x.toFixed(1), y: points[i].y.toFixed(1) }, label(m).slice(0, 6)));
  });
  return svg;
}

function renderDeadlocks(snapshot) {
  const list = document.getElementById("deadlocks");
  list.replaceChildren(...snapshot.deadlocks.map((d) => {
    const li = el("li", { class: "deadlock", "data-victim": d.victim || "" });
    li.append(el("span", { class: "when" }, new Date(d.at_ms).toLocaleTimeString()));
    d.cycle.forEach((m, i) => {
      const span = el("span", { class: "member" + (i === 0 ? " victim" : ""), "data-session": m.session,
                                title: m.session + " waited for " + m.key },
                      label(m) + " → " + m.key);
      li.append(span);
    });
    li.append(el("span", { class: "when" }, "refused: " + label(d.cycle[0] || { session: "?" })));
    li.append(cycleDrawing(d.cycle));
    return li;
  }));
  if (snapshot.deadlocks.length === 0) list.append(el("li", { class: "empty" }, "none since the server started"));
}

function render(snapshot) {
  lastSnapshot = snapshot;
  document.getElementById("sessions").textContent = snapshot.sessions;
  document.getElementById("suspended").textContent = snapshot.suspended;
  document.getElementById("locks").textContent = snapshot.locks_held;
  document.getElementById("waiters").textContent = snapshot.waiters;
  document.getElementById("deadlocks-per-s").textContent = snapshot.deadlocks_per_s;
  document.getElementById("seq").textContent = snapshot.seq;
  renderKeys(snapshot);
  renderGraph(snapshot);
  renderDeadlocks(snapshot);
}

function connect(delay) {
  const token = new URLSearchParams(location.search).get("token");
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const url = scheme + "//" + location.host + "/live" + (token ? "?token=" + encodeURIComponent(token) : "");
  const socket = new WebSocket(url);
  socket.onopen = () => {
    delay = 500;
    document.body.dataset.stream = "live";
    document.getElementById("stream-state").textContent = "live";
  };
  socket.onmessage = (event) => render(JSON.parse(event.data));
  socket.onclose = () => {
    document.body.dataset.stream = "down";
    document.getElementById("stream-state").textContent = "disconnected, retrying…";
    setTimeout(() => connect(Math.min(delay * 2, 5000)), delay);
  };
}

document.getElementById("sort-wait").addEventListener("click", (event) => {
  sortByWait = !sortByWait;
  event.currentTarget.classList.toggle("sorted", sortByWait);
  if (lastSnapshot) renderKeys(lastSnapshot);
});
connect(500);
