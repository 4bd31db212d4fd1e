// The report page: builds every plot (BokehJS) and table from the inlined payload (report/data.py).
// Text from the history is only ever set as textContent, never parsed as HTML.
"use strict";
(async function () {
  // The payloads are gzipped JSON in base64 (page.py); the browser inflates them natively.
  async function unpack(base64) {
    const response = await fetch(`data:application/gzip;base64,${base64}`);
    return JSON.parse(await new Response(response.body.pipeThrough(new DecompressionStream("gzip"))).text());
  }
  const phases = { scripts_run_ms: performance.now() }; // milliseconds since navigation
  const D = await unpack(document.getElementById("report-data").textContent);
  phases.unpacked_ms = performance.now();
  // The per-node details, in chunks of D.detail_chunk nodes (an element each), each inflated when
  // one of its nodes is first selected. They come after this script in the file.
  const parsed = new Promise((done) =>
    document.readyState === "loading" ? document.addEventListener("DOMContentLoaded", done) : done());
  const detailChunks = new Map();
  async function details(i) {
    const k = Math.floor(i / D.detail_chunk);
    if (!detailChunks.has(k)) {
      detailChunks.set(k, parsed.then(() => unpack(document.getElementsByClassName("report-details")[k].textContent)));
    }
    return (await detailChunks.get(k))[i % D.detail_chunk];
  }
  const C = D.nodes || { id: [] };
  const N = C.id.length;
  const stages = D.stages || [];
  const rowOf = new Map(C.id.map((id, i) => [id, i]));
  const MARKER = N > 2000 ? 4 : 8; // small markers where thousands share a plot
  const plotted = []; // [ring source, (i) -> [x, y] or null]: where each plot marks the selection
  let selected = null;

  // ---------------------------------------------------------------- helpers

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }
  const fmt = (x, digits = 4) =>
    x === null || x === undefined ? "–" : Math.abs(x) >= 1e5 || (x !== 0 && Math.abs(x) < 1e-3)
      ? x.toExponential(2) : Number(x.toPrecision(digits)).toString();
  const signed = (x) => (x === null || x === undefined ? "–" : (x > 0 ? "+" : "") + fmt(x, 3));
  const seconds = (s) => {
    if (!s) return "0 s";
    if (s < 120) return `${s.toFixed(1)} s`;
    const m = Math.round(s / 60);
    return m < 120 ? `${m} min` : `${(s / 3600).toFixed(1)} h`;
  };
  // Local time, formatted by hand: toLocaleString cost a 10,000-node page about 25 ms (Intl).
  const pad = (n) => String(n).padStart(2, "0");
  const when = (t) => {
    if (!t) return "–";
    const d = new Date(t * 1000);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
  };
  const nodeLink = (id) => el("a", { class: "node", onclick: () => select(id) }, `#${id}`);
  const better = (a, b, direction) => (direction === "max" ? a > b : a < b);
  const label = (i) => `#${C.id[i]} ${C.name[i]}`;
  const vsText = (vs) => {
    if (!vs) return "–";
    const ci = vs.ci95 && vs.ci95[0] !== null ? ` [${signed(vs.ci95[0])}, ${signed(vs.ci95[1])}]` : "";
    return `${signed(vs.mean_diff)}${ci}`;
  };
  function table(headers, rows) {
    return el("table", {}, el("tr", {}, headers.map((h) => el("th", {}, h))),
      rows.map((cells) => el("tr", {}, cells.map((c) =>
        c instanceof Node ? el("td", {}, c) : el("td", typeof c === "number" ? { class: "num" } : {}, c)))));
  }
  function empty(container, text) {
    container.replaceChildren(el("p", { class: "muted" }, text));
  }

  // ---------------------------------------------------------------- BokehJS plots

  const B = Bokeh;
  const TOOLS = "pan,wheel_zoom,box_zoom,reset,tap";

  function figure(title, xLabel, yLabel, height, extra) {
    return B.Plotting.figure({ title, height, sizing_mode: "stretch_width", tools: TOOLS,
      x_axis_label: xLabel, y_axis_label: yLabel, toolbar_location: "right", ...(extra || {}) });
  }

  // Points of one plot: a data source whose rows are nodes (its ``id`` column), a hover text
  // (``text`` of the node's row, made when hovered: no column of 10,000 labels to build) and a
  // tap that selects the node.
  function points(fig, data, style, text) {
    const source = new B.ColumnDataSource({ data });
    const renderer = fig.scatter({ field: "x" }, { field: "y" }, { source, ...style });
    const tooltips = (_, vars) => el("div", {}, text(rowOf.get(source.data.id[vars.index])));
    fig.add_tools(new B.HoverTool({ tooltips, renderers: [renderer] }));
    source.selected.change.connect(() => {
      const k = source.selected.indices[0];
      if (k !== undefined) select(source.data.id[k]);
    });
    return renderer;
  }

  // A ring around the selected node, drawn by its own one-point source (cheap to move).
  function selectionRing(fig, at) {
    const source = new B.ColumnDataSource({ data: { x: [], y: [] } });
    fig.scatter({ field: "x" }, { field: "y" }, { source, size: 18, fill_alpha: 0, line_color: "#111", line_width: 2 });
    plotted.push([source, at]);
  }

  // Whole-number ticks when the x axis counts a few evaluations (no "2.5th evaluation").
  function countAxis(fig, count) {
    if (count <= 20) fig.xaxis.ticker = new B.SingleIntervalTicker({ interval: 1 });
  }

  // A plot's key, in HTML above it: BokehJS legends and the colour bar measure their text, and
  // on a 10,000-node page cost about 0.3 s of layout each (the legends together, the bar alone).
  function key(...items) {
    return el("div", { class: "key" }, items.map(([symbol, style, text]) =>
      el("span", {}, el("span", { class: "symbol", style }, symbol), text)));
  }
  const KEY = {
    node: ["●", "color: #5b7fd6", "node"],
    failed: ["✕", "color: #c4321d", "failed (drawn past the worst)"],
    best: ["━", "color: #1a7f37", "best so far"],
    edge: ["━", "color: #aab3c5", "parent → child"],
    second: ["┅", "color: #d0a84f", "second parent"],
  };

  const figures = []; // [element id, figure] of every plot shown
  async function show(fig, div) {
    figures.push([div.id, fig]);
    await B.Plotting.show(fig, div);
  }

  // ---------------------------------------------------------------- what a reload keeps

  // The live page reloads itself; what the reader set (scroll, the leaderboard's filter and page,
  // zoomed or panned plots) is kept across the reload in sessionStorage. The selection is kept
  // in the URL.
  const VIEW = `evolve_jax report view ${location.pathname}`;
  const savedView = (() => {
    try { return JSON.parse(sessionStorage.getItem(VIEW)) || {}; } catch { return {}; }
  })();
  history.scrollRestoration = "manual";
  const rangesOf = (fig) => [fig.x_range.start, fig.x_range.end, fig.y_range.start, fig.y_range.end];
  const drawnRanges = new Map(); // each plot's ranges as first drawn: a zoom changes them

  function saveView() {
    const zoomed = {};
    for (const [id, fig] of figures) {
      const now = rangesOf(fig), first = drawnRanges.get(id);
      if (first && now.some((v, k) => v !== first[k])) zoomed[id] = now;
    }
    const view = { scroll: [scrollX, scrollY], filter: document.getElementById("filter").value, page: boardPage, zoomed };
    try { sessionStorage.setItem(VIEW, JSON.stringify(view)); } catch { /* storage off: nothing kept */ }
  }

  function restoreView() {
    for (const [id, fig] of figures) {
      drawnRanges.set(id, rangesOf(fig));
      const r = (savedView.zoomed || {})[id];
      if (!r) continue;
      for (const [range, start, end] of [[fig.x_range, r[0], r[1]], [fig.y_range, r[2], r[3]]]) {
        range.have_updated_interactively = true; // as a tool leaves it: a DataRange1d then stays put
        range.setv({ start, end });
      }
    }
    if (savedView.scroll) scrollTo(...savedView.scroll);
    addEventListener("pagehide", saveView);
  }

  // ---------------------------------------------------------------- header and notices

  function header() {
    const counts = {};
    C.status && C.status.forEach((s) => (counts[s] = (counts[s] || 0) + 1));
    const live = D.live
      ? el("span", { class: "pill live", id: "state" }, `live · reloads every ${D.reload_seconds} s`)
      : el("span", { class: "pill ended", id: "state" }, "ended");
    const stageText = stages.map((s, i) => `s${i} ${s.name} (${s.metric}, ${s.metric_direction === "max" ? "higher" : "lower"} is better)`).join("; ");
    document.getElementById("header").replaceChildren(
      el("h1", {}, D.title || "evolve_jax report", live),
      el("div", { class: "meta" },
        `${D.search_space || "?"} · ${D.workdir} · ${N} nodes`,
        Object.keys(counts).length ? ` (${Object.entries(counts).map(([k, v]) => `${v} ${k}`).join(", ")})` : "",
        ` · written ${when(D.generated)}`),
      stageText ? el("div", { class: "meta" }, `Stages: ${stageText}`) : null,
    );
    document.getElementById("notices").replaceChildren(...(D.notices || []).map((t) => el("li", {}, t)));
  }

  // ---------------------------------------------------------------- fitness over evaluations

  function fitnessPlots() {
    const box = document.getElementById("fitness-plots");
    if (!N) return empty(box, "No evaluations yet.");
    const plots = [];
    stages.forEach((stage, s) => {
      let order = C.id.map((_, i) => i);
      if (s > 0) {
        order = order.filter((i) => C[`s${s}_status`][i]);
        order.sort((a, b) => (C[`s${s}_created`][a] || 0) - (C[`s${s}_created`][b] || 0));
      }
      const title = `Stage ${s}: ${stage.name}, ${stage.metric} (mean over seeds; ${stage.metric_direction === "max" ? "higher" : "lower"} is better)`;
      const div = el("div", { class: "plot", id: `fitness-${s}` });
      box.append(div);
      if (!order.length) {
        div.classList.remove("plot");
        div.replaceChildren(el("p", { class: "muted" }, `${title}: no node evaluated at this stage yet.`));
        return;
      }
      const mean = C[`s${s}_mean`];
      const ok = { x: [], y: [], id: [] }, bad = { x: [], id: [] };
      const best = { x: [], y: [] };
      let top = null;
      const xOf = new Map();
      order.forEach((i, k) => {
        xOf.set(i, k + 1);
        if (mean[i] !== null) {
          ok.x.push(k + 1); ok.y.push(mean[i]); ok.id.push(C.id[i]);
          if (top === null || better(mean[i], top, stage.metric_direction)) top = mean[i];
        } else {
          bad.x.push(k + 1); bad.id.push(C.id[i]);
        }
        if (top !== null) { best.x.push(k + 1); best.y.push(top); }
      });
      // Failures have no metric: they are drawn in a row just past the worst value.
      const lo = ok.y.length ? Math.min(...ok.y) : 0, hi = ok.y.length ? Math.max(...ok.y) : 1;
      const pad = 0.08 * (hi - lo || 1);
      const worstY = stage.metric_direction === "max" ? lo - pad : hi + pad;
      bad.y = bad.x.map(() => worstY);
      const fig = figure(title, s === 0 ? "evaluation (node order)" : `evaluation at stage ${s}`, stage.metric, 320);
      points(fig, ok, { size: MARKER - 2, fill_color: "#5b7fd6", line_color: null, fill_alpha: 0.75, name: "nodes" },
        (i) => `${label(i)}: ${fmt(mean[i])}`);
      fig.step({ field: "x" }, { field: "y" }, "after", { source: new B.ColumnDataSource({ data: best }),
        line_color: "#1a7f37", line_width: 2 });
      if (bad.x.length) {
        points(fig, bad, { marker: "x", size: MARKER + 1, line_color: "#c4321d", line_width: 2, name: "failed" },
          (i) => `${label(i)}: ${C[`s${s}_status`][i]}${C.reason[i] && s === 0 ? ` (${C.reason[i]})` : ""}`);
      }
      countAxis(fig, order.length);
      div.before(key(KEY.node, KEY.best, ...(bad.x.length ? [KEY.failed] : [])));
      selectionRing(fig, (i) => (xOf.has(i) && mean[i] !== null ? [xOf.get(i), mean[i]] : null));
      plots.push(show(fig, div));
    });
    return Promise.all(plots);
  }

  // ---------------------------------------------------------------- leaderboard

  const PAGE = 50;
  let boardRows = [], boardPage = 0;

  function boardOrder() {
    const ok = C.id.map((_, i) => i).filter((i) => C.status[i] === "ok" && C.score[i] !== null);
    ok.sort((a, b) => (D.direction === "max" ? C.score[b] - C.score[a] : C.score[a] - C.score[b]) || C.id[a] - C.id[b]);
    const rest = C.id.map((_, i) => i).filter((i) => !(C.status[i] === "ok" && C.score[i] !== null));
    return ok.map((i, k) => [i, k + 1]).concat(rest.map((i) => [i, null]));
  }

  function leaderboard() {
    const all = boardOrder();
    const input = document.getElementById("filter");
    const search = [];
    all.forEach(([i]) => search.push(`#${C.id[i]} ${C.name[i]} ${C.status[i]} ${C.operator[i] || "seed"} ${C.reason[i] || ""}`.toLowerCase()));
    const apply = (page) => {
      const q = input.value.trim().toLowerCase();
      boardRows = q ? all.filter((_, k) => search[k].includes(q)) : all;
      boardPage = Math.max(0, Math.min(page, Math.ceil(boardRows.length / PAGE) - 1));
      drawBoard();
    };
    input.addEventListener("input", () => apply(0));
    input.value = savedView.filter || "";
    apply(savedView.page || 0);
  }

  function drawBoard() {
    const tableEl = document.getElementById("board");
    const pager = document.getElementById("pager");
    if (!N) { pager.replaceChildren(); return tableEl.replaceChildren(el("tr", {}, el("td", { class: "muted" }, "No nodes yet."))); }
    const pages = Math.max(1, Math.ceil(boardRows.length / PAGE));
    const start = boardPage * PAGE;
    const heads = ["rank", "id", "name", "status", "score"];
    stages.forEach((s, k) => heads.push(`s${k} ${s.metric}`, `s${k} vs baseline`));
    heads.push("operator", "reason");
    const rows = boardRows.slice(start, start + PAGE).map(([i, rank]) => {
      const cells = [rank === null ? "–" : rank, C.id[i], C.name[i],
        el("span", { class: `status-${C.status[i]}` }, C.status[i]), C.score[i] === null ? "–" : fmt(C.score[i])];
      stages.forEach((_, s) => {
        const m = C[`s${s}_mean`][i], sd = C[`s${s}_sd`][i], n = C[`s${s}_n`][i], st = C[`s${s}_status`][i];
        cells.push(m === null ? (st && st !== "ok" ? st : "–") : `${fmt(m)}${sd !== null ? ` ±${fmt(sd, 2)}` : ""} (n=${n})`);
        cells.push(vsText(C[`s${s}_vs`][i]));
      });
      cells.push(C.operator[i] || "seed", C.reason[i] || "");
      const tr = el("tr", { class: `row${selected === C.id[i] ? " selected" : ""}`, "data-id": C.id[i], onclick: () => select(C.id[i]) },
        cells.map((c) => el("td", typeof c === "number" ? { class: "num" } : {}, c)));
      return tr;
    });
    tableEl.replaceChildren(el("tr", {}, heads.map((h) => el("th", {}, h))), ...rows);
    pager.replaceChildren(
      el("button", { onclick: () => { boardPage = Math.max(0, boardPage - 1); drawBoard(); } }, "‹"),
      ` ${boardRows.length ? start + 1 : 0}–${Math.min(start + PAGE, boardRows.length)} of ${boardRows.length} `,
      el("button", { onclick: () => { boardPage = Math.min(pages - 1, boardPage + 1); drawBoard(); } }, "›"));
  }

  // ---------------------------------------------------------------- lineage tree

  function lineage() {
    const div = document.getElementById("tree-plot");
    if (!N) { div.classList.remove("plot", "tall"); return empty(div, "No nodes yet."); }
    const row = D.tree.row;
    const edges = { x: [], y: [] }, second = { x0: [], y0: [], x1: [], y1: [] };
    C.parents.forEach((parents, i) => {
      parents.forEach((p, k) => {
        const j = rowOf.get(p);
        if (j === undefined) return;
        if (k === 0) { edges.x.push(C.id[j], C.id[j], C.id[i], NaN); edges.y.push(row[j], row[i], row[i], NaN); }
        else { second.x0.push(C.id[j]); second.y0.push(row[j]); second.x1.push(C.id[i]); second.y1.push(row[i]); }
      });
    });
    const ok = { x: [], y: [], id: [], score: [] }, bad = { x: [], y: [], id: [] };
    C.id.forEach((id, i) => {
      if (C.status[i] === "ok") {
        ok.x.push(id); ok.y.push(row[i]); ok.id.push(id); ok.score.push(C.score[i]);
      } else {
        bad.x.push(id); bad.y.push(row[i]); bad.id.push(id);
      }
    });
    // Rows top to bottom, as a tree is read; the y axis carries no quantity.
    const fig = figure(null, "node id (evaluation order)", "lineage (depth-first)", 520,
      { y_range: new B.Range1d({ start: N, end: -1 }) });
    fig.yaxis.major_label_text_font_size = "0px";
    // All first-parent edges as one line broken by NaNs: one path to stroke, not 10,000.
    fig.line({ field: "x" }, { field: "y" }, { source: new B.ColumnDataSource({ data: edges }),
      line_color: "#aab3c5", line_width: 1 });
    if (second.x0.length) {
      fig.segment({ field: "x0" }, { field: "y0" }, { field: "x1" }, { field: "y1" }, {
        source: new B.ColumnDataSource({ data: second }), line_color: "#d0a84f", line_dash: "dotted" });
    }
    const scores = ok.score.filter((x) => x !== null);
    const mapper = new B.LinearColorMapper({ palette: B.Palettes.Viridis256,
      low: scores.length ? Math.min(...scores) : 0, high: scores.length ? Math.max(...scores) : 1 });
    if (D.direction === "min") mapper.palette = [...B.Palettes.Viridis256].reverse();
    points(fig, ok, { size: MARKER, fill_color: { field: "score", transform: mapper }, line_color: null, name: "nodes" },
      (i) => `${label(i)} · score ${fmt(C.score[i])}${C.operator[i] ? ` · ${C.operator[i]}` : ""}`);
    if (bad.x.length) points(fig, bad, { marker: "x", size: MARKER + 1, line_color: "#c4321d", line_width: 2, name: "failed" },
      (i) => `${label(i)} · ${C.status[i]}: ${C.reason[i] || ""}`);
    // BokehJS palettes hold colours as 0xRRGGBBAA numbers.
    const ramp = mapper.palette.filter((_, k) => k % 32 === 0 || k === mapper.palette.length - 1)
      .map((c) => `#${(c >>> 8).toString(16).padStart(6, "0")}`);
    const scoreKey = key(KEY.edge, ...(second.x0.length ? [KEY.second] : []), ...(bad.x.length ? [KEY.failed] : []));
    scoreKey.prepend(el("span", {}, `score ${fmt(mapper.low)} `,
      el("span", { class: "ramp", style: `background: linear-gradient(to right, ${ramp.join(", ")})` }), ` ${fmt(mapper.high)}`));
    div.before(scoreKey);
    countAxis(fig, N);
    selectionRing(fig, (i) => [C.id[i], row[i]]);
    return show(fig, div);
  }

  // ---------------------------------------------------------------- stage agreement

  function correlations() {
    const box = document.getElementById("corr-plots");
    if (!D.correlations || !D.correlations.length) return empty(box, "This search has one stage: nothing to compare.");
    return Promise.all(D.correlations.map((c) => {
      const cheap = stages[0], costly = stages[c.stage];
      const head = el("p", {}, `Spearman rank correlation, stage 0 (${cheap.name}) against stage ${c.stage} (${costly.name}): ${c.text}.`);
      box.append(head);
      if (!c.points.length) { box.append(el("p", { class: "muted" }, `No node has been evaluated at stage ${c.stage} yet.`)); return null; }
      const div = el("div", { class: "plot", id: `corr-${c.stage}` });
      box.append(div);
      const rho = c.spearman === null ? "undefined" : fmt(c.spearman, 3);
      const ci = c.ci95[0] === null ? "no CI" : `95% CI [${fmt(c.ci95[0], 2)}, ${fmt(c.ci95[1], 2)}]`;
      const fig = figure(`ρ = ${rho} (${ci}), n = ${c.n}`, `stage 0 ${cheap.metric}`, `stage ${c.stage} ${costly.metric}`, 320);
      const xy = new Map(c.points.map((p) => [p[0], [p[1], p[2]]]));
      points(fig, { x: c.points.map((p) => p[1]), y: c.points.map((p) => p[2]), id: c.points.map((p) => p[0]) },
        { size: 9, fill_color: "#5b7fd6", line_color: null, name: "nodes" },
        (i) => `${label(i)}: ${xy.get(C.id[i]).map((v) => fmt(v)).join(" → ")}`);
      selectionRing(fig, (i) => xy.get(C.id[i]) || null);
      return show(fig, div);
    }));
  }

  // ---------------------------------------------------------------- operators, lessons, prior knowledge

  function knowledge() {
    const ops = document.getElementById("operators");
    if (!D.operators || !D.operators.length) empty(ops, "No child has been made by an operator yet.");
    else ops.replaceChildren(el("p", { class: "muted" }, "Gain: a child's score minus its first parent's, over children and parents that both ran (95% t interval)."),
      table(["operator", "uses", "ran", "beat parent", "mean gain", "95% CI", "n"], D.operators.map((o) => [
        o.operator, o.uses, o.ok, o.wins, signed(o.mean_gain),
        o.ci95[0] === null ? "–" : `[${signed(o.ci95[0])}, ${signed(o.ci95[1])}]`, o.n])));
    const lessons = document.getElementById("lessons");
    if (!D.lessons || !D.lessons.length) empty(lessons, "The Analyzer has recorded no lessons yet.");
    else lessons.replaceChildren(table(["lesson", "drawn from", "when"], D.lessons.map((l) => [
      el("div", {}, el("strong", {}, l.title), el("div", {}, l.content),
        l.tags && l.tags.length ? el("div", { class: "muted" }, l.tags.join(", ")) : null),
      el("span", {}, ...l.nodes.flatMap((id, k) => (k ? [" ", nodeLink(id)] : [nodeLink(id)]))),
      when(l.time)])));
    const prior = document.getElementById("prior");
    if (!D.prior_knowledge || !D.prior_knowledge.length) empty(prior, "No prior-knowledge items recorded.");
    else prior.replaceChildren(el("details", {}, el("summary", {}, `${D.prior_knowledge.length} items seeded from the search space`),
      table(["item", "source", "tags"], D.prior_knowledge.map((k) => [k.title, k.source, (k.tags || []).join(", ")]))));
  }

  // ---------------------------------------------------------------- time and cost

  function costs() {
    const box = document.getElementById("costs");
    if (!D.time || !D.time.length) return empty(box, "Nothing timed yet.");
    box.replaceChildren(el("div", { class: "scroll" }, table(
      ["run", "nodes", "designing", "evaluating (stage 0)", "later stages", "compiling", "LLM calls", "prompt tokens (cached)", "output tokens", "thinking tokens", "est. USD"],
      D.time.map((r) => [r.run, r.nodes || 0, seconds(r.design_s), seconds(r.evaluate_s), seconds(r.later_stages_s),
        r.compile_recorded ? seconds(r.compile_s) : "not recorded",
        r.llm_calls ? r.llm_calls : "none (offline agents)", r.llm_calls ? `${r.llm_prompt_tokens || 0} (${r.llm_cached_tokens || 0})` : "–",
        r.llm_calls ? r.llm_output_tokens || 0 : "–", r.llm_calls ? r.llm_thinking_tokens || 0 : "–",
        r.llm_calls ? `$${(r.llm_usd || 0).toFixed(4)}` : "–"]))),
      el("p", { class: "muted" }, "Compiling: seconds process 0 spent tracing, lowering and compiling, from JAX's compile events (also counted in evaluating and later stages)."));
  }

  // ---------------------------------------------------------------- the selected node

  function select(id) {
    const i = rowOf.get(Number(id));
    if (i === undefined) return;
    selected = C.id[i];
    if (location.hash !== `#node=${selected}`) history.replaceState(null, "", `#node=${selected}`);
    showDetail(i, selected);
    for (const [ring, at] of plotted) {
      const xy = at(i);
      ring.data = { x: xy ? [xy[0]] : [], y: xy ? [xy[1]] : [] };
    }
    document.querySelectorAll("#board tr.row").forEach((tr) => tr.classList.toggle("selected", Number(tr.dataset.id) === selected));
  }

  function codeBlock(text, kind) {
    const pre = el("pre", { class: `candidate ${kind}` });
    if (kind !== "diff") pre.textContent = text;
    else for (const line of text.split("\n")) {
      const cls = line.startsWith("+") && !line.startsWith("+++") ? "add" : line.startsWith("-") && !line.startsWith("---") ? "del" : null;
      pre.append(cls ? el("span", { class: cls }, line) : line, "\n");
    }
    return pre;
  }

  function metricsTable(bySeed) {
    const seeds = Object.keys(bySeed || {});
    if (!seeds.length) return el("p", { class: "muted" }, "no metrics");
    const names = [...new Set(seeds.flatMap((s) => Object.keys(bySeed[s] || {})))].sort();
    return table(["metric", ...seeds.map((s) => `seed ${s}`)], names.map((m) => [m, ...seeds.map((s) => fmt((bySeed[s] || {})[m]))]));
  }

  async function showDetail(i, id) {
    const d = await details(i);
    if (selected !== id) return; // another node was selected meanwhile
    const panel = document.getElementById("detail");
    const parts = [
      el("h2", {}, `#${C.id[i]} ${C.name[i]}`),
      el("p", {}, el("span", { class: `status-${C.status[i]}` }, C.status[i]),
        ` · score ${C.score[i] === null ? "–" : fmt(C.score[i])} · ${C.operator[i] || "seed"}`,
        C.parents[i].length ? el("span", {}, " · parents ", ...C.parents[i].flatMap((p, k) => (k ? [" ", nodeLink(p)] : [nodeLink(p)]))) : null,
        ` · island ${C.island[i]} · run ${C.run[i] || "–"} step ${C.step[i] ?? "–"}`),
    ];
    if (d.reason) parts.push(el("p", { class: "status-failed" }, d.reason));
    parts.push(el("h3", {}, "Candidate"));
    for (const note of d.candidate.notices) parts.push(el("p", { class: "note" }, note));
    if (d.candidate.changed.length) parts.push(table(["changed", "parent", "this node"], d.candidate.changed));
    parts.push(codeBlock(d.candidate.text, d.candidate.kind));
    parts.push(el("h3", {}, "Motivation"), el("p", {}, d.motivation || "–"));
    parts.push(el("h3", {}, "Metrics"));
    stages.forEach((s, k) => {
      const bySeed = k === 0 ? (d.metrics || {})[s.name] : ((d.stages || {})[k] || {}).metrics;
      const st = k === 0 ? C.status[i] : (d.stages[k] || {}).status;
      if (k > 0 && !st) return;
      parts.push(el("div", { class: "muted" }, `stage ${k} ${s.name}: ${st}${k > 0 && d.stages[k].seconds ? `, ${seconds(d.stages[k].seconds)}` : ""}` +
        ` · vs baseline ${vsText(C[`s${k}_vs`][i])}`), metricsTable(bySeed));
    });
    parts.push(el("h3", {}, "Analysis"), el("p", {}, d.analysis || "–"));
    parts.push(el("h3", {}, "Lessons"));
    parts.push(d.used.length ? el("div", {}, el("div", { class: "muted" }, "used in its design:"),
      el("ul", {}, d.used.map(([id, title]) => el("li", {}, title, el("span", { class: "muted" }, ` (${id})`))))) : el("p", { class: "muted" }, "none used"));
    parts.push(d.produced.length ? el("div", {}, el("div", { class: "muted" }, "drawn from it:"),
      el("ul", {}, d.produced.map(([id, title]) => el("li", {}, title || id)))) : el("p", { class: "muted" }, "none drawn from it"));
    const t = d.timings || {};
    parts.push(el("h3", {}, "Cost"), el("p", {}, `design ${seconds(t.design)} · evaluation ${seconds(t.evaluate)}` +
      (d.repairs ? ` · ${d.repairs} repair(s)` : "") +
      (d.llm && d.llm.calls ? ` · ${d.llm.calls} LLM call(s), ${d.llm.prompt_tokens || 0} prompt / ${d.llm.output_tokens || 0} output tokens, $${(d.llm.usd || 0).toFixed(4)}` : "")));
    panel.replaceChildren(...parts);
  }

  // ---------------------------------------------------------------- start

  const steps = { header, fitnessPlots, leaderboard, lineage, correlations, knowledge, costs };
  const ready = Object.entries(steps).map(([name, step]) => {
    const result = step();
    phases[`${name}_ms`] = performance.now();
    return result;
  });
  // Ready once every plot's view exists and two frames have been painted after it.
  const painted = () => new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
  Promise.all(ready).then(() => { phases.views_ms = performance.now(); }).then(painted).then(() => {
    window.reportPhases = phases;
    restoreView();
    const m = /^#node=(\d+)$/.exec(location.hash);
    if (m) select(Number(m[1]));
    window.reportRenderedMs = performance.now();
    document.body.dataset.ready = "1";
    // Live: read the file again in a while (counted from when this one was shown).
    if (D.live) setTimeout(() => location.reload(), (D.reload_seconds || 10) * 1000);
  });
})();
