// Markdown for model replies. Model output is untrusted: raw HTML in it is shown as
// text (never parsed), images are shown as their markdown source (no requests to
// arbitrary hosts), and the generated HTML still goes through DOMPurify with a short
// allow-list. The page's Content-Security-Policy forbids inline script as a last line.
//
// On the sanitized DOM, and only from its text: fenced code is highlighted (highlight.js)
// and math is typeset (KaTeX). A leading <think>...</think> becomes a "Reasoning" block.

import { Marked } from "../vendor/marked.esm.js";
import DOMPurify from "../vendor/purify.es.mjs";
import hljs from "../vendor/highlight/core.min.js";
import bash from "../vendor/highlight/languages/bash.min.js";
import c from "../vendor/highlight/languages/c.min.js";
import cpp from "../vendor/highlight/languages/cpp.min.js";
import css from "../vendor/highlight/languages/css.min.js";
import diff from "../vendor/highlight/languages/diff.min.js";
import go from "../vendor/highlight/languages/go.min.js";
import java from "../vendor/highlight/languages/java.min.js";
import javascript from "../vendor/highlight/languages/javascript.min.js";
import json from "../vendor/highlight/languages/json.min.js";
import markdown from "../vendor/highlight/languages/markdown.min.js";
import python from "../vendor/highlight/languages/python.min.js";
import rust from "../vendor/highlight/languages/rust.min.js";
import shell from "../vendor/highlight/languages/shell.min.js";
import sql from "../vendor/highlight/languages/sql.min.js";
import typescript from "../vendor/highlight/languages/typescript.min.js";
import xml from "../vendor/highlight/languages/xml.min.js";
import yaml from "../vendor/highlight/languages/yaml.min.js";
import katex from "../vendor/katex/katex.mjs";
import { t } from "./i18n.js";
import { copyText, h } from "./util.js";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

// -- math: marked tokens, so that code spans and blocks keep their dollars and marked's
// escaping never sees the TeX (`\,` reaches KaTeX intact) ----------------------------------
const TEX = String.raw`(?:\\[\s\S]|[^\\$])`;
// $x$ (pandoc's rule: no space inside the dollars, no digit after the closing one, and
// no backtick, so "$5 and `code` $6" stays text); $$x$$; \(x\); \[x\]
const INLINE_DOLLAR = String.raw`\$(?:[^\\$\s\x60]|\\[\s\S])(?:(?:[^\\$\x60]|\\[\s\S])*?(?:[^\\$\s\x60]|\\[\s\S]))?\$(?!\d)`;
const INLINE_MATH = [
  { re: new RegExp(String.raw`^\$\$(${TEX}+?)\$\$`), display: true },
  { re: new RegExp(`^${INLINE_DOLLAR}`), display: false, dollar: true },
  { re: /^\\\(([\s\S]+?)\\\)/, display: false },
  { re: /^\\\[([\s\S]+?)\\\]/, display: true },
];
const ANY_INLINE_MATH = new RegExp(
  String.raw`\$\$${TEX}+?\$\$|${INLINE_DOLLAR}|\\\([\s\S]+?\\\)|\\\[[\s\S]+?\\\]`,
  "g",
);
const BLOCK_MATH = [
  new RegExp(String.raw`^ {0,3}\$\$(${TEX}+?)\$\$[ \t]*(?:\n+|$)`),
  /^ {0,3}\\\[([\s\S]+?)\\\][ \t]*(?:\n+|$)/,
];

const mathExtensions = [
  {
    name: "mathBlock",
    level: "block",
    // where a paragraph must stop: a line that opens display math (marked joins the
    // paragraph back up if the math turns out not to close)
    start(src) {
      const i = src.search(/\n {0,3}(?:\$\$|\\\[)/);
      return i < 0 ? undefined : i + 1;
    },
    tokenizer(src) {
      for (const re of BLOCK_MATH) {
        const m = re.exec(src);
        if (m && m[1].trim()) return { type: "mathBlock", raw: m[0], text: m[1].trim() };
      }
      return undefined;
    },
    renderer: ({ text }) => `<div class="math-display">${escapeHtml(text)}</div>\n`,
  },
  {
    name: "mathInline",
    level: "inline",
    start(src) {
      const i = src.search(/\$|\\[([]/);
      return i < 0 ? undefined : i;
    },
    tokenizer(src) {
      for (const { re, display, dollar } of INLINE_MATH) {
        const m = re.exec(src);
        if (!m) continue;
        const text = dollar ? m[0].slice(1, -1) : m[1];
        if (dollar && /^[\d.,]+\s/.test(text)) continue; // "$10 and US$": money, not math
        if (text.trim()) return { type: "mathInline", raw: m[0], text: text.trim(), display };
      }
      return undefined;
    },
    renderer({ text, display }) {
      return `<span class="math-${display ? "display" : "inline"}">${escapeHtml(text)}</span>`;
    },
  },
];

const marked = new Marked({ gfm: true, breaks: true, async: false });
marked.use({
  extensions: mathExtensions,
  hooks: {
    // emphasis delimiters inside math ("$a*b$") must not pair with ones outside it
    emStrongMask(src) {
      return src.replace(ANY_INLINE_MATH, (m) => m.replace(/[*_~]/g, "a"));
    },
  },
  renderer: {
    // block HTML and inline tags alike: shown literally
    html({ text, block }) {
      const shown = escapeHtml(text);
      return block ? `<p>${shown.trimEnd().replace(/\n/g, "<br>")}</p>\n` : shown;
    },
    image({ raw, href, text }) {
      return escapeHtml(raw || `![${text}](${href})`);
    },
    checkbox({ checked }) {
      return checked ? "[x] " : "[ ] ";
    },
    code({ text, lang }) {
      const language = (lang || "").trim().split(/\s+/)[0].replace(/[^\w+#.-]/g, "");
      const cls = language ? ` class="language-${escapeHtml(language)}"` : "";
      return `<pre><code${cls}>${escapeHtml(text)}</code></pre>\n`;
    },
  },
});

const ALLOWED_TAGS = [
  "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "strong", "em", "del", "s", "code",
  "pre", "blockquote", "ul", "ol", "li", "a", "table", "thead", "tbody", "tr", "th", "td",
  "span", "div", // only as the math placeholders above (model HTML never gets here)
];
const PURIFY = {
  ALLOWED_TAGS,
  ALLOWED_ATTR: ["href", "title", "class", "align", "start"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
  // not URIs: without this the URI pattern above drops them (<ol start="4"> lost its 4)
  ADD_URI_SAFE_ATTR: ["align", "start"],
  ALLOW_DATA_ATTR: false,
  KEEP_CONTENT: true,
  RETURN_DOM_FRAGMENT: true,
};

const CLASS_OK = {
  CODE: /^language-[\w+#.-]+$/,
  SPAN: /^math-(?:inline|display)$/,
  DIV: /^math-display$/,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
  if (node.hasAttribute("class") && !CLASS_OK[node.tagName]?.test(node.getAttribute("class"))) {
    node.removeAttribute("class");
  }
});

// -- code: highlight.js on the code's text; its markup (spans with hljs classes) goes
// through a DOMPurify of its own -----------------------------------------------------------
const LANGUAGES = {
  bash, c, cpp, css, diff, go, java, javascript, json, markdown, python, rust, shell, sql,
  typescript, xml, yaml,
};
for (const [name, language] of Object.entries(LANGUAGES)) hljs.registerLanguage(name, language);

const codePurify = DOMPurify(window);
codePurify.addHook("afterSanitizeAttributes", (node) => {
  const cls = node.getAttribute("class");
  if (cls && !cls.split(/\s+/).every((c) => /^(?:hljs-[\w-]+|[a-z]+_+|language-[\w-]+)$/.test(c))) {
    node.removeAttribute("class");
  }
});
const CODE_PURIFY = {
  ALLOWED_TAGS: ["span"],
  ALLOWED_ATTR: ["class"],
  ALLOW_DATA_ATTR: false,
  KEEP_CONTENT: true,
  RETURN_DOM_FRAGMENT: true,
};

function highlight(code) {
  const lang = (code.className.match(/^language-(.+)$/) || [])[1];
  if (!lang || !hljs.getLanguage(lang)) return; // unknown or no language: plain
  try {
    const { value } = hljs.highlight(code.textContent, { language: lang, ignoreIllegals: true });
    code.replaceChildren(codePurify.sanitize(value, CODE_PURIFY));
    code.classList.add("hljs");
  } catch {
    // leave the text as it was
  }
}

// -- math: KaTeX renders to a string, turned into DOM here. The page's CSP (style-src
// 'self') refuses style attributes parsed from HTML, even in a <template> or DOMParser
// document, but not styles set through CSSOM; so the string is parsed with its style
// attributes renamed, and the elements are rebuilt from an allow-list, with each style
// applied through el.style. -------------------------------------------------------------
const KATEX_OPTIONS = {
  throwOnError: false,
  trust: false,
  output: "htmlAndMathml",
  strict: "ignore",
  maxSize: 50,
  errorColor: "var(--danger)",
};
const KATEX_TAGS = new Set([
  "span", "svg", "path", "line", "math", "semantics", "annotation", "mrow", "mi", "mn", "mo",
  "ms", "mtext", "mspace", "msup", "msub", "msubsup", "mfrac", "msqrt", "mroot", "mover",
  "munder", "munderover", "mtable", "mtr", "mtd", "mlabeledtr", "mstyle", "menclose",
  "mpadded", "mphantom", "mglyph",
]);
const KATEX_ATTRS = new Set([
  "class", "aria-hidden", "title", "accent", "accentunder", "columnalign", "columnlines",
  "columnspacing", "depth", "display", "displaystyle", "encoding", "fence", "height",
  "largeop", "linebreak", "linethickness", "lspace", "mathbackground", "mathcolor",
  "mathsize", "mathvariant", "maxsize", "minsize", "movablelimits", "notation", "rowlines",
  "rowspacing", "rspace", "scriptlevel", "separator", "stretchy", "symmetric", "valign",
  "voffset", "width", "xmlns", "viewBox", "preserveAspectRatio", "d", "x1", "x2", "y1", "y2",
  "stroke-width",
]);
const STYLE_ATTR = "data-katex-style";
const mathCache = new Map();

function rebuild(node) {
  if (node.nodeType === Node.TEXT_NODE) return document.createTextNode(node.data);
  if (node.nodeType !== Node.ELEMENT_NODE) return null;
  if (!KATEX_TAGS.has(node.localName)) return document.createTextNode(node.textContent);
  const el = document.createElementNS(node.namespaceURI, node.localName);
  for (const { name, value } of node.attributes) {
    if (name === STYLE_ATTR) el.style.cssText = value;
    else if (KATEX_ATTRS.has(name)) el.setAttribute(name, value);
  }
  el.append(...[...node.childNodes].map(rebuild).filter(Boolean));
  return el;
}

function typeset(tex, display) {
  const key = `${display ? "D" : "I"}${tex}`;
  let node = mathCache.get(key);
  if (!node) {
    const markup = katex.renderToString(tex, { ...KATEX_OPTIONS, displayMode: display });
    // KaTeX escapes every quote in attribute values and text, so ` style="` can only be
    // the start of a style attribute
    const template = document.createElement("template");
    template.innerHTML = markup.replace(/ style="/g, ` ${STYLE_ATTR}="`);
    node = document.createDocumentFragment();
    node.append(...[...template.content.childNodes].map(rebuild).filter(Boolean));
    if (mathCache.size >= 500) mathCache.delete(mathCache.keys().next().value);
    mathCache.set(key, node);
  }
  return node.cloneNode(true);
}

function renderMath(el) {
  try {
    el.replaceChildren(typeset(el.textContent, el.classList.contains("math-display")));
  } catch {
    // leave the TeX as text
  }
}

// -- the reply ------------------------------------------------------------------------------
function renderBody(text) {
  let html;
  try {
    html = marked.parse(text || "");
  } catch {
    html = `<p>${escapeHtml(text)}</p>`;
  }
  const fragment = DOMPurify.sanitize(html, PURIFY);
  for (const el of fragment.querySelectorAll(".math-inline, .math-display")) renderMath(el);
  for (const code of fragment.querySelectorAll("pre > code")) highlight(code);
  for (const pre of fragment.querySelectorAll("pre")) decorateCode(pre);
  return fragment;
}

// a reply that opens with <think>: its reasoning, still open while it streams
const THINK = /^\s*<think>([\s\S]*?)(?:(<\/think>)|$)/;

/** Safe DOM for a reply's markdown. */
export function renderMarkdown(text) {
  const m = THINK.exec(text || "");
  if (!m) return renderBody(text);
  const closed = m[2] !== undefined;
  // while streaming, a closing tag may have arrived only in part
  const thought = closed ? m[1] : m[1].replace(/<(?:\/(?:t(?:h(?:i(?:nk?)?)?)?)?)?$/, "");
  const fragment = document.createDocumentFragment();
  fragment.append(
    h(
      "details",
      { class: "think", open: !closed, "data-testid": "think" },
      h("summary", {}, t("md.reasoning")),
      h("div", { class: "think-body" }, renderBody(thought.trim())),
    ),
    renderBody(text.slice(m[0].length).replace(/^\s+/, "")),
  );
  return fragment;
}

function decorateCode(pre) {
  const code = pre.querySelector("code");
  const lang = (code?.className.match(/^language-(\S+)/) || [])[1] || "";
  const button = h(
    "button",
    {
      type: "button",
      class: "code-copy",
      "aria-label": t("md.copyCode"),
      "data-testid": "copy-code",
    },
    t("chat.copy"),
  );
  button.addEventListener("click", async () => {
    const ok = await copyText(code ? code.textContent : pre.textContent);
    button.textContent = ok ? t("chat.copied") : t("chat.copyFailed");
    setTimeout(() => (button.textContent = t("chat.copy")), 1500);
  });
  const head = h("div", { class: "code-head" }, h("span", { class: "code-lang" }, lang), button);
  const wrap = h("div", { class: "code-block" });
  pre.replaceWith(wrap);
  wrap.append(head, pre);
}
