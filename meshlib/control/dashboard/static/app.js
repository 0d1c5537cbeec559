// meshlib control dashboard: polls the control service's read endpoints and redraws.
// No framework, no build step, no network beyond this origin. Every value that came from a
// client (service names, addresses, messages) goes into the page through textContent or an
// attribute, never through innerHTML.
"use strict";

(function () {
  const POLL_MS = 1500;
  const SVG_NS = "http://www.w3.org/2000/svg";
  const NODE_W = 170;
  const NODE_H = 48;
  const COL_GAP = 200;
  const ROW_GAP = 44;
  const PAD = 24;

  const state = {
    version: null, // rules version shown
    history: [],
    diffFrom: null, // user's choice, or null for "the version before `to`"
    diffTo: null, // user's choice, or null for "the current version"
    diffKey: null,
    documents: [],
  };

  // -- DOM helpers ------------------------------------------------------------------------

  function $(id) {
    return document.getElementById(id);
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    for (const child of children) append(node, child);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    for (const child of children) append(node, child);
    return node;
  }

  function setAttrs(node, attrs) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.setAttribute("class", v);
      else node.setAttribute(k, String(v));
    }
  }

  function append(node, child) {
    if (child === null || child === undefined || child === false) return;
    if (child instanceof Node) node.appendChild(child);
    else node.appendChild(document.createTextNode(String(child)));
  }

  function fill(tbody, rows, empty, columns) {
    tbody.replaceChildren(...(rows.length ? rows : [el("tr", { class: "empty" }, el("td", { colspan: columns }, empty))]));
  }

  async function getJSON(path) {
    const r = await fetch(path, { cache: "no-store", headers: { accept: "application/json" } });
    if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
    return r.json();
  }

  // -- formatting -------------------------------------------------------------------------

  function fmtRate(rps) {
    if (rps === null || rps === undefined) return "–";
    if (rps >= 100) return rps.toFixed(0);
    if (rps >= 1) return rps.toFixed(1);
    return rps.toFixed(2);
  }

  function fmtPct(ratio) {
    if (ratio === null || ratio === undefined) return "–";
    const pct = ratio * 100;
    return (pct >= 99.95 || pct === 0 ? pct.toFixed(0) : pct.toFixed(1)) + "%";
  }

  function fmtMs(ms) {
    if (ms === null || ms === undefined) return "–";
    if (ms >= 1000) return (ms / 1000).toFixed(2) + " s";
    if (ms >= 10) return ms.toFixed(0) + " ms";
    return ms.toFixed(1) + " ms";
  }

  function fmtAgo(unixSeconds) {
    if (!unixSeconds) return "–";
    const s = Math.max(0, Date.now() / 1000 - unixSeconds);
    if (s < 60) return s.toFixed(0) + " s ago";
    if (s < 3600) return (s / 60).toFixed(0) + " min ago";
    return (s / 3600).toFixed(1) + " h ago";
  }

  function fmtTime(unixSeconds) {
    return new Date(unixSeconds * 1000).toLocaleString();
  }

  function edgeHealth(e) {
    if (e.breakers && e.breakers.open > 0) return "bad";
    if (!e.rps || e.success_rate === null || e.success_rate === undefined) return "idle";
    if (e.success_rate >= 0.99) return "ok";
    if (e.success_rate >= 0.95) return "warn";
    return "bad";
  }

  function breakerText(b) {
    if (!b) return "";
    const parts = [];
    if (b.open) parts.push(`${b.open} breaker${b.open > 1 ? "s" : ""} open`);
    if (b.half_open) parts.push(`${b.half_open} half-open`);
    if (b.ejected) parts.push(`${b.ejected} ejected`);
    return parts.join(" · ");
  }

  function subsetText(subsets) {
    return Object.entries(subsets || {})
      .map(([name, s]) => `${name} ${fmtRate(s.rps)}/s`)
      .join(" · ");
  }

  // -- a small YAML writer for display (plain data only) -----------------------------------

  const RESERVED = /^(true|false|null|yes|no|on|off|y|n|~)$/i;
  const PLAIN = /^[A-Za-z_/.][A-Za-z0-9_./:*-]*$|^[0-9]+(\.[0-9]+)?(ms|s|m|h)$|^[0-9]+(\.[0-9]+){1,3}:[0-9]+$/;

  function scalar(v) {
    if (v === null || v === undefined) return "null";
    if (typeof v === "number" || typeof v === "boolean") return String(v);
    const s = String(v);
    return PLAIN.test(s) && !RESERVED.test(s) ? s : JSON.stringify(s);
  }

  function toYaml(value, indent) {
    const pad = " ".repeat(indent);
    if (Array.isArray(value)) {
      if (!value.length) return "[]";
      return value
        .map((item) => {
          const inner = toYaml(item, indent + 2);
          return isBlock(item) ? `${pad}- ${inner.trimStart()}` : `${pad}- ${inner}`;
        })
        .join("\n");
    }
    if (value && typeof value === "object") {
      const keys = Object.keys(value);
      if (!keys.length) return "{}";
      return keys
        .map((k) => {
          const v = value[k];
          if (!isBlock(v)) return `${pad}${scalar(k)}: ${toYaml(v, 0)}`;
          // a list inside a mapping is not indented (the way PyYAML writes rules files)
          return `${pad}${scalar(k)}:\n${toYaml(v, Array.isArray(v) ? indent : indent + 2)}`;
        })
        .join("\n");
    }
    return scalar(value);
  }

  function isBlock(v) {
    return v !== null && typeof v === "object" && Object.keys(v).length > 0;
  }

  // -- header -----------------------------------------------------------------------------

  function setStatus(ok, text) {
    const s = $("status");
    s.dataset.state = ok ? "live" : "offline";
    s.textContent = text;
  }

  function renderVersion(health) {
    const v = $("version");
    v.textContent = `version ${health.version}`;
    v.dataset.version = String(health.version);
    $("summary").textContent = `revision ${health.revision} · epoch ${health.epoch}`;
  }

  // -- graph ------------------------------------------------------------------------------

  function layout(nodes, edges) {
    const names = nodes.map((n) => n.service);
    const level = Object.fromEntries(names.map((n) => [n, 0]));
    // longest path from the callers, bounded so that cycles terminate
    for (let i = 0; i < names.length; i++) {
      let changed = false;
      for (const e of edges) {
        if (e.source === e.destination) continue;
        if (level[e.destination] < level[e.source] + 1 && level[e.source] + 1 < names.length) {
          level[e.destination] = level[e.source] + 1;
          changed = true;
        }
      }
      if (!changed) break;
    }
    const columns = new Map();
    for (const name of names.slice().sort()) {
      const l = level[name];
      if (!columns.has(l)) columns.set(l, []);
      columns.get(l).push(name);
    }
    const tallest = Math.max(1, ...[...columns.values()].map((c) => c.length));
    const height = PAD * 2 + tallest * NODE_H + (tallest - 1) * ROW_GAP + 40;
    const pos = {};
    for (const [l, column] of columns) {
      const colHeight = column.length * NODE_H + (column.length - 1) * ROW_GAP;
      const top = (height - colHeight) / 2;
      column.forEach((name, i) => {
        pos[name] = { x: PAD + l * (NODE_W + COL_GAP), y: top + i * (NODE_H + ROW_GAP), level: l };
      });
    }
    const levels = columns.size ? Math.max(...columns.keys()) + 1 : 1;
    const width = PAD * 2 + levels * NODE_W + (levels - 1) * COL_GAP;
    return { pos, width: Math.max(width, 480), height: Math.max(height, 160) };
  }

  function edgePath(a, b, back) {
    if (back) {
      // same column or going back: a loop under both boxes
      const x1 = a.x + NODE_W / 2, y1 = a.y + NODE_H;
      const x2 = b.x + NODE_W / 2, y2 = b.y + NODE_H;
      const dip = Math.max(y1, y2) + 50;
      return { d: `M ${x1} ${y1} C ${x1} ${dip}, ${x2} ${dip}, ${x2} ${y2 + 6}`, lx: (x1 + x2) / 2, ly: dip - 6 };
    }
    const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2;
    const x2 = b.x - 6, y2 = b.y + NODE_H / 2;
    const mid = (x1 + x2) / 2;
    return { d: `M ${x1} ${y1} C ${mid} ${y1}, ${mid} ${y2}, ${x2} ${y2}`, lx: mid, ly: (y1 + y2) / 2 };
  }

  function renderGraph(graph) {
    const root = $("graph");
    const { pos, width, height } = layout(graph.nodes, graph.edges);
    root.setAttribute("viewBox", `0 0 ${width} ${height}`);
    root.setAttribute("width", width);
    root.setAttribute("height", height);
    const defs = svg(
      "defs",
      {},
      ...["ok", "warn", "bad", "idle"].map((cls) =>
        svg("marker", { id: `arrow-${cls}`, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 11, markerHeight: 11, markerUnits: "userSpaceOnUse", orient: "auto-start-reverse" },
          svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: `arrowhead ${cls}` }))
      )
    );
    const edgeLayer = svg("g", { class: "edges" });
    const labelLayer = svg("g", { class: "labels" });
    for (const e of graph.edges) {
      const a = pos[e.source], b = pos[e.destination];
      if (!a || !b) continue;
      const health = edgeHealth(e);
      const back = b.level <= a.level;
      const p = edgePath(a, b, back);
      const b6 = e.breakers || {};
      const classes = ["edge", health, e.view === "in" ? "server-view" : "client-view"];
      if (b6.open) classes.push("breaker-open");
      if (b6.half_open) classes.push("breaker-half-open");
      if (b6.ejected) classes.push("ejected");
      const key = `${e.source}->${e.destination}`;
      const group = svg(
        "g",
        {
          class: classes.join(" "),
          "data-edge": key,
          "data-rps": e.rps,
          "data-success": e.success_rate === null ? "" : e.success_rate,
          "data-p50": e.p50_ms === null ? "" : e.p50_ms,
          "data-p99": e.p99_ms === null ? "" : e.p99_ms,
          "data-view": e.view,
          "data-breakers-open": b6.open || 0,
          "data-ejected": b6.ejected || 0,
        },
        svg("title", {}, edgeTitle(e)),
        svg("path", { d: p.d, class: "edge-line", "marker-end": `url(#arrow-${health})` })
      );
      edgeLayer.appendChild(group);
      const lines = [`${fmtRate(e.rps)} req/s · ${fmtPct(e.success_rate)}`, `p50 ${fmtMs(e.p50_ms)} · p99 ${fmtMs(e.p99_ms)}`];
      const subsets = subsetText(e.subsets);
      if (subsets) lines.push(subsets);
      const alarm = breakerText(b6);
      if (alarm) lines.push("⚠ " + alarm);
      const label = svg("g", { class: `edge-label ${health}`, "data-edge-label": key });
      const boxH = lines.length * 15 + 6;
      const boxW = Math.max(...lines.map((l) => l.length)) * 6.4 + 12;
      label.appendChild(svg("rect", { x: p.lx - boxW / 2, y: p.ly - boxH / 2, width: boxW, height: boxH, rx: 4, class: "label-bg" }));
      lines.forEach((line, i) => {
        label.appendChild(svg("text", { x: p.lx, y: p.ly - boxH / 2 + 15 + i * 15, "text-anchor": "middle", class: line.startsWith("⚠") ? "alarm" : null }, line));
      });
      labelLayer.appendChild(label);
    }
    const nodeLayer = svg("g", { class: "nodes" });
    for (const n of graph.nodes) {
      const p = pos[n.service];
      const external = n.instances === 0 && n.reporters === 0;
      const g = svg(
        "g",
        { class: `node${external ? " external" : ""}`, "data-node": n.service, "data-instances": n.instances, transform: `translate(${p.x} ${p.y})` },
        svg("title", {}, `${n.service}: ${n.instances} registered instance(s), ${n.reporters} reporting process(es)`),
        svg("rect", { width: NODE_W, height: NODE_H, rx: 8 }),
        svg("text", { x: NODE_W / 2, y: 20, "text-anchor": "middle", class: "node-name" }, truncate(n.service, 22)),
        svg("text", { x: NODE_W / 2, y: 38, "text-anchor": "middle", class: "node-meta" }, `${n.instances} inst · ${n.reporters} reporting`)
      );
      nodeLayer.appendChild(g);
    }
    root.replaceChildren(defs, edgeLayer, nodeLayer, labelLayer);
    if (!graph.nodes.length) {
      root.appendChild(svg("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "muted" }, "no services yet"));
    }
    $("graph-note").textContent = `· reports younger than ${graph.max_age} s · ${graph.edges.length} edge(s)`;
    renderEdgeTable(graph.edges);
  }

  function edgeTitle(e) {
    const lines = [`${e.source} → ${e.destination} (${e.view === "in" ? "measured by the called side" : "measured by the callers"})`];
    lines.push(`${fmtRate(e.rps)} req/s, ${fmtPct(e.success_rate)} success, ${e.requests} requests from ${e.reporters} process(es)`);
    lines.push(`p50 ${fmtMs(e.p50_ms)}, p90 ${fmtMs(e.p90_ms)}, p99 ${fmtMs(e.p99_ms)}`);
    for (const ep of e.endpoints || []) {
      const weight = ep.weight !== undefined ? `, weight ${Number(ep.weight).toPrecision(3)}` : "";
      lines.push(`${ep.address}: breaker ${ep.breaker}${ep.ejected ? ", ejected" : ""}${weight}`);
    }
    return lines.join("\n");
  }

  function truncate(s, n) {
    return s.length > n ? s.slice(0, n - 1) + "…" : s;
  }

  function renderEdgeTable(edges) {
    const rows = edges.map((e) => {
      const health = edgeHealth(e);
      return el(
        "tr",
        { "data-edge-row": `${e.source}->${e.destination}`, class: health },
        el("td", {}, e.source),
        el("td", {}, e.destination),
        el("td", { class: "num" }, fmtRate(e.rps)),
        el("td", { class: "num" }, fmtPct(e.success_rate)),
        el("td", { class: "num" }, fmtMs(e.p50_ms)),
        el("td", { class: "num" }, fmtMs(e.p99_ms)),
        el("td", {}, subsetText(e.subsets) || "–"),
        el("td", { class: breakerText(e.breakers) ? "alarm" : "" }, breakerText(e.breakers) || "none"),
        el("td", { class: "num", title: "the callers' adaptive concurrency limits, summed" },
          e.concurrency_limit == null ? "–" : String(e.concurrency_limit)),
        el("td", {}, e.view === "in" ? "server" : "client")
      );
    });
    fill($("edges").tBodies[0], rows, "no traffic reported yet", 10);
  }

  // -- services and clients -----------------------------------------------------------------

  function renderServices(registry, graph) {
    const kinds = {};
    for (const d of state.documents) (kinds[d.service] = kinds[d.service] || []).push(d.kind);
    const names = new Set([...Object.keys(registry), ...Object.keys(kinds)]);
    for (const n of graph ? graph.nodes : []) if (n.instances || n.reporters) names.add(n.service);
    const rows = [...names].sort().map((name) => {
      const instances = registry[name] || [];
      const list = instances.length
        ? el("ul", { class: "instances" }, ...instances.map((i) =>
            el("li", { "data-instance": i.id }, el("code", {}, i.address), " ",
              ...Object.entries(i.labels || {}).map(([k, v]) => el("span", { class: "label" }, `${k}=${v}`)))))
        : el("span", { class: "muted" }, "none registered");
      return el(
        "tr",
        { "data-service": name },
        el("td", {}, el("strong", {}, name)),
        el("td", {}, list),
        el("td", {}, (kinds[name] || []).join(", ") || "–")
      );
    });
    fill($("services").tBodies[0], rows, "no services yet", 3);
  }

  function clientState(c) {
    if (c.stale) return ["stale", "stale"];
    if (!c.connected) return ["disconnected", "disconnected"];
    if (c.ok === false) return ["refused", `refused: ${c.error || "?"}`];
    if (c.ok) return ["ok", "in sync"];
    return ["waiting", "waiting for ack"];
  }

  function renderClients(clients) {
    let stale = 0;
    const rows = clients.map((c) => {
      const [cls, text] = clientState(c);
      if (c.stale) stale++;
      return el(
        "tr",
        { "data-client": c.client, class: cls, "data-acked": c.version === null ? "" : c.version, "data-replica": c.replica || "" },
        el("td", {}, el("code", {}, c.client)),
        el("td", {}, c.service || "–"),
        el("td", c.replica ? { title: `on control replica ${c.replica}` } : {}, c.peer || "–"),
        c.protocol === "xds"
          ? el("td", {}, el("a", { href: "#xds-section", class: "muted" }, "xDS"))
          : el("td", { class: "num" }, c.version === null ? "–" : `v${c.version}`, c.revision === null ? "" : el("span", { class: "muted" }, ` (rev ${c.revision})`)),
        el("td", {}, el("span", { class: `badge ${cls}` }, text)),
        el("td", {}, fmtAgo(c.last_seen))
      );
    });
    fill($("clients").tBodies[0], rows, "no client connected", 6);
    const counter = $("stale-count");
    counter.textContent = `· ${clients.length} known${stale ? `, ${stale} stale` : ""}`;
    counter.classList.toggle("alarm", stale > 0);
  }

  // -- xDS clients ---------------------------------------------------------------------------

  const XDS_TYPES = ["lds", "rds", "cds", "eds"];

  function xdsCell(type, t) {
    // one resource type of one client: what it acked, or what it refused and why
    if (!t) return el("td", { "data-type": type, class: "muted" }, "–");
    if (t.nacked !== null) {
      return el(
        "td",
        { "data-type": type, "data-nacked": t.nacked, "data-acked": t.acked === null ? "" : t.acked },
        el("span", { class: "badge refused" }, `refused v${t.nacked}`),
        t.acked === null ? "" : el("span", { class: "muted" }, ` keeps v${t.acked}`),
        el("div", { class: "reason" }, t.error || "")
      );
    }
    if (t.acked !== null && t.acked === t.sent) {
      return el("td", { "data-type": type, "data-acked": t.acked, class: "num" }, el("span", { class: "badge ok" }, `v${t.acked}`));
    }
    return el(
      "td",
      { "data-type": type, "data-acked": t.acked === null ? "" : t.acked },
      el("span", { class: "badge waiting" }, t.sent === null ? "subscribed" : `sent v${t.sent}`),
      t.acked === null ? "" : el("span", { class: "muted" }, ` acked v${t.acked}`)
    );
  }

  function renderXds(clients) {
    const xds = clients.filter((c) => c.protocol === "xds");
    let refusing = 0;
    const rows = xds.map((c) => {
      const [cls] = clientState(c);
      if (c.ok === false) refusing++;
      const notes = c.left_out || [];
      return el(
        "tr",
        { "data-client": c.client, class: cls, "data-replica": c.replica || "" },
        el("td", {}, el("code", {}, c.client)),
        el("td", {}, c.service || "–"),
        el("td", c.replica ? { title: `on control replica ${c.replica}` } : {}, c.peer || "–"),
        ...XDS_TYPES.map((type) => xdsCell(type, (c.xds || {})[type])),
        el("td", { class: "left-out" }, notes.length ? el("ul", { class: "notes" }, ...notes.map((n) => el("li", {}, n))) : "–")
      );
    });
    fill($("xds").tBodies[0], rows, "no xDS client (the control service serves xDS with --xds-port)", 8);
    const counter = $("xds-count");
    counter.textContent = xds.length ? `· ${xds.length} connected${refusing ? `, ${refusing} refusing` : ""}` : "";
    counter.classList.toggle("alarm", refusing > 0);
  }

  // -- rules, history, diff -------------------------------------------------------------------

  async function refreshRules() {
    const [config, history] = await Promise.all([getJSON("v1/config"), getJSON("v1/history?limit=50")]);
    state.documents = config.documents;
    state.history = history;
    state.version = config.version;
    $("rules").textContent = config.documents.length
      ? config.documents.map((d) => toYaml(d, 0)).join("\n---\n")
      : "# no documents";
    $("rules").dataset.version = String(config.version);
    const rows = history.map((h) =>
      el(
        "tr",
        { "data-version": h.version, class: h.version === config.version ? "current" : "" },
        el("td", { class: "num" }, `v${h.version}`),
        el("td", {}, fmtTime(h.created)),
        el("td", { class: "num" }, h.documents),
        el("td", {}, h.message || "")
      )
    );
    fill($("history").tBodies[0], rows, "no versions yet", 4);
    fillSelects();
    await refreshDiff();
  }

  function fillSelects() {
    const versions = state.history.map((h) => h.version);
    if (!versions.includes(0)) versions.push(0);
    for (const [id, chosen] of [["diff-from", state.diffFrom], ["diff-to", state.diffTo]]) {
      const select = $(id);
      select.replaceChildren(...versions.map((v) => el("option", { value: v }, v === 0 ? "v0 (empty)" : `v${v}`)));
      const [from, to] = defaultPair();
      select.value = String(chosen !== null ? chosen : id === "diff-from" ? from : to);
    }
  }

  function defaultPair() {
    const to = state.diffTo !== null ? state.diffTo : state.version || 0;
    const older = state.history.map((h) => h.version).filter((v) => v < to);
    const from = state.diffFrom !== null ? state.diffFrom : older.length ? Math.max(...older) : 0;
    return [from, to];
  }

  async function refreshDiff() {
    const [from, to] = defaultPair();
    const key = `${from}:${to}`;
    if (key === state.diffKey) return;
    const out = $("diff");
    try {
      const d = await getJSON(`v1/diff?from=${encodeURIComponent(from)}&to=${encodeURIComponent(to)}`);
      const lines = d.diff ? d.diff.split("\n") : [`# versions ${from} and ${to} hold the same documents`];
      if (d.truncated) lines.push("# … (diff truncated)");
      out.replaceChildren(...lines.map((line) => el("div", { class: diffClass(line) || null }, line || " ")));
      out.dataset.from = String(from);
      out.dataset.to = String(to);
      state.diffKey = key;
    } catch (err) {
      out.textContent = `# cannot diff v${from} and v${to}: ${err.message}`;
    }
  }

  function diffClass(line) {
    if (line.startsWith("+++") || line.startsWith("---")) return "file";
    if (line.startsWith("@@")) return "hunk";
    if (line.startsWith("+")) return "add";
    if (line.startsWith("-")) return "del";
    return "";
  }

  function onSelect(which) {
    return (event) => {
      const v = Number(event.target.value);
      if (which === "from") state.diffFrom = v;
      else state.diffTo = v === state.version ? null : v; // the newest version keeps following
      refreshDiff();
    };
  }

  // -- the loop -------------------------------------------------------------------------------

  let graph = null;

  async function tick() {
    const [health, clients, registry, g] = await Promise.allSettled([
      getJSON("healthz"),
      getJSON("v1/clients"),
      getJSON("v1/registry"),
      getJSON("v1/graph"),
    ]);
    const failed = [health, clients, registry, g].filter((r) => r.status === "rejected");
    if (health.status === "fulfilled") {
      renderVersion(health.value);
      if (health.value.version !== state.version) {
        try {
          await refreshRules();
        } catch (err) {
          failed.push({ reason: err });
        }
      }
    }
    if (g.status === "fulfilled") {
      graph = g.value;
      renderGraph(graph);
    }
    if (clients.status === "fulfilled") {
      renderClients(clients.value);
      renderXds(clients.value);
    }
    if (registry.status === "fulfilled") renderServices(registry.value, graph);
    if (failed.length) setStatus(false, `offline: ${failed[0].reason.message || failed[0].reason} (retrying)`);
    else setStatus(true, `live · updated ${new Date().toLocaleTimeString()}`);
    document.body.dataset.ticks = String(Number(document.body.dataset.ticks || 0) + 1);
  }

  async function loop() {
    try {
      await tick();
    } catch (err) {
      setStatus(false, `offline: ${err.message} (retrying)`);
    }
    setTimeout(loop, POLL_MS);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("diff-from").addEventListener("change", onSelect("from"));
    $("diff-to").addEventListener("change", onSelect("to"));
    loop();
  });
})();
