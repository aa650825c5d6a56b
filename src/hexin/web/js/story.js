// Story mode: plain text continuation through POST /v1/completions with stream=true,
// read as server-sent events from a fetch() body; Stop aborts the request.

import { api, ApiError } from "./api.js";
import { t } from "./i18n.js";
import { pickParams } from "./settings.js";
import { $, h, storage, toast } from "./util.js";

const PARAMS_KEY = "hexin.story.params";
const PROMPT_KEY = "hexin.story.prompt";

/** Why a story ended, as the server (or Stop) says it; others are shown as they come. */
const FINISH_REASONS = ["length", "stopped", "stop"];

/** Split a growing SSE text buffer into complete events; returns [events, rest]. Each
 * event is the joined data: lines of one block. */
export function takeEvents(buffer) {
  const events = [];
  const text = buffer.replace(/\r\n/g, "\n");
  let start = 0;
  let end;
  while ((end = text.indexOf("\n\n", start)) >= 0) {
    const block = text.slice(start, end);
    start = end + 2;
    const data = [];
    for (const line of block.split("\n")) {
      if (line.startsWith("data:")) data.push(line.slice(line[5] === " " ? 6 : 5));
    }
    if (data.length) events.push(data.join("\n"));
  }
  return [events, text.slice(start)];
}

export class StoryView {
  constructor({ getDefaults }) {
    this.getDefaults = getDefaults;
    this.controller = null;
    this.el = {
      prompt: $("#story-prompt"),
      generate: $("#story-generate"),
      stop: $("#story-stop"),
      append: $("#story-continue"),
      output: $("#story-output"),
      stats: $("#story-stats"),
    };
    // a prompt not yet written here is the example one, in the UI's language
    this.el.prompt.value = storage.get(PROMPT_KEY) || t("story.defaultPrompt");
    this.el.prompt.addEventListener("input", () => storage.set(PROMPT_KEY, this.el.prompt.value));
    this.el.prompt.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
        ev.preventDefault();
        this.generate();
      }
    });
    this.el.generate.addEventListener("click", () => this.generate());
    this.el.stop.addEventListener("click", () => this.stop());
    this.el.append.addEventListener("click", () => {
      this.el.prompt.value = this.prompt + this.text;
      storage.set(PROMPT_KEY, this.el.prompt.value);
      this.el.append.disabled = true;
    });
    this.prompt = "";
    this.text = "";
    this.stats = null; // the figures of the last run, kept to say them again (relabel)
  }

  /** Say it again in the language just chosen: the figures, and the example prompt if
   * nothing was written over it. */
  relabel() {
    if (!storage.get(PROMPT_KEY) && !this.running) this.el.prompt.value = t("story.defaultPrompt");
    this.renderStats();
  }

  get params() {
    let stored = null;
    try {
      stored = JSON.parse(storage.get(PARAMS_KEY, "null"));
    } catch {
      stored = null;
    }
    return pickParams(stored || this.getDefaults(), this.getDefaults());
  }

  saveParams(params) {
    storage.set(PARAMS_KEY, JSON.stringify(params));
  }

  get running() {
    return this.controller !== null;
  }

  setRunning(running) {
    this.el.generate.hidden = running;
    this.el.stop.hidden = !running;
    this.el.prompt.readOnly = running;
    this.el.output.setAttribute("aria-busy", running ? "true" : "false");
    this.el.output.dataset.streaming = running ? "true" : "false";
  }

  renderOutput(done = false) {
    const { output } = this.el;
    output.replaceChildren(
      h("span", { class: "story-prompt-text" }, this.prompt),
      h("span", { class: "story-generated", "data-testid": "story-generated" }, this.text),
      done ? null : h("span", { class: "cursor", "aria-hidden": "true" }),
    );
  }

  async generate() {
    if (this.running) return;
    const prompt = this.el.prompt.value;
    if (!prompt.trim()) {
      toast(t("story.empty"), "error");
      return;
    }
    const p = this.params;
    this.prompt = prompt;
    this.text = "";
    this.stats = null;
    this.el.stats.textContent = "";
    this.el.append.disabled = true;
    this.controller = new AbortController();
    this.setRunning(true);
    this.renderOutput();
    const started = performance.now();
    let first = 0;
    let usage = null;
    let finish = "";
    try {
      const res = await api("v1/completions", {
        method: "POST",
        stream: true,
        signal: this.controller.signal,
        body: {
          prompt,
          stream: true,
          stream_options: { include_usage: true },
          temperature: p.temperature,
          top_k: p.top_k ?? 0,
          top_p: p.top_p,
          max_tokens: p.max_tokens,
          seed: p.seed,
        },
      });
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let frame = 0;
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        let events;
        [events, buffer] = takeEvents(buffer + value);
        for (const data of events) {
          if (data === "[DONE]") continue;
          let chunk;
          try {
            chunk = JSON.parse(data);
          } catch {
            continue;
          }
          if (chunk.usage) usage = chunk.usage;
          const choice = chunk.choices && chunk.choices[0];
          if (choice) {
            if (choice.text) {
              if (!first) first = performance.now();
              this.text += choice.text;
            }
            if (choice.finish_reason) finish = choice.finish_reason;
          }
        }
        if (!frame) {
          frame = requestAnimationFrame(() => {
            frame = 0;
            if (this.running) this.renderOutput();
          });
        }
      }
    } catch (e) {
      if (e.name !== "AbortError") {
        const text = e instanceof ApiError ? e.message : t("story.failed", { message: e.message });
        toast(text, "error", 6000);
      } else {
        finish = "stopped";
      }
    } finally {
      this.controller = null;
      this.setRunning(false);
      this.renderOutput(true);
      this.el.append.disabled = !this.text;
      this.showStats(started, first, usage, finish);
    }
  }

  /** Measure the run that just ended, then show it. */
  showStats(started, first, usage, finish) {
    const elapsed = (performance.now() - (first || started)) / 1000;
    const rate =
      usage && first && elapsed > 0 && usage.completion_tokens > 1
        ? ((usage.completion_tokens - 1) / elapsed).toFixed(1)
        : null;
    this.stats = {
      tokens: usage ? usage.completion_tokens : null,
      ttft: first ? Math.round(first - started) : null,
      rate,
      finish,
    };
    this.renderStats();
  }

  renderStats() {
    const s = this.stats;
    if (!s) return;
    const parts = [];
    if (s.tokens !== null) parts.push(t("story.tokens", { count: s.tokens }));
    if (s.ttft !== null) parts.push(t("status.ttft", { ms: s.ttft }));
    if (s.rate !== null) parts.push(t("status.speed", { rate: s.rate }));
    if (s.finish) {
      parts.push(FINISH_REASONS.includes(s.finish) ? t(`story.finish.${s.finish}`) : s.finish);
    }
    this.el.stats.textContent = parts.join(" · ");
  }

  stop() {
    if (this.controller) this.controller.abort();
  }
}
