// Small DOM and formatting helpers. Elements are built with h(); text always goes in as
// text nodes, never as HTML.

import { locale } from "./i18n.js";

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2).toLowerCase(), value);
    } else if (key === "text") el.textContent = value;
    else if (value === true) el.setAttribute(key, "");
    else el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export const $ = (sel, root = document) => root.querySelector(sel);

export function debounce(fn, ms) {
  let timer = null;
  const wrapped = (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
  wrapped.cancel = () => clearTimeout(timer);
  return wrapped;
}

/** A count in the UI's language ("12,345"); formatted anew on each call, so that a
 * language switch shows in what is rendered next. */
export function formatNumber(n) {
  return Number(n).toLocaleString(locale());
}

/** When a conversation last changed: the time today, else the day ("May 3", "5月3日"). */
export function formatWhen(seconds) {
  const d = new Date(seconds * 1000);
  const now = new Date();
  if (d.toDateString() === now.toDateString()) {
    return d.toLocaleTimeString(locale(), { hour: "2-digit", minute: "2-digit" });
  }
  return d.toLocaleDateString(locale(), { month: "short", day: "numeric" });
}

/** Copy text; the async Clipboard API needs a secure context, so fall back to a hidden
 * textarea and execCommand where it is missing or refused. */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      /* fall through */
    }
  }
  const area = h("textarea", { readonly: true, "aria-hidden": "true", class: "offscreen" });
  area.value = text;
  document.body.append(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand("copy");
  } catch {
    ok = false;
  }
  area.remove();
  return ok;
}

/** A passing message; with ``action`` ({label, onClick}) it carries one button (e.g.
 * Undo), which dismisses it. Returns a function that dismisses it early. */
export function toast(message, kind = "info", ms = 4000, action = null) {
  const box = document.getElementById("toasts");
  const item = h("div", { class: `toast toast-${kind}`, "data-testid": "toast" }, message);
  const dismiss = () => item.remove();
  if (action) {
    const button = h(
      "button",
      { type: "button", class: "toast-action", "data-testid": "toast-action" },
      action.label,
    );
    button.addEventListener("click", () => {
      dismiss();
      action.onClick();
    });
    item.append(" ", button);
  }
  box.append(item);
  setTimeout(dismiss, ms);
  return dismiss;
}

export const storage = {
  get(key, fallback = null) {
    try {
      const v = localStorage.getItem(key);
      return v === null ? fallback : v;
    } catch {
      return fallback;
    }
  },
  set(key, value) {
    try {
      if (value === null || value === undefined || value === "") localStorage.removeItem(key);
      else localStorage.setItem(key, value);
    } catch {
      /* storage may be disabled or full */
    }
  },
};

export const SESSION_ID_RE = /^[A-Za-z0-9_-]{1,64}$/;
