// sluice dashboard: polls the admin API once a second and acts through its write routes.
// Everything is built with DOM calls and textContent (names from the config are never
// parsed as HTML). Tables keep the keyboard focus across refreshes (data-key).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const HOUR = 3600;
  let token = sessionStorage.getItem("sluice-token") || "";
  let paused = false;
  let history = { services: [], samples: [] };
  let lastSample = 0;
  let prevStats = null;
  let prevStatsAt = 0;
  let prevConns = new Map();
  let pending = null;
  let latestStats = null;

  // ---- formatting
  const num = (n) => (n === undefined || n === null ? "–" : Number(n).toLocaleString("en-US"));
  function bytes(n) {
    if (n === undefined || n === null) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
  }
  const rate = (n) => (n === undefined || n === null ? "–" : bytes(n) + "/s");
  function age(ms) {
    const s = Math.floor(ms / 1000);
    if (s < 60) return s + "s";
    const m = Math.floor(s / 60);
    if (m < 60) return m + "m " + String(s % 60).padStart(2, "0") + "s";
    return Math.floor(m / 60) + "h " + String(m % 60).padStart(2, "0") + "m";
  }

  // ---- DOM helpers
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (k.startsWith("data-")) e.setAttribute(k, v);
      else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
  }
  const cell = (text, cls) => el("td", { class: cls || "", text: String(text) });
  const ncell = (text) => cell(text, "n");
  function badge(text, kind) { return el("span", { class: "badge " + kind, text }); }

  // Replaces a table body's rows; the focused control keeps its focus by its data-key.
  function fill(tbody, rows, emptyText, columns) {
    const focused = document.activeElement && document.activeElement.dataset
      ? document.activeElement.dataset.key : null;
    tbody.replaceChildren(...rows);
    if (rows.length === 0) {
      tbody.append(el("tr", {}, el("td", { class: "empty", colspan: String(columns), text: emptyText })));
    }
    if (focused) {
      const again = tbody.querySelector('[data-key="' + CSS.escape(focused) + '"]');
      if (again) again.focus();
    }
  }

  function say(text, kind) {
    const s = $("status");
    s.textContent = text;
    s.className = "status " + (kind || "");
  }

  // ---- API
  async function api(method, path) {
    const headers = {};
    if (token) headers.Authorization = "Bearer " + token;
    // An absolute URL from the origin: a page opened with credentials in its address would
    // otherwise resolve relative URLs with the credentials in them, which fetch refuses.
    const r = await fetch(location.origin + path, { method, headers, cache: "no-store", credentials: "same-origin" });
    let body = null;
    try { body = await r.json(); } catch (e) { body = null; }
    return { status: r.status, body };
  }

  function askToken(why, retry) {
    pending = retry || null;
    $("login").hidden = false;
    $("login-why").textContent = why;
    $("token").focus();
  }

  // A write action: retried once the write token is given when it was refused for want of it.
  async function act(method, path, done) {
    const r = await api(method, path);
    if (r.status === 401 || r.status === 403) {
      const message = r.body && r.body.error ? r.body.error : "refused";
      say(message, "error");
      if (r.status === 401 || message.includes("write token")) {
        askToken("This action needs the write token.", () => act(method, path, done));
      }
      return;
    }
    done(r);
    refresh();
  }

  // ---- actions
  function reload() {
    say("Reloading the configuration…");
    act("POST", "/reload", (r) => {
      const box = $("reload-errors");
      if (r.status === 200) {
        box.hidden = true;
        say("Reloaded: tables version " + r.body.tables_version + " in force.", "ok");
        return;
      }
      const errors = (r.body && r.body.errors) || [];
      const rows = errors.map((e) => el("tr", {}, cell(e.file), ncell(e.line), ncell(e.column), cell(e.key), cell(e.message)));
      if (rows.length === 0) {
        rows.push(el("tr", {}, cell("–"), cell("–"), cell("–"), cell("–"), cell(r.body ? r.body.error : "status " + r.status)));
      }
      $("reload-error-rows").replaceChildren(...rows);
      box.hidden = false;
      say("Reload refused (" + errors.length + " error" + (errors.length === 1 ? "" : "s") + "): the running configuration stays in force.", "error");
    });
  }

  function backendAction(service, addr, action) {
    const path = "/backends/" + encodeURIComponent(service) + "/" + encodeURIComponent(addr) + "/" + action;
    act("POST", path, (r) => {
      if (r.status === 200) say("Backend " + addr + " of " + service + " is now " + r.body.state + ".", "ok");
      else say((r.body && r.body.error) || "status " + r.status, "error");
    });
  }

  const armedKills = new Map();
  function kill(id, button) {
    if (!armedKills.has(id)) {
      button.classList.add("armed");
      button.textContent = "Confirm cut";
      armedKills.set(id, setTimeout(() => armedKills.delete(id), 4000));
      return;
    }
    clearTimeout(armedKills.get(id));
    armedKills.delete(id);
    act("DELETE", "/connections/" + encodeURIComponent(id), (r) => {
      if (r.status === 200) say("Connection " + id + " cut (admin_kill).", "ok");
      else say((r.body && r.body.error) || "status " + r.status, "error");
    });
  }

  // ---- rendering
  function latest() { return history.samples.length ? history.samples[history.samples.length - 1] : null; }
  function serviceFigures(name) {
    const s = latest();
    const i = history.services.indexOf(name);
    if (!s || i < 0 || !s[2][i]) return null;
    return s[2][i];
  }

  function renderFacts(stats) {
    $("f-version").textContent = stats.version;
    $("f-driver").textContent = stats.driver;
    $("f-uptime").textContent = age(stats.uptime_seconds * 1000);
    $("f-tables").textContent = "v" + stats.tables_version;
    $("f-reloads").textContent = stats.reloads + (stats.reload_failures ? " (" + stats.reload_failures + " refused)" : "");
  }

  function renderTiles(stats) {
    const active = stats.services.reduce((a, s) => a + s.active, 0);
    $("t-active").textContent = num(active);
    const s = latest();
    const t = s ? s[1] : null;
    $("t-new").textContent = t ? num(t[1]) : "–";
    $("t-up").textContent = t ? rate(t[2]) : "–";
    $("t-down").textContent = t ? rate(t[3]) : "–";
    $("t-denied").textContent = t ? num(t[4]) : "–";
  }

  function renderServices(stats) {
    const rows = stats.services.map((s) => {
      const f = serviceFigures(s.name);
      const errors = s.connect_errors + s.no_backend + s.proxy_errors;
      return el("tr", {},
        el("th", { scope: "row", text: s.name + (s.protocol === "udp" ? " (udp)" : "") }),
        cell(s.listen.join(", ")), ncell(num(s.active)), ncell(f ? num(f[1]) : "–"),
        ncell(f ? rate(f[2]) : "–"), ncell(f ? rate(f[3]) : "–"), ncell(num(s.sessions)),
        ncell(num(s.denied)), ncell(num(errors)));
    });
    fill($("services").tBodies[0], rows, "no service", 9);
  }

  function health(b) {
    const h = b.health;
    if (b.state !== "enabled") return badge(b.state, b.state === "draining" ? "warn" : "bad");
    if (h.ejected) return badge("ejected", "bad");
    if (!h.healthy) return badge("down", "bad");
    if (!h.up) return badge("full", "warn");
    return badge("up", "ok");
  }

  function renderBackends(stats) {
    const rows = [];
    for (const s of stats.services) {
      for (const b of s.backends) {
        const actions = el("td", {});
        for (const action of ["drain", "disable", "enable"]) {
          const current = { drain: "draining", disable: "disabled", enable: "enabled" }[action] === b.state;
          const button = el("button", {
            type: "button", text: action, "data-key": "b|" + s.name + "|" + b.addr + "|" + action,
            "aria-label": action + " backend " + b.addr + " of " + s.name,
            class: action === "enable" ? "" : "danger",
            onclick: () => backendAction(s.name, b.addr, action),
          });
          if (current) button.disabled = true;
          actions.append(button, " ");
        }
        rows.push(el("tr", { "data-backend": s.name + "|" + b.addr },
          el("th", { scope: "row", text: s.name }), cell(b.addr), cell(b.state),
          el("td", {}, health(b)), ncell(b.health.weight), ncell(num(b.active)),
          ncell(num(b.sessions)), ncell(num(b.connect_errors)), actions));
      }
    }
    fill($("backends").tBodies[0], rows, "no backend", 9);
  }

  function renderRules(stats, dt) {
    const before = new Map();
    if (prevStats) {
      for (const r of prevStats.firewall) before.set("firewall|" + r.name, r.hits);
      for (const s of prevStats.services) for (const r of s.rules) before.set(s.name + "|" + r.name, r.hits);
    }
    const rows = [];
    const add = (scope, r) => {
      const b = before.get(scope + "|" + r.name);
      const perSecond = b === undefined || dt <= 0 ? "–" : ((r.hits - b) / dt).toFixed(1);
      rows.push(el("tr", {}, cell(scope), el("th", { scope: "row", text: r.name }),
        el("td", {}, badge(r.action, r.action === "allow" ? "ok" : "bad")), ncell(num(r.hits)), ncell(perSecond)));
    };
    for (const r of stats.firewall) add("firewall", r);
    for (const s of stats.services) {
      for (const r of s.rules) add(s.name, r);
      add(s.name, { name: "(default)", action: s.default_action, hits: s.default_hits });
    }
    fill($("rules").tBodies[0], rows, "no rule", 5);
  }

  function renderDenials(list) {
    const rows = list.denials.slice(0, 20).map((d) => el("tr", {},
      cell(d.time.replace("T", " ").replace(/\.\d+Z$/, "Z")), cell(d.service), cell(d.client), cell(d.rule)));
    fill($("denials").tBodies[0], rows, "no denial", 4);
  }

  function renderConnections(list, now) {
    const filter = $("filter").value.trim().toLowerCase();
    const seen = new Map();
    const rows = [];
    for (const c of list.connections) {
      const total = c.bytes_up + c.bytes_down;
      seen.set(c.id, { total, at: now });
      const p = prevConns.get(c.id);
      const r = p && now > p.at ? (total - p.total) / ((now - p.at) / 1000) : (c.age_ms > 0 ? total / (c.age_ms / 1000) : 0);
      const text = [c.id, c.client, c.service, c.backend || ""].join(" ").toLowerCase();
      if (filter && !text.includes(filter)) continue;
      const button = el("button", {
        type: "button", class: "danger", text: "cut", "data-key": "kill|" + c.id,
        "aria-label": "cut connection " + c.id + " from " + c.client,
      });
      if (armedKills.has(c.id)) { button.classList.add("armed"); button.textContent = "Confirm cut"; }
      button.addEventListener("click", () => kill(c.id, button));
      rows.push(el("tr", { "data-id": c.id },
        cell(c.id), cell(c.client), cell(c.service), cell(c.backend || "–"), cell(c.state),
        ncell(age(c.age_ms)), ncell(bytes(c.bytes_up)), ncell(bytes(c.bytes_down)), ncell(rate(Math.max(0, r))),
        el("td", {}, button)));
    }
    prevConns = seen;
    $("conn-count").textContent = "(" + rows.length + (filter ? " shown of " + list.count : "") + ")";
    fill($("conns").tBodies[0], rows, filter ? "no connection matches" : "no live connection", 10);
  }

  // ---- topology
  function svgEl(tag, attrs, text) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function renderTopology(stats) {
    const svg = $("topology");
    const width = Math.max(svg.clientWidth, 700);
    const rowH = 28;
    let rows = 0;
    const blocks = stats.services.map((s) => {
      const n = Math.max(s.listen.length, s.backends.length, 1);
      const block = { s, top: rows, n };
      rows += n + 0.6;
      return block;
    });
    const height = Math.max(rows * rowH + 20, 120);
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.style.height = height + "px";
    const parts = [];
    const x = { clients: 12, listen: width * 0.2, service: width * 0.47, backend: width * 0.7 };
    const boxW = { clients: width * 0.12, listen: width * 0.2, service: width * 0.16, backend: width * 0.27 };
    const totalActive = stats.services.reduce((a, s) => a + s.active, 0);
    const cy = height / 2;
    const lineW = (n) => 1.5 + Math.min(8, Math.log2(1 + n));
    const box = (bx, by, w, label, fill, stroke) => {
      parts.push(svgEl("rect", { x: bx, y: by - 11, width: w, height: 22, rx: 4, fill, stroke }));
      parts.push(svgEl("text", { x: bx + 6, y: by + 4 }, label));
    };
    parts.push(svgEl("rect", { x: x.listen - 8, y: 4, width: x.service + boxW.service - x.listen + 16, height: height - 8, rx: 8, fill: "#eef3fb", stroke: "#9fb6d8" }));
    parts.push(svgEl("text", { x: x.listen, y: 16, class: "muted" }, "sluice"));
    for (const { s, top, n } of blocks) {
      const y0 = 10 + (top + 0.6) * rowH + rowH / 2;
      const sy = y0 + ((n - 1) * rowH) / 2;
      s.listen.forEach((l, i) => {
        const ly = y0 + i * rowH;
        parts.push(svgEl("path", { d: `M${x.clients + boxW.clients},${cy} C${x.listen - 40},${cy} ${x.listen - 40},${ly} ${x.listen},${ly}`, fill: "none", stroke: "#7d8da1", "stroke-width": lineW(s.active / s.listen.length) }));
        parts.push(svgEl("line", { x1: x.listen + boxW.listen, y1: ly, x2: x.service, y2: sy, stroke: "#7d8da1", "stroke-width": 1.5 }));
        box(x.listen, ly, boxW.listen, l, "#fff", "#7d8da1");
      });
      s.backends.forEach((b, i) => {
        const by = y0 + i * rowH;
        const good = b.state === "enabled" && b.health.up;
        const color = good ? "#1f7a3f" : b.state === "draining" ? "#9a6700" : "#b3261e";
        parts.push(svgEl("line", { x1: x.service + boxW.service, y1: sy, x2: x.backend, y2: by, stroke: color, "stroke-width": lineW(b.active), "stroke-dasharray": good ? "" : "5 4" }));
        const label = b.addr + "  " + (good ? "up" : b.state !== "enabled" ? b.state : b.health.ejected ? "ejected" : "down") + " · " + b.active;
        box(x.backend, by, boxW.backend, label, "#fff", color);
      });
      box(x.service, sy, boxW.service, s.name + " · " + s.active, "#dbe7f7", "#1f5fbf");
    }
    box(x.clients, cy, boxW.clients, "clients · " + totalActive, "#fff", "#7d8da1");
    svg.replaceChildren(...parts);
  }

  // ---- charts
  function chart(svg, series, yFormat) {
    const width = Math.max(svg.clientWidth, 300);
    const height = 150;
    const pad = { l: 64, r: 8, t: 8, b: 20 };
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    const now = history.samples.length ? history.samples[history.samples.length - 1][0] : Math.floor(Date.now() / 1000);
    const start = now - HOUR;
    let max = 1;
    for (const s of series) for (const [, v] of s.points) max = Math.max(max, v);
    const px = (t) => pad.l + ((t - start) / HOUR) * (width - pad.l - pad.r);
    const py = (v) => height - pad.b - (v / max) * (height - pad.t - pad.b);
    const parts = [
      svgEl("line", { class: "axis", x1: pad.l, y1: height - pad.b, x2: width - pad.r, y2: height - pad.b }),
      svgEl("line", { class: "axis", x1: pad.l, y1: pad.t, x2: pad.l, y2: height - pad.b }),
      svgEl("text", { x: pad.l - 4, y: pad.t + 10, "text-anchor": "end", class: "muted" }, yFormat(max)),
      svgEl("text", { x: pad.l - 4, y: height - pad.b, "text-anchor": "end", class: "muted" }, "0"),
      svgEl("text", { x: pad.l, y: height - 4, class: "muted" }, "−60 min"),
      svgEl("text", { x: (pad.l + width - pad.r) / 2, y: height - 4, "text-anchor": "middle", class: "muted" }, "−30 min"),
      svgEl("text", { x: width - pad.r, y: height - 4, "text-anchor": "end", class: "muted" }, "now"),
    ];
    for (const s of series) {
      if (s.points.length === 0) continue;
      const d = s.points.map(([t, v], i) => (i ? "L" : "M") + px(t).toFixed(1) + "," + py(v).toFixed(1)).join("");
      parts.push(svgEl("path", { d, fill: "none", stroke: s.color, "stroke-width": 1.6 }));
    }
    svg.replaceChildren(...parts);
  }

  function renderCharts() {
    const scope = Number($("scope").value);
    const pick = (sample) => (scope < 0 ? sample[1] : sample[2][scope] || [0, 0, 0, 0, 0]);
    const pts = (k) => history.samples.map((s) => [s[0], pick(s)[k]]);
    chart($("chart-new"), [{ points: pts(1), color: "#1f5fbf" }], (v) => num(Math.round(v)) + "/s");
    chart($("chart-active"), [{ points: pts(0), color: "#1b1f24" }], (v) => num(Math.round(v)));
    chart($("chart-bytes"), [{ points: pts(2), color: "#1f7a3f" }, { points: pts(3), color: "#8a3ab9" }], (v) => rate(v));
  }

  function updateScopes() {
    const select = $("scope");
    const have = new Set([...select.options].map((o) => o.value));
    history.services.forEach((name, i) => {
      if (!have.has(String(i))) select.append(el("option", { value: String(i), text: name }));
    });
  }

  // ---- polling
  async function refresh() {
    const since = lastSample;
    let stats, conns, denials, hist;
    try {
      [stats, conns, denials, hist] = await Promise.all([
        api("GET", "/stats"), api("GET", "/connections?limit=200"), api("GET", "/denials"),
        api("GET", "/history" + (since ? "?since=" + since : "")),
      ]);
    } catch (e) {
      $("updated").textContent = "sluice does not answer: " + e.message;
      return;
    }
    if (stats.status === 401) {
      askToken("The dashboard needs the read token.", refresh);
      return;
    }
    if (stats.status !== 200) {
      $("updated").textContent = "/stats answered " + stats.status;
      return;
    }
    const now = Date.now();
    if (hist.status === 200) {
      history.services = hist.body.services;
      history.samples = history.samples.concat(hist.body.samples);
      const cut = hist.body.samples.length ? hist.body.samples[hist.body.samples.length - 1][0] - HOUR : 0;
      history.samples = history.samples.filter((s) => s[0] > cut);
      if (history.samples.length) lastSample = history.samples[history.samples.length - 1][0];
      updateScopes();
    }
    const dt = prevStats ? (now - prevStatsAt) / 1000 : 0;
    latestStats = stats.body;
    renderFacts(stats.body);
    renderTiles(stats.body);
    renderServices(stats.body);
    renderBackends(stats.body);
    renderRules(stats.body, dt);
    if (denials.status === 200) renderDenials(denials.body);
    if (conns.status === 200) renderConnections(conns.body, now);
    renderTopology(stats.body);
    renderCharts();
    prevStats = stats.body;
    prevStatsAt = now;
    $("updated").textContent = "updated " + new Date(now).toLocaleTimeString("en-GB") + (paused ? " · paused (p resumes)" : "");
    document.body.dataset.ready = "1";
  }

  async function loop() {
    if (!paused) await refresh();
    setTimeout(loop, 1000);
  }

  // ---- wiring
  document.addEventListener("DOMContentLoaded", () => {
    $("reload").addEventListener("click", reload);
    $("help-toggle").addEventListener("click", () => {
      const help = $("help");
      help.hidden = !help.hidden;
      $("help-toggle").setAttribute("aria-expanded", String(!help.hidden));
    });
    $("filter").addEventListener("input", () => latestStats && refresh());
    $("scope").addEventListener("change", renderCharts);
    $("login").addEventListener("submit", (e) => {
      e.preventDefault();
      token = $("token").value.trim();
      sessionStorage.setItem("sluice-token", token);
      $("token").value = "";
      $("login").hidden = true;
      const retry = pending;
      pending = null;
      if (retry) retry();
    });
    document.addEventListener("keydown", (e) => {
      const typing = e.target.matches("input, select, textarea");
      if (e.key === "Escape" && typing) { e.target.blur(); return; }
      if (typing || e.ctrlKey || e.metaKey || e.altKey) return;
      if (e.key === "/") { e.preventDefault(); $("filter").focus(); }
      else if (e.key === "r") { e.preventDefault(); reload(); }
      else if (e.key === "p") { paused = !paused; say(paused ? "Updates paused (p resumes)." : "Updates resumed."); }
      else if (e.key === "?") { $("help-toggle").click(); }
    });
    loop();
  });
})();
