// HTTP calls to the hexin server, the API key, and the connectivity state that drives
// the "server unreachable" banner.

import { t } from "./i18n.js";
import { storage } from "./util.js";

const KEY_STORAGE = "hexin.apiKey";

export function apiKey() {
  return storage.get(KEY_STORAGE, "");
}

export function setApiKey(key) {
  storage.set(KEY_STORAGE, (key || "").trim());
}

/** A URL relative to the page (the UI may be served below a path prefix). */
export function url(path) {
  const u = new URL(path, document.baseURI);
  u.hash = "";
  return u;
}

export function wsUrl(path) {
  const u = url(path);
  u.protocol = u.protocol === "https:" ? "wss:" : "ws:";
  return u.toString();
}

/** The subprotocols the chat socket offers: "hexin" (the one the server selects) and,
 * with a key, "hexin.key." + base64url(key). A browser cannot set an Authorization
 * header on a WebSocket, and a key in the URL would end up in access logs. */
export function wsProtocols() {
  const key = apiKey();
  if (!key) return ["hexin"];
  let bin = "";
  for (const byte of new TextEncoder().encode(key)) bin += String.fromCharCode(byte);
  const b64 = btoa(bin).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  return ["hexin", `hexin.key.${b64}`];
}

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Backoff delays: 0.5 s doubling up to 3 s (a server that comes back is found within
 * seconds), with some jitter so that many tabs do not retry in lockstep. */
export function backoff(attempt) {
  const base = Math.min(3000, 500 * 2 ** Math.min(attempt, 10));
  return Math.round(base * (0.85 + Math.random() * 0.3));
}

/**
 * Connectivity as seen by the page. Two sources report: the chat WebSocket ("ws") and
 * plain HTTP requests ("http"). Either being down shows the banner. While HTTP is down,
 * /health is polled with backoff until it answers.
 */
class Net extends EventTarget {
  constructor() {
    super();
    this.ws = null; // null (no socket), "ok", "down"
    this.http = "ok";
    this.auth = false; // the server refused our API key
    this.retryAt = 0; // when the next reconnection attempt happens (ms since epoch)
    this.note = ""; // an i18n key for why it is down, shown in the banner ("" for none)
    this.probeTimer = null;
    this.probeAttempt = 0;
  }

  get online() {
    return this.ws !== "down" && this.http !== "down";
  }

  report(source, state) {
    if (this[source] === state) return;
    this[source] = state;
    if (source === "http" && state === "down") this.scheduleProbe();
    if (source === "http" && state === "ok") {
      clearTimeout(this.probeTimer);
      this.probeTimer = null;
      this.probeAttempt = 0;
    }
    this.changed();
  }

  setAuthProblem(flag) {
    if (this.auth === flag) return;
    this.auth = flag;
    this.changed();
  }

  setRetryAt(ms) {
    this.retryAt = ms;
    this.changed();
  }

  changed() {
    this.dispatchEvent(new Event("change"));
  }

  scheduleProbe() {
    if (this.probeTimer) return;
    const delay = backoff(this.probeAttempt++);
    this.setRetryAt(Date.now() + delay);
    this.probeTimer = setTimeout(() => this.probe(), delay);
  }

  async probe() {
    this.probeTimer = null;
    try {
      const res = await fetch(url("health"), { cache: "no-store" });
      // 503 while the model loads still proves the server is there
      if (res.status === 200 || res.status === 503) {
        this.report("http", "ok");
        return;
      }
    } catch {
      /* still down */
    }
    this.scheduleProbe();
  }

  retryNow() {
    if (this.http === "down") {
      clearTimeout(this.probeTimer);
      this.probeTimer = null;
      this.probe();
    }
    this.dispatchEvent(new Event("retry"));
  }
}

export const net = new Net();

/**
 * fetch() against the server with the API key; JSON in and out. Throws ApiError with the
 * server's message (its errors look like {"error": {"message": ...}}); status 0 means the
 * server could not be reached.
 */
export async function api(path, { method = "GET", body, signal, stream = false } = {}) {
  const headers = {};
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(url(path), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    net.report("http", "down");
    throw new ApiError(0, t("api.unreachable"));
  }
  if (res.status === 502 || res.status === 504) {
    net.report("http", "down");
    throw new ApiError(res.status, t("api.gateway"));
  }
  net.report("http", "ok");
  if (res.status === 401) net.setAuthProblem(true);
  else if (res.ok) net.setAuthProblem(false);
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`;
    try {
      const data = await res.json();
      message = data?.error?.message || message;
    } catch {
      /* not JSON */
    }
    throw new ApiError(res.status, message);
  }
  if (stream) return res;
  if (res.status === 204) return null;
  return res.json();
}
