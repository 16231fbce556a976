/* Shoal dashboard: a single page with hash routes, fed by server-sent events.

   #/                               namespaces
   #/namespaces/NS                  workloads of NS
   #/namespaces/NS/workloads/NAME   one workload: edges, routes, live top
   #/tap?ns=&workload=&to=&method=&path=&authority=   live tap

   Each page opens one EventSource on /api/stream (or /api/tap) and closes it when the
   route changes, so a tab holds one connection whatever it shows. Plain JavaScript,
   no build step, nothing loaded from anywhere but this server. */
"use strict";

const HISTORY_TICKS = 150;      // 5 minutes at one tick every 2 s (server: history.py)
const MIN_CHART_TICKS = 30;     // a chart's axis spans at least a minute of ticks
const STALE_AFTER_MS = 6000;    // three missed ticks: say the view is not live
const MAX_TAP_ROWS = 500;       // requests kept on the tap page, newest first
const TAP_RENDER_MS = 250;      // tap table redrawn at most this often
const GRPC_STATUS = ["OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded",
  "NotFound", "AlreadyExists", "PermissionDenied", "ResourceExhausted",
  "FailedPrecondition", "Aborted", "OutOfRange", "Unimplemented", "Internal",
  "Unavailable", "DataLoss", "Unauthenticated"];

const view = document.getElementById("view");
const banner = document.getElementById("banner");
const live = document.getElementById("live");
const liveText = document.getElementById("live-text");
let unmount = () => {};
let lastMessage = 0;

// ---------------------------------------------------------------- formatting

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}
function pct(sr) { return sr == null ? "-" : (sr * 100).toFixed(2) + "%"; }
function rps(value) {
  if (value == null) return "-";
  return value < 10 ? value.toFixed(2) : value.toFixed(1);
}
function ms(value) {
  if (value == null) return "-";
  if (value < 1) return value.toFixed(2) + " ms";
  if (value < 10) return value.toFixed(1) + " ms";
  if (value < 1000) return Math.round(value) + " ms";
  return (value / 1000).toFixed(2) + " s";
}
function us(value) { return value == null ? "-" : ms(value / 1000); }
function grade(sr) {
  if (sr == null) return "none";
  return sr >= 0.99 ? "good" : sr >= 0.95 ? "warn" : "bad";
}
function pill(sr) { return `<span class="pill ${grade(sr)}">${pct(sr)}</span>`; }
function grpcName(code) {
  return code == null ? "" : (GRPC_STATUS[code] ?? String(code));
}
function clock(seconds) {
  const d = new Date(seconds * 1000);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.` +
         pad(d.getMilliseconds(), 3);
}
function shortId(identity) {
  // "web.emojivoto.serviceaccount.identity.shoal.cluster.local" -> "web.emojivoto"
  if (!identity) return "-";
  const at = identity.indexOf(".serviceaccount.");
  return at > 0 ? identity.slice(0, at) : identity;
}
function secured(edge) {
  return edge.secured ? `<span class="secured">✓ mTLS</span>`
    : `<span class="unsecured">✗ ${esc(edge.no_tls_reason || "not secured")}</span>`;
}

// ---------------------------------------------------------------- sparklines (inline SVG)

function sparkline(values, { width = 140, height = 30, kind = "rps" } = {}) {
  // Right-aligned on an axis of at least a minute of ticks, so a chart that has just
  // started fills from the right instead of stretching a few points across.
  const all = values || [];
  const slots = Math.max(all.length, MIN_CHART_TICKS);
  const offset = slots - all.length;
  const points = all.map((v, i) => [i + offset, v]).filter(([, v]) => v != null);
  const n = Math.max(slots - 1, 1);
  let lo = 0, hi = 1;
  if (kind === "sr") {
    // from a tenth below the lowest tenth reached, so 90% does not sit on the floor
    const min = points.length ? Math.min(...points.map(([, v]) => v)) : 1;
    lo = Math.max(0, Math.min(0.9, Math.floor(min * 10) / 10 - 0.1));
    hi = 1;
  } else {
    const max = points.length ? Math.max(...points.map(([, v]) => v)) : 0;
    hi = max > 0 ? max * 1.15 : 1;
  }
  const x = (i) => 1 + (i / n) * (width - 4);
  const y = (v) => height - 2 - ((v - lo) / (hi - lo || 1)) * (height - 5);
  const dip = kind === "sr" && points.length && points[points.length - 1][1] < 0.99;
  let body = `<line class="base" x1="1" x2="${width - 1}" y1="${height - 1.5}" y2="${height - 1.5}"/>`;
  if (points.length) {
    // one path per run of values without gaps
    let line = "", area = "", run = [];
    const flush = () => {
      if (!run.length) return;
      const d = run.map(([i, v], k) => `${k ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`).join("");
      line += d;
      area += `${d}L${x(run[run.length - 1][0]).toFixed(1)},${height - 1.5}` +
              `L${x(run[0][0]).toFixed(1)},${height - 1.5}Z`;
      run = [];
    };
    let prev = -2;
    for (const [i, v] of points) {
      if (i !== prev + 1) flush();
      run.push([i, v]);
      prev = i;
    }
    flush();
    const [li, lv] = points[points.length - 1];
    body += `<path class="area" d="${area}"/><path class="line" d="${line}"/>` +
            `<circle class="dot" cx="${x(li).toFixed(1)}" cy="${y(lv).toFixed(1)}" r="2"/>`;
  }
  const title = kind === "sr" ? "success rate, last 5 minutes" : kind === "p95" ?
    "p95 latency, last 5 minutes" : "requests per second, last 5 minutes";
  return `<svg class="spark ${kind}${dip ? " dip" : ""}" width="${width}" height="${height}" ` +
         `viewBox="0 0 ${width} ${height}" role="img" aria-label="${title}"><title>${title}</title>${body}</svg>`;
}

// Client-side copy of the server's ring: filled whole by "snapshot", one tick per "tick".
class History {
  constructor(initial) {
    this.times = (initial && initial.times) || [];
    this.series = (initial && initial.series) || {};
  }
  add(sample) {
    if (!sample) return;
    const last = this.times[this.times.length - 1];
    if (last != null && sample.time <= last) return;
    this.times.push(sample.time);
    const length = this.times.length;
    for (const [name, s] of Object.entries(this.series)) {
      const v = sample.values[name];
      s.rps.push(v ? v.rps : null); s.sr.push(v ? v.sr : null); s.p95.push(v ? v.p95 : null);
    }
    for (const [name, v] of Object.entries(sample.values)) {
      if (this.series[name]) continue;
      const empty = () => new Array(length - 1).fill(null);
      this.series[name] = { rps: [...empty(), v.rps], sr: [...empty(), v.sr], p95: [...empty(), v.p95] };
    }
    if (length > HISTORY_TICKS) {
      const cut = length - HISTORY_TICKS;
      this.times.splice(0, cut);
      for (const s of Object.values(this.series)) {
        s.rps.splice(0, cut); s.sr.splice(0, cut); s.p95.splice(0, cut);
      }
    }
  }
  of(name) { return this.series[name] || { rps: [], sr: [], p95: [] }; }
}

// ---------------------------------------------------------------- live status and streams

function setBanner(text, bad = false) {
  banner.hidden = !text;
  banner.textContent = text || "";
  banner.classList.toggle("bad", bad);
}
function markLive() {
  lastMessage = Date.now();
  live.className = "live on";
  liveText.textContent = "live";
}
setInterval(() => {
  if (lastMessage && Date.now() - lastMessage > STALE_AFTER_MS) {
    live.className = "live stale";
    liveText.textContent = "reconnecting…";
  }
}, 1000);

// One EventSource for a page; `handlers` maps event names to functions of the parsed data.
function stream(url, handlers) {
  const source = new EventSource(url);
  for (const [name, fn] of Object.entries(handlers)) {
    source.addEventListener(name, (event) => {
      markLive();
      fn(JSON.parse(event.data));
    });
  }
  source.onopen = markLive;
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED && handlers.closed) handlers.closed();
  };
  return () => source.close();
}

function showPlaneError(data) {
  if (data.error) {
    setBanner(`The metrics service is not answering (${data.error}); showing the last ` +
              "figures it gave.", true);
  } else if (data.waiting) {
    setBanner("Waiting for the first answer of the metrics service…");
  } else {
    setBanner("");
  }
}

// ---------------------------------------------------------------- tables

// A sortable table: columns are {key, label, num, sort(row), cell(row)}.
class Table {
  constructor(columns, { rowLink, empty, sortKey }) {
    this.columns = columns;
    this.rowLink = rowLink;
    this.emptyText = empty;
    this.sortKey = sortKey || columns[0].key;
    this.sortDesc = false;
  }
  header() {
    return "<tr>" + this.columns.map((c) => {
      const arrow = c.key === this.sortKey ? `<span class="arrow">${this.sortDesc ? "▼" : "▲"}</span>` : "";
      const cls = [c.num ? "num" : "", c.sort ? "sortable" : ""].join(" ").trim();
      return `<th class="${cls}" data-key="${c.key}">${esc(c.label)}${arrow}</th>`;
    }).join("") + "</tr>";
  }
  body(rows) {
    if (!rows.length) {
      return `<tr><td class="empty" colspan="${this.columns.length}">${this.emptyText}</td></tr>`;
    }
    const column = this.columns.find((c) => c.key === this.sortKey);
    const sorted = column && column.sort ? [...rows].sort((a, b) => {
      const va = column.sort(a), vb = column.sort(b);
      const cmp = va == null ? (vb == null ? 0 : -1) : vb == null ? 1 :
        (typeof va === "string" ? va.localeCompare(vb) : va - vb);
      return this.sortDesc ? -cmp : cmp;
    }) : rows;
    return sorted.map((row) => {
      const link = this.rowLink ? this.rowLink(row) : "";
      const attrs = link ? ` class="link" data-href="${esc(link)}"` : "";
      return `<tr${attrs}>` + this.columns.map((c) =>
        `<td class="${c.cls || (c.num ? "num" : "")}">${c.cell(row)}</td>`).join("") + "</tr>";
    }).join("");
  }
  // Wire a <table> element: header clicks sort, row clicks follow the row's link.
  attach(table, redraw) {
    table.querySelector("thead").addEventListener("click", (event) => {
      const th = event.target.closest("th.sortable");
      if (!th) return;
      const column = this.columns.find((c) => c.key === th.dataset.key);
      if (this.sortKey === th.dataset.key) this.sortDesc = !this.sortDesc;
      // numbers biggest first, except success rates: the worst first is what one looks for
      else { this.sortKey = th.dataset.key; this.sortDesc = column.desc ?? !!column.num; }
      redraw();
    });
    table.querySelector("tbody").addEventListener("click", (event) => {
      const tr = event.target.closest("tr[data-href]");
      if (tr && !event.target.closest("a")) location.hash = tr.dataset.href;
    });
  }
}

function statColumns(nameLabel, link, history, extra = []) {
  return [
    { key: "name", label: nameLabel, sort: (r) => r.name, cls: "name",
      cell: (r) => `<a href="${esc(link(r))}">${esc(r.name)}</a>` },
    ...extra,
    { key: "meshed", label: "Meshed", cell: (r) => esc(r.meshed), cls: "muted" },
    { key: "success", label: "Success", num: true, desc: false, sort: (r) => r.success_rate,
      cell: (r) => pill(r.success_rate) },
    { key: "rps", label: "RPS", num: true, sort: (r) => r.rps, cell: (r) => rps(r.rps) },
    { key: "p50", label: "P50", num: true, sort: (r) => r.latency_p50_ms,
      cell: (r) => ms(r.latency_p50_ms) },
    { key: "p95", label: "P95", num: true, sort: (r) => r.latency_p95_ms,
      cell: (r) => ms(r.latency_p95_ms) },
    { key: "p99", label: "P99", num: true, sort: (r) => r.latency_p99_ms,
      cell: (r) => ms(r.latency_p99_ms) },
    { key: "tcp", label: "TCP", num: true, sort: (r) => r.tcp_conn, cell: (r) => r.tcp_conn },
    { key: "rps_chart", label: "RPS · 5 min", cls: "chart",
      cell: (r) => sparkline(history().of(r.name).rps, { kind: "rps" }) },
    { key: "sr_chart", label: "Success · 5 min", cls: "chart",
      cell: (r) => sparkline(history().of(r.name).sr, { kind: "sr" }) },
  ];
}

function panel(title, id, hint = "") {
  return `<section class="panel"><h2>${title}<span class="count" id="${id}-count"></span>` +
         `${hint ? `<span class="hint">${hint}</span>` : ""}</h2>` +
         `<div class="scroll"><table id="${id}"><thead></thead><tbody></tbody></table></div></section>`;
}

function crumbs(parts) {
  return `<div class="crumbs">` + parts.map(([text, href]) => href ?
    `<a href="${esc(href)}">${esc(text)}</a>` : `<span>${esc(text)}</span>`)
    .join(`<span class="sep">/</span>`) + `</div>`;
}

const nsHref = (ns) => `#/namespaces/${encodeURIComponent(ns)}`;
const workloadHref = (ns, name) => `${nsHref(ns)}/workloads/${encodeURIComponent(name)}`;
const tapHref = (params) => "#/tap?" + new URLSearchParams(params).toString();

// ---------------------------------------------------------------- pages

function namespacesPage() {
  view.innerHTML = `<div class="page-head"><div>${crumbs([["Namespaces"]])}` +
    `<h1>Namespaces</h1></div><div class="sub">meshed namespaces seen in the last minute</div></div>` +
    panel("Namespaces", "ns-table", "click a namespace for its workloads");
  let rows = [];
  let history = new History();
  const table = new Table(statColumns("Namespace", (r) => nsHref(r.name), () => history, [
    { key: "workloads", label: "Workloads", num: true, sort: (r) => r.workloads,
      cell: (r) => r.workloads }]), {
    rowLink: (r) => nsHref(r.name),
    empty: "No meshed traffic yet. Namespaces show up here once their proxies report.",
  });
  const el = document.getElementById("ns-table");
  const draw = () => {
    el.querySelector("thead").innerHTML = table.header();
    el.querySelector("tbody").innerHTML = table.body(rows);
    document.getElementById("ns-table-count").textContent = rows.length ? String(rows.length) : "";
  };
  table.attach(el, draw);
  draw();
  return stream("/api/stream?view=namespaces", {
    snapshot: (data) => { showPlaneError(data); history = new History(data.history);
                          rows = data.rows || []; draw(); },
    tick: (data) => { showPlaneError(data); history.add(data.sample);
                      rows = data.rows || rows; draw(); },
  });
}

function workloadsPage(ns) {
  view.innerHTML = `<div class="page-head"><div>${crumbs([["Namespaces", "#/"], [ns]])}` +
    `<h1><span class="kind">namespace/</span>${esc(ns)}</h1></div>` +
    `<div class="actions"><a class="btn" href="${esc(tapHref({ ns }))}">Tap this namespace</a></div></div>` +
    panel("Workloads", "wl-table", "success, rate and latency of inbound requests, last minute");
  let rows = [];
  let history = new History();
  const table = new Table(statColumns("Workload", (r) => workloadHref(ns, r.name), () => history), {
    rowLink: (r) => workloadHref(ns, r.name),
    empty: "No meshed workload in this namespace reported traffic in the last minute.",
  });
  const el = document.getElementById("wl-table");
  const draw = () => {
    const started = performance.now();
    el.querySelector("thead").innerHTML = table.header();
    el.querySelector("tbody").innerHTML = table.body(rows);
    document.getElementById("wl-table-count").textContent = rows.length ? String(rows.length) : "";
    window.shoalLastRenderMs = performance.now() - started;  // read by the browser test
  };
  table.attach(el, draw);
  draw();
  return stream(`/api/stream?view=workloads&ns=${encodeURIComponent(ns)}`, {
    snapshot: (data) => { showPlaneError(data); history = new History(data.history);
                          rows = data.rows || []; draw(); },
    tick: (data) => { showPlaneError(data); history.add(data.sample);
                      rows = data.rows || rows; draw(); },
  });
}

function workloadPage(ns, name) {
  view.innerHTML = `<div class="page-head"><div>` +
    crumbs([["Namespaces", "#/"], [ns, nsHref(ns)], [name]]) +
    `<h1><span class="kind">deploy/</span>${esc(name)}</h1></div>` +
    `<div class="sub" id="wl-meshed"></div>` +
    `<div class="actions"><a class="btn primary" id="tap-link" ` +
    `href="${esc(tapHref({ ns, workload: name }))}">Tap ${esc(name)}</a></div></div>` +
    `<div class="cards" id="cards"></div>` +
    `<div class="grid2">${panel("Inbound", "in-table", "who calls " + esc(name))}` +
    `${panel("Outbound", "out-table", "whom " + esc(name) + " calls")}</div>` +
    panel("Routes", "routes-table", "inbound requests per route") +
    panel("Live calls", "top-table", "like <code>shoal viz top</code>, last minute");
  let history = new History();
  let data = null;

  const inbound = new Table([
    { key: "src", label: "From", sort: (e) => e.src, cls: "name",
      cell: (e) => `<a href="${esc(workloadHref(e.src_namespace, e.src))}">${esc(e.src)}</a>` },
    { key: "src_ns", label: "Namespace", sort: (e) => e.src_namespace, cls: "muted",
      cell: (e) => esc(e.src_namespace) },
    { key: "secured", label: "Secured", cell: secured },
    { key: "client_id", label: "Client identity", cls: "mono",
      cell: (e) => `<span title="${esc(e.client_id)}">${esc(shortId(e.client_id))}</span>` },
  ], { empty: "No inbound calls in the last minute." });
  const outbound = new Table([
    { key: "dst", label: "To", sort: (e) => e.dst, cls: "name",
      cell: (e) => `<a href="${esc(workloadHref(e.dst_namespace, e.dst))}">${esc(e.dst)}</a>` },
    { key: "dst_ns", label: "Namespace", sort: (e) => e.dst_namespace, cls: "muted",
      cell: (e) => esc(e.dst_namespace) },
    { key: "secured", label: "Secured", cell: secured },
    { key: "server_id", label: "Server identity", cls: "mono",
      cell: (e) => `<span title="${esc(e.server_id)}">${esc(shortId(e.server_id))}</span>` },
  ], { empty: "No outbound calls in the last minute." });
  const routes = new Table([
    { key: "route", label: "Route", sort: (r) => r.route, cls: "mono", cell: (r) => esc(r.route) },
    { key: "service", label: "Service", sort: (r) => r.service, cell: (r) => esc(r.service) },
    { key: "success", label: "Success", num: true, desc: false, sort: (r) => r.success_rate,
      cell: (r) => pill(r.success_rate) },
    { key: "rps", label: "RPS", num: true, sort: (r) => r.rps, cell: (r) => rps(r.rps) },
    { key: "p50", label: "P50", num: true, sort: (r) => r.latency_p50_ms, cell: (r) => ms(r.latency_p50_ms) },
    { key: "p95", label: "P95", num: true, sort: (r) => r.latency_p95_ms, cell: (r) => ms(r.latency_p95_ms) },
    { key: "p99", label: "P99", num: true, sort: (r) => r.latency_p99_ms, cell: (r) => ms(r.latency_p99_ms) },
  ], { empty: "No routes served in the last minute." });
  const top = new Table([
    { key: "source", label: "Source", sort: (r) => r.source, cell: (r) => esc(r.source) },
    { key: "destination", label: "Destination", sort: (r) => r.destination,
      cell: (r) => esc(r.destination) },
    { key: "method", label: "Method", sort: (r) => r.method, cls: "mono", cell: (r) => esc(r.method) },
    { key: "path", label: "Path", sort: (r) => r.path, cls: "mono", cell: (r) => esc(r.path) },
    { key: "count", label: "Count", num: true, sort: (r) => r.count, cell: (r) => r.count },
    { key: "best", label: "Best", num: true, sort: (r) => r.best_ms, cell: (r) => ms(r.best_ms) },
    { key: "worst", label: "Worst", num: true, sort: (r) => r.worst_ms, cell: (r) => ms(r.worst_ms) },
    { key: "last", label: "Last", num: true, sort: (r) => r.last_ms, cell: (r) => ms(r.last_ms) },
    { key: "success", label: "Success", num: true, desc: false, sort: (r) => r.success_rate,
      cell: (r) => pill(r.success_rate) },
  ], { empty: "No calls in the last minute.", sortKey: "count" });
  top.sortDesc = true;

  const tables = [["in-table", inbound, () => data.inbound], ["out-table", outbound, () => data.outbound],
                  ["routes-table", routes, () => data.routes], ["top-table", top, () => data.top]];
  const drawCards = () => {
    const s = data && data.stat;
    const series = history.of(name);
    const card = (label, value, cls, chart) =>
      `<div class="card"><div class="label">${label}</div><div class="value ${cls}">${value}</div>${chart}</div>`;
    document.getElementById("cards").innerHTML = [
      card("Success rate", pct(s && s.success_rate), grade(s && s.success_rate),
           sparkline(series.sr, { kind: "sr", width: 260, height: 40 })),
      card("Requests / s", rps(s && s.rps), "", sparkline(series.rps, { width: 260, height: 40 })),
      card("Latency p95", ms(s && s.latency_p95_ms),
           "", sparkline(series.p95, { kind: "p95", width: 260, height: 40 })),
      card("Latency p50 · p99", `${ms(s && s.latency_p50_ms)} <small>·</small> ${ms(s && s.latency_p99_ms)}`,
           "", `<div class="muted">TCP connections: ${s ? s.tcp_conn : "-"}</div>`),
    ].join("");
    document.getElementById("wl-meshed").textContent = s ? `${s.meshed} pods meshed` : "";
  };
  const draw = () => {
    drawCards();
    if (!data) return;
    for (const [id, table, rowsOf] of tables) {
      const el = document.getElementById(id);
      el.querySelector("thead").innerHTML = table.header();
      el.querySelector("tbody").innerHTML = table.body(rowsOf() || []);
      const n = (rowsOf() || []).length;
      document.getElementById(`${id}-count`).textContent = n ? String(n) : "";
    }
  };
  for (const [id, table] of tables) table.attach(document.getElementById(id), draw);
  draw();
  const url = `/api/stream?view=workload&ns=${encodeURIComponent(ns)}&name=${encodeURIComponent(name)}`;
  return stream(url, {
    snapshot: (d) => { showPlaneError(d); history = new History(d.history);
                       if (!d.waiting) data = d; draw(); },
    tick: (d) => { showPlaneError(d); history.add(d.sample); if (!d.waiting) data = d; draw(); },
  });
}

// ----- tap

const TAP_FIELDS = [
  ["ns", "Namespace", "emojivoto"], ["workload", "Workload", "web"],
  ["to", "To workload", "voting"], ["method", "Method", ""],
  ["path", "Path prefix", "/api"], ["authority", "Authority", "web-svc:8080"],
  ["max_rps", "Max events/s", "100"],
];
const METHODS = ["", "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

function tapPage(params) {
  const field = ([key, label, placeholder]) => {
    const value = esc(params.get(key) || "");
    if (key === "method") {
      const options = METHODS.map((m) => `<option value="${m}"${m === (params.get(key) || "").toUpperCase() ? " selected" : ""}>${m || "any"}</option>`).join("");
      return `<label>${label}<select name="${key}">${options}</select></label>`;
    }
    return `<label>${label}<input name="${key}" value="${value}" placeholder="${esc(placeholder)}" ` +
           `autocomplete="off" spellcheck="false"></label>`;
  };
  view.innerHTML = `<div class="page-head"><div>${crumbs([["Tap"]])}<h1>Tap</h1></div>` +
    `<div class="sub">live requests through the proxies, like <code>shoal viz tap</code></div></div>` +
    `<section class="panel"><form class="filters" id="tap-form">${TAP_FIELDS.map(field).join("")}` +
    `<div class="buttons"><button class="btn primary" id="tap-start" type="submit">Start</button>` +
    `<button class="btn" id="tap-stop" type="button" disabled>Stop</button>` +
    `<button class="btn" id="tap-clear" type="button">Clear</button></div></form></section>` +
    `<div class="taplayout"><section class="panel"><h2>Requests<span class="count" id="tap-count"></span>` +
    `<span class="hint tapstate" id="tap-state">stopped</span></h2>` +
    `<div class="scroll"><table id="tap-table"><thead><tr><th>Time</th><th>Dir</th><th>From</th>` +
    `<th>To</th><th>Method</th><th>Path</th><th class="num">Status</th><th>gRPC</th>` +
    `<th class="num">Latency</th></tr></thead><tbody></tbody></table></div></section>` +
    `<section class="panel" id="tap-details"><h2>Request details</h2>` +
    `<div class="details" id="tap-detail-body"><p class="muted">Click a request to see it here.</p></div>` +
    `</section></div>`;

  const form = document.getElementById("tap-form");
  const startButton = document.getElementById("tap-start");
  const stopButton = document.getElementById("tap-stop");
  const state = document.getElementById("tap-state");
  const tbody = document.querySelector("#tap-table tbody");
  const requests = new Map();  // id -> {req, rsp, end, seen}
  let order = [];              // ids, newest first
  let selected = null;
  let close = null;
  let dirty = false;
  let dropped = 0;

  const failed = (r) => (r.rsp && r.rsp.status >= 500) ||
    (r.end && ((r.end.grpc_status != null && r.end.grpc_status !== 0) || r.end.reset_error));
  const peerName = (p) => p.workload ? p.workload : p.address ? `${p.address}:${p.port}` : "-";
  const render = () => {
    dirty = false;
    if (!order.length) {
      tbody.innerHTML = `<tr><td class="empty" colspan="9">${close ? "Waiting for requests that match…" :
        "Set filters and press Start."}</td></tr>`;
    } else {
      tbody.innerHTML = order.map((id) => {
        const r = requests.get(id);
        const first = r.req || r.rsp || r.end;
        const status = r.rsp ? r.rsp.status : "";
        const grpc = r.end ? grpcName(r.end.grpc_status) || (r.end.reset_error ? "reset" : "") : "";
        const cls = ["link", failed(r) ? "fail" : "", id === selected ? "sel" : ""].join(" ");
        const dir = first.direction === "inbound" ? `<span class="dir in">in</span>` :
          `<span class="dir out">out</span>`;
        return `<tr class="${cls}" data-id="${esc(id)}"><td class="mono muted">${clock(first.timestamp || r.seen)}</td>` +
          `<td>${dir}</td><td>${esc(peerName(first.source))}</td><td>${esc(peerName(first.destination))}</td>` +
          `<td class="mono">${esc(r.req ? r.req.method : "")}</td>` +
          `<td class="mono wrap">${esc(r.req ? r.req.path : "")}</td>` +
          `<td class="num status ${status ? (status < 400 ? "ok" : status >= 500 ? "bad" : "") : ""}">${esc(status)}</td>` +
          `<td class="status ${grpc ? (grpc === "OK" ? "ok" : "bad") : ""}">${esc(grpc)}</td>` +
          `<td class="num">${r.rsp ? us(r.rsp.latency_us) : ""}</td></tr>`;
      }).join("");
    }
    document.getElementById("tap-count").textContent = order.length ? String(order.length) : "";
  };
  const scheduleRender = () => {
    if (dirty) return;
    dirty = true;
    setTimeout(render, TAP_RENDER_MS);
  };
  const peerDetails = (label, p) => `<dt>${label}</dt><dd>${esc(peerName(p))}` +
    `${p.namespace ? ` <span class="muted">(${esc(p.namespace)}${p.pod ? " · " + esc(p.pod) : ""})</span>` : ""}` +
    `${p.identity ? `<br><span class="muted">${esc(p.identity)}</span>` : ""}</dd>`;
  const headers = (h) => {
    const entries = Object.entries(h || {});
    return entries.length ? `<dl>${entries.map(([k, v]) => `<dt>${esc(k)}</dt><dd>${esc(v)}</dd>`).join("")}</dl>` :
      `<p class="muted">none recorded</p>`;
  };
  const showDetails = () => {
    const r = selected && requests.get(selected);
    const body = document.getElementById("tap-detail-body");
    if (!r) { body.innerHTML = `<p class="muted">Click a request to see it here.</p>`; return; }
    const first = r.req || r.rsp || r.end;
    let html = `<h3>Request</h3><dl><dt>id</dt><dd>${esc(first.id)}</dd>` +
      `<dt>direction</dt><dd>${esc(first.direction)}</dd>` +
      peerDetails("source", first.source) + peerDetails("destination", first.destination) +
      `<dt>tls</dt><dd>${first.tls ? "true (mutual TLS)" : "false"}</dd>`;
    if (r.req) {
      html += `<dt>:method</dt><dd>${esc(r.req.method)}</dd><dt>:authority</dt><dd>${esc(r.req.authority)}</dd>` +
        `<dt>:path</dt><dd>${esc(r.req.path)}</dd><dt>scheme</dt><dd>${esc(r.req.scheme)}</dd>`;
    }
    html += `</dl>`;
    if (r.req) html += `<h3>Request headers</h3>${headers(r.req.headers)}`;
    html += `<h3>Response</h3>`;
    if (r.rsp) {
      html += `<dl><dt>:status</dt><dd>${esc(r.rsp.status)}</dd><dt>latency</dt><dd>${us(r.rsp.latency_us)}</dd></dl>`;
    } else html += `<p class="muted">no response yet</p>`;
    if (r.end) {
      html += `<h3>End of stream</h3><dl>` +
        (r.end.grpc_status != null ? `<dt>grpc-status</dt><dd>${esc(grpcName(r.end.grpc_status))} (${r.end.grpc_status})</dd>` : "") +
        (r.end.reset_error ? `<dt>reset-error</dt><dd>${esc(r.end.reset_error)}</dd>` : "") +
        `<dt>duration</dt><dd>${us(r.end.duration_us)}</dd><dt>response-length</dt><dd>${esc(r.end.response_bytes)} B</dd></dl>`;
    }
    if (r.rsp) html += `<h3>Response headers</h3>${headers(r.rsp.headers)}`;
    body.innerHTML = html;
  };
  tbody.addEventListener("click", (event) => {
    const tr = event.target.closest("tr[data-id]");
    if (!tr) return;
    selected = tr.dataset.id;
    render();
    showDetails();
  });
  const onEvent = (event) => {
    let r = requests.get(event.id);
    if (!r) {
      r = { seen: Date.now() / 1000 };
      requests.set(event.id, r);
      order.unshift(event.id);
      if (order.length > MAX_TAP_ROWS) {
        for (const old of order.splice(MAX_TAP_ROWS)) requests.delete(old);
      }
    }
    if (event.type === "request_start") r.req = event;
    else if (event.type === "response_start") r.rsp = event;
    else r.end = event;
    if (event.id === selected) showDetails();
    scheduleRender();
  };
  const stop = (text = "stopped") => {
    if (close) close();
    close = null;
    startButton.disabled = false;
    stopButton.disabled = true;
    state.textContent = text;
    live.className = "live";
    liveText.textContent = "paused";
    render();
  };
  const start = () => {
    stop();
    const query = new URLSearchParams();
    for (const [key, value] of new FormData(form).entries()) {
      if (String(value).trim()) query.set(key, String(value).trim());
    }
    history.replaceState(null, "", tapHref(Object.fromEntries(query)));
    const url = "/api/tap?" + query.toString();
    startButton.disabled = true;
    stopButton.disabled = false;
    state.textContent = "opening a tap session…";
    setBanner("");
    close = stream(url, {
      session: (s) => { state.innerHTML = `streaming · session <b class="mono">${esc(s.id)}</b> · ` +
                                          `at most ${esc(s.max_rps)} events/s`; render(); },
      tap: onEvent,
      dropped: (d) => { dropped = d.dropped; state.textContent += ` · ${dropped} dropped`; },
      ended: (d) => { setBanner(d.error, true); stop("session ended"); },
      closed: () => {
        // The stream was refused (bad filter, tap service down): ask again for the reason.
        const abort = new AbortController();
        fetch(url, { signal: abort.signal }).then(async (response) => {
          if (response.ok) { abort.abort(); return; }
          const body = await response.json().catch(() => ({}));
          setBanner(`Tap: ${body.error || response.statusText}`, true);
        }).catch(() => {});
        stop("stopped");
      },
    });
    render();
  };
  form.addEventListener("submit", (event) => { event.preventDefault(); start(); });
  stopButton.addEventListener("click", () => stop());
  document.getElementById("tap-clear").addEventListener("click", () => {
    requests.clear(); order = []; selected = null; render(); showDetails();
  });
  render();
  if (params.get("ns")) start();  // arriving from a workload's "Tap" button
  return () => { if (close) close(); };
}

// ---------------------------------------------------------------- router

function route() {
  unmount();
  setBanner("");
  const hash = location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  let page = "namespaces";
  if (parts[0] === "tap") {
    page = "tap";
    unmount = tapPage(new URLSearchParams(query || ""));
  } else if (parts[0] === "namespaces" && parts.length === 4 && parts[2] === "workloads") {
    unmount = workloadPage(parts[1], parts[3]);
    document.title = `${parts[3]} · ${parts[1]} · Shoal`;
  } else if (parts[0] === "namespaces" && parts.length === 2) {
    unmount = workloadsPage(parts[1]);
    document.title = `${parts[1]} · Shoal`;
  } else {
    unmount = namespacesPage();
    document.title = "Shoal dashboard";
  }
  if (page === "tap") document.title = "Tap · Shoal";
  for (const a of document.querySelectorAll("header nav a")) {
    a.classList.toggle("active", a.dataset.nav === page);
  }
  window.scrollTo(0, 0);
}

window.addEventListener("hashchange", route);
route();
