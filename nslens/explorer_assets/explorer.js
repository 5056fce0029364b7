/* nslens run explorer: renders the run data embedded in #nslens-data. No libraries, nothing fetched. */
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("nslens-data").textContent);
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf"];
  const color = (k) => COLORS[k % COLORS.length];
  const NOT_COMPUTED = "Not computed in this run";

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") node.textContent = value;
      else if (key === "data") Object.assign(node.dataset, value);
      else node.setAttribute(key, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  function esc(text) {
    return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;");
  }

  function fmt(v, signed, digits) {
    const s = v.toFixed(digits);
    return signed && v >= 0 ? "+" + s : s;
  }

  function body(id) {
    return document.querySelector("#" + id + " .body");
  }

  function missing(node, text) {
    node.append(el("p", { class: "missing", text: text }));
  }

  /* ------------------------------------------------------------------ run facts */
  function runFacts() {
    const r = DATA.run;
    const facts = document.getElementById("run-facts");
    const site = r.site || {};
    const items = [
      ["model", r.model_id], ["site", "layer " + site.layer + " (" + site.path + ")"], ["dataset", r.dataset],
      ["samples", r.n_train + " train / " + r.n_test + " test"], ["ranking", r.method],
      ["fraction", r.fraction], ["neurons per concept", r.neurons_per_concept], ["tau", r.tau],
      ["positions", r.positions], ["basis", r.basis], ["status", r.status]];
    for (const [k, v] of items) {
      if (v !== null && v !== undefined) facts.append(el("span", { text: k + ": " + v }));
    }
    for (const [step, msg] of Object.entries(r.failed_steps)) {
      facts.append(el("div", { class: "failed", text: "step " + step + " failed: " + msg }));
    }
  }

  /* ------------------------------------------------------------------ sortable tables */
  function sortableTable(tab, id, digits) {
    const table = el("table", { id: id, class: "sortable" });
    const headRow = el("tr");
    ["concept", ...tab.columns].forEach((name, col) => {
      const th = el("th", { text: name, data: { col: String(col) } });
      th.addEventListener("click", () => sortBy(col));
      headRow.append(th);
    });
    table.append(el("thead", {}, headRow));
    const cell = (v, col) => {
      if (col === 0) return el("td", { text: v });
      const signed = col - 1 >= tab.signed_from;
      const cls = signed && v < 0 ? "neg" : signed && v > 0 ? "pos" : "";
      return el("td", { text: fmt(v, signed, digits), class: cls, data: { value: String(v) } });
    };
    const tbody = el("tbody");
    const rows = tab.rows.map((row, i) => {
      const tr = el("tr", { data: { index: String(i) } }, ...row.map(cell));
      tbody.append(tr);
      return { tr: tr, row: row, i: i };
    });
    table.append(tbody, el("tfoot", {}, el("tr", {}, ...tab.footer.map(cell))));
    const state = { col: null, dir: 1 };

    function sortBy(col) {
      state.dir = state.col === col ? -state.dir : 1;
      state.col = col;
      const cmp = (a, b) => {
        const x = a.row[col], y = b.row[col];
        const c = col === 0 ? String(x).localeCompare(String(y)) : x - y;
        return c * state.dir || a.i - b.i;
      };
      rows.slice().sort(cmp).forEach((r) => tbody.append(r.tr));
      headRow.querySelectorAll("th").forEach((th, c) => {
        th.classList.toggle("sorted-asc", c === col && state.dir === 1);
        th.classList.toggle("sorted-desc", c === col && state.dir === -1);
      });
    }
    return table;
  }

  function erasure() {
    const node = body("erasure");
    if (!DATA.erasure) return missing(node, NOT_COMPUTED + ": no erasure tables.");
    for (const tab of DATA.erasure) {
      const title = tab.steering ? "Steering run " + tab.name + " (" + tab.operator + ")"
        : "Operator " + tab.operator;
      node.append(el("h3", { text: title }), sortableTable(tab, "erasure-" + tab.name, 3));
    }
  }

  function sideEffects() {
    const node = body("side-effects");
    if (!DATA.side_effects) return missing(node, NOT_COMPUTED + ": no side effects were measured.");
    for (const tab of DATA.side_effects) {
      const clean = tab.clean.map(([t, k, v]) => t + " " + k + " = " + v.toFixed(4)).join(", ");
      node.append(el("h3", { text: "Operator " + tab.operator + (tab.name !== tab.operator ? " (" + tab.name + ")" : "") }),
        el("p", { class: "help", text: "Clean model: " + clean + "." }),
        sortableTable(tab, "side-effects-" + tab.name, 4));
    }
  }

  /* ------------------------------------------------------------------ neuron browser */
  const PLOT = { w: 660, h: 290, l: 56, r: 16, t: 14, b: 36 };

  function niceTicks(lo, hi, n) {
    const step = Math.pow(10, Math.floor(Math.log10((hi - lo) / n)));
    const mult = [1, 2, 5, 10].find((m) => (hi - lo) / (m * step) <= n) || 10;
    const s = mult * step, out = [];
    for (let v = Math.ceil(lo / s) * s; v <= hi + 1e-12; v += s) out.push(Math.abs(v) < s / 1e6 ? 0 : v);
    return out;
  }

  function densityPlot(c, i) {
    const mask = DATA.masks[c], j = mask.neurons[i];
    const d = DATA.densities.neurons[String(j)];
    const curves = d.y;
    const ymax = Math.max(...curves.filter((y) => y).map((y) => Math.max(...y)), 1e-12);
    const X = (v) => PLOT.l + (v - d.x0) / (d.x1 - d.x0) * (PLOT.w - PLOT.l - PLOT.r);
    const Y = (v) => PLOT.h - PLOT.b - v / ymax * (PLOT.h - PLOT.t - PLOT.b);
    const n = DATA.densities.grid, parts = [];
    const lo = mask.lo[i], hi = mask.hi[i];
    const x0 = X(Math.max(lo, d.x0)), x1 = X(Math.min(hi, d.x1));
    parts.push('<rect class="range-band" x="' + x0.toFixed(2) + '" y="' + PLOT.t + '" width="' +
      Math.max(x1 - x0, 1).toFixed(2) + '" height="' + (PLOT.h - PLOT.t - PLOT.b) + '" fill="' + color(c) +
      '" stroke="' + color(c) + '" data-lo="' + lo + '" data-hi="' + hi + '"></rect>');
    const xm = X(mask.mu[i]);
    parts.push('<line class="mu" x1="' + xm.toFixed(2) + '" x2="' + xm.toFixed(2) + '" y1="' + PLOT.t + '" y2="' +
      (PLOT.h - PLOT.b) + '" stroke="' + color(c) + '"></line>');
    curves.forEach((y, k) => {
      if (!y) return;
      const pts = y.map((v, g) => (g ? "L" : "M") + X(d.x0 + g * (d.x1 - d.x0) / (n - 1)).toFixed(2) + " " +
        Y(v).toFixed(2));
      parts.push('<path class="curve" d="' + pts.join(" ") + '" stroke="' + color(k) + '" data-concept="' +
        esc(DATA.masks[k].concept) + '"></path>');
    });
    const base = PLOT.h - PLOT.b;
    parts.push('<line class="axis" x1="' + PLOT.l + '" x2="' + (PLOT.w - PLOT.r) + '" y1="' + base + '" y2="' + base +
      '"></line><line class="axis" x1="' + PLOT.l + '" x2="' + PLOT.l + '" y1="' + PLOT.t + '" y2="' + base + '"></line>');
    for (const v of niceTicks(d.x0, d.x1, 6)) {
      parts.push('<text class="tick" text-anchor="middle" x="' + X(v).toFixed(2) + '" y="' + (base + 15) + '">' +
        Number(v.toPrecision(4)) + "</text>");
    }
    for (const v of niceTicks(0, ymax, 4)) {
      parts.push('<text class="tick" text-anchor="end" x="' + (PLOT.l - 5) + '" y="' + (Y(v) + 4).toFixed(2) + '">' +
        Number(v.toPrecision(3)) + "</text>");
    }
    parts.push('<text class="tick" text-anchor="middle" x="' + ((PLOT.w + PLOT.l) / 2) + '" y="' + (PLOT.h - 4) +
      '">activation of neuron ' + j + "</text>");
    parts.push('<text class="tick" text-anchor="middle" transform="translate(13 ' + ((PLOT.h - PLOT.b) / 2) +
      ') rotate(-90)">density</text>');
    document.getElementById("density-plot").innerHTML = '<svg id="density-svg" viewBox="0 0 ' + PLOT.w + " " +
      PLOT.h + '" width="' + PLOT.w + '" height="' + PLOT.h + '">' + parts.join("") + "</svg>";
    const legend = document.getElementById("density-legend");
    legend.replaceChildren(...DATA.masks.map((m, k) => el("span", {},
      el("i", { style: "background:" + color(k) }), m.concept + (curves[k] ? "" : " (no density)"))));
  }

  function selectNeuron(c, i) {
    const mask = DATA.masks[c], j = mask.neurons[i];
    document.querySelectorAll("#neuron-list li").forEach((li, k) => li.classList.toggle("selected", k === i));
    document.getElementById("neuron-title").replaceChildren("Neuron ",
      el("span", { id: "neuron-id", text: String(j) }), " of concept " + mask.concept +
      " (rank " + (i + 1) + " of " + mask.neurons.length + ")");
    const shared = DATA.masks.filter((m, k) => k !== c && m.neurons.includes(j)).map((m) => m.concept);
    const num = (id, v) => el("span", { id: id, text: v.toFixed(4), data: { value: String(v) } });
    document.getElementById("neuron-range").replaceChildren("range [lo, hi] = [", num("range-lo", mask.lo[i]),
      ", ", num("range-hi", mask.hi[i]), "], mu = " + mask.mu[i].toFixed(4) + ", sigma = " +
      mask.sigma[i].toFixed(4) + (shared.length ? "; also in the masks of " + shared.join(", ") : ""));
    densityPlot(c, i);
    boundSamples(c, i);
  }

  function selectConcept(c) {
    const list = document.getElementById("neuron-list");
    const mask = DATA.masks[c];
    list.replaceChildren(...mask.neurons.map((j, i) => {
      const li = el("li", { text: j + "  [" + mask.lo[i].toFixed(3) + ", " + mask.hi[i].toFixed(3) + "]",
        data: { neuron: String(j), index: String(i) } });
      li.addEventListener("click", () => selectNeuron(c, i));
      return li;
    }));
    selectNeuron(c, 0);
  }

  function neurons() {
    if (!DATA.masks.length) {
      document.querySelector("#neurons .browser").replaceChildren(
        el("p", { class: "missing", text: NOT_COMPUTED + ": the run has no masks." }));
      return;
    }
    document.getElementById("density-note").textContent = "Densities: " + DATA.densities.note +
      " Shaded band: the chosen concept's range [lo, hi]; dotted line: its mu.";
    const select = document.getElementById("concept-select");
    DATA.masks.forEach((m, c) => select.append(el("option", { value: String(c), text: m.concept })));
    select.addEventListener("change", () => selectConcept(Number(select.value)));
    selectConcept(0);
  }

  /* ------------------------------------------------------------------ overlap and bounds */
  function overlap() {
    const node = body("overlap");
    const o = DATA.overlap;
    if (!o) return missing(node, NOT_COMPUTED + ": the analyses (analysis.json) need the run's raw samples.");
    node.append(el("p", { class: "help", text: "Share of concept a's (row) top " + Math.round(o.fraction * 100) +
      " % salient neurons that are also salient for concept b (column). " + o.common_neurons.length +
      " neurons are salient for every concept" + (o.common_neurons.length ? ": " + o.common_neurons.join(", ") : "") +
      "." }));
    const table = el("table", { id: "overlap-matrix", class: "matrix" });
    table.append(el("thead", {}, el("tr", {}, el("th", { text: "a \\ b" }), ...o.names.map((n) => el("th", { text: n })))));
    const tbody = el("tbody");
    o.matrix.forEach((row, a) => tbody.append(el("tr", {}, el("td", { text: o.names[a] }), ...row.map((v) =>
      el("td", { text: v.toFixed(2), data: { value: String(v) },
        style: "background: rgba(32, 50, 74, " + (0.85 * v).toFixed(3) + "); color: " + (v > 0.5 ? "#fff" : "#000") })))));
    table.append(tbody);
    node.append(table);
    if (o.per_concept_mean) {
      node.append(el("p", { class: "help", text: "Mean distribution overlap (" + o.definition + ") of each " +
        "concept's masked neurons against the other concepts: " + Object.entries(o.per_concept_mean)
        .map(([k, v]) => k + " " + v.toFixed(3)).join(", ") + "." }));
    }
  }

  function boundSamples(c, i) {
    const node = body("bounds");
    if (!DATA.bounds || !DATA.masks.length) {
      node.replaceChildren(el("p", { class: "missing", text: "Not kept in this run: the run kept no raw samples " +
        "(or no training texts), so there are no texts at the bounds." }));
      return;
    }
    const mask = DATA.masks[c], j = mask.neurons[i];
    const near = DATA.bounds.per_concept[c][String(j)];
    const list = (rows, id) => el("ol", { class: "bounds-list", id: id }, ...rows.map(([t, act]) => el("li", {},
      el("span", { class: "act", text: fmt(act, true, 3) }), el("code", { text: DATA.bounds.texts[t] }))));
    node.replaceChildren(
      el("p", { class: "help", text: "Training texts of " + mask.concept + " whose activation of neuron " + j +
        " lies nearest the range's bounds (activation first)." }),
      el("h3", { text: "nearest lo = " + mask.lo[i].toFixed(4) }), list(near.lo, "bounds-lo"),
      el("h3", { text: "nearest hi = " + mask.hi[i].toFixed(4) }), list(near.hi, "bounds-hi"));
  }

  runFacts();
  erasure();
  sideEffects();
  overlap();
  neurons();
  if (!DATA.masks.length) boundSamples(0, 0);
})();
