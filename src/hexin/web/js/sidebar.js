// The conversations sidebar: newest first, search, rename inline, delete with undo.

import { api, apiKey, url } from "./api.js";
import { t } from "./i18n.js";
import { icon } from "./icons.js";
import { $, debounce, formatWhen, h, toast } from "./util.js";

/** How long a deleted conversation can be brought back. */
const UNDO_MS = 6000;

export class Sidebar {
  constructor({ onDeleted, onNavigate }) {
    this.onDeleted = onDeleted;
    this.onNavigate = onNavigate;
    this.list = $("#session-list");
    this.empty = $("#session-empty");
    this.search = $("#session-search");
    this.activeId = null;
    this.sessions = [];
    this.renaming = null;
    this.pending = new Map(); // deletes waiting out their undo time: id -> {timer, commit}
    this.seq = 0;
    const later = debounce(() => this.refresh(), 200);
    this.search.addEventListener("input", later);
    this.search.addEventListener("keydown", (ev) => {
      if (ev.key === "Escape" && this.search.value) {
        ev.stopPropagation();
        this.search.value = "";
        this.refresh();
      }
    });
    this.refreshSoon = debounce(() => this.refresh(), 150);
  }

  async refresh() {
    const seq = ++this.seq;
    const q = this.search.value.trim();
    let data;
    try {
      data = await api(q ? `api/sessions?q=${encodeURIComponent(q)}` : "api/sessions");
    } catch {
      return; // the banner tells about connectivity; keep the list we have
    }
    if (seq !== this.seq) return; // a newer refresh is under way
    this.sessions = [...data.sessions]
      .filter((s) => !this.pending.has(s.id))
      .sort((a, b) => b.updated_at - a.updated_at);
    this.render();
  }

  setActive(id) {
    this.activeId = id;
    for (const li of this.list.children) {
      const active = li.dataset.id === id;
      li.classList.toggle("active", active);
      const link = li.querySelector("a");
      if (link) {
        if (active) link.setAttribute("aria-current", "page");
        else link.removeAttribute("aria-current");
      }
    }
  }

  render() {
    const q = this.search.value.trim();
    this.list.replaceChildren(...this.sessions.map((s) => this.itemEl(s)));
    this.empty.hidden = this.sessions.length > 0;
    this.empty.textContent = t(q ? "sessions.noMatch" : "sessions.none");
  }

  itemEl(s) {
    const active = s.id === this.activeId;
    const title = s.title || t("sessions.untitled");
    const li = h("li", {
      class: active ? "session active" : "session",
      "data-testid": "session-item",
      "data-id": s.id,
    });
    if (this.renaming === s.id) {
      const input = h("input", {
        type: "text",
        class: "rename-input",
        "data-testid": "rename-input",
        "aria-label": t("sessions.newTitle"),
        maxlength: 200,
      });
      input.value = s.title;
      let done = false;
      const finish = async (save) => {
        if (done) return;
        done = true;
        this.renaming = null;
        if (save && input.value.trim() !== s.title) {
          try {
            await api(`api/sessions/${encodeURIComponent(s.id)}`, {
              method: "PATCH",
              body: { title: input.value.trim() },
            });
            s.title = input.value.trim();
            this.onNavigate?.("renamed", s);
          } catch (e) {
            toast(t("sessions.renameFailed", { message: e.message }), "error");
          }
        }
        this.render();
        this.refresh();
      };
      input.addEventListener("keydown", (ev) => {
        if (ev.key === "Enter") {
          ev.preventDefault();
          finish(true);
        } else if (ev.key === "Escape") {
          ev.preventDefault();
          ev.stopPropagation();
          finish(false);
        }
      });
      input.addEventListener("blur", () => finish(true));
      li.append(input);
      queueMicrotask(() => {
        input.focus();
        input.select();
      });
      return li;
    }
    const link = h(
      "a",
      {
        href: `#/c/${s.id}`,
        class: "session-link",
        "data-testid": "session-link",
        "aria-current": active ? "page" : null,
        title,
        onclick: () => this.onNavigate?.("open", s),
      },
      h("span", { class: "session-title", "data-testid": "session-title" }, title),
      h("span", { class: "session-when" }, formatWhen(s.updated_at)),
    );
    const rename = h(
      "button",
      {
        type: "button",
        class: "icon-btn small",
        "aria-label": t("sessions.renameTitle", { title }),
        "data-testid": "session-rename",
        title: t("sessions.rename"),
        onclick: () => {
          this.renaming = s.id;
          this.render();
        },
      },
      icon("pencil"),
    );
    const del = h(
      "button",
      {
        type: "button",
        class: "icon-btn small",
        "aria-label": t("sessions.deleteTitle", { title }),
        "data-testid": "session-delete",
        title: t("sessions.delete"),
        onclick: () => this.remove(s),
      },
      icon("trash"),
    );
    li.append(link, h("span", { class: "session-tools" }, rename, del));
    return li;
  }

  /** Delete a conversation, with a few seconds to undo: it leaves the list at once and
   * is deleted on the server when the time is up (or when the page goes away). */
  remove(s) {
    const title = s.title || t("sessions.untitled");
    const pending = { id: s.id, timer: null };
    const commit = async () => {
      clearTimeout(pending.timer);
      this.pending.delete(s.id);
      try {
        await api(`api/sessions/${encodeURIComponent(s.id)}`, { method: "DELETE" });
      } catch (e) {
        if (e.status !== 404) toast(t("sessions.deleteFailed", { message: e.message }), "error");
      }
      this.refresh();
    };
    pending.commit = commit;
    this.pending.set(s.id, pending);
    this.sessions = this.sessions.filter((x) => x.id !== s.id);
    this.render();
    this.onDeleted(s.id);
    const dismiss = toast(t("sessions.deleted", { title }), "info", UNDO_MS, {
      label: t("sessions.undo"),
      onClick: () => {
        clearTimeout(pending.timer);
        this.pending.delete(s.id);
        this.refresh();
      },
    });
    pending.timer = setTimeout(() => {
      dismiss();
      commit();
    }, UNDO_MS);
  }

  /** Carry out the deletes still waiting for their undo time (the page is closing). */
  flushDeletes() {
    for (const { id, timer } of this.pending.values()) {
      clearTimeout(timer);
      fetch(url(`api/sessions/${encodeURIComponent(id)}`), {
        method: "DELETE",
        keepalive: true,
        headers: apiKey() ? { Authorization: `Bearer ${apiKey()}` } : {},
      });
    }
    this.pending.clear();
  }
}
