// Markdown for model replies. Model output is untrusted: raw HTML in it is shown as
// text (never parsed), images are shown as their markdown source (no requests to
// arbitrary hosts), and the generated HTML still goes through DOMPurify with a short
// allow-list. The page's Content-Security-Policy forbids inline script as a last line.

import { Marked } from "../vendor/marked.esm.js";
import DOMPurify from "../vendor/purify.es.mjs";
import { copyText, h } from "./util.js";

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

const marked = new Marked({ gfm: true, breaks: true, async: false });
marked.use({
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
];
const PURIFY = {
  ALLOWED_TAGS,
  ALLOWED_ATTR: ["href", "title", "class", "align", "start"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:)/i,
  ALLOW_DATA_ATTR: false,
  KEEP_CONTENT: true,
  RETURN_DOM_FRAGMENT: true,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
  if (node.hasAttribute("class") && !/^language-[\w+#.-]+$/.test(node.getAttribute("class"))) {
    node.removeAttribute("class");
  }
});

/** Safe DOM for a reply's markdown. */
export function renderMarkdown(text) {
  let html;
  try {
    html = marked.parse(text || "");
  } catch {
    html = `<p>${escapeHtml(text)}</p>`;
  }
  const fragment = DOMPurify.sanitize(html, PURIFY);
  for (const pre of fragment.querySelectorAll("pre")) decorateCode(pre);
  return fragment;
}

function decorateCode(pre) {
  const code = pre.querySelector("code");
  const lang = (code?.className.match(/^language-(.+)$/) || [])[1] || "";
  const button = h(
    "button",
    { type: "button", class: "code-copy", "aria-label": "Copy code", "data-testid": "copy-code" },
    "Copy",
  );
  button.addEventListener("click", async () => {
    const ok = await copyText(code ? code.textContent : pre.textContent);
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => (button.textContent = "Copy"), 1500);
  });
  const head = h("div", { class: "code-head" }, h("span", { class: "code-lang" }, lang), button);
  const wrap = h("div", { class: "code-block" });
  pre.replaceWith(wrap);
  wrap.append(head, pre);
}
