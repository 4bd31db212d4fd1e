// The report page: builds every plot and table from the inlined payload (evolve_jax/report/data.py).
// Text from the history is only ever set as textContent, never parsed as HTML.
"use strict";
(async function () {
  // The payloads are gzipped JSON in base64 (page.py); the browser inflates them natively.
  async function unpack(id) {
    const response = await fetch(`data:application/gzip;base64,${document.getElementById(id).textContent}`);
    return JSON.parse(await new Response(response.body.pipeThrough(new DecompressionStream("gzip"))).text());
  }
  const phases = { scripts_run_ms: performance.now() }; // milliseconds since navigation
  const D = await unpack("report-data");
  phases.unpacked_ms = performance.now();
  let detailsPromise = null; // the per-node details, inflated on the first selection
  const details = () => detailsPromise || (detailsPromise = unpack("report-details"));
  const C = D.nodes || { id: [] };
  const N = C.id.length;
  const stages = D.stages || [];
  const rowOf = new Map(C.id.map((id, i) => [id, i]));
  const GL_ABOVE = 1500; // WebGL markers above this many points; SVG below (crisper, lighter)
  const plotted = []; // [div, highlight trace index, (i) -> [x, y] or null]
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
  const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "–");
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
  const PLOT_CONFIG = { displaylogo: false, responsive: true };

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
      const okX = [], okY = [], okIds = [], okText = [], badX = [], badIds = [], badText = [];
      const bestX = [], bestY = [];
      let best = null;
      const xOf = new Map();
      order.forEach((i, k) => {
        xOf.set(i, k + 1);
        if (mean[i] !== null) {
          okX.push(k + 1); okY.push(mean[i]); okIds.push(C.id[i]); okText.push(label(i));
          if (best === null || better(mean[i], best, stage.metric_direction)) best = mean[i];
        } else {
          badX.push(k + 1); badIds.push(C.id[i]);
          badText.push(`${label(i)}: ${C[`s${s}_status`][i]}${C.reason[i] && s === 0 ? ` (${C.reason[i]})` : ""}`);
        }
        if (best !== null) { bestX.push(k + 1); bestY.push(best); }
      });
      const type = order.length > GL_ABOVE ? "scattergl" : "scatter";
      const traces = [
        { type, mode: "markers", name: "node", x: okX, y: okY, customdata: okIds, text: okText,
          hovertemplate: "%{text}<br>%{y}<extra></extra>", marker: { size: 6, color: "#5b7fd6", opacity: 0.75 } },
        { type: "scatter", mode: "lines", name: "best so far", x: bestX, y: bestY,
          line: { shape: "hv", color: "#1a7f37", width: 2 }, hoverinfo: "skip" },
        { type, mode: "markers", name: "failed", x: badX, y: badX.map(() => 0), yaxis: "y2",
          customdata: badIds, text: badText, hovertemplate: "%{text}<extra></extra>",
          marker: { symbol: "x", size: 7, color: "#c4321d" } },
      ];
      const layout = {
        title: { text: title, font: { size: 13 } }, margin: { l: 60, r: 10, t: 36, b: 40 },
        xaxis: { title: { text: s === 0 ? "evaluation (node order)" : `evaluation at stage ${s}` }, dtick: order.length <= 20 ? 1 : undefined },
        yaxis: { domain: [0.14, 1], title: { text: stage.metric } },
        yaxis2: { domain: [0, 0.08], showticklabels: false, title: { text: "failed", font: { size: 10 } }, range: [-1, 1] },
        legend: { orientation: "h", y: 1.12, x: 1, xanchor: "right" }, hovermode: "closest",
      };
      plots.push(Plotly.newPlot(div, traces, layout, PLOT_CONFIG).then(() => {
        div.on("plotly_click", (e) => e.points[0] && e.points[0].customdata !== undefined && select(e.points[0].customdata));
        plotted.push([div, (i) => (xOf.has(i) && mean[i] !== null ? [xOf.get(i), mean[i]] : null)]);
      }));
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
    const apply = () => {
      const q = input.value.trim().toLowerCase();
      boardRows = q ? all.filter((_, k) => search[k].includes(q)) : all;
      boardPage = 0;
      drawBoard();
    };
    input.addEventListener("input", apply);
    apply();
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
    const ex = [], ey = [], cx = [], cy = [];
    C.parents.forEach((parents, i) => {
      parents.forEach((p, k) => {
        const j = rowOf.get(p);
        if (j === undefined) return;
        if (k === 0) ex.push(C.id[j], C.id[j], C.id[i], null), ey.push(row[j], row[i], row[i], null);
        else cx.push(C.id[j], C.id[i], null), cy.push(row[j], row[i], null);
      });
    });
    const ok = [], bad = [];
    C.id.forEach((_, i) => (C.status[i] === "ok" ? ok : bad).push(i));
    const type = N > GL_ABOVE ? "scattergl" : "scatter";
    const pick = (ids, f) => ids.map(f);
    const traces = [
      { type, mode: "lines", name: "parent → child", x: ex, y: ey, hoverinfo: "skip", line: { color: "#aab3c5", width: 1 } },
      { type, mode: "lines", name: "second parent", x: cx, y: cy, hoverinfo: "skip", line: { color: "#d0a84f", width: 1, dash: "dot" } },
      { type, mode: "markers", name: "ok", x: pick(ok, (i) => C.id[i]), y: pick(ok, (i) => row[i]),
        customdata: pick(ok, (i) => C.id[i]), text: pick(ok, (i) => `${label(i)}<br>score ${fmt(C.score[i])}${C.operator[i] ? `<br>${C.operator[i]}` : ""}`),
        hovertemplate: "%{text}<extra></extra>",
        marker: { size: 8, color: pick(ok, (i) => C.score[i]), colorscale: "Viridis", reversescale: D.direction === "min",
          showscale: ok.length > 0, colorbar: { title: { text: "score" }, thickness: 10 } } },
      { type, mode: "markers", name: "failed", x: pick(bad, (i) => C.id[i]), y: pick(bad, (i) => row[i]),
        customdata: pick(bad, (i) => C.id[i]), text: pick(bad, (i) => `${label(i)}<br>${C.status[i]}: ${C.reason[i] || ""}`),
        hovertemplate: "%{text}<extra></extra>", marker: { symbol: "x", size: 8, color: "#c4321d" } },
    ];
    const layout = {
      margin: { l: 20, r: 10, t: 10, b: 40 }, hovermode: "closest",
      xaxis: { title: { text: "node id (evaluation order)" }, dtick: N <= 20 ? 1 : undefined },
      yaxis: { autorange: "reversed", showticklabels: false, zeroline: false, title: { text: "lineage (depth-first)" } },
      legend: { orientation: "h", y: 1.04, x: 1, xanchor: "right" },
    };
    return Plotly.newPlot(div, traces, layout, PLOT_CONFIG).then(() => {
      div.on("plotly_click", (e) => e.points[0] && e.points[0].customdata !== undefined && select(e.points[0].customdata));
      plotted.push([div, (i) => [C.id[i], row[i]]]);
    });
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
      const trace = { type: "scatter", mode: "markers", x: c.points.map((p) => p[1]), y: c.points.map((p) => p[2]),
        customdata: c.points.map((p) => p[0]), text: c.points.map((p) => label(rowOf.get(p[0]))),
        hovertemplate: "%{text}<br>%{x} → %{y}<extra></extra>", marker: { size: 9, color: "#5b7fd6" } };
      const rho = c.spearman === null ? "undefined" : fmt(c.spearman, 3);
      const ci = c.ci95[0] === null ? "no CI" : `95% CI [${fmt(c.ci95[0], 2)}, ${fmt(c.ci95[1], 2)}]`;
      const layout = { title: { text: `ρ = ${rho} (${ci}), n = ${c.n}`, font: { size: 13 } },
        margin: { l: 60, r: 10, t: 36, b: 44 }, hovermode: "closest",
        xaxis: { title: { text: `stage 0 ${cheap.metric}` } }, yaxis: { title: { text: `stage ${c.stage} ${costly.metric}` } } };
      return Plotly.newPlot(div, [trace], layout, PLOT_CONFIG).then(() =>
        div.on("plotly_click", (e) => e.points[0] && select(e.points[0].customdata)));
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
    for (const [div, at] of plotted) {
      // A layout shape, not a trace: Plotly redraws only its shapes, not 10,000 points.
      const xy = at(i);
      Plotly.relayout(div, { shapes: xy ? [ring(xy[0], xy[1])] : [] });
    }
    document.querySelectorAll("#board tr.row").forEach((tr) => tr.classList.toggle("selected", Number(tr.dataset.id) === selected));
  }

  function ring(x, y) {
    return { type: "circle", xref: "x", yref: "y", xsizemode: "pixel", ysizemode: "pixel", xanchor: x, yanchor: y,
      x0: -8, x1: 8, y0: -8, y1: 8, line: { color: "#111", width: 2 } };
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
    const d = (await details())[i];
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
  Promise.all(ready).then(() => {
    window.reportPhases = phases;
    const m = /^#node=(\d+)$/.exec(location.hash);
    if (m) select(Number(m[1]));
    window.reportRenderedMs = performance.now();
    document.body.dataset.ready = "1";
  });
  if (D.live) setTimeout(() => location.reload(), (D.reload_seconds || 10) * 1000);
})();
