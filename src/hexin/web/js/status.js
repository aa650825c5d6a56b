// The status bar: model, speed and time to first token of the last reply, context used,
// cached tokens, and a notice when older turns were left out of the prompt.

import { $, formatNumber } from "./util.js";

let contextLimit = 0;

export function setModel(config) {
  $("#status-model").textContent = config.model || "model";
  contextLimit = config.context_limit || 0;
}

export function clearReplyStats() {
  $("#status-speed").textContent = "";
  $("#status-ttft").textContent = "";
  $("#status-cached").textContent = "";
  $("#status-context-text").textContent = "";
  setContext(0);
  const dropped = $("#status-dropped");
  dropped.hidden = true;
  dropped.textContent = "";
}

function setContext(used) {
  const pct = contextLimit ? Math.min(100, (100 * used) / contextLimit) : 0;
  const bar = $("#status-context");
  bar.setAttribute("aria-valuenow", pct.toFixed(1));
  bar.dataset.level = pct > 90 ? "high" : pct > 70 ? "mid" : "low";
  $("#ctx-fill").style.width = `${pct}%`;
  $("#status-ctx").hidden = !used;
  if (contextLimit && used) {
    $("#status-context-text").textContent =
      `${formatNumber(used)} / ${formatNumber(contextLimit)} tokens`;
  }
}

/** Show the figures of a finished reply: a WebSocket "done" message, or an assistant
 * message's meta (same numbers) when a saved conversation is opened. */
export function showReplyStats({ usage, timing, dropped_turns }) {
  clearReplyStats();
  if (timing && typeof timing.tokens_per_s === "number") {
    $("#status-speed").textContent = `${timing.tokens_per_s.toFixed(1)} tok/s`;
  }
  if (timing && typeof timing.ttft_ms === "number") {
    $("#status-ttft").textContent = `TTFT ${Math.round(timing.ttft_ms)} ms`;
  }
  if (usage) {
    setContext((usage.prompt_tokens || 0) + (usage.completion_tokens || 0));
    if (typeof usage.cached_tokens === "number") {
      $("#status-cached").textContent = `${formatNumber(usage.cached_tokens)} cached`;
    }
  }
  const dropped = $("#status-dropped");
  if (dropped_turns > 0) {
    const turns = dropped_turns === 1 ? "1 older turn" : `${dropped_turns} older turns`;
    dropped.textContent = `${turns} left out to fit the context`;
    dropped.hidden = false;
  }
}

export function statsFromMeta(meta) {
  if (!meta || typeof meta.prompt_tokens !== "number") return null;
  return {
    usage: {
      prompt_tokens: meta.prompt_tokens,
      cached_tokens: meta.cached_tokens,
      completion_tokens: meta.completion_tokens,
    },
    timing: { ttft_ms: meta.ttft_ms, tokens_per_s: meta.tokens_per_s },
    dropped_turns: meta.dropped_turns || 0,
  };
}

export function setConnection(state, text) {
  const conn = $("#conn");
  conn.dataset.state = state;
  $("#conn-text").textContent = text || state;
}
