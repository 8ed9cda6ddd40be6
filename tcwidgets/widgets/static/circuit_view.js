// CircuitView front-end (a plain ES module for anywidget; no build step, no network).
//
// Python owns the graph. The synced trait `_graph` holds the drawing payload: node fields as
// columns (id, kind, layer, position, level, label, attribution, expanded, expandable) and edges
// as index arrays (source, target, weight), plus `scores` and `pruning` (null when unknown). `threshold`, `selected`, `pinned`, `error` are synced
// too; the page changes them only through messages that Python validates:
//   page -> Python  {type: "select", id} | {type: "pin", id, pinned} | {type: "threshold", value}
//   page -> Python  {type: "expand", request, id}    Python -> page {type: "expanded", request, added}
//   page -> Python  {type: "summary", request, id}   Python -> page {type: "summary", request, id, summary}
// Edges are drawn on a canvas (tens of thousands stay fast), nodes are SVG circles (native hover
// and click). Every string from a tokenizer is inserted as text: `h` appends Text nodes, and
// nothing here assigns innerHTML.

const MARGIN = { left: 72, right: 16, top: 14, bottom: 8 };
const MAX_RADIUS = 11;
const MIN_RADIUS = 2.5;
const MIN_COLUMN = 30;  // px: a token's column when it holds at most one node per row
const NODE_STEP = 2 * MAX_RADIUS + 2;  // px between the centres of a cell's nodes, side by side
const MIN_NODE_STEP = 10;  // px: how close they may be squeezed so that the prompt fits the width
const EMPTY_COLUMN = 18;  // px: a token's column without nodes (room for one upright line of text)
const KIND_NAMES = { logit: "logit", latent: "transcoder latent", head: "attention head", skip: "skip path",
  embedding: "token embedding", position: "position embedding", error: "transcoder error",
  mlp: "MLP (no transcoder)", bias: "bias" };

/** Make invisible characters, spaces too, visible; the text stays text. */
const dotted = (token) => shown(String(token).replace(/ /g, "·"));
/** Slider position (0..1000) <-> threshold (0..1): quadratic, so small thresholds get most of the range. */
const toThreshold = (v) => (v / 1000) ** 2;
const toSlider = (t) => Math.round(1000 * Math.sqrt(Math.max(0, Math.min(1, t))));

function levelName(level, nLayers) {
  if (level === 0) return "embed";
  if (level > 2 * nLayers) return "logit";
  const layer = Math.floor((level - 1) / 2);
  return level % 2 === 1 ? `L${layer} attn` : `L${layer} MLP`;
}

/** Everything derived from one graph payload that does not depend on the threshold or the size. */
function prepare(g) {
  const n = g.nodes.id.length, m = g.edges.source.length;
  const absWeight = Float64Array.from(g.edges.weight, (w) => Math.abs(w));
  const incoming = Array.from({ length: n }, () => []);
  for (let e = 0; e < m; e++) incoming[g.edges.target[e]].push(e);
  const order = Array.from({ length: m }, (_, e) => e).sort((a, b) => absWeight[a] - absWeight[b]);
  const levels = [...new Set(g.nodes.level)].sort((a, b) => a - b);
  const row = new Map(levels.map((level, i) => [level, i]));
  const index = new Map(g.nodes.id.map((id, i) => [id, i]));
  let maxWeight = 0, maxAttribution = 0;
  for (const w of absWeight) maxWeight = Math.max(maxWeight, w);
  for (const a of g.nodes.attribution) maxAttribution = Math.max(maxAttribution, Math.abs(a || 0));
  // nodes sharing a (level, position) cell, strongest first
  const cells = new Map();
  for (let i = 0; i < n; i++) {
    const key = `${g.nodes.level[i]}:${g.nodes.position[i]}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(i);
  }
  const slot = new Int32Array(n), cellSize = new Int32Array(n);
  const busiest = new Int32Array(g.tokens.length);  // the most nodes a cell of each position holds
  for (const members of cells.values()) {
    members.sort((a, b) => Math.abs(g.nodes.attribution[b] || 0) - Math.abs(g.nodes.attribution[a] || 0));
    members.forEach((i, k) => { slot[i] = k; cellSize[i] = members.length; });
    const position = g.nodes.position[members[0]];
    busiest[position] = Math.max(busiest[position], members.length);
  }
  return { g, n, m, absWeight, incoming, order, levels, row, index, maxWeight: maxWeight || 1,
    maxAttribution: maxAttribution || 1, slot, cellSize, busiest };
}

/** Pixel positions for a given plot width. Each token's column is as wide as its busiest cell needs
 * (nodes side by side, as circuit-tracer's frontend spreads them), at least MIN_COLUMN; the columns
 * then share the width available. */
function layout(p, width) {
  const room = width - MARGIN.left - MARGIN.right;
  const sum = (values) => values.reduce((a, b) => a + b, 0);
  const wantedAt = (step) => Array.from(p.busiest, (k) => k ? Math.max(MIN_COLUMN, k * step + 6) : EMPTY_COLUMN);
  let wanted = wantedAt(NODE_STEP);
  if (sum(wanted) > room) {  // squeeze the busy cells' nodes (to MIN_NODE_STEP at most) before scrolling sideways
    const tight = wantedAt(MIN_NODE_STEP), slack = sum(wanted) - sum(tight);
    const squeeze = slack > 0 ? Math.min(1, (sum(wanted) - room) / slack) : 0;
    wanted = wanted.map((w, position) => w - squeeze * (w - tight[position]));
  }
  const total = sum(wanted) || 1;
  const spread = Math.max(1, room / total);
  const columns = wanted.map((w) => w * spread);
  const left = [];
  columns.reduce((start, w, position) => { left[position] = start; return start + w; }, MARGIN.left);
  const colWidth = Math.min(...columns, Infinity);
  const rowGap = Math.max(16, Math.min(40, 560 / Math.max(p.levels.length, 1)));
  const plotWidth = MARGIN.left + MARGIN.right + columns.reduce((a, b) => a + b, 0);
  const plotHeight = MARGIN.top + MARGIN.bottom + rowGap * Math.max(p.levels.length - 1, 0) + 2 * MAX_RADIUS;
  const x = new Float64Array(p.n), y = new Float64Array(p.n), r = new Float64Array(p.n);
  for (let i = 0; i < p.n; i++) {
    const k = p.cellSize[i], position = p.g.nodes.position[i];
    const step = Math.min((columns[position] - 6) / k, NODE_STEP);
    x[i] = left[position] + columns[position] / 2 + (p.slot[i] - (k - 1) / 2) * step;
    y[i] = plotHeight - MARGIN.bottom - MAX_RADIUS - rowGap * p.row.get(p.g.nodes.level[i]);
    const share = Math.abs(p.g.nodes.attribution[i] || 0) / p.maxAttribution;
    r[i] = i === p.g.target ? MAX_RADIUS : MIN_RADIUS + (MAX_RADIUS - MIN_RADIUS) * Math.sqrt(share);
  }
  return { colWidth, columns, left, rowGap, plotWidth, plotHeight, x, y, r };
}

/** Which edges pass the threshold and still reach the target (or a pinned / the selected node). */
function visibility(p, threshold, keep) {
  const cut = threshold * p.maxWeight;
  const nodes = new Uint8Array(p.n), edges = new Uint8Array(p.m);
  const queue = [p.g.target, ...keep.filter((i) => i !== undefined)];
  for (const i of queue) nodes[i] = 1;
  while (queue.length) {
    const t = queue.pop();
    for (const e of p.incoming[t]) {
      if (p.absWeight[e] < cut) continue;
      edges[e] = 1;
      const s = p.g.edges.source[e];
      if (!nodes[s]) { nodes[s] = 1; queue.push(s); }
    }
  }
  return { nodes, edges };
}

function render({ model, el }) {
  const view = Math.random().toString(36).slice(2);
  let request = 0, latestExpand = null, sendTimer = null;
  let prepared = null, placed = null, shownSets = null, hovered = -1, scrolled = false;
  let threshold = model.get("threshold");
  const summaries = new Map(), pending = new Set();

  const slider = h("input", { class: "tcw-cv-threshold", type: "range", min: 0, max: 1000, step: 1,
    "aria-label": "edge threshold", oninput: () => setThreshold(toThreshold(Number(slider.value)), true) });
  const thresholdLabel = h("span", { class: "tcw-cv-threshold-label" });
  const counts = h("span", { class: "tcw-cv-counts" });
  const scoresLine = h("div", { class: "tcw-cv-scores tcw-cv-muted" });
  const expandButton = h("button", { class: "tcw-cv-expand", title: "add the selected node's largest predecessors (e)",
    onclick: () => expandSelected() }, "Expand");
  const pinButton = h("button", { class: "tcw-cv-pin", title: "keep the selected node drawn (p)",
    onclick: () => pinSelected() }, "Pin");
  const banner = h("div", { class: "tcw-error", role: "alert", hidden: true });
  const canvas = h("canvas", { class: "tcw-cv-edges" });
  const nodesLayer = svg("svg", { class: "tcw-cv-nodes", role: "img" });
  const labels = h("div", { class: "tcw-cv-labels" });
  const tokensRow = h("div", { class: "tcw-cv-tokens" });
  const plot = h("div", { class: "tcw-cv-plot" }, canvas, nodesLayer, labels);
  const scroller = h("div", { class: "tcw-cv-scroll" }, plot, tokensRow);
  const tooltip = h("div", { class: "tcw-cv-tooltip", role: "tooltip", hidden: true });
  const details = h("div", { class: "tcw-cv-details" });
  const root = h("div", { class: "tcw-circuit", tabIndex: 0, "data-lm-suppress-shortcuts": "true" },
    h("div", { class: "tcw-bar" }, h("label", {}, "threshold ", slider), thresholdLabel, counts,
      h("span", { class: "tcw-cv-spacer" }), expandButton, pinButton),
    scoresLine, banner, scroller, tooltip, details);
  el.append(root);

  // -- drawing ------------------------------------------------------------------------------------------

  function build() {
    const start = performance.now();
    const g = model.get("_graph");
    if (!g || !g.nodes) return;
    prepared = prepare(g);
    showScores(g);
    const circles = [];
    for (let i = 0; i < prepared.n; i++) {
      const circle = svg("circle", { class: `tcw-cv-node tcw-cv-${g.nodes.kind[i]}` });
      circle.dataset.index = String(i);
      circle.dataset.id = g.nodes.id[i];
      circle.dataset.position = String(g.nodes.position[i]);
      circle.setAttribute("aria-label", g.nodes.label[i]);
      if (i === g.target) circle.classList.add("tcw-cv-target");
      if (g.nodes.expandable[i] && !g.nodes.expanded[i]) circle.classList.add("tcw-cv-open");
      circles.push(circle);
    }
    nodesLayer.replaceChildren(...circles);
    summaries.clear();
    pending.clear();
    scrolled = false;
    place();
    showSelection();
    root.dataset.ready = "1";
    root.dataset.totalNodes = String(prepared.n);
    root.dataset.totalEdges = String(prepared.m);
    root.dataset.renderMs = (performance.now() - start).toFixed(1);
    root.dataset.builtAt = String(Date.now());
  }

  /** circuit-tracer's scores of the prompt's full graph, and the pruning thresholds of a pruned graph. */
  function showScores(g) {
    const parts = [];
    if (g.scores) {
      parts.push(`replacement score ${fmt(g.scores.replacement)} · completeness score ${fmt(g.scores.completeness)}`);
    }
    if (g.pruning) {
      parts.push(`pruned to ${fmt(100 * g.pruning.node_threshold)}% of the node influence, ` +
        `${fmt(100 * g.pruning.edge_threshold)}% of the edge influence`);
    }
    scoresLine.textContent = parts.join(" · ");
    scoresLine.hidden = !parts.length;
    scoresLine.title = "replacement: share of the target's influence that starts at tokens rather than at " +
      "error nodes; completeness: share of each node's input not from error nodes, weighted by influence " +
      "(circuit-tracer's definitions, over every active latent of the prompt)";
  }

  /** Positions for the current width; token and layer labels. */
  function place() {
    if (!prepared) return;
    const width = Math.max(scroller.clientWidth || 0, 480);
    placed = layout(prepared, width);
    const { plotWidth, plotHeight, x, y, r } = placed;
    plot.style.width = `${plotWidth}px`;
    plot.style.height = `${plotHeight}px`;
    if (!scrolled && scroller.clientWidth > 0) {  // long prompts: start at the target, once laid out
      scrolled = true;
      const targetX = x[prepared.g.target];
      if (targetX > scroller.clientWidth - MARGIN.right) scroller.scrollLeft = targetX - scroller.clientWidth / 2;
    }
    nodesLayer.setAttribute("width", plotWidth);
    nodesLayer.setAttribute("height", plotHeight);
    nodesLayer.setAttribute("viewBox", `0 0 ${plotWidth} ${plotHeight}`);
    const circles = nodesLayer.children;
    for (let i = 0; i < prepared.n; i++) {
      circles[i].setAttribute("cx", x[i].toFixed(1));
      circles[i].setAttribute("cy", y[i].toFixed(1));
      circles[i].setAttribute("r", r[i].toFixed(1));
    }
    const nLayers = prepared.g.n_layers;
    labels.replaceChildren(...prepared.levels.map((level) => h("div", { class: "tcw-cv-level",
      style: `top:${(plotHeight - MARGIN.bottom - MAX_RADIUS - placed.rowGap * prepared.row.get(level)).toFixed(1)}px` },
    levelName(level, nLayers))));
    tokensRow.style.width = `${plotWidth}px`;
    tokensRow.classList.remove("tcw-cv-tilted");
    tokensRow.style.height = "";
    const tokenLabels = prepared.g.tokens.map((token, position) => h("span", {
      class: "tcw-cv-token", title: `position ${position}: ${JSON.stringify(token)}`,
      style: `left:${(placed.left[position] + placed.columns[position] / 2).toFixed(1)}px` }, dotted(token)));
    tokensRow.replaceChildren(...tokenLabels);
    // a label wider than its column would overlap its neighbours: then every label turns to read
    // upwards, one line of text per column (columns are at least EMPTY_COLUMN wide), none cut short
    const tilt = tokenLabels.some((label, position) => label.offsetWidth > placed.columns[position] - 2);
    tokensRow.classList.toggle("tcw-cv-tilted", tilt);
    if (tilt) tokensRow.style.height = `${Math.max(...tokenLabels.map((label) => label.offsetHeight)) + 6}px`;
    draw();
  }

  /** Apply the threshold, pins and selection; redraw the edges. */
  function draw() {
    if (!prepared || !placed) return;
    const start = performance.now();
    const g = prepared.g;
    const selected = prepared.index.get(model.get("selected"));
    const pinned = model.get("pinned").map((id) => prepared.index.get(id));
    shownSets = visibility(prepared, threshold, [...pinned, selected]);
    const circles = nodesLayer.children;
    let visibleNodes = 0;
    for (let i = 0; i < prepared.n; i++) {
      const on = shownSets.nodes[i] === 1;
      visibleNodes += on;
      circles[i].style.display = on ? "" : "none";
      circles[i].classList.toggle("tcw-cv-selected", i === selected);
      circles[i].classList.toggle("tcw-cv-pinned", pinned.includes(i));
    }
    const { plotWidth, plotHeight, x, y } = placed;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(plotWidth * ratio);
    canvas.height = Math.round(plotHeight * ratio);
    canvas.style.width = `${plotWidth}px`;
    canvas.style.height = `${plotHeight}px`;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, plotWidth, plotHeight);
    const style = getComputedStyle(root);
    const colours = { pos: style.getPropertyValue("--tcw-pos").trim() || "#1976d2",
      neg: style.getPropertyValue("--tcw-neg").trim() || "#d32f2f" };
    const focus = hovered >= 0 ? hovered : selected;
    let visibleEdges = 0;
    const highlighted = [];
    for (const e of prepared.order) {
      if (!shownSets.edges[e]) continue;
      visibleEdges++;
      const s = g.edges.source[e], t = g.edges.target[e];
      if (focus !== undefined && (s === focus || t === focus)) { highlighted.push(e); continue; }
      stroke(ctx, e, s, t, colours, focus !== undefined && focus >= 0 ? 0.35 : 1);
    }
    for (const e of highlighted) stroke(ctx, e, g.edges.source[e], g.edges.target[e], colours, 1, 1.5);
    const total = prepared.m;
    thresholdLabel.textContent = `edges ≥ ${fmt(100 * threshold)}% of the strongest`;
    counts.textContent = `${visibleNodes} of ${prepared.n} nodes, ${visibleEdges} of ${total} edges`;
    root.dataset.visibleNodes = String(visibleNodes);
    root.dataset.visibleEdges = String(visibleEdges);
    root.dataset.threshold = String(threshold);
    root.dataset.selected = model.get("selected");
    slider.value = String(toSlider(threshold));
    updateButtons(selected);
    root.dataset.drawMs = (performance.now() - start).toFixed(1);

    function stroke(context, e, s, t, palette, fade, boost = 1) {
      const share = prepared.absWeight[e] / prepared.maxWeight;
      context.globalAlpha = Math.min(1, (0.15 + 0.75 * Math.sqrt(share)) * fade * boost);
      context.lineWidth = (0.5 + 3.5 * share) * boost;
      context.strokeStyle = g.edges.weight[e] >= 0 ? palette.pos : palette.neg;
      context.beginPath();
      context.moveTo(x[s], y[s]);
      const bend = (y[t] - y[s]) / 2;  // a gentle S-curve upwards
      context.bezierCurveTo(x[s], y[s] + bend, x[t], y[t] - bend, x[t], y[t]);
      context.stroke();
    }
  }

  // -- selection, pins, expansion ----------------------------------------------------------------------------

  function updateButtons(selected) {
    const g = prepared.g;
    const can = selected !== undefined && g.can_expand && g.nodes.expandable[selected];
    expandButton.disabled = !can || root.dataset.busy === "1";
    expandButton.title = !g.can_expand ? "this graph was read from JSON: it cannot be expanded"
      : "add the selected node's largest predecessors (e)";
    pinButton.disabled = selected === undefined;
    pinButton.textContent = selected !== undefined && model.get("pinned").includes(g.nodes.id[selected]) ? "Unpin" : "Pin";
  }

  function select(i) {
    model.send({ type: "select", id: i === undefined || i < 0 ? "" : prepared.g.nodes.id[i] });
  }

  function expandSelected() {
    const id = model.get("selected");
    if (!id || expandButton.disabled) return;
    latestExpand = `${view}:${++request}`;
    root.dataset.busy = "1";
    expandButton.disabled = true;
    model.send({ type: "expand", request: latestExpand, id });
  }

  function pinSelected() {
    const id = model.get("selected");
    if (id) model.send({ type: "pin", id, pinned: !model.get("pinned").includes(id) });
  }

  function setThreshold(value, fromSlider) {
    threshold = value;
    draw();
    if (fromSlider) {
      clearTimeout(sendTimer);
      sendTimer = setTimeout(() => model.send({ type: "threshold", value: threshold }), 120);
    }
  }

  // -- summaries (hover tooltip, details panel) ----------------------------------------------------------------

  function askSummary(i) {
    const id = prepared.g.nodes.id[i];
    if (summaries.has(id)) return summaries.get(id);
    if (!pending.has(id)) {
      pending.add(id);
      model.send({ type: "summary", request: `${view}:${++request}`, id });
    }
    return null;
  }

  function tokenList(title, pairs, cls) {
    if (!pairs || !pairs.length) return null;
    return h("div", { class: `tcw-cv-logits ${cls}` }, h("span", { class: "tcw-cv-muted" }, title),
      ...pairs.map(([token, value]) => h("span", { class: "tcw-cv-chip", title: JSON.stringify(token) },
        dotted(token), h("small", {}, ` ${fmt(value)}`))));
  }

  function snippet(example) {
    if (!example) return null;
    const max = Math.max(...example.acts.map(Math.abs), 1e-9);
    return h("div", { class: "tcw-cv-example" }, h("span", { class: "tcw-cv-muted" }, "top example "),
      ...example.tokens.map((token, i) => {
        const span = h("span", { class: "tcw-tok" + (i === example.center ? " tcw-center" : ""),
          title: `${JSON.stringify(token)}  ${fmt(example.acts[i])}` }, dotted(token));
        if (example.acts[i] > 0) span.style.setProperty("--a", Math.min(example.acts[i] / max, 1).toFixed(3));
        return span;
      }));
  }

  function edgeTable(title, rows) {
    if (!rows.length) return null;
    return h("table", { class: "tcw-cv-edges-table" }, h("caption", {}, title),
      h("thead", {}, h("tr", {}, h("th", {}, "node"), h("th", {}, "weight"), h("th", { title: "input-invariant factor" }, "invariant"),
        h("th", { title: "input-dependent factor (activation × frozen norm scales × attention)" }, "dependent"))),
      h("tbody", {}, rows.map(([label, weight, invariant, dependent]) => h("tr", {},
        h("td", {}, label), h("td", { class: "tcw-num" }, fmt(weight)), h("td", { class: "tcw-num" }, fmt(invariant)),
        h("td", { class: "tcw-num" }, fmt(dependent))))));
  }

  function facts(i, s) {
    const g = prepared.g;
    const kind = g.nodes.kind[i];
    const token = g.tokens[g.nodes.position[i]];
    return [
      h("div", { class: "tcw-cv-title" }, h("strong", {}, g.nodes.label[i]), " ",
        h("span", { class: "tcw-cv-muted" }, `${KIND_NAMES[kind] || kind} · position ${g.nodes.position[i]} `),
        h("span", { class: "tcw-tok", title: JSON.stringify(token) }, dotted(token))),
      h("div", { class: "tcw-cv-muted" }, `attribution to the target ${fmt(g.nodes.attribution[i])}` +
        (s && s.value !== null ? ` · value ${fmt(s.value)}` : "") +
        (s && s.activation !== null ? ` · activation ${fmt(s.activation)}` : "")),
    ];
  }

  function showTooltip(i, event) {
    const s = askSummary(i);
    fill(tooltip, facts(i, s), s && [tokenList("promotes", s.promoted, "tcw-cv-promoted"),
      tokenList("suppresses", s.suppressed, "tcw-cv-suppressed"), snippet(s.example)]);
    tooltip.dataset.id = prepared.g.nodes.id[i];
    tooltip.hidden = false;
    placeTooltip(event.clientX, event.clientY);
  }

  /** Next to the pointer, inside the widget's width and the browser's viewport (above or left of the
   * pointer when there is no room below or right of it). */
  function placeTooltip(clientX, clientY) {
    const box = root.getBoundingClientRect(), size = tooltip.getBoundingClientRect();
    const right = Math.min(box.right, window.innerWidth), bottom = window.innerHeight;
    let x = clientX + 14, y = clientY + 14;
    if (x + size.width > right) x = Math.max(clientX - 14 - size.width, Math.max(box.left, 0));
    if (x + size.width > right) x = Math.max(right - size.width, 0);
    if (y + size.height > bottom) y = Math.max(clientY - 14 - size.height, 0);
    tooltip.style.left = `${(x - box.left).toFixed(0)}px`;
    tooltip.style.top = `${(y - box.top).toFixed(0)}px`;
    tooltip.dataset.pointer = `${clientX},${clientY}`;
  }

  function showSelection() {
    draw();
    if (prepared) showDetails(prepared.index.get(model.get("selected")));
  }

  function showDetails(selected) {
    if (selected === undefined) {
      details.replaceChildren(h("p", { class: "tcw-cv-muted" },
        `Target ${prepared.g.nodes.label[prepared.g.target]} = ${fmt(prepared.g.value)}. Hover a node for its summary, ` +
        "click to select it; Expand adds its predecessors, Pin keeps it drawn."));
      return;
    }
    const s = askSummary(selected);
    fill(details, facts(selected, s), s && [tokenList("promotes", s.promoted, "tcw-cv-promoted"),
      tokenList("suppresses", s.suppressed, "tcw-cv-suppressed"), snippet(s.example),
      h("div", { class: "tcw-cv-pair" }, edgeTable("strongest inputs", s.incoming), edgeTable("feeds", s.outgoing))]);
  }

  /** Replace an element's children with the given parts, skipping empty ones. */
  function fill(target, ...parts) {
    target.replaceChildren(...parts.flat(2).filter((part) => part instanceof Node));
  }

  // -- events -----------------------------------------------------------------------------------------------------

  function indexOf(event) {
    const index = event.target && event.target.dataset ? event.target.dataset.index : undefined;
    return index === undefined ? -1 : Number(index);
  }

  nodesLayer.addEventListener("mouseover", (event) => {
    const i = indexOf(event);
    if (i < 0) return;
    hovered = i;
    showTooltip(i, event);
    draw();
  });
  nodesLayer.addEventListener("mouseout", (event) => {
    if (indexOf(event) < 0) return;
    hovered = -1;
    tooltip.hidden = true;
    draw();
  });
  nodesLayer.addEventListener("click", (event) => {
    const i = indexOf(event);
    select(i === prepared.index.get(model.get("selected")) ? -1 : i);
  });
  nodesLayer.addEventListener("dblclick", (event) => {
    if (indexOf(event) >= 0) expandSelected();
  });

  function onKey(event) {
    if (event.target instanceof HTMLInputElement || event.ctrlKey || event.metaKey || event.altKey) return;
    const action = { e: expandSelected, p: pinSelected, Escape: () => select(-1) }[event.key];
    if (!action) return;
    event.preventDefault();
    event.stopPropagation(); // keep JupyterLab's command-mode shortcuts from firing too
    action();
  }

  function onMessage(msg) {
    if (!msg || !prepared) return;
    if (msg.type === "summary") {
      summaries.set(msg.id, msg.summary);
      pending.delete(msg.id);
      const i = prepared.index.get(msg.id);
      if (!tooltip.hidden && tooltip.dataset.id === msg.id && i !== undefined) {
        const [clientX, clientY] = tooltip.dataset.pointer.split(",").map(Number);
        showTooltip(i, { clientX, clientY });  // the summary made it larger: place it again
      }
      if (msg.id === model.get("selected")) showDetails(i);
    } else if (msg.type === "expanded" && msg.request === latestExpand) {
      root.dataset.busy = "0";
      root.dataset.expanded = String(msg.added);
      updateButtons(prepared.index.get(model.get("selected")));
    }
  }

  function drawError() {
    const message = model.get("error");
    banner.textContent = message;
    banner.hidden = !message;
  }

  function onThreshold() {
    threshold = model.get("threshold");
    draw();
  }

  const resize = new ResizeObserver(() => place());
  resize.observe(scroller);
  root.addEventListener("keydown", onKey);
  model.on("change:_graph", build);
  model.on("change:threshold", onThreshold);
  model.on("change:selected", showSelection);
  model.on("change:pinned", draw);
  model.on("change:error", drawError);
  model.on("msg:custom", onMessage);
  build();
  drawError();
  return () => {
    resize.disconnect();
    clearTimeout(sendTimer);
    model.off("change:_graph", build);
    model.off("change:threshold", onThreshold);
    model.off("change:selected", showSelection);
    model.off("change:pinned", draw);
    model.off("change:error", drawError);
    model.off("msg:custom", onMessage);
  };
}

export default { render };
