// The settings dialog: system prompt and sampling of the open conversation (or of story
// mode), the defaults for new chats (kept in this browser), presets, the API key and the
// language. The caller says what is being edited through getContext().

import { apiKey, setApiKey } from "./api.js";
import { lang, setLang, t } from "./i18n.js";
import { $, storage, toast } from "./util.js";

const FIELDS = {
  temperature: "#set-temperature",
  top_k: "#set-top-k",
  top_p: "#set-top-p",
  min_p: "#set-min-p",
  max_tokens: "#set-max-tokens",
  seed: "#set-seed",
  repetition_penalty: "#set-repetition-penalty",
  presence_penalty: "#set-presence-penalty",
  frequency_penalty: "#set-frequency-penalty",
};

export const FALLBACK_DEFAULTS = {
  temperature: 0.8,
  top_k: 40,
  top_p: 0.95,
  min_p: 0,
  max_tokens: 256,
  seed: null,
  repetition_penalty: 1,
  presence_penalty: 0,
  frequency_penalty: 0,
};

const DEFAULTS_KEY = "hexin.defaults";
const PRESETS_KEY = "hexin.presets";

/** Built-in presets: sampling only (max tokens and seed stay as they are). Their names
 * are shown translated ("preset.<name>"); the stored name stays the English one. */
const BUILTIN_PRESETS = {
  Precise: { temperature: 0.2, top_k: 40, top_p: 0.9, min_p: 0, repetition_penalty: 1 },
  Balanced: { temperature: 0.8, top_k: 40, top_p: 0.95, min_p: 0.05, repetition_penalty: 1 },
  Creative: { temperature: 1.1, top_k: null, top_p: 1, min_p: 0.05, repetition_penalty: 1.05 },
};

function readJson(key, fallback) {
  try {
    const value = JSON.parse(storage.get(key, "null"));
    return value && typeof value === "object" ? value : fallback;
  } catch {
    return fallback;
  }
}

/** The defaults for new chats set in this browser ({system_prompt, params}), or null. */
export function globalDefaults() {
  return readJson(DEFAULTS_KEY, null);
}

/** A preset's name as shown: a built-in one translated, one saved here as written. */
function presetLabel(name) {
  return name in BUILTIN_PRESETS ? t(`preset.${name}`) : name;
}

function presets() {
  return { ...BUILTIN_PRESETS, ...readJson(PRESETS_KEY, {}) };
}

/** Only the sampling fields the UI edits, with top_k 0 meaning "off" (null). */
export function pickParams(params, defaults = FALLBACK_DEFAULTS) {
  const out = {};
  for (const key of Object.keys(FIELDS)) {
    out[key] = params && key in params ? params[key] : defaults[key];
  }
  if (out.top_k === 0) out.top_k = null;
  return out;
}

/** The number in a field, checked; ``label`` is the i18n key of the field's name. */
function readNumber(sel, { integer = false, optional = false, min, max, label }) {
  const field = $(sel);
  const fail = (key) => new Error(t(key, { name: t(label), min, max }));
  if (field.validity?.badInput) throw fail("settings.notNumber");
  const raw = field.value.trim();
  if (raw === "") {
    if (optional) return null;
    throw fail("settings.required");
  }
  const value = Number(raw);
  if (!Number.isFinite(value)) throw fail("settings.notNumber");
  if (integer && !Number.isInteger(value)) throw fail("settings.notWhole");
  if (min !== undefined && value < min) throw fail("settings.atLeast");
  if (max !== undefined && value > max) throw fail("settings.atMost");
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
    $("#set-preset").addEventListener("change", (ev) => {
      const preset = presets()[ev.target.value];
      if (preset) this.fill({ ...this.readLoose(), ...preset });
    });
    $("#settings-save-preset").addEventListener("click", () => this.savePreset());
    // the language is not part of what Save keeps: it applies, and is stored, at once
    $("#set-language").addEventListener("change", (ev) => setLang(ev.target.value));
  }

  /** The fields, checked; null (the fault shown in the dialog) when one is wrong. */
  readOrReport() {
    try {
      return this.read();
    } catch (e) {
      this.showError(e.message);
      return null;
    }
  }

  /** The fields as they are, unchecked (for applying a preset over them). */
  readLoose() {
    try {
      return this.read();
    } catch {
      return this.ctx.params;
    }
  }

  savePreset() {
    const name = $("#preset-name").value.trim();
    if (!name) {
      this.showError(t("settings.presetNeedsName"));
      return;
    }
    const params = this.readOrReport();
    if (!params) return;
    const { max_tokens, seed, ...sampling } = params;
    const saved = readJson(PRESETS_KEY, {});
    saved[name] = sampling;
    storage.set(PRESETS_KEY, JSON.stringify(saved));
    this.fillPresets(name);
    toast(t("settings.presetSaved", { name }));
  }

  fillPresets(selected = "") {
    const select = $("#set-preset");
    select.replaceChildren(new Option(t("settings.presetChoose"), ""));
    for (const name of Object.keys(presets())) select.append(new Option(presetLabel(name), name));
    select.value = selected;
  }

  /** The dialog's built text again, in the language just chosen (it may be open). */
  relabel() {
    if (!this.ctx) return;
    $("#settings-scope").textContent = t(this.ctx.label);
    this.fillPresets($("#set-preset").value);
  }

  open() {
    const ctx = this.getContext();
    this.ctx = ctx;
    $("#settings-scope").textContent = t(ctx.label);
    $("#set-language").value = lang();
    $("#field-system").hidden = ctx.scope === "story";
    $("#field-global").hidden = ctx.scope === "story";
    $("#set-global").checked = false;
    $("#set-system").value = ctx.system_prompt || "";
    this.fill(ctx.params);
    this.fillPresets();
    $("#preset-name").value = "";
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
    const top_k = readNumber(FIELDS.top_k, {
      integer: true,
      optional: true,
      min: 0,
      label: "settings.topK",
    });
    const penalty = (sel, label, min, max) => readNumber(sel, { min, max, label });
    return {
      temperature: readNumber(FIELDS.temperature, {
        min: 0,
        max: 2,
        label: "settings.temperature",
      }),
      top_k: top_k === 0 ? null : top_k,
      top_p: readNumber(FIELDS.top_p, { min: 0, max: 1, label: "settings.topP" }),
      min_p: readNumber(FIELDS.min_p, { min: 0, max: 1, label: "settings.minP" }),
      max_tokens: readNumber(FIELDS.max_tokens, {
        integer: true,
        min: 1,
        label: "settings.maxTokens",
      }),
      seed: readNumber(FIELDS.seed, { integer: true, optional: true, label: "settings.seed" }),
      repetition_penalty: penalty(
        FIELDS.repetition_penalty,
        "settings.repetitionPenalty",
        0.01,
        10,
      ),
      presence_penalty: penalty(FIELDS.presence_penalty, "settings.presencePenalty", -2, 2),
      frequency_penalty: penalty(FIELDS.frequency_penalty, "settings.frequencyPenalty", -2, 2),
    };
  }

  async save() {
    const params = this.readOrReport();
    if (!params) return;
    const key = $("#set-api-key").value.trim();
    const keyChanged = key !== apiKey();
    if (keyChanged) setApiKey(key);
    const system_prompt = $("#set-system").value;
    try {
      await this.ctx.save({ system_prompt, params });
    } catch (e) {
      this.showError(e.message);
      if (keyChanged) this.onApiKeyChanged();
      return;
    }
    const global = this.ctx.scope !== "story" && $("#set-global").checked;
    if (global) storage.set(DEFAULTS_KEY, JSON.stringify({ system_prompt, params }));
    this.dialog.close();
    toast(t(`settings.saved.${this.ctx.scope}`) + (global ? t("settings.savedGlobal") : ""));
    if (keyChanged) this.onApiKeyChanged();
  }

  showError(message) {
    this.error.textContent = message;
    this.error.hidden = false;
  }
}
