// The conversation view: one WebSocket per open session (/c/{id}), streamed replies,
// versions (regenerate / edit) with a < i/n > pager, rollback, copy, auto-scroll.

import { api, ApiError, backoff, net, wsProtocols, wsUrl } from "./api.js";
import { t } from "./i18n.js";
import { renderMarkdown } from "./markdown.js";
import { clearReplyStats, setConnection, showReplyStats, statsFromMeta } from "./status.js";
import { $, copyText, h, storage, toast } from "./util.js";

const STOP_GRACE_MS = 8000;

/** Where a chat's unsent text is kept (per conversation; "new" for a chat not created). */
const draftKey = (id) => `hexin.draft.${id || "new"}`;

/** The largest text file that can be attached to a message. */
const MAX_ATTACHMENT_CHARS = 60000;

/** Say something to screen readers, politely (the live region in index.html). */
export function announce(text) {
  const region = $("#announcer");
  if (!region) return;
  region.textContent = "";
  setTimeout(() => (region.textContent = text), 50);
}

/** A WebSocket to one session that reconnects with exponential backoff. The connection
 * counts as up once the server's first "session" message arrives. */
class ChatSocket {
  constructor({ onMessage, onState }) {
    this.onMessage = onMessage;
    this.onState = onState;
    this.ws = null;
    this.id = null;
    this.ready = false;
    this.attempt = 0;
    this.timer = null;
  }

  open(id) {
    this.close();
    this.id = id;
    this.attempt = 0;
    this.connect();
  }

  connect() {
    clearTimeout(this.timer);
    this.timer = null;
    if (!this.id) return;
    const ws = new WebSocket(wsUrl(`c/${encodeURIComponent(this.id)}`), wsProtocols());
    this.ws = ws;
    this.ready = false;
    this.onState(this.attempt ? "reconnecting" : "connecting");
    let loading = false;
    ws.addEventListener("message", (ev) => {
      if (ws !== this.ws) return;
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (msg.type === "error" && msg.message === "model is loading") loading = true;
      if (!this.ready && msg.type === "session") {
        this.ready = true;
        this.attempt = 0;
        net.setAuthProblem(false);
        net.note = "";
        net.report("ws", "ok");
        this.onState("open");
      }
      this.onMessage(msg);
    });
    ws.addEventListener("close", (ev) => {
      if (ws !== this.ws) return;
      this.ws = null;
      const wasReady = this.ready;
      this.ready = false;
      this.onState("closed", { wasReady });
      if (ev.code === 4401) {
        // wrong or missing API key: retrying cannot help until the key changes
        net.report("ws", null);
        net.setAuthProblem(true);
        this.onState("unauthorized");
        return;
      }
      if (ev.code === 4400) {
        net.report("ws", null);
        this.onState("invalid");
        return;
      }
      net.note = loading || ev.code === 1013 ? "banner.modelLoading" : "";
      net.report("ws", "down");
      this.schedule();
    });
  }

  schedule() {
    const delay = backoff(this.attempt++);
    net.setRetryAt(Date.now() + delay);
    this.onState("reconnecting");
    this.timer = setTimeout(() => this.connect(), delay);
  }

  retryNow() {
    if (this.id && !this.ws) this.connect();
  }

  close() {
    clearTimeout(this.timer);
    this.timer = null;
    const ws = this.ws;
    this.ws = null;
    this.id = null;
    this.ready = false;
    if (ws) ws.close(1000);
    net.report("ws", null);
  }

  send(payload) {
    if (!this.ws || !this.ready || this.ws.readyState !== WebSocket.OPEN) return false;
    this.ws.send(JSON.stringify(payload));
    return true;
  }
}

export class ChatView {
  constructor({ onSessionsChanged, onSession }) {
    this.onSessionsChanged = onSessionsChanged; // the sidebar should refresh
    this.onSession = onSession; // the open session (or null) changed
    this.sessionId = null;
    this.session = null;
    this.byId = new Map();
    this.path = [];
    this.streaming = null; // {parentId, text, el, body, frame}
    this.busy = false; // a generating request was sent and its "done" has not come
    this.stopTimer = null;
    this.editing = null; // {id, draft}
    this.pendingSend = null; // {id, text}: first message of a conversation just created
    this.preloaded = null;
    this.routeToken = 0;
    this.stick = true;
    this.draft = { system_prompt: "", params: null }; // settings of a chat not yet created
    this.modelLoading = false; // the server is still loading its model
    this.unavailable = false; // the open conversation could not be read (server down)
    this.interrupted = null; // a partial reply cut off by a lost connection: {parentId, el}
    this.stopping = false; // Stop was pressed; the reply's "done" has not come yet
    this.attachments = []; // text files dropped on the message box: {name, text}
    this.isVisible = () => true; // whether the chat view is the one shown (not story)
    this.newChatDefaults = () => ({ system_prompt: "", params: null }); // set by the app

    this.el = {
      view: $("#chat-view"),
      scroller: $("#messages"),
      inner: $("#messages-inner"),
      input: $("#input"),
      form: $("#composer"),
      send: $("#send"),
      stop: $("#stop"),
      jump: $("#jump"),
      title: $("#title"),
    };
    this.socket = new ChatSocket({
      onMessage: (msg) => this.handle(msg),
      onState: (state, info) => this.socketState(state, info),
    });
    this.bind();
    this.updateComposer();
  }

  bind() {
    const { form, input, stop, scroller, jump } = this.el;
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.submit();
    });
    input.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229) {
        ev.preventDefault();
        this.submit();
      }
    });
    // a text file dropped on the message box is attached: sent as a fenced block
    form.addEventListener("dragover", (ev) => {
      if (ev.dataTransfer?.types?.includes("Files")) {
        ev.preventDefault();
        form.classList.add("dropping");
      }
    });
    form.addEventListener("dragleave", () => form.classList.remove("dropping"));
    form.addEventListener("drop", (ev) => {
      form.classList.remove("dropping");
      if (!ev.dataTransfer?.files?.length) return;
      ev.preventDefault();
      this.attach([...ev.dataTransfer.files]);
    });
    input.addEventListener("input", () => {
      this.autosize();
      storage.set(draftKey(this.sessionId), input.value);
    });
    stop.addEventListener("click", () => this.stop());
    scroller.addEventListener("scroll", () => {
      const gap = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight;
      this.stick = gap < 48;
      jump.hidden = this.stick;
    });
    scroller.addEventListener("wheel", (ev) => {
      if (ev.deltaY < 0) {
        this.stick = false;
        jump.hidden = false;
      }
    });
    jump.addEventListener("click", () => {
      this.stick = true;
      jump.hidden = true;
      this.scrollToBottom();
    });
  }

  async attach(files) {
    for (const file of files) {
      const text = await file.text();
      if (text.includes("\u0000")) {
        toast(t("chat.notText", { name: file.name }), "error");
      } else if (text.length > MAX_ATTACHMENT_CHARS) {
        toast(t("chat.tooLong", { name: file.name, max: MAX_ATTACHMENT_CHARS }), "error");
      } else {
        this.attachments.push({ name: file.name, text });
      }
    }
    this.renderAttachments();
  }

  renderAttachments() {
    const list = $("#attachments");
    list.hidden = !this.attachments.length;
    list.replaceChildren(
      ...this.attachments.map((a, i) =>
        h(
          "li",
          { class: "attachment", "data-testid": "attachment" },
          h("span", {}, a.name),
          h(
            "button",
            {
              type: "button",
              class: "icon-btn small",
              "aria-label": t("chat.removeAttachment", { name: a.name }),
              onclick: () => {
                this.attachments.splice(i, 1);
                this.renderAttachments();
              },
            },
            "×",
          ),
        ),
      ),
    );
  }

  /** The message to send: the attached files as fenced blocks, then what was typed. */
  composed(text) {
    const files = this.attachments.map((a) => {
      const fence = a.text.includes("```") ? "~~~~" : "```";
      return `${a.name}:\n${fence}\n${a.text.replace(/\n$/, "")}\n${fence}`;
    });
    return [...files, text].filter((x) => x.trim()).join("\n\n");
  }

  autosize() {
    const { input } = this.el;
    input.style.height = "auto";
    input.style.height = `${Math.min(input.scrollHeight, 240)}px`;
  }

  // -- routing --------------------------------------------------------------------------
  /** Show a new, empty chat; it is created on the server when its first message is sent. */
  showNew() {
    this.routeToken++;
    this.socket.close();
    this.reset(null);
    this.showIdle();
    this.onSession(null);
    this.render();
    this.el.input.focus();
  }

  /** The connection label of a chat with no socket: ready, or waiting for the model. */
  showIdle() {
    if (this.modelLoading) setConnection("connecting", "conn.loading");
    else setConnection("idle", "conn.idle");
  }

  setModelLoading(loading) {
    if (this.modelLoading === loading) return;
    this.modelLoading = loading;
    if (!this.socket.id) this.showIdle();
    this.updateComposer();
  }

  async open(id) {
    if (id === this.sessionId && this.socket.id === id) return;
    const token = ++this.routeToken;
    this.socket.close();
    this.reset(id);
    this.onSession(null);
    this.render();
    let view = this.preloaded && this.preloaded.id === id ? this.preloaded : null;
    this.preloaded = null;
    if (!view) {
      try {
        view = await api(`api/sessions/${encodeURIComponent(id)}`);
      } catch (e) {
        if (token !== this.routeToken) return;
        if (e instanceof ApiError && e.status === 404) {
          this.showMissing(id);
          return;
        }
        // unreachable or loading: the socket below retries and brings the state; until
        // then say so, rather than show an empty chat as if its history were gone
        if (e instanceof ApiError && e.status !== 0 && e.status !== 503) {
          toast(e.message, "error");
        }
        this.unavailable = true;
        this.render();
        this.updateComposer();
      }
    }
    if (token !== this.routeToken) return;
    if (view) this.setSession(view);
    this.socket.open(id);
  }

  reset(id) {
    this.sessionId = id;
    this.session = null;
    this.byId = new Map();
    this.path = [];
    this.streaming = null;
    this.busy = false;
    this.editing = null;
    this.stick = true;
    this.missing = false;
    this.unavailable = false;
    this.interrupted = null;
    this.stopping = false;
    clearTimeout(this.stopTimer);
    clearReplyStats();
    if (this.isVisible()) this.el.title.textContent = t("chat.new");
    this.el.input.disabled = false;
    this.el.input.value = storage.get(draftKey(id), "");
    this.autosize();
    this.updateComposer();
  }

  showMissing(id) {
    this.missing = true;
    this.missingId = id; // to say it again after a language switch
    this.sessionId = null;
    this.showIdle();
    this.updateComposer();
    this.el.title.textContent = t("chat.notFoundTitle");
    this.el.inner.replaceChildren(
      h(
        "div",
        { class: "empty", "data-testid": "missing" },
        h("h2", {}, t("chat.notFoundHeading")),
        h("p", {}, t("chat.notFoundText", { id })),
        h("p", {}, h("a", { href: "#/", class: "btn btn-primary" }, t("chat.startNew"))),
      ),
    );
  }

  retryNow() {
    this.socket.retryNow();
  }

  reconnect() {
    // after the API key changed
    if (this.sessionId && !this.missing) {
      const id = this.sessionId;
      this.sessionId = null;
      this.open(id);
    }
  }

  /** Say it all again in the language just chosen: the messages are rebuilt (roles,
   * badges, buttons) and the composer relabelled. A reply kept across renders (streaming,
   * or cut off by an outage) carries data-i18n, which applyI18n has reached already. */
  relabel() {
    if (this.missing) this.showMissing(this.missingId);
    else this.render();
    this.renderAttachments();
    this.updateComposer();
  }

  // -- server messages ------------------------------------------------------------------
  socketState(state, info) {
    if (state === "open") setConnection("open", "conn.open");
    else if (state === "connecting") setConnection("connecting", "conn.connecting");
    else if (state === "reconnecting") setConnection("down", "conn.reconnecting");
    else if (state === "unauthorized") setConnection("down", "conn.unauthorized");
    else if (state === "invalid") setConnection("down", "conn.invalid");
    else if (state === "closed" && info?.wasReady && (this.streaming || this.busy)) {
      // the server saves an interrupted reply as stopped; the next "session" shows it.
      // Until then the partial reply stays, marked, instead of vanishing.
      const s = this.streaming;
      if (s?.text) {
        if (s.frame) cancelAnimationFrame(s.frame);
        s.body.replaceChildren(renderMarkdown(s.text));
        s.el.classList.remove("streaming");
        s.el.removeAttribute("aria-busy");
        s.el.removeAttribute("data-streaming");
        s.el.querySelector(".cursor")?.remove();
        s.el.append(
          h(
            "div",
            { class: "msg-actions" },
            // this element outlives re-renders: data-i18n lets a language switch reach it
            h(
              "span",
              {
                class: "badge badge-warn",
                "data-testid": "interrupted-badge",
                "data-i18n": "chat.interrupted",
              },
              t("chat.interrupted"),
            ),
          ),
        );
        this.interrupted = { parentId: s.parentId, el: s.el };
      }
      this.streaming = null;
      this.busy = false;
      this.stopping = false;
      this.render();
      this.updateComposer();
    }
  }

  handle(msg) {
    switch (msg.type) {
      case "session":
        this.setSession(msg.session);
        this.flushPending();
        break;
      case "user_message":
        this.addUserMessage(msg.message);
        this.onSessionsChanged();
        break;
      case "reply_start":
        this.beginStream(msg.parent_id);
        break;
      case "progress":
        this.showProgress(msg);
        break;
      case "token":
        this.appendToken(msg.text);
        break;
      case "done":
        this.finishStream(msg);
        break;
      case "error":
        this.serverError(msg.message);
        break;
      default:
        break;
    }
  }

  setSession(session) {
    if (session.id !== this.sessionId) return;
    this.session = session;
    this.byId = new Map(session.messages.map((m) => [m.id, m]));
    this.path = session.path.slice();
    this.unavailable = false;
    if (!this.busy) this.streaming = null;
    // a partial reply cut off by an outage stays until the server shows what it saved
    const cut = this.interrupted;
    if (cut && this.path.some((m) => m.parent_id === cut.parentId && m.role === "assistant")) {
      this.interrupted = null;
    }
    if (this.isVisible()) {
      // a reply finishing in the background must not retitle the story view
      this.el.title.textContent = session.title || t("chat.new");
      document.title = session.title ? `${session.title} · hexin` : "hexin";
    }
    this.onSession(session);
    const last = [...this.path].reverse().find((m) => m.role === "assistant");
    const stats = last && statsFromMeta(last.meta);
    if (stats) showReplyStats(stats);
    else clearReplyStats();
    this.render();
    this.updateComposer();
  }

  flushPending() {
    const pending = this.pendingSend;
    if (!pending || pending.id !== this.sessionId) return;
    this.pendingSend = null;
    if (!this.socket.send({ type: "user", content: pending.text })) {
      this.el.input.value = pending.text;
      toast(t("chat.notSent"), "error");
      return;
    }
    this.busy = true;
    this.updateComposer();
  }

  addUserMessage(message) {
    this.byId.set(message.id, message);
    const idx = this.path.findIndex((m) => m.id === message.id);
    if (idx >= 0) {
      this.path = this.path.slice(0, idx + 1); // regenerate: the reply below is replaced
    } else {
      const parent = message.parent_id
        ? this.path.findIndex((m) => m.id === message.parent_id)
        : -1;
      this.path = [...this.path.slice(0, parent + 1), message];
    }
    this.busy = true;
    this.stick = true;
    this.render();
    this.updateComposer();
  }

  beginStream(parentId) {
    const body = h("div", { class: "msg-body md", "data-testid": "message-content" });
    const el = h(
      "article",
      {
        class: "msg msg-assistant streaming",
        "data-testid": "message",
        "data-role": "assistant",
        "data-streaming": "true",
        "aria-busy": "true",
      },
      h("div", { class: "msg-role", "data-i18n": "chat.assistant" }, t("chat.assistant")),
      body,
      h("span", { class: "cursor", "aria-hidden": "true" }),
    );
    // a continued reply streams on from its text so far (it left the path meanwhile)
    const cont = this.continuing?.parent_id === parentId ? this.continuing : null;
    this.continuing = null;
    this.streaming = { parentId, text: cont ? cont.content : "", el, body, frame: 0 };
    if (cont) body.replaceChildren(renderMarkdown(cont.content));
    this.busy = true;
    this.el.inner.querySelector(".empty")?.remove();
    this.el.inner.append(el);
    this.updateComposer();
    this.afterContentChange();
  }

  /** Prompt processing before the first token: "Processing 40% · about 3 s left". The
   * rate is measured from the first progress frame of this reply. */
  showProgress({ done, total, cached }) {
    const s = this.streaming;
    if (!s || s.text || !total) return;
    const now = performance.now();
    if (!s.progress) {
      s.progress = { t0: now, done0: done };
      s.meter = h("div", { class: "progress", "data-testid": "prompt-progress", role: "status" });
      s.el.insertBefore(s.meter, s.body);
    }
    const pct = Math.floor((100 * done) / total);
    const rate = (done - s.progress.done0) / ((now - s.progress.t0) / 1000);
    const left = rate > 0 ? Math.ceil((total - done) / rate) : null;
    const eta = left === null ? "" : t("chat.progressEta", { left });
    const reused = cached ? t("chat.progressCached", { cached }) : "";
    s.meter.textContent = t("chat.progress", { pct, total, reused, eta });
    s.meter.dataset.percent = String(pct);
  }

  appendToken(text) {
    const s = this.streaming;
    if (!s) return;
    if (s.meter) {
      s.meter.remove();
      s.meter = null;
    }
    s.text += text;
    if (!s.frame) {
      s.frame = requestAnimationFrame(() => {
        s.frame = 0;
        s.body.replaceChildren(renderMarkdown(s.text));
        this.afterContentChange();
      });
    }
  }

  finishStream(msg) {
    clearTimeout(this.stopTimer);
    if (this.streaming?.frame) cancelAnimationFrame(this.streaming.frame);
    this.streaming = null;
    this.busy = false;
    this.stopping = false;
    const message = msg.message;
    if (message) {
      const how = message.status === "stopped" ? "chat.announceStopped" : "chat.announceFinished";
      announce(t(how, { text: message.content.slice(0, 300) }));
    }
    if (message) {
      this.byId.set(message.id, message);
      const parent = this.path.findIndex((m) => m.id === message.parent_id);
      this.path = [...this.path.slice(0, parent + 1), message];
    }
    showReplyStats(msg);
    this.render();
    this.updateComposer();
    this.onSessionsChanged();
    this.socket.send({ type: "session" }); // versions and title, as the server has them
  }

  serverError(message) {
    toast(message, "error", 6000);
    if (this.busy && !this.streaming) {
      this.busy = false; // the request was refused before a reply started
      this.updateComposer();
    }
  }

  // -- actions --------------------------------------------------------------------------
  async submit() {
    const { input } = this.el;
    const text = this.composed(input.value);
    if (!text.trim() || this.busy || this.creating || this.el.send.disabled) return;
    if (!this.sessionId) {
      await this.createAndSend(text);
      return;
    }
    if (!this.socket.send({ type: "user", content: text })) {
      toast(t("chat.notConnectedRetry"), "error");
      return;
    }
    this.busy = true;
    input.value = "";
    this.attachments = [];
    this.renderAttachments();
    storage.set(draftKey(this.sessionId), "");
    this.autosize();
    this.updateComposer();
  }

  async createAndSend(text) {
    this.creating = true;
    this.updateComposer();
    try {
      const body = {};
      const base = this.newChatDefaults();
      const systemPrompt = this.draft.system_prompt || base.system_prompt;
      const params = this.draft.params || base.params;
      if (systemPrompt) body.system_prompt = systemPrompt;
      if (params) body.params = params;
      const view = await api("api/sessions", { method: "POST", body });
      this.draft = { system_prompt: "", params: null };
      this.el.input.value = "";
      this.attachments = [];
      this.renderAttachments();
      storage.set(draftKey(null), "");
      this.autosize();
      this.pendingSend = { id: view.id, text };
      this.preloaded = view;
      this.onSessionsChanged();
      location.hash = `#/c/${view.id}`;
    } catch (e) {
      toast(t("chat.startFailed", { message: e.message }), "error");
    } finally {
      this.creating = false;
      this.updateComposer();
    }
  }

  stop() {
    if (!this.busy) return;
    this.socket.send({ type: "stop" });
    this.stopping = true;
    this.updateComposer();
    clearTimeout(this.stopTimer);
    // if no "done" comes (the reply failed), do not leave the page stuck
    this.stopTimer = setTimeout(() => {
      if (!this.busy) return;
      this.busy = false;
      this.stopping = false;
      this.streaming = null;
      this.updateComposer();
      this.socket.send({ type: "session" });
    }, STOP_GRACE_MS);
  }

  request(payload) {
    if (this.busy) return false;
    if (!this.socket.send(payload)) {
      toast(t("chat.notConnected"), "error");
      return false;
    }
    return true;
  }

  regenerate() {
    if (this.request({ type: "regenerate" })) {
      this.busy = true;
      this.updateComposer();
    }
  }

  /** Regenerate the last reply (or answer a trailing question), if there is one. */
  regenerateLast() {
    const last = this.path[this.path.length - 1];
    if (last && !this.busy) this.regenerate();
  }

  /** Let the last reply go on where it stopped (its token limit, or Stop). */
  continueReply(message) {
    if (this.request({ type: "continue" })) {
      this.continuing = message;
      this.busy = true;
      this.updateComposer();
    }
  }

  rollback() {
    this.request({ type: "rollback" });
  }

  switchTo(messageId) {
    this.request({ type: "switch", message_id: messageId });
  }

  submitEdit(message, content) {
    if (!content.trim()) return;
    if (this.request({ type: "edit", message_id: message.id, content })) {
      this.editing = null;
      this.busy = true;
      this.updateComposer();
    }
  }

  // -- rendering ------------------------------------------------------------------------
  /** Versions of a message: the messages with the same parent and role, oldest first. */
  siblings(message) {
    const out = [];
    for (const m of this.byId.values()) {
      if (m.parent_id === message.parent_id && m.role === message.role) out.push(m);
    }
    out.sort((a, b) => a.created_at - b.created_at || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
    return out;
  }

  render() {
    const items = this.path.map((m, i) => this.messageEl(m, i === this.path.length - 1));
    if (this.interrupted) items.push(this.interrupted.el);
    if (this.streaming) items.push(this.streaming.el);
    if (!items.length && this.unavailable) items.push(this.unavailableEl());
    else if (!items.length && !this.missing) items.push(this.emptyEl());
    const system = this.session?.system_prompt;
    if (system) {
      // what the model was told, visible: a short prompt open, a long one folded
      const block = h(
        "details",
        { class: "system-prompt", "data-testid": "system-prompt", open: system.length <= 200 },
        h("summary", {}, t("chat.systemPrompt")),
        system,
      );
      items.unshift(block);
    }
    // a reader who scrolled up keeps their place when the view is rebuilt (e.g. when the
    // server's "session" message lands mid-reading)
    const top = this.el.scroller.scrollTop;
    if (!this.missing) this.el.inner.replaceChildren(...items);
    if (!this.stick) this.el.scroller.scrollTop = top;
    this.afterContentChange();
  }

  unavailableEl() {
    return h(
      "div",
      { class: "empty", "data-testid": "chat-unavailable" },
      h("h2", {}, t("chat.unavailableHeading")),
      h("p", {}, t("chat.unavailableText")),
    );
  }

  emptyEl() {
    return h(
      "div",
      { class: "empty", "data-testid": "empty-chat" },
      h("h2", {}, t("chat.emptyHeading")),
      h("p", {}, t("chat.emptyKeys"), t("chat.emptySettings")),
    );
  }

  messageEl(m, isLast) {
    const role = m.role === "assistant" ? "assistant" : m.role === "tool" ? "tool" : "user";
    const editing = this.editing && this.editing.id === m.id;
    const calls = (m.meta && m.meta.tool_calls) || [];
    const body = h("div", {
      class: role === "assistant" ? "msg-body md" : "msg-body plain",
      "data-testid": "message-content",
    });
    if (editing) {
      body.append(this.editorEl(m));
    } else if (role !== "assistant") {
      body.textContent = m.content;
    } else if (m.content) {
      body.append(renderMarkdown(m.content));
    } else if (!calls.length) {
      body.append(h("em", { class: "muted" }, t("chat.noText")));
    }
    for (const call of calls) {
      // a call the model made: its function and arguments, as text (never as markup)
      const text = `${call.function.name}(${call.function.arguments})`;
      body.append(h("pre", { class: "tool-call", "data-testid": "tool-call" }, text));
    }
    const label = {
      user: t("chat.you"),
      assistant: t("chat.assistant"),
      tool: t("chat.toolResult", { name: m.meta?.name || "" }),
    };
    const el = h(
      "article",
      {
        class: `msg msg-${role}`,
        "data-testid": "message",
        "data-role": role,
        "data-id": m.id,
        "data-status": m.status,
      },
      h("div", { class: "msg-role" }, label[role]),
      body,
    );
    if (!editing) el.append(this.actionsEl(m, isLast));
    return el;
  }

  actionsEl(m, isLast) {
    const bar = h("div", { class: "msg-actions" });
    const disabled = this.busy;
    const sibs = this.siblings(m);
    if (sibs.length > 1) {
      const i = sibs.findIndex((s) => s.id === m.id);
      bar.append(
        h(
          "span",
          { class: "pager", "data-testid": "version-pager" },
          h(
            "button",
            {
              type: "button",
              class: "icon-btn small",
              "aria-label": t("chat.prevVersion"),
              "data-testid": "version-prev",
              disabled: disabled || i <= 0,
              onclick: () => this.switchTo(sibs[i - 1].id),
            },
            "‹",
          ),
          h("span", { class: "pager-label", "data-testid": "version-label" }, `${i + 1}/${sibs.length}`),
          h(
            "button",
            {
              type: "button",
              class: "icon-btn small",
              "aria-label": t("chat.nextVersion"),
              "data-testid": "version-next",
              disabled: disabled || i >= sibs.length - 1,
              onclick: () => this.switchTo(sibs[i + 1].id),
            },
            "›",
          ),
        ),
      );
    }
    if (m.status === "stopped") {
      bar.append(h("span", { class: "badge", "data-testid": "stopped-badge" }, t("chat.stopped")));
    } else if (m.role === "assistant" && m.meta?.stop_reason === "length") {
      const n = m.meta.completion_tokens;
      bar.append(
        h(
          "span",
          { class: "badge", "data-testid": "length-badge", title: t("chat.cutTitle") },
          t("chat.cut", { count: n }),
        ),
      );
    }
    const copy = h(
      "button",
      {
        type: "button",
        class: "act",
        "aria-label": t("chat.copyMessage"),
        "data-testid": "copy-message",
      },
      t("chat.copy"),
    );
    copy.addEventListener("click", async () => {
      const ok = await copyText(m.content);
      copy.textContent = ok ? t("chat.copied") : t("chat.copyFailed");
      setTimeout(() => (copy.textContent = t("chat.copy")), 1500);
    });
    bar.append(copy);
    if (m.role === "user") {
      bar.append(
        h(
          "button",
          {
            type: "button",
            class: "act",
            "aria-label": t("chat.editMessage"),
            "data-testid": "edit-message",
            disabled,
            onclick: () => {
              this.editing = { id: m.id, draft: m.content };
              this.render();
              this.el.inner.querySelector("[data-testid=edit-input]")?.focus();
            },
          },
          t("chat.edit"),
        ),
      );
    }
    const cut = m.status === "stopped" || m.meta?.stop_reason === "length";
    if (m.role === "assistant" && isLast && cut && !m.meta?.tool_calls) {
      bar.append(
        h(
          "button",
          {
            type: "button",
            class: "act",
            "aria-label": t("chat.continueLabel"),
            "data-testid": "continue",
            disabled,
            onclick: () => this.continueReply(m),
          },
          t("chat.continue"),
        ),
      );
    }
    if (m.role === "assistant" && isLast) {
      bar.append(
        h(
          "button",
          {
            type: "button",
            class: "act",
            "aria-label": t("chat.regenerateLabel"),
            "data-testid": "regenerate",
            disabled,
            onclick: () => this.regenerate(),
          },
          t("chat.regenerate"),
        ),
      );
    }
    if (m.role === "user" && isLast) {
      // a question left without an answer (its reply was rolled back): answer it
      bar.append(
        h(
          "button",
          {
            type: "button",
            class: "act",
            "aria-label": t("chat.replyLabel"),
            "data-testid": "reply",
            disabled,
            onclick: () => this.regenerate(),
          },
          t("chat.reply"),
        ),
      );
    }
    if (isLast) {
      bar.append(
        h(
          "button",
          {
            type: "button",
            class: "act",
            "aria-label": t(m.role === "assistant" ? "chat.rollbackReply" : "chat.rollbackMessage"),
            "data-testid": "rollback",
            title: t("chat.rollbackTitle"),
            disabled,
            onclick: () => this.rollback(),
          },
          t("chat.rollback"),
        ),
      );
    }
    return bar;
  }

  editorEl(m) {
    const area = h("textarea", {
      class: "edit-input",
      "data-testid": "edit-input",
      "aria-label": t("chat.editMessage"),
      rows: 3,
    });
    area.value = this.editing.draft;
    area.addEventListener("input", () => {
      if (this.editing) this.editing.draft = area.value;
    });
    const cancel = () => {
      this.editing = null;
      this.render();
      // focus back where the edit began, not on <body>
      this.el.inner.querySelector(`[data-id="${m.id}"] [data-testid=edit-message]`)?.focus();
    };
    area.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
        ev.preventDefault();
        this.submitEdit(m, area.value);
      } else if (ev.key === "Escape") {
        ev.preventDefault();
        ev.stopPropagation();
        cancel();
      }
    });
    return h(
      "div",
      { class: "editor" },
      area,
      h(
        "div",
        { class: "editor-actions" },
        h(
          "button",
          { type: "button", class: "btn", "data-testid": "edit-cancel", onclick: cancel },
          t("chat.cancel"),
        ),
        h(
          "button",
          {
            type: "button",
            class: "btn btn-primary",
            "data-testid": "edit-save",
            "aria-label": t("chat.saveSendLabel"),
            onclick: () => this.submitEdit(m, area.value),
          },
          t("chat.saveSend"),
        ),
      ),
    );
  }

  updateComposer() {
    const { send, stop, input } = this.el;
    const busy = this.busy;
    send.hidden = busy;
    stop.hidden = !busy;
    stop.disabled = this.stopping;
    stop.textContent = t(this.stopping ? "chat.stopping" : "chat.stop");
    const blocked = this.missing || this.modelLoading || this.unavailable;
    send.disabled = !!this.creating || blocked;
    send.title = this.modelLoading
      ? t("chat.sendTitleLoading")
      : this.unavailable
        ? t("chat.sendTitleUnreachable")
        : "";
    input.disabled = this.missing;
    if (this.missing) input.value = "";
    input.placeholder = t(this.modelLoading ? "chat.placeholderLoading" : "chat.placeholder");
    this.el.view.dataset.busy = busy ? "true" : "false";
    for (const b of this.el.inner.querySelectorAll(".msg-actions button")) {
      if (b.dataset.testid === "copy-message") continue;
      if (b.classList.contains("act")) b.hidden = busy; // no dead buttons while it streams
      else if (busy) b.disabled = true;
    }
  }

  afterContentChange() {
    if (this.stick) this.scrollToBottom();
  }

  scrollToBottom() {
    const { scroller } = this.el;
    scroller.scrollTop = scroller.scrollHeight;
  }
}
