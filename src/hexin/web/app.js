// hexin web UI: routing (#/ new chat, #/c/<id> a conversation, #/story), the theme,
// the sidebar toggle, the connectivity banner, the language, and the wiring between the
// views.

import { api, net } from "./js/api.js";
import { ChatView } from "./js/chat.js";
import { applyI18n, onLangChange, t } from "./js/i18n.js";
import { FALLBACK_DEFAULTS, globalDefaults, pickParams, Settings } from "./js/settings.js";
import { Sidebar } from "./js/sidebar.js";
import { relabelStatus, setModel, setModelLoading } from "./js/status.js";
import { StoryView } from "./js/story.js";
import { exportAll, exportChat, importFiles } from "./js/transfer.js";
import { $, SESSION_ID_RE, storage, toast } from "./js/util.js";

const state = { config: null, view: "chat", configTimer: null };
const app = $("#app");

// the page's own text (index.html) in the chosen language, before the views add theirs
applyI18n(document);

/** Sampling for a new chat: this browser's defaults where set, else the server's. */
function defaults() {
  const server = state.config ? pickParams(state.config.defaults) : { ...FALLBACK_DEFAULTS };
  const mine = globalDefaults();
  return mine?.params ? pickParams(mine.params, server) : server;
}

// -- views --------------------------------------------------------------------------------
const sidebar = new Sidebar({
  onDeleted: (id) => {
    if (chat.sessionId === id) location.hash = "#/";
  },
  onNavigate: (what, s) => {
    if (what === "open") closeSidebar();
    if (what === "renamed" && chat.session && chat.session.id === s.id) {
      chat.session.title = s.title;
      $("#title").textContent = s.title || t("chat.new");
    }
  },
});

const chat = new ChatView({
  onSessionsChanged: () => sidebar.refreshSoon(),
  onSession: () => {
    $("#export-chat").hidden = !chat.session;
    sidebar.setActive(chat.sessionId);
    if (chat.sessionId) $("#tab-chat").setAttribute("href", `#/c/${chat.sessionId}`);
  },
});

chat.isVisible = () => state.view === "chat";
chat.newChatDefaults = () => ({
  system_prompt: globalDefaults()?.system_prompt || "",
  params: globalDefaults()?.params ? defaults() : null,
});

const story = new StoryView({ getDefaults: defaults });

const settings = new Settings({
  getDefaults: defaults,
  getContext: () => {
    if (state.view === "story") {
      return {
        scope: "story",
        label: "settings.scope.story", // an i18n key: the dialog says it in its language
        params: story.params,
        save: async ({ params }) => story.saveParams(params),
      };
    }
    if (chat.session) {
      const id = chat.session.id;
      return {
        scope: "session",
        label: "settings.scope.session",
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
            chat.render();
          }
        },
      };
    }
    return {
      scope: "draft",
      label: "settings.scope.draft",
      system_prompt: chat.draft.system_prompt || chat.newChatDefaults().system_prompt,
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
    $("#title").textContent = t("app.storyTitle");
    document.title = t("app.storyDocTitle");
  } else if (!chat.session) {
    $("#title").textContent = t(chat.missing ? "chat.notFoundTitle" : "chat.new");
    document.title = "hexin";
  } else {
    $("#title").textContent = chat.session.title || t("chat.new");
  }
}

window.addEventListener("hashchange", route);

$("#new-chat").addEventListener("click", () => {
  if (location.hash === "#/" || location.hash === "") route();
  else location.hash = "#/";
});

// -- sidebar on narrow screens -------------------------------------------------------------
const toggle = $("#sidebar-toggle");
// on a phone the closed sidebar is off-screen: inert, so that Tab does not walk into it
const narrow = window.matchMedia("(max-width: 760px)");
function syncSidebarInert() {
  $("#sidebar").inert = narrow.matches && !app.classList.contains("sidebar-open");
}
narrow.addEventListener("change", syncSidebarInert);

function openSidebar() {
  app.classList.add("sidebar-open");
  toggle.setAttribute("aria-expanded", "true");
  toggle.setAttribute("aria-label", t("sidebar.hide"));
  $("#scrim").hidden = false;
  syncSidebarInert();
  $("#session-search").focus();
}
function closeSidebar() {
  app.classList.remove("sidebar-open");
  toggle.setAttribute("aria-expanded", "false");
  toggle.setAttribute("aria-label", t("sidebar.show"));
  $("#scrim").hidden = true;
  syncSidebarInert();
}
toggle.addEventListener("click", () =>
  app.classList.contains("sidebar-open") ? closeSidebar() : openSidebar(),
);
$("#scrim").addEventListener("click", closeSidebar);

// -- theme: light, dark, or the system's (the button cycles through them) --------------------
const dark = window.matchMedia("(prefers-color-scheme: dark)");
function themeChoice() {
  return document.documentElement.dataset.theme || "system";
}
/** The choice after this one: from the system's theme to the other one first, so that a
 * click always changes what is seen, then the system's own, then back to it. */
function nextTheme() {
  const order = dark.matches ? ["system", "light", "dark"] : ["system", "dark", "light"];
  return order[(order.indexOf(themeChoice()) + 1) % order.length];
}
function labelTheme() {
  const choice = themeChoice();
  const next = nextTheme();
  const mode = t(dark.matches ? "theme.dark" : "theme.light");
  const shown = choice === "system" ? t("theme.systemShown", { mode }) : t(`theme.${choice}`);
  const label = t("theme.aria", { shown, next: t(`theme.${next}`) });
  $("#theme-toggle").setAttribute("aria-label", label);
  $("#theme-toggle").title = t("theme.title", { shown });
  $("#theme-toggle").dataset.theme = choice === "system" ? (dark.matches ? "dark" : "light") : choice;
  $("#theme-toggle").dataset.choice = choice;
}
$("#theme-toggle").addEventListener("click", () => {
  const next = nextTheme();
  if (next === "system") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = next;
  storage.set("hexin.theme", next === "system" ? "" : next);
  labelTheme();
});
dark.addEventListener("change", labelTheme);
labelTheme();

$("#open-settings").addEventListener("click", () => settings.open());

// the skip link moves focus; it must not change the route (the hash is the route)
$(".skip-link").addEventListener("click", (ev) => {
  ev.preventDefault();
  (state.view === "story" ? $("#story-prompt") : $("#input")).focus();
});

// -- import / export ----------------------------------------------------------------------
$("#export-chat").addEventListener("click", () => chat.session && exportChat(chat.session.id));
$("#export-all").addEventListener("click", exportAll);
$("#import-chats").addEventListener("click", () => $("#import-file").click());
$("#import-file").addEventListener("change", async (ev) => {
  const files = [...ev.target.files];
  ev.target.value = "";
  const ids = await importFiles(files);
  sidebar.refresh();
  if (ids.length === 1) location.hash = `#/c/${ids[0]}`;
});

// -- keyboard -----------------------------------------------------------------------------
const help = $("#help-dialog");
$("#open-help").addEventListener("click", () => help.showModal());

function typing(target) {
  return target instanceof HTMLElement && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
}

document.addEventListener("keydown", (ev) => {
  if (ev.defaultPrevented || document.querySelector("dialog[open]")) return;
  const mod = ev.ctrlKey || ev.metaKey;
  const key = ev.key.toLowerCase();
  if (mod && ev.shiftKey && key === "o") {
    ev.preventDefault();
    $("#new-chat").click();
  } else if (mod && !ev.shiftKey && key === "k") {
    ev.preventDefault();
    if (narrow.matches) openSidebar();
    $("#session-search").focus();
  } else if (ev.altKey && !mod && key === "r" && state.view === "chat") {
    ev.preventDefault();
    chat.regenerateLast();
  } else if (ev.key === "?" && !typing(ev.target)) {
    ev.preventDefault();
    help.showModal();
  }
});

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
    text.textContent = t("banner.auth");
    button.textContent = t("banner.openSettings");
  } else if (!net.online) {
    banner.hidden = false;
    banner.dataset.kind = "offline";
    const secs = Math.ceil((net.retryAt - Date.now()) / 1000);
    const lead = t(net.note || "banner.unreachable");
    text.textContent =
      secs > 0 ? t("banner.reconnectIn", { lead, secs }) : t("banner.reconnectNow", { lead });
    button.textContent = t("banner.retry");
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
// HTTP answers again while the socket waits out its backoff: try the socket now
net.addEventListener("change", () => {
  if (net.http === "ok" && net.ws === "down") chat.retryNow();
});
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
    chat.setModelLoading(false);
    setModel(state.config);
    if (retried) sidebar.refresh(); // the model was loading: the list was refused too
  } catch (e) {
    if (e.status === 503) {
      chat.setModelLoading(true);
      setModelLoading();
      state.configTimer = setTimeout(() => loadConfig(true), 1500);
    } else if (e.status !== 0 && e.status !== 401) {
      toast(t("app.configFailed", { message: e.message }), "error");
    }
    // status 0: the banner's probe brings us back online, which reloads the config
  }
}

// conversations created or changed elsewhere (another tab, an import, the API) appear
// without a reload: the list is read again every few seconds while the page is seen
const SIDEBAR_POLL_MS = 5000;
setInterval(() => {
  if (document.visibilityState === "visible" && net.online && !net.auth) sidebar.refresh();
}, SIDEBAR_POLL_MS);
window.addEventListener("focus", () => sidebar.refresh());
window.addEventListener("pagehide", () => sidebar.flushDeletes());

// -- language -------------------------------------------------------------------------------
// A switch (the select in the settings dialog) takes effect at once, without a reload:
// i18n.js has refilled the marked static text; here each view writes its built text again.
onLangChange(() => {
  relabelStatus();
  chat.relabel();
  sidebar.render();
  story.relabel();
  settings.relabel();
  setView(state.view); // last: the title is the shown view's (chat.relabel may set it)
  const open = app.classList.contains("sidebar-open");
  toggle.setAttribute("aria-label", t(open ? "sidebar.hide" : "sidebar.show"));
  labelTheme();
  updateBanner();
});

// -- start ----------------------------------------------------------------------------------
loadConfig();
sidebar.refresh();
syncSidebarInert();
route();
