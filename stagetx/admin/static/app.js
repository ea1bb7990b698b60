// stagetx dashboard: renders /api/events snapshots, plots /api/history, browses index stages.
// No build step, no framework; charts by uPlot (static/uPlot.iife.min.js).
"use strict";

const $ = (id) => document.getElementById(id);
const session = { token: sessionStorage.getItem("stagetx-token") || "", readonly: true, csrf: null, interval: 1 };
let latest = null;        // the last overview
let lastEventAt = 0;      // Date.now() of the last event
let charts = [];
const board = { start: 1 }; // scoreboard paging

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (session.token) h["Authorization"] = "Bearer " + session.token;
  return h;
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({}, options, { headers: headers((options || {}).headers) }));
  if (response.status === 401) throw Object.assign(new Error("token required"), { status: 401 });
  return response.json();
}

async function command(name, args) {
  const query = (args || []).map((a) => "args=" + encodeURIComponent(a)).join("&");
  const reply = await api("api/" + name + (query ? "?" + query : ""));
  if (!reply.ok) throw new Error(reply.error);
  return reply.data;
}

// -- formatting ------------------------------------------------------------------------------
const num = (v, digits) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits || 0));
const ms = (seconds) => (seconds === null || seconds === undefined ? "–" : (seconds * 1000).toFixed(2));
function bytes(v) {
  if (v === null || v === undefined) return "–";
  return v >= 1048576 ? (v / 1048576).toFixed(1) + " MiB" : (v / 1024).toFixed(0) + " KiB";
}
function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.floor(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
}
function cell(text, attrs) {
  const td = document.createElement("td");
  td.textContent = text;
  for (const [k, v] of Object.entries(attrs || {})) td.setAttribute(k, v);
  return td;
}
function stateCell(state) {
  return cell(state, { class: "badge state-" + state, "data-field": "state" });
}
function fill(tableId, rows, build, empty) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren();
  for (const r of rows) body.appendChild(build(r));
  if (!rows.length) {
    const tr = document.createElement("tr");
    tr.appendChild(cell(empty, { colspan: $(tableId).tHead.rows[0].cells.length, class: "empty" }));
    body.appendChild(tr);
  }
}
function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

// -- overview --------------------------------------------------------------------------------
function render(o) {
  latest = o;
  fill("processes", o.processes, (p) => {
    const tr = document.createElement("tr");
    tr.dataset.process = p.process;
    tr.className = "row-" + p.state;
    tr.append(cell(p.process), stateCell(p.state), cell(p.pid ?? "–", { "data-field": "pid" }),
      cell(duration(p.uptime)), cell(p.restarts, { "data-field": "restarts" }), cell(bytes(p.rss)),
      cell(num(p.queue), { "data-field": "queue" }), cell(p.stages.join(" ")));
    const act = cell("", { class: "act" });
    if (!session.readonly) act.appendChild(button("restart", () => act_(`restart process ${p.process}`, "restart", [String(p.process)])));
    tr.appendChild(act);
    return tr;
  }, "no processes");
  fill("stages", o.stages, (s) => {
    const tr = document.createElement("tr");
    tr.dataset.stage = `${s.process}/${s.name}`;
    tr.className = "row-" + s.state;
    const state = stateCell(s.state);
    if (s.failure) state.title = s.failure;
    tr.append(cell(s.process), cell(s.name), state,
      cell(num(s.in_rate, 1), { "data-field": "in_rate" }), cell(num(s.out_rate, 1), { "data-field": "out_rate" }),
      cell(num(s.received), { "data-field": "received" }), cell(num(s.sent), { "data-field": "sent" }),
      cell(ms(s.p50), { "data-field": "p50" }), cell(ms(s.p99), { "data-field": "p99" }),
      cell(num(s.queue), { "data-field": "queue" }), errorsCell(s),
      cell(num(s.clients), { "data-field": "clients" }),
      cell(s.type === "lua" || s.type === "luajit" ? bytes(s.lua_memory) : ""));
    const act = cell("", { class: "act" });
    if (!session.readonly && (s.type === "lua" || s.type === "luajit") && (s.state === "running" || s.state === "failed")) {
      act.appendChild(button("reload", () => act_(`reload stage ${s.name}`, "reload", [s.name])));
    }
    tr.appendChild(act);
    return tr;
  }, "no stages");
  fill("listeners", o.listeners || [], (e) => {
    const tr = document.createElement("tr");
    tr.dataset.endpoint = `${e.process}/${e.stage}/${e.id}`;
    tr.append(cell(e.process), cell(e.stage), cell(e.url), cell(e.kind),
      ...["connected", "accepted", "refused", "closed", "frames_in", "frames_out", "bytes_in", "bytes_out", "oversized"]
        .map((f) => cell(num(e[f]), { "data-field": f })));
    return tr;
  }, "no broker endpoints");
  showErrors();
  fill("tickets", o.tickets, (t) => {
    const tr = document.createElement("tr");
    tr.append(cell(t.stage), cell(t.category), cell(t.held), cell(t.waiting), cell(t.limit));
    return tr;
  }, "no ticket stage running");
  fill("subscriptions", o.subscriptions, (s) => {
    const tr = document.createElement("tr");
    tr.append(cell(s.stage), cell(s.subscribe_id), cell(s.subscribers));
    return tr;
  }, "no subscriptions");
  fill("peers", o.peers || [], (p) => {
    const tr = document.createElement("tr");
    tr.className = "row-" + p.state;
    tr.append(cell(p.server), cell(p.addr), stateCell(p.state), cell(p.linked ? ms(p.delay) : "–"),
      cell(p.overloaded ? "yes" : "no"), cell(p.stages));
    return tr;
  }, o.peers === null ? "no cluster" : "no peers yet");
  $("updated").textContent = "updated " + new Date(o.time * 1000).toLocaleTimeString();
  $("updated").dataset.time = o.time;
  syncStageChoices(o);
}

function syncStageChoices(o) {
  const keys = o.stages.map((s) => `${s.process}/${s.name}`);
  const chart = $("chart-stage");
  if (chart.options.length !== keys.length) {
    const chosen = chart.value;
    chart.replaceChildren(...keys.map((k) => new Option(k, k)));
    if (keys.includes(chosen)) chart.value = chosen;
    loadHistory();
  }
  const indexes = [...new Set(o.stages.filter((s) => s.type === "index").map((s) => s.name))];
  const sb = $("sb-stage");
  if (sb.options.length !== indexes.length) {
    sb.replaceChildren(...indexes.map((k) => new Option(k, k)));
    loadBoards();
  }
}

// -- a stage's last errors, opened by clicking its error count ---------------------------------
let errorsOf = null; // "process/name" of the stage whose errors are shown
function errorsCell(s) {
  const td = cell(num(s.errors), { "data-field": "errors", class: s.errors ? "error" : "" });
  if (s.errors) {
    td.classList.add("clickable");
    td.title = "show the last errors";
    td.addEventListener("click", () => { errorsOf = `${s.process}/${s.name}`; showErrors(); });
  }
  return td;
}
function showErrors() {
  const stage = errorsOf && latest && latest.stages.find((s) => `${s.process}/${s.name}` === errorsOf);
  $("errors-panel").hidden = !stage;
  if (!stage) return;
  $("errors-title").textContent = `Last errors of ${stage.name} (process ${stage.process}): ${stage.errors} in all`;
  const items = [...(stage.last_errors || [])].reverse().map((e) => {
    const li = document.createElement("li");
    li.textContent = `${new Date(e.time * 1000).toLocaleTimeString()} ${e.error}`;
    return li;
  });
  if (!items.length) items.push(Object.assign(document.createElement("li"), { textContent: "no error text kept" }));
  $("errors-list").replaceChildren(...items);
}
$("errors-close").addEventListener("click", () => { errorsOf = null; showErrors(); });

// -- live stream (fetch, so that the token travels as a header) -------------------------------
async function stream() {
  try {
    const response = await fetch("api/events", { headers: headers() });
    if (response.status === 401) return needToken("token required");
    setConnection("live", "state-up");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
        if (data) {
          lastEventAt = Date.now();
          render(JSON.parse(data));
        }
      }
    }
  } catch (e) { /* the server went away: retry below */ }
  setConnection("disconnected: retrying", "state-down");
  setTimeout(stream, 2000);
}

function setConnection(text, cls) {
  $("connection").textContent = text;
  $("connection").className = "badge " + cls;
}

// Numbers older than a few refreshes are not shown as live.
setInterval(() => {
  const stale = lastEventAt && Date.now() - lastEventAt > 5000;
  document.body.classList.toggle("stale", Boolean(stale));
  if (stale) setConnection("no data for " + Math.round((Date.now() - lastEventAt) / 1000) + " s", "state-down");
}, 1000);

// -- history charts --------------------------------------------------------------------------
async function loadHistory() {
  const key = $("chart-stage").value;
  if (!key) return;
  const h = await api("api/history?stage=" + encodeURIComponent(key));
  const s = h.stages[key] || { t: [], in: [], out: [], p50: [], p99: [] };
  const width = Math.max(320, Math.floor(($("main").clientWidth - 40) / 2));
  const toMs = (xs) => xs.map((v) => (v === null ? null : v * 1000));
  charts.forEach((c) => c.destroy());
  charts = [
    new uPlot({ title: "messages / s", width, height: 220,
      series: [{}, { label: "in", stroke: "#2a7de1" }, { label: "out", stroke: "#e1812a" }] },
      [s.t, s.in, s.out], $("chart-rate")),
    new uPlot({ title: "handler time (ms)", width, height: 220,
      series: [{}, { label: "p50", stroke: "#2aa15a" }, { label: "p99", stroke: "#c0392b" }] },
      [s.t, toMs(s.p50), toMs(s.p99)], $("chart-latency")),
  ];
}
$("chart-stage").addEventListener("change", loadHistory);
setInterval(() => { if (latest) loadHistory().catch(() => {}); }, 5000);

// -- scoreboard browser (the index stage's own forEach, get and range) ----------------------
function sbTarget() {
  return `${$("sb-board").value}/${$("sb-tier").value}`;
}
async function loadBoards() {
  const stage = $("sb-stage").value;
  if (!stage) return;
  const boards = await command("index", [stage]);
  $("sb-board").replaceChildren(...Object.keys(boards).map((b) => new Option(`${b} (${boards[b].join("/")})`, b)));
  board.sizes = boards;
  board.start = 1;
  await showPage();
}
async function indexRequest(request) {
  return command("index", [$("sb-stage").value, JSON.stringify(request)]);
}
function showRows(rows, highlight) {
  fill("sb-rows", rows, (r) => {
    const tr = document.createElement("tr");
    tr.dataset.member = r.k;
    if (r.k === highlight) tr.className = "found";
    tr.append(cell(r.d, { "data-field": "rank" }), cell(r.k, { "data-field": "member" }), cell(r.i, { "data-field": "score" }),
      cell(r.v === undefined ? "" : JSON.stringify(r.v)));
    return tr;
  }, "no entries");
}
async function showPage() {
  if (!$("sb-board").value) return showRows([]);
  const count = Math.max(1, Math.min(500, Number($("sb-count").value) || 10));
  const total = (board.sizes[$("sb-board").value] || [])[Number($("sb-tier").value) - 1] || 0;
  board.start = Math.max(1, Math.min(board.start, Math.max(1, total - count + 1)));
  const key = "forEach:" + sbTarget();
  const reply = await indexRequest({ [key]: [board.start, count] });
  const rows = reply[key];
  if (rows.error) throw new Error(rows.error);
  showRows(rows);
  $("sb-page").textContent = `ranks ${board.start}–${board.start + rows.length - 1} of ${total}`;
  $("sb-status").textContent = "";
}
async function search(member) {
  const get = "#1.get:" + sbTarget(), range = "#2.range:" + sbTarget();
  const reply = await indexRequest({ [get]: [member], [range]: [member, 11] });
  const found = reply[get][member];
  const tier = $("sb-tier").value;
  if (!found || !found.I[tier]) {
    $("sb-status").textContent = `${member} has no rank in tier ${tier}`;
    return showRows([]);
  }
  $("sb-status").textContent = `${member}: rank ${found.I[tier].d}, score ${found.I[tier].i}`;
  $("sb-status").dataset.rank = found.I[tier].d;
  showRows(reply[range], member);
  $("sb-page").textContent = "";
}
const report = (p) => p.catch((e) => { $("sb-status").textContent = "error: " + e.message; });
$("sb-stage").addEventListener("change", () => report(loadBoards()));
for (const id of ["sb-board", "sb-tier", "sb-count"]) $(id).addEventListener("change", () => { board.start = 1; report(showPage()); });
$("sb-prev").addEventListener("click", () => { board.start -= Number($("sb-count").value) || 10; report(showPage()); });
$("sb-next").addEventListener("click", () => { board.start += Number($("sb-count").value) || 10; report(showPage()); });
$("sb-search").addEventListener("submit", (e) => { e.preventDefault(); report(search($("sb-member").value.trim())); });

// -- actions (token, CSRF header, confirmation) ----------------------------------------------
async function act_(what, name, args) {
  if (!window.confirm(`Really ${what}?`)) return;
  $("action-result").textContent = what + "…";
  const response = await fetch("api/action", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json", "X-CSRF-Token": session.csrf }),
    body: JSON.stringify({ command: name, args }),
  });
  const reply = await response.json();
  $("action-result").textContent = `${what}: ${reply.ok ? "done" : "failed: " + reply.error}`;
}
$("loglevel").addEventListener("submit", (e) => {
  e.preventDefault();
  const ns = $("ll-namespace").value.trim(), level = $("ll-level").value;
  act_(`set log level of ${ns} to ${level}`, "loglevel", [ns, level]);
});

// -- start -----------------------------------------------------------------------------------
function needToken(why) {
  $("login").hidden = false;
  $("main").hidden = true;
  $("login-error").textContent = why || "";
}
$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  session.token = $("token").value;
  sessionStorage.setItem("stagetx-token", session.token);
  start();
});
async function start() {
  try {
    Object.assign(session, await api("api/session"));
  } catch (e) {
    return needToken(e.status === 401 && session.token ? "wrong token" : "");
  }
  $("login").hidden = true;
  $("main").hidden = false;
  $("actions").hidden = session.readonly;
  $("mode").textContent = session.readonly ? "read-only (no admin token configured)" : "admin";
  $("mode").className = "badge " + (session.readonly ? "state-starting" : "state-up");
  stream();
}
start();
