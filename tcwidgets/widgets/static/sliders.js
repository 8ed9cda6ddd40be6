// AblationSliders front-end (a plain ES module for anywidget; no build step, no network).
//
// Python owns the model and the state (see sliders.py); the page never sets a trait. It asks:
//   page -> Python  {type: "set", request, values: {prompt?, position?, scope?, sliders?, pinned?, continuation?}}
//   page -> Python  {type: "add", request, layer, latent}   list another latent
//   page -> Python  {type: "select", layer, latent}         the latent being looked at
//   page -> Python  {type: "cancel"}                        abandon the running computation
// Python validates, sets the public traits, and answers with `_context` (tokens), `_rows` (the
// latents listed at the position), `_result` (bars, pinned tokens, continuations; `request` names
// the request it answers), `_status` and `error`. A view ignores results older than its latest request.
// Every string that came from the tokenizer is inserted as text (`h` appends strings as Text
// nodes, and nothing here assigns innerHTML).

const KINDS = [["scale", "×", "scale", "multiply by"], ["clamp", "=", "clamp", "clamp to"],
  ["steer", "+", "steer", "steer by (adds this × its decoder row)"]];
const IDENTITY = { scale: 1, steer: 0 };
const DEBOUNCE_MS = 40;
// Busy longer than this: a spinner and a seconds count. A quicker answer (a slider move) shows
// neither: the spinner's animation alone keeps the browser drawing frames (about a sixth of a core
// in headless Chromium), taken from the model run on a small machine.
const SLOW_MS = 500;

const percent = (p) => `${(100 * p).toFixed(2)}%`;
const signed = (v) => `${v >= 0 ? "+" : "−"}${Math.abs(v).toFixed(3)}`;
const key = (layer, latent) => `${layer}:${latent}`;

/** The slider range of one kind, scaled by the latent's typical activation `ref`. */
function range(kind, ref) {
  if (kind === "scale") return { min: -2, max: 4, step: 0.05 };
  const step = Number((ref / 20).toPrecision(1)) || 0.01;
  return kind === "clamp" ? { min: -2 * ref, max: 4 * ref, step } : { min: -4 * ref, max: 4 * ref, step };
}

/** A value on the slider's grid (no float noise like 0.15000000000000002). */
function snap(value, step) {
  const decimals = Math.max(0, -Math.floor(Math.log10(step)) + 1);
  return Number(Number(value).toFixed(decimals));
}

function render({ model, el }) {
  const view = Math.random().toString(36).slice(2);
  let counter = 0;
  let latest = null; // this view's newest request, until answered
  let timer = null; // a debounced commit waiting
  let lastCommit = 0;
  let busySince = null;
  let ticker = null;
  let cancelled = false;
  const pending = new Map(); // slider changes not sent yet: key -> entry
  let sent = new Map(); // slider changes sent, until Python's `sliders` shows them
  const rowEls = new Map(); // key -> {el, parts, row}: rows are updated in place, not redrawn

  const promptBox = h("textarea", { class: "tcw-prompt", rows: 2, "aria-label": "prompt",
    placeholder: "Type a prompt, then Enter", onkeydown: (e) => {
      if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); submitPrompt(); }
    } });
  const runButton = h("button", { class: "tcw-run", title: "run the prompt (Enter)", onclick: () => submitPrompt() }, "Run");
  const tokens = h("div", { class: "tcw-tokens", role: "toolbar",
    "aria-label": "tokens: choose the position to edit (arrow keys)", onkeydown: onTokenKey });
  const scope = h("select", { class: "tcw-scope", "aria-label": "where the edits apply",
    onchange: () => change({ scope: scope.value }) },
  h("option", { value: "token" }, "at the chosen token"), h("option", { value: "all" }, "at every token"));
  const continuation = h("input", { class: "tcw-continuation", type: "number", min: 0, step: 1,
    "aria-label": "tokens to generate before vs after (0: off)",
    onchange: () => change({ continuation: Math.round(Number(continuation.value)) || 0 }) });
  const where = h("span", { class: "tcw-where" });
  const rowsBox = h("div", { class: "tcw-rows", role: "group", "aria-label": "latent edits" });
  const addLayer = h("select", { class: "tcw-add-layer", "aria-label": "layer of the latent to add" });
  const addLatent = h("input", { class: "tcw-add-latent", type: "number", min: 0, step: 1, placeholder: "latent",
    "aria-label": "number of the latent to add", onkeydown: (e) => { if (e.key === "Enter") add(); } });
  const addForm = h("div", { class: "tcw-add" }, "add latent: layer ", addLayer, " ", addLatent,
    h("button", { class: "tcw-add-button", onclick: () => add() }, "Add"));
  const bars = h("div", { class: "tcw-bars", role: "table", "aria-label": "next-token probabilities before and after" });
  const pins = h("div", { class: "tcw-pins" });
  const pinInput = h("input", { class: "tcw-pin-input", type: "text", placeholder: "pin a token, e.g. \u201c Paris\u201d",
    "aria-label": "pin a token (mind its leading space)", onkeydown: (e) => {
      if (e.key === "Enter" && pinInput.value) { pin(pinInput.value); pinInput.value = ""; }
    } });
  const continuations = h("div", { class: "tcw-continuations" });
  const statusText = h("span", { class: "tcw-status-text" });
  const cancel = h("button", { class: "tcw-cancel", disabled: true, onclick: () => {
    cancelled = true;
    latest = null;
    model.send({ type: "cancel" });
    drawStatus();
  } }, "Cancel");
  const status = h("div", { class: "tcw-status", role: "status", "aria-live": "polite" }, statusText, cancel);
  const banner = h("div", { class: "tcw-error", role: "alert", hidden: true });
  const root = h("div", { class: "tcw-sliders", "data-lm-suppress-shortcuts": "true" },
    h("div", { class: "tcw-prompt-bar" }, promptBox, runButton),
    banner,
    tokens,
    h("div", { class: "tcw-options" }, h("label", {}, "edit ", scope),
      h("label", {}, "continue for ", continuation, " tokens"), status),
    h("div", { class: "tcw-body" },
      h("section", { class: "tcw-edits" }, h("h4", {}, "Latents ", where),
        h("div", { class: "tcw-grid tcw-head", "aria-hidden": "true" }, h("span", {}, "layer #latent"),
          h("span", { class: "tcw-act" }, "act"), h("span", {}, "edit"), h("span", {}),
          h("span", { class: "tcw-value" }, "value")),
        rowsBox, addForm),
      h("section", { class: "tcw-output" },
        h("h4", {}, "Next token after the prompt ", h("span", { class: "tcw-legend" },
          h("span", { class: "tcw-key-before" }, "before"), " ", h("span", { class: "tcw-key-after" }, "after"))),
        bars,
        h("h4", {}, "Pinned tokens: log-probability"), pins, pinInput,
        continuations)));
  el.append(root);
  // Keys typed into the widget's controls are theirs: JupyterLab's notebook would otherwise take the
  // arrow keys (and prevent a slider's default) and command-mode letters. Escape and chords still reach it.
  root.addEventListener("keydown", (event) => {
    if (event.key !== "Escape" && !event.ctrlKey && !event.metaKey && !event.altKey) event.stopPropagation();
  });

  // -- sending changes --------------------------------------------------------------------------------------
  function request() {
    latest = `${view}:${++counter}`;
    cancelled = false;
    return latest;
  }

  function change(values) {
    model.send({ type: "set", request: request(), values });
    drawStatus();
  }

  function submitPrompt() {
    if (promptBox.value !== model.get("prompt")) change({ prompt: promptBox.value });
  }

  /** Current slider state of every latent with a slider, with the uncommitted changes applied. */
  function entries() {
    const local = new Map([...sent, ...pending]);
    const list = model.get("sliders").map((s) => local.get(key(s.layer, s.latent)) || s);
    for (const [k, entry] of local) if (!list.some((s) => key(s.layer, s.latent) === k)) list.push(entry);
    return list;
  }

  function commitSliders() {
    timer = null;
    lastCommit = performance.now();
    const list = entries();
    sent = new Map([...sent, ...pending]);
    pending.clear();
    change({ sliders: list });
  }

  /** Debounced: the first change after a quiet spell goes out at once, a burst ends with its last. */
  function slide(entry) {
    pending.set(key(entry.layer, entry.latent), entry);
    clearTimeout(timer);
    if (performance.now() - lastCommit > DEBOUNCE_MS) commitSliders();
    else timer = setTimeout(commitSliders, DEBOUNCE_MS);
    drawStatus();
  }

  function select(layer, latent) {
    const current = model.get("selected");
    if (current[0] !== layer || current[1] !== latent) model.send({ type: "select", layer, latent });
  }

  function add() {
    const latent = addLatent.value.trim();
    model.send({ type: "add", request: request(), layer: Number(addLayer.value),
      latent: latent === "" ? null : Number(latent) });
    addLatent.value = "";
    drawStatus();
  }

  function pin(text) {
    const pinned = model.get("pinned");
    change({ pinned: pinned.includes(text) ? pinned.filter((p) => p !== text) : [...pinned, text] });
  }

  // -- tokens -------------------------------------------------------------------------------------------------
  function drawTokens() {
    const context = model.get("_context");
    const position = model.get("position");
    const list = context.tokens || [];
    tokens.replaceChildren(...list.map((token, i) => h("button", {
      class: "tcw-tok" + (i === position ? " tcw-current" : ""), tabIndex: i === position ? 0 : -1,
      title: `${i}: ${JSON.stringify(token)}`, "aria-pressed": String(i === position), dataset: { position: String(i) },
      onclick: () => choose(i),
    }, shown(token))));
    root.dataset.version = String(context.version ?? "");
    drawWhere();
    addLayer.replaceChildren(...(context.layers || []).map(([layer, n]) =>
      h("option", { value: String(layer) }, `${layer} (${n} latents)`)));
    addForm.hidden = !(context.layers || []).length;
  }

  function choose(position) {
    if (position !== model.get("position")) change({ position });
  }

  function onTokenKey(event) {
    const n = (model.get("_context").tokens || []).length;
    const position = model.get("position");
    const target = { ArrowLeft: position - 1, ArrowRight: position + 1, Home: 0, End: n - 1 }[event.key];
    if (target === undefined || target < 0 || target >= n) return;
    event.preventDefault();
    event.stopPropagation();
    choose(target);
  }

  function drawWhere() {
    const position = model.get("position");
    const token = (model.get("_context").tokens || [])[position];
    where.textContent = token === undefined ? "" : `at token ${position} (${JSON.stringify(token)})`;
  }

  function drawPosition() {
    drawWhere();
    const position = model.get("position");
    for (const button of tokens.children) {
      const current = Number(button.dataset.position) === position;
      button.classList.toggle("tcw-current", current);
      button.tabIndex = current ? 0 : -1;
      button.setAttribute("aria-pressed", String(current));
      if (current && tokens.contains(document.activeElement)) button.focus();
    }
  }

  // -- latent rows ----------------------------------------------------------------------------------------------
  function rowRef(row) {
    const top = Math.max(0, ...model.get("_rows").map((r) => r.act));
    return Math.max(row.max, row.act) || top || 1;
  }

  function makeRow(row) {
    const name = `layer ${row.layer} latent ${row.latent}`;
    const parts = {
      label: h("button", { class: "tcw-latent", title: `select ${name}`, onclick: () => select(row.layer, row.latent) },
        `L${row.layer} #${row.latent}`),
      act: h("span", { class: "tcw-act" }),
      kind: h("select", { class: "tcw-kind", "aria-label": `${name}: kind of edit` },
        KINDS.map(([value, symbol, label, long]) => h("option", { value, title: long }, `${symbol} ${label}`))),
      slider: h("input", { class: "tcw-slider", type: "range" }),
      value: h("output", { class: "tcw-value" }),
      reset: h("button", { class: "tcw-reset", title: `reset ${name}`, "aria-label": `reset ${name}` }, "↺"),
      remove: h("button", { class: "tcw-remove", title: `remove ${name}`, "aria-label": `remove ${name}` }, "✕"),
    };
    const el = h("div", { class: "tcw-row tcw-grid", dataset: { layer: String(row.layer), latent: String(row.latent) } },
      parts.label, parts.act, parts.kind, parts.slider, parts.value, parts.reset, parts.remove);
    const item = { el, parts, row };
    const entry = (kind, value) => ({ layer: row.layer, latent: row.latent, kind, value });
    parts.slider.addEventListener("input", () => {
      const kind = parts.kind.value;
      const value = snap(parts.slider.value, Number(parts.slider.step));
      item.drawn = null; // the user moved it: the next `setSlider` draws again
      parts.value.textContent = fmt(value);
      slide(entry(kind, value));
    });
    parts.slider.addEventListener("focus", () => select(row.layer, row.latent));
    parts.kind.addEventListener("change", () => {
      const kind = parts.kind.value;
      const value = kind === "clamp" ? item.row.act : IDENTITY[kind];
      setSlider(item, entry(kind, value));
      slide(entry(kind, value));
    });
    parts.reset.addEventListener("click", () => {
      setSlider(item, entry("scale", 1));
      slide(entry("scale", 1));
    });
    parts.remove.addEventListener("click", () => {
      pending.delete(key(row.layer, row.latent));
      change({ sliders: entries().filter((s) => !(s.layer === row.layer && s.latent === row.latent)) });
    });
    return item;
  }

  function setSlider(item, entry) {
    const { parts } = item;
    const { min, max, step } = range(entry.kind, rowRef(item.row));
    const drawn = `${entry.kind} ${entry.value} ${min} ${max} ${step}`;
    if (item.drawn === drawn) return; // unchanged: no DOM writes (every sync of the sliders redraws the rows)
    item.drawn = drawn;
    parts.kind.value = entry.kind;
    Object.assign(parts.slider, { min, max, step });
    parts.slider.value = entry.value;
    parts.slider.setAttribute("aria-label", `layer ${item.row.layer} latent ${item.row.latent}: ` +
      KINDS.find(([k]) => k === entry.kind)[3]);
    parts.value.textContent = fmt(entry.value);
    const edited = IDENTITY[entry.kind] !== entry.value;
    item.el.classList.toggle("tcw-edited", edited);
  }

  function drawRows() {
    const rows = model.get("_rows");
    const state = new Map(entries().map((s) => [key(s.layer, s.latent), s]));
    const selected = model.get("selected");
    const order = rows.map((row) => {
      const k = key(row.layer, row.latent);
      let item = rowEls.get(k);
      if (!item) rowEls.set(k, (item = makeRow(row)));
      item.row = row;
      item.parts.act.textContent = fmt(row.act);
      item.parts.act.title = `activation at this token; max over the prompt ${fmt(row.max)}`;
      item.parts.remove.hidden = row.active || !state.has(k);
      item.el.classList.toggle("tcw-active", row.active);
      item.el.classList.toggle("tcw-selected", selected[0] === row.layer && selected[1] === row.latent);
      if (document.activeElement !== item.parts.slider || !(pending.has(k) || sent.has(k))) {
        setSlider(item, state.get(k) || { layer: row.layer, latent: row.latent, kind: "scale", value: 1 });
      }
      return item.el;
    });
    for (const [k, item] of rowEls) if (!order.includes(item.el)) rowEls.delete(k);
    const same = order.length === rowsBox.children.length && order.every((el, i) => rowsBox.children[i] === el);
    if (!same) rowsBox.replaceChildren(...order); // moving a focused row would blur it: only when needed
    if (!rows.length) rowsBox.replaceChildren(h("p", { class: "tcw-empty" }, "No latent is active at this token."));
  }

  // -- output -----------------------------------------------------------------------------------------------------
  function drawResult() {
    const result = model.get("_result");
    if (result.request === latest) latest = null; // answered
    else if (latest !== null) return; // a newer request of this view is on its way
    const version = model.get("_context").version;
    root.dataset.request = String(result.request ?? "");
    root.dataset.modelMs = String(result.model_ms ?? "");
    bars.classList.toggle("tcw-stale", result.version !== version);
    const top = result.top || [];
    const most = Math.max(1e-9, ...top.map((t) => Math.max(t.before, t.after)));
    const pinned = model.get("pinned");
    bars.replaceChildren(...top.map((t) => h("div", { class: "tcw-bar-row", role: "row", dataset: { id: String(t.id) } },
      h("button", { class: "tcw-bar-token" + (pinned.includes(t.token) ? " tcw-pinned" : ""), role: "rowheader",
        title: `${JSON.stringify(t.token)}: click to pin or unpin`, onclick: () => pin(t.token) }, label(t.token)),
      h("div", { class: "tcw-bar-pair", role: "cell" },
        bar("before", t.before, most), bar("after", t.after, most)))));
    pins.replaceChildren(...(result.pinned || []).map((p) => {
      const delta = p.after - p.before;
      return h("div", { class: "tcw-pin", dataset: { id: String(p.id) } },
        h("span", { class: "tcw-pin-token", title: JSON.stringify(p.text) }, shown(p.text)),
        p.parts > 1 ? h("span", { class: "tcw-note", title: "only its first token is scored" },
          `(first of ${p.parts} tokens: ${shown(p.token)})`) : null,
        h("span", { class: "tcw-pin-before", title: "log p before" }, p.before.toFixed(3)),
        "→",
        h("span", { class: "tcw-pin-after", title: "log p after" }, p.after.toFixed(3)),
        h("span", { class: "tcw-pin-delta " + (delta >= 0 ? "tcw-up" : "tcw-down"), title: "change in log p" },
          `Δ ${signed(delta)}`),
        h("button", { class: "tcw-unpin", title: "unpin", "aria-label": `unpin ${p.text}`, onclick: () => pin(p.text) }, "✕"));
    }));
    const c = result.continuation;
    continuations.replaceChildren(...(c ? [
      h("h4", {}, "Continuation"),
      h("div", { class: "tcw-cont tcw-cont-before" }, h("span", { class: "tcw-cont-label" }, "before"), h("span", {}, c.before)),
      h("div", { class: "tcw-cont tcw-cont-after" }, h("span", { class: "tcw-cont-label" }, "after"), h("span", {}, c.after)),
    ] : []));
    drawStatus();
  }

  function bar(which, p, most) {
    return h("div", { class: `tcw-bar tcw-${which}`, title: `${which}: ${percent(p)}` },
      h("span", { class: "tcw-track" }, h("span", { class: "tcw-fill", style: `width: ${(100 * p) / most}%` })),
      h("span", { class: `tcw-p tcw-p-${which}` }, percent(p)));
  }

  function drawStatus() {
    const python = model.get("_status");
    const busy = Boolean(python) || timer !== null || (latest !== null && !cancelled);
    if (busy && busySince === null) {
      busySince = performance.now();
      ticker = setTimeout(() => { ticker = setInterval(drawStatus, 100); drawStatus(); }, SLOW_MS);
    } else if (!busy && busySince !== null) {
      busySince = null;
      stopTicker();
    }
    const slow = busy && performance.now() - busySince >= SLOW_MS;
    root.classList.toggle("tcw-busy", busy);
    root.classList.toggle("tcw-slow", slow);
    root.setAttribute("aria-busy", String(busy));
    cancel.disabled = !python;
    const result = model.get("_result");
    if (busy) {
      const where = model.get("_context").remote ? " on NDIF" : "";
      const seconds = slow ? ` ${((performance.now() - busySince) / 1000).toFixed(1)} s` : "";
      statusText.textContent = `${python || "running"}${where}…${seconds}`;
    } else if (cancelled) {
      statusText.textContent = "cancelled: showing the last finished run";
    } else {
      const edits = result.edits ? `${result.edits} edit${result.edits > 1 ? "s" : ""}` : "no edits";
      statusText.textContent = result.edits ? `${edits}, model ${Math.round(result.model_ms)} ms` : edits;
    }
  }

  function stopTicker() {
    clearTimeout(ticker);
    clearInterval(ticker);
  }

  function drawError() {
    const message = model.get("error");
    banner.textContent = message;
    banner.hidden = !message;
  }

  function drawInputs() {
    if (document.activeElement !== promptBox) promptBox.value = model.get("prompt");
    scope.value = model.get("scope");
    if (document.activeElement !== continuation) continuation.value = model.get("continuation");
  }

  const handlers = {
    "change:_context": () => { drawTokens(); drawResult(); },
    "change:position": drawPosition,
    "change:sliders": () => { // forget the sent changes that Python now shows
      const confirmed = new Map(model.get("sliders").map((s) => [key(s.layer, s.latent), s]));
      for (const [k, entry] of sent) {
        const s = confirmed.get(k);
        if (s && s.kind === entry.kind && s.value === entry.value) sent.delete(k);
      }
      drawRows();
    },
    "change:error": () => { sent = new Map(); drawError(); drawRows(); drawInputs(); }, // maybe a refused change
    "change:_rows change:selected": drawRows,
    "change:_result change:pinned": drawResult,
    // Python answers every request with `_result` (a failed run too); an empty `_status` is no answer:
    // a newer request may still be on its way to Python
    "change:_status": drawStatus,
    "change:prompt change:scope change:continuation": drawInputs,
  };
  const each = (f) => Object.entries(handlers).forEach(([events, handler]) => events.split(" ").forEach((e) => f(e, handler)));
  each((event, handler) => model.on(event, handler));
  drawInputs();
  drawTokens();
  drawRows();
  drawResult();
  drawError();
  return () => {
    each((event, handler) => model.off(event, handler));
    clearTimeout(timer);
    stopTicker();
  };
}

export default { render };
