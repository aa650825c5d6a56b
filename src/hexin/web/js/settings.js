// The settings dialog: system prompt and sampling of the open conversation (or of story
// mode), and the API key. The caller says what is being edited through getContext().

import { apiKey, setApiKey } from "./api.js";
import { $ } from "./util.js";

const FIELDS = {
  temperature: "#set-temperature",
  top_k: "#set-top-k",
  top_p: "#set-top-p",
  max_tokens: "#set-max-tokens",
  seed: "#set-seed",
};

export const FALLBACK_DEFAULTS = {
  temperature: 0.8,
  top_k: 40,
  top_p: 0.95,
  max_tokens: 256,
  seed: null,
};

/** Only the sampling fields the UI edits, with top_k 0 meaning "off" (null). */
export function pickParams(params, defaults = FALLBACK_DEFAULTS) {
  const out = {};
  for (const key of Object.keys(FIELDS)) {
    out[key] = params && key in params ? params[key] : defaults[key];
  }
  if (out.top_k === 0) out.top_k = null;
  return out;
}

function readNumber(sel, { integer = false, optional = false, min, max, name }) {
  const raw = $(sel).value.trim();
  if (raw === "") {
    if (optional) return null;
    throw new Error(`${name} is required`);
  }
  const value = Number(raw);
  if (!Number.isFinite(value)) throw new Error(`${name} must be a number`);
  if (integer && !Number.isInteger(value)) throw new Error(`${name} must be a whole number`);
  if (min !== undefined && value < min) throw new Error(`${name} must be at least ${min}`);
  if (max !== undefined && value > max) throw new Error(`${name} must be at most ${max}`);
  return value;
}

export class Settings {
  constructor({ getContext, getDefaults, onApiKeyChanged }) {
    this.getContext = getContext;
    this.getDefaults = getDefaults;
    this.onApiKeyChanged = onApiKeyChanged;
    this.dialog = $("#settings-dialog");
    this.error = $("#settings-error");
    $("#settings-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.save();
    });
    $("#settings-cancel").addEventListener("click", () => this.dialog.close());
    $("#settings-defaults").addEventListener("click", () => this.fill(this.getDefaults()));
  }

  open() {
    const ctx = this.getContext();
    this.ctx = ctx;
    $("#settings-scope").textContent = ctx.label;
    $("#field-system").hidden = ctx.scope === "story";
    $("#set-system").value = ctx.system_prompt || "";
    this.fill(ctx.params);
    $("#set-api-key").value = apiKey();
    this.error.hidden = true;
    this.dialog.showModal();
  }

  fill(params) {
    const p = pickParams(params, this.getDefaults());
    for (const [key, sel] of Object.entries(FIELDS)) {
      $(sel).value = p[key] === null || p[key] === undefined ? "" : String(p[key]);
    }
  }

  read() {
    const top_k = readNumber(FIELDS.top_k, { integer: true, optional: true, min: 0, name: "Top-k" });
    return {
      temperature: readNumber(FIELDS.temperature, { min: 0, max: 2, name: "Temperature" }),
      top_k: top_k === 0 ? null : top_k,
      top_p: readNumber(FIELDS.top_p, { min: 0, max: 1, name: "Top-p" }),
      max_tokens: readNumber(FIELDS.max_tokens, { integer: true, min: 1, name: "Max tokens" }),
      seed: readNumber(FIELDS.seed, { integer: true, optional: true, name: "Seed" }),
    };
  }

  async save() {
    let params;
    try {
      params = this.read();
    } catch (e) {
      this.showError(e.message);
      return;
    }
    const key = $("#set-api-key").value.trim();
    const keyChanged = key !== apiKey();
    if (keyChanged) setApiKey(key);
    try {
      await this.ctx.save({ system_prompt: $("#set-system").value, params });
    } catch (e) {
      this.showError(e.message);
      if (keyChanged) this.onApiKeyChanged();
      return;
    }
    this.dialog.close();
    if (keyChanged) this.onApiKeyChanged();
  }

  showError(message) {
    this.error.textContent = message;
    this.error.hidden = false;
  }
}
