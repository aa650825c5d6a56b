// The status bar: model, speed and time to first token of the last reply, context used,
// cached tokens, and a notice when older turns were left out of the prompt.

import { t } from "./i18n.js";
import { $, formatNumber } from "./util.js";

let contextLimit = 0;

// what the bar shows, kept so that a language switch can write it out again (relabel)
const shown = { config: null, loading: false, stats: null, conn: null };

export function setModel(config) {
  shown.config = config;
  shown.loading = false;
  $("#status-model").textContent = config.model || t("status.modelUnnamed");
  contextLimit = config.context_limit || 0;
}

/** The server answered 503: its model is still loading. */
export function setModelLoading() {
  shown.loading = true;
  $("#status-model").textContent = t("status.modelLoading");
}

export function clearReplyStats() {
  shown.stats = null;
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
    $("#status-context-text").textContent = t("status.context", {
      used: formatNumber(used),
      limit: formatNumber(contextLimit),
    });
  }
}

/** Show the figures of a finished reply: a WebSocket "done" message, or an assistant
 * message's meta (same numbers) when a saved conversation is opened. */
export function showReplyStats(stats) {
  const { usage, timing, dropped_turns } = stats;
  clearReplyStats();
  shown.stats = stats;
  if (timing && typeof timing.tokens_per_s === "number") {
    $("#status-speed").textContent = t("status.speed", { rate: timing.tokens_per_s.toFixed(1) });
  }
  if (timing && typeof timing.ttft_ms === "number") {
    $("#status-ttft").textContent = t("status.ttft", { ms: Math.round(timing.ttft_ms) });
  }
  if (usage) {
    setContext((usage.prompt_tokens || 0) + (usage.completion_tokens || 0));
    if (typeof usage.cached_tokens === "number") {
      const count = formatNumber(usage.cached_tokens);
      $("#status-cached").textContent = t("status.cached", { count });
    }
  }
  const dropped = $("#status-dropped");
  if (dropped_turns > 0) {
    dropped.textContent = t("status.dropped", { count: dropped_turns });
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

/** The connection's state ("open", "down", ...: the dot's colour) and its label, given as
 * an i18n key ("conn.open") so that a language switch can say it again. */
export function setConnection(state, key) {
  shown.conn = { state, key };
  const conn = $("#conn");
  conn.dataset.state = state;
  $("#conn-text").textContent = t(key || `conn.${state}`);
}

/** Write the bar out again in the language just chosen. */
export function relabelStatus() {
  if (shown.loading) setModelLoading();
  else if (shown.config) setModel(shown.config);
  if (shown.stats) showReplyStats(shown.stats);
  if (shown.conn) setConnection(shown.conn.state, shown.conn.key);
}
