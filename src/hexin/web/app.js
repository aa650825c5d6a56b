// hexin web UI: routing (#/ new chat, #/c/<id> a conversation, #/story), the theme,
// the sidebar toggle, the connectivity banner, and the wiring between the views.

import { api, net } from "./js/api.js";
import { ChatView } from "./js/chat.js";
import { FALLBACK_DEFAULTS, pickParams, Settings } from "./js/settings.js";
import { Sidebar } from "./js/sidebar.js";
import { setModel } from "./js/status.js";
import { StoryView } from "./js/story.js";
import { $, SESSION_ID_RE, storage, toast } from "./js/util.js";

const state = { config: null, view: "chat", configTimer: null };
const app = $("#app");

const defaults = () => (state.config ? pickParams(state.config.defaults) : { ...FALLBACK_DEFAULTS });

// -- views --------------------------------------------------------------------------------
const sidebar = new Sidebar({
  onDeleted: (id) => {
    if (chat.sessionId === id) location.hash = "#/";
  },
  onNavigate: (what, s) => {
    if (what === "open") closeSidebar();
    if (what === "renamed" && chat.session && chat.session.id === s.id) {
      chat.session.title = s.title;
      $("#title").textContent = s.title || "New chat";
    }
  },
});

const chat = new ChatView({
  onSessionsChanged: () => sidebar.refreshSoon(),
  onSession: () => {
    sidebar.setActive(chat.sessionId);
    if (chat.sessionId) $("#tab-chat").setAttribute("href", `#/c/${chat.sessionId}`);
  },
});

const story = new StoryView({ getDefaults: defaults });

const settings = new Settings({
  getDefaults: defaults,
  getContext: () => {
    if (state.view === "story") {
      return {
        scope: "story",
        label: "Sampling for story mode (kept in this browser).",
        params: story.params,
        save: async ({ params }) => story.saveParams(params),
      };
    }
    if (chat.session) {
      const id = chat.session.id;
      return {
        scope: "session",
        label: "For this conversation; saved on the server.",
        system_prompt: chat.session.system_prompt,
        params: chat.session.params,
        save: async ({ system_prompt, params }) => {
          const view = await api(`api/sessions/${encodeURIComponent(id)}`, {
            method: "PATCH",
            body: { system_prompt, params },
          });
          if (chat.session && chat.session.id === id) {
            chat.session.system_prompt = view.system_prompt;
            chat.session.params = view.params;
          }
        },
      };
    }
    return {
      scope: "draft",
      label: "For the new conversation; applied when you send its first message.",
      system_prompt: chat.draft.system_prompt,
      params: chat.draft.params || defaults(),
      save: async ({ system_prompt, params }) => {
        chat.draft = { system_prompt, params };
      },
    };
  },
  onApiKeyChanged: () => {
    net.setAuthProblem(false);
    loadConfig();
    sidebar.refresh();
    chat.reconnect();
  },
});

// -- routing ------------------------------------------------------------------------------
function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const match = hash.match(/^\/c\/([^/?#]+)$/);
  closeSidebar();
  if (hash === "/story") {
    setView("story");
    return;
  }
  setView("chat");
  const id = match ? decodeURIComponent(match[1]) : null;
  if (id && SESSION_ID_RE.test(id)) {
    sidebar.setActive(id);
    chat.open(id);
  } else {
    if (hash !== "/") history.replaceState(null, "", "#/");
    sidebar.setActive(null);
    $("#tab-chat").setAttribute("href", "#/");
    chat.showNew();
  }
}

function setView(view) {
  state.view = view;
  app.dataset.view = view;
  $("#chat-view").hidden = view !== "chat";
  $("#story-view").hidden = view !== "story";
  $("#tab-chat").classList.toggle("active", view === "chat");
  $("#tab-story").classList.toggle("active", view === "story");
  $("#tab-chat").toggleAttribute("aria-current", view === "chat");
  $("#tab-story").toggleAttribute("aria-current", view === "story");
  if (view === "story") {
    $("#title").textContent = "Story mode";
    document.title = "Story · hexin";
  } else if (!chat.session) {
    $("#title").textContent = chat.missing ? "Conversation not found" : "New chat";
    document.title = "hexin";
  } else {
    $("#title").textContent = chat.session.title || "New chat";
  }
}

window.addEventListener("hashchange", route);

$("#new-chat").addEventListener("click", () => {
  if (location.hash === "#/" || location.hash === "") route();
  else location.hash = "#/";
});

// -- sidebar on narrow screens -------------------------------------------------------------
const toggle = $("#sidebar-toggle");
function openSidebar() {
  app.classList.add("sidebar-open");
  toggle.setAttribute("aria-expanded", "true");
  toggle.setAttribute("aria-label", "Hide conversations");
  $("#scrim").hidden = false;
}
function closeSidebar() {
  app.classList.remove("sidebar-open");
  toggle.setAttribute("aria-expanded", "false");
  toggle.setAttribute("aria-label", "Show conversations");
  $("#scrim").hidden = true;
}
toggle.addEventListener("click", () =>
  app.classList.contains("sidebar-open") ? closeSidebar() : openSidebar(),
);
$("#scrim").addEventListener("click", closeSidebar);

// -- theme --------------------------------------------------------------------------------
const dark = window.matchMedia("(prefers-color-scheme: dark)");
function effectiveTheme() {
  return document.documentElement.dataset.theme || (dark.matches ? "dark" : "light");
}
function labelTheme() {
  const other = effectiveTheme() === "dark" ? "light" : "dark";
  $("#theme-toggle").setAttribute("aria-label", `Switch to ${other} theme`);
  $("#theme-toggle").dataset.theme = effectiveTheme();
}
$("#theme-toggle").addEventListener("click", () => {
  const next = effectiveTheme() === "dark" ? "light" : "dark";
  document.documentElement.dataset.theme = next;
  storage.set("hexin.theme", next);
  labelTheme();
});
dark.addEventListener("change", labelTheme);
labelTheme();

$("#open-settings").addEventListener("click", () => settings.open());

// -- keyboard -----------------------------------------------------------------------------
document.addEventListener("keydown", (ev) => {
  if (ev.key !== "Escape" || ev.defaultPrevented) return;
  if (document.querySelector("dialog[open]")) return;
  if (state.view === "chat" && chat.busy) {
    ev.preventDefault();
    chat.stop();
  } else if (state.view === "story" && story.running) {
    ev.preventDefault();
    story.stop();
  } else if (app.classList.contains("sidebar-open")) {
    closeSidebar();
  }
});

// -- connectivity -------------------------------------------------------------------------
const banner = $("#banner");
let bannerTimer = null;
let wasOnline = true;

function updateBanner() {
  const text = $("#banner-text");
  const button = $("#banner-retry");
  if (net.auth) {
    banner.hidden = false;
    banner.dataset.kind = "auth";
    text.textContent = "The server wants an API key, or the one given is wrong.";
    button.textContent = "Open settings";
  } else if (!net.online) {
    banner.hidden = false;
    banner.dataset.kind = "offline";
    const secs = Math.ceil((net.retryAt - Date.now()) / 1000);
    const lead = net.note || "Cannot reach the server.";
    text.textContent = `${lead} Reconnecting ${secs > 0 ? `in ${secs} s` : "now"}…`;
    button.textContent = "Retry now";
  } else {
    banner.hidden = true;
    delete banner.dataset.kind;
  }
  if (!banner.hidden && !bannerTimer) bannerTimer = setInterval(updateBanner, 1000);
  if (banner.hidden && bannerTimer) {
    clearInterval(bannerTimer);
    bannerTimer = null;
  }
}

net.addEventListener("change", () => {
  updateBanner();
  if (net.online && !wasOnline) {
    // back: refresh what may have changed while we were away
    if (!state.config) loadConfig();
    sidebar.refresh();
  }
  wasOnline = net.online;
});
net.addEventListener("retry", () => chat.retryNow());
$("#banner-retry").addEventListener("click", () => {
  if (net.auth) settings.open();
  else net.retryNow();
});
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && !net.online) net.retryNow();
});

async function loadConfig(retried = false) {
  clearTimeout(state.configTimer);
  try {
    state.config = await api("api/config");
    setModel(state.config);
    if (retried) sidebar.refresh(); // the model was loading: the list was refused too
  } catch (e) {
    if (e.status === 503) {
      $("#status-model").textContent = "loading model…";
      state.configTimer = setTimeout(() => loadConfig(true), 1500);
    } else if (e.status !== 0 && e.status !== 401) {
      toast(`Could not read the server configuration: ${e.message}`, "error");
    }
    // status 0: the banner's probe brings us back online, which reloads the config
  }
}

// -- start ----------------------------------------------------------------------------------
loadConfig();
sidebar.refresh();
route();
