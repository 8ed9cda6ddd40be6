// Shared by every tcwidgets front-end: the Python side joins this file before each widget's own
// module (anywidget modules cannot import one another without a build step).

const SVG_NS = "http://www.w3.org/2000/svg";

/** An element with properties, listeners (`on<event>`) and children; strings become Text nodes. */
function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key in el) el[key] = value;
    else el.setAttribute(key, value);
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false)
    .map((c) => (c instanceof Node ? c : String(c))));
  return el;
}

function svg(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  if (text !== undefined) el.textContent = text;
  return el;
}

/** Make invisible characters visible; the text stays text. */
const shown = (token) => String(token).replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍") || "∅";

/** A token as a compact label for lists and tables: every whitespace character visible (a space is
 * "·"), other invisible characters as \u escapes, and runs of four or more of one glyph counted
 * ("·×46"), so a token of a newline and 46 spaces reads "↵·×46" instead of blank or very wide. */
function label(token) {
  const glyphs = Array.from(String(token), (c) => {
    if (c === " ") return "·";
    if (c === "\u00a0") return "⍽";
    if (/[\p{Cc}\p{Cf}\p{Z}]/u.test(c) && !"\n\t\r".includes(c)) return `\\u${c.codePointAt(0).toString(16).padStart(4, "0")}`;
    return shown(c);
  });
  let out = "";
  for (let i = 0; i < glyphs.length;) {
    let j = i;
    while (j < glyphs.length && glyphs[j] === glyphs[i]) j++;
    out += j - i >= 4 && /^[·↵⇥␍⍽]$/.test(glyphs[i]) ? `${glyphs[i]}×${j - i}` : glyphs.slice(i, j).join("");
    i = j;
  }
  return out || "∅";
}

/** A number to 3 significant digits, or a dash for a missing one. */
const fmt = (v) => (v === null || v === undefined ? "–" : Number(Number(v).toPrecision(3)).toString());
