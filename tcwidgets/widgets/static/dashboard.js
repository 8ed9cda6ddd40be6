// FeatureDashboard front-end (a plain ES module for anywidget; no build step, no network).
//
// Python owns the data. The synced trait `_latent` holds the current latent's payload; `feature`
// and `error` are synced too. The latent list and the token search are custom messages:
//   page -> Python  {type: "select", feature}                 ask to show a latent
//   page -> Python  {type: "list", request, query, sort, descending, offset}
//   Python -> page  {type: "list", request, rows, total, offset, limit, query}
// Every string that came from a tokenizer or a corpus is inserted as text (`h` in common.js appends
// strings as Text nodes, and nothing here assigns innerHTML).

const SORTS = [["density", "density"], ["max", "max activation"], ["mean_active", "mean activation"], ["index", "number"]];

const percent = (d) => `${Number((100 * d).toPrecision(3))}%`;

/** One example: tokens shaded by activation relative to the latent's maximum. */
function example(ex, max) {
  const line = h("div", { class: "tcw-tokens" });
  ex.tokens.forEach((token, i) => {
    const act = ex.acts[i];
    const span = h("span", {
      class: "tcw-tok" + (i === ex.center ? " tcw-center" : ""),
      title: `${JSON.stringify(token)}  ${fmt(act)}` + (i === ex.center ? "  (example token)" : ""),
      dataset: { act: String(act) },
    }, shown(token));
    if (act > 0) {
      span.classList.add("tcw-on");
      span.style.setProperty("--a", Math.min(act / (max || 1), 1).toFixed(3));
    }
    line.append(span);
  });
  return h("div", { class: "tcw-example" }, h("span", { class: "tcw-value" }, fmt(ex.value)), line);
}

function histogram(hist, count) {
  const width = 300, height = 72;
  const { counts } = hist;
  const box = svg("svg", { class: "tcw-hist", viewBox: `0 0 ${width} ${height + 14}`, role: "img" });
  box.append(svg("title", {}, `Histogram of the ${count} firing activations`));
  const top = Math.max(...counts, 1);
  counts.forEach((c, i) => {
    const barHeight = (height * c) / top;
    const bar = svg("rect", { x: (i * width) / counts.length, y: height - barHeight,
      width: Math.max(width / counts.length - 1, 1), height: barHeight });
    bar.append(svg("title", {}, `${fmt(i * hist.width)}–${fmt((i + 1) * hist.width)}: ${c}`));
    box.append(bar);
  });
  box.append(svg("text", { x: 0, y: height + 12 }, "0"),
    svg("text", { x: width, y: height + 12, "text-anchor": "end" }, fmt(counts.length * hist.width)));
  return box;
}

function tokenTable(title, pairs, cls) {
  return h("table", { class: `tcw-table ${cls}` },
    h("caption", {}, title),
    h("tbody", {}, pairs.map(([token, value]) =>
      h("tr", {}, h("td", { class: "tcw-tok-cell", title: JSON.stringify(token) }, label(token)),
        h("td", { class: "tcw-num" }, fmt(value))))));
}

/** The latent's interpretability: its explanation and how well it predicts held-out firing. */
function scoreView(s) {
  return h("section", { class: "tcw-score" },
    h("span", { class: "tcw-score-label",
      title: "detection score: balanced accuracy of predicting, from the explanation alone, which held-out contexts make it fire (0.5: chance, 1: perfect)" },
    "detection score"),
    h("span", { class: "tcw-score-value" }, fmt(s.score)),
    h("span", { class: "tcw-score-parts" },
      `recall ${fmt(s.recall)} of ${s.n_activating} firing, specificity ${fmt(s.specificity)} of ${s.n_non_activating} not`),
    h("span", { class: "tcw-explanation", title: s.explanation }, s.explanation));
}

function latentView(p) {
  const facts = h("div", { class: "tcw-facts" },
    h("section", { class: "tcw-summary" },
      h("h4", {}, "Activations"),
      h("dl", {},
        h("dt", {}, "density"), h("dd", {}, `${percent(p.density)} (${p.count} of ${p.n_tokens} tokens)`),
        h("dt", {}, "mean when firing"), h("dd", {}, fmt(p.mean)),
        h("dt", {}, "max"), h("dd", {}, fmt(p.max))),
      p.count > 0 ? histogram(p.histogram, p.count) : null),
    h("section", { class: "tcw-logits" }, h("h4", {}, "Logit effects"),
      h("div", { class: "tcw-pair" }, tokenTable("promoted", p.promoted, "tcw-promoted"),
        tokenTable("suppressed", p.suppressed, "tcw-suppressed"))),
    p.embedding ? h("section", { class: "tcw-embedding" }, h("h4", {}, "Embedding"),
      tokenTable("tokens that excite it", p.embedding, "tcw-embed")) : null);
  const score = p.score ? scoreView(p.score) : null;
  if (p.count === 0) {
    return h("div", {}, score, facts,
      h("p", { class: "tcw-dead" }, `This latent never fired on the ${p.n_tokens} analysed tokens.`));
  }
  const groups = p.quantiles.filter((g) => g.examples.length).reverse().map((g) =>
    h("section", { class: "tcw-group" },
      h("h5", {}, `quantile ${Math.round(100 * g.low)}–${Math.round(100 * g.high)}%: activations ${fmt(g.min)}–${fmt(g.max)}`),
      g.examples.slice().reverse().map((ex) => example(ex, p.max))));
  return h("div", {}, score, facts,
    h("section", { class: "tcw-top" }, h("h4", {}, "Top activations"), p.top.map((ex) => example(ex, p.max))),
    h("section", { class: "tcw-quantiles" },
      h("h4", {}, `Across the distribution (sample of ${p.sample_size} firing tokens)`), groups));
}

function render({ model, el }) {
  const view = Math.random().toString(36).slice(2);
  let request = 0, latest = null, offset = 0, limit = 0, searchTimer = null;

  const number = h("input", { class: "tcw-number", type: "number", min: 0, "aria-label": "latent number",
    onchange: () => select(Number(number.value)),
    onkeydown: (event) => { if (event.key === "Enter") select(Number(number.value)); } });
  const prev = h("button", { class: "tcw-prev", title: "previous latent (← or k)", onclick: () => step(-1) }, "◀");
  const next = h("button", { class: "tcw-next", title: "next latent (→ or j)", onclick: () => step(1) }, "▶");
  const total = h("span", { class: "tcw-total" });
  const search = h("input", { class: "tcw-search", type: "search", placeholder: "search tokens…",
    "aria-label": "search tokens", oninput: () => { clearTimeout(searchTimer); searchTimer = setTimeout(() => ask(0), 250); } });
  const sort = h("select", { class: "tcw-sort", "aria-label": "sort latents by", onchange: () => ask(0) },
    SORTS.map(([value, label]) => h("option", { value }, label)));
  const order = h("button", { class: "tcw-order", title: "sort order", onclick: () => {
    order.dataset.descending = order.dataset.descending === "true" ? "false" : "true";
    order.textContent = order.dataset.descending === "true" ? "↓" : "↑";
    ask(0);
  } }, "↓");
  order.dataset.descending = "true";
  const listTitle = h("div", { class: "tcw-list-title" });
  const lastColumn = h("span", { class: "tcw-num" }, "max");
  const columns = h("div", { class: "tcw-columns", "aria-hidden": "true" },
    h("span", {}, "latent"), h("span", { class: "tcw-num", title: "share of tokens it fires on" }, "density"), lastColumn);
  const list = h("ol", { class: "tcw-list" });
  const pagePrev = h("button", { class: "tcw-page-prev", onclick: () => ask(offset - limit) }, "‹");
  const pageNext = h("button", { class: "tcw-page-next", onclick: () => ask(offset + limit) }, "›");
  const pageLabel = h("span", { class: "tcw-page-label" });
  const banner = h("div", { class: "tcw-error", role: "alert", hidden: true });
  const main = h("div", { class: "tcw-main" });
  const root = h("div", { class: "tcw-dashboard", tabIndex: 0, "data-lm-suppress-shortcuts": "true" },
    h("div", { class: "tcw-bar" }, prev, h("label", {}, "Latent ", number), total, next, search),
    banner,
    h("div", { class: "tcw-body" },
      h("aside", { class: "tcw-side" },
        h("div", { class: "tcw-list-head" }, "sort by ", sort, order),
        listTitle, columns, list, h("div", { class: "tcw-pager" }, pagePrev, pageLabel, pageNext)),
      main));
  el.append(root);

  function select(feature) {
    model.send({ type: "select", feature });
  }

  function step(delta) {
    const current = model.get("feature");
    const target = Math.min(Math.max(current + delta, 0), model.get("n_latents") - 1);
    if (target !== current) select(target);
  }

  function ask(from) {
    latest = `${view}:${++request}`;
    model.send({ type: "list", request: latest, query: search.value, sort: sort.value,
      descending: order.dataset.descending === "true", offset: Math.max(from, 0) });
  }

  function markCurrent() {
    for (const item of list.children) item.classList.toggle("tcw-current", Number(item.dataset.latent) === model.get("feature"));
  }

  function showList(msg) {
    ({ offset, limit } = msg);
    listTitle.textContent = msg.query ? `“${msg.query}”: ${msg.total} latents` : `${msg.total} latents`;
    lastColumn.textContent = msg.query ? "matches" : "max";
    lastColumn.title = msg.query ? "how often the searched text is among its examples' tokens" : "largest activation";
    list.replaceChildren(...msg.rows.map(([latent, density, max, hits]) =>
      h("li", { dataset: { latent: String(latent) } },
        h("button", { class: "tcw-row", onclick: () => select(latent),
          title: `latent ${latent}: density ${percent(density)}, max ${fmt(max)}` + (hits ? `, ${hits} matches` : "") },
        h("span", { class: "tcw-row-id" }, `#${latent}`),
        h("span", { class: "tcw-num" }, percent(density)),
        h("span", { class: "tcw-num" }, hits ? `${hits}×` : fmt(max))))));
    pageLabel.textContent = msg.total ? `${msg.offset + 1}–${msg.offset + msg.rows.length} of ${msg.total}` : "none";
    pagePrev.disabled = msg.offset === 0;
    pageNext.disabled = msg.offset + msg.rows.length >= msg.total;
    markCurrent();
  }

  function drawLatent() {
    const p = model.get("_latent");
    if (!p || p.index === undefined) return;
    number.max = p.n_latents - 1;
    number.value = p.index;
    total.textContent = `of ${p.n_latents}`;
    prev.disabled = p.index === 0;
    next.disabled = p.index === p.n_latents - 1;
    main.replaceChildren(latentView(p));
    root.dataset.latent = String(p.index);
    markCurrent();
  }

  function drawError() {
    const message = model.get("error");
    banner.textContent = message;
    banner.hidden = !message;
    if (message) number.value = model.get("feature"); // the rejected number is named in the message
  }

  function onKey(event) {
    if (event.target instanceof HTMLInputElement || event.target instanceof HTMLSelectElement) return;
    const delta = { ArrowRight: 1, ArrowDown: 1, j: 1, ArrowLeft: -1, ArrowUp: -1, k: -1 }[event.key];
    if (delta === undefined || event.ctrlKey || event.metaKey || event.altKey) return;
    event.preventDefault();
    event.stopPropagation(); // keep JupyterLab's command-mode j/k from moving the cell selection
    step(delta);
  }

  function onMessage(msg) {
    if (msg && msg.type === "list" && msg.request === latest) showList(msg);
  }

  root.addEventListener("keydown", onKey);
  model.on("change:_latent", drawLatent);
  model.on("change:error", drawError);
  model.on("msg:custom", onMessage);
  drawLatent();
  drawError();
  ask(0);
  return () => {
    model.off("change:_latent", drawLatent);
    model.off("change:error", drawError);
    model.off("msg:custom", onMessage);
  };
}

export default { render };
