// The UI's words in English and Simplified Chinese (zh-CN, the product's origin).
//
// One table per language, keyed by short dotted names. t(key, vars) looks a key up in
// the chosen language (falling back to English, then to the key itself, so a missing
// translation shows up as English rather than as nothing) and fills {name} placeholders.
// A value may be {one, other}: the form is picked by Intl.PluralRules for vars.count, so
// English says "1 older turn" / "2 older turns" while Chinese, which does not inflect,
// simply gives one string.
//
// Static text in index.html carries data-i18n="key" (textContent) or
// data-i18n-attr="aria-label:key;placeholder:key2" (attributes); applyI18n(root) fills
// them in at startup and again on a switch. Text built in JS calls t() when it is built;
// the views re-render through onLangChange(), so a switch needs no reload.
//
// This module imports nothing: util.js and api.js use it, and a cycle back to them would
// run this file before their exports exist.

const STORAGE_KEY = "hexin.lang";

/** The languages offered, with the locale their numbers and dates are written in. */
const LOCALES = { en: "en-US", "zh-CN": "zh-CN" };

const STRINGS = {
  en: {
    // page furniture (index.html)
    "page.skip": "Skip to the message box",
    "sidebar.label": "Conversations",
    "sidebar.show": "Show conversations",
    "sidebar.hide": "Hide conversations",
    "sidebar.newChatButton": "+ New chat",
    "tabs.label": "Mode",
    "tabs.chat": "Chat",
    "tabs.story": "Story",
    "sessions.search": "Search conversations",
    "sessions.list": "Conversation list",
    "sessions.none": "No conversations yet.",
    "sessions.noMatch": "No conversation matches.",
    "sessions.import": "Import",
    "sessions.exportAll": "Export all",
    "sessions.shortcuts": "Shortcuts",
    "sessions.untitled": "Untitled",
    "sessions.newTitle": "New title",
    "sessions.rename": "Rename",
    "sessions.renameTitle": "Rename “{title}”",
    "sessions.renameFailed": "Rename failed: {message}",
    "sessions.delete": "Delete",
    "sessions.deleteTitle": "Delete “{title}”",
    "sessions.deleteFailed": "Delete failed: {message}",
    "sessions.deleted": "Deleted “{title}”.",
    "sessions.undo": "Undo",
    "top.export": "Export this conversation",
    "top.exportTitle": "Export this conversation (JSON)",
    "top.settings": "Settings",
    "theme.light": "light",
    "theme.dark": "dark",
    "theme.system": "system",
    "theme.systemShown": "system ({mode})",
    "theme.aria": "Theme: {shown}. Switch to {next}",
    "theme.title": "Theme: {shown}",
    "banner.unreachable": "Cannot reach the server.",
    "banner.modelLoading": "The model is still loading.",
    "banner.reconnectIn": "{lead} Reconnecting in {secs} s…",
    "banner.reconnectNow": "{lead} Reconnecting now…",
    "banner.retry": "Retry now",
    "banner.auth": "The server wants an API key, or the one given is wrong.",
    "banner.openSettings": "Open settings",
    "app.configFailed": "Could not read the server configuration: {message}",
    "app.storyTitle": "Story mode",
    "app.storyDocTitle": "Story · hexin",
    "api.unreachable": "Cannot reach the server",
    "api.gateway": "Cannot reach the server (gateway error)",

    // the chat view
    "chat.view": "Conversation",
    "chat.new": "New chat",
    "chat.jump": "↓ Latest",
    "chat.jumpLabel": "Scroll to the latest message",
    "chat.attachments": "Attached files",
    "chat.input": "Message",
    "chat.placeholder": "Send a message",
    "chat.placeholderLoading": "The model is loading…",
    "chat.send": "Send",
    "chat.sendLabel": "Send message",
    "chat.sendTitleLoading": "The model is still loading",
    "chat.sendTitleUnreachable": "The server cannot be reached",
    "chat.stop": "Stop",
    "chat.stopping": "Stopping…",
    "chat.stopLabel": "Stop generating",
    "chat.notText": "“{name}” is not a text file",
    "chat.tooLong": "“{name}” is too long to attach (over {max} characters)",
    "chat.removeAttachment": "Remove {name}",
    "chat.notFoundTitle": "Conversation not found",
    "chat.notFoundHeading": "This conversation does not exist",
    "chat.notFoundText": "No session “{id}” on this server; it may have been deleted.",
    "chat.startNew": "Start a new chat",
    "chat.unavailableHeading": "This conversation cannot be loaded right now",
    "chat.unavailableText":
      "The server cannot be reached. Its history is kept there and appears here as soon as it is back.",
    "chat.emptyHeading": "What shall we talk about?",
    "chat.emptyKeys": "Enter sends, Shift+Enter starts a new line, Esc stops a reply. ",
    "chat.emptySettings": "Sampling settings and the system prompt are under ⚙.",
    "chat.systemPrompt": "System prompt",
    "chat.you": "You",
    "chat.assistant": "Assistant",
    "chat.toolResult": "Tool result · {name}",
    "chat.noText": "(no text)",
    "chat.interrupted": "interrupted",
    "chat.stopped": "stopped",
    "chat.cut": "cut at {count} tokens",
    "chat.cutTitle": "The reply reached its token limit",
    "chat.prevVersion": "Previous version",
    "chat.nextVersion": "Next version",
    "chat.copy": "Copy",
    "chat.copied": "Copied",
    "chat.copyFailed": "Copy failed",
    "chat.copyMessage": "Copy message",
    "chat.edit": "Edit",
    "chat.editMessage": "Edit message",
    "chat.continue": "Continue",
    "chat.continueLabel": "Continue the reply",
    "chat.regenerate": "Regenerate",
    "chat.regenerateLabel": "Regenerate reply",
    "chat.reply": "Reply",
    "chat.replyLabel": "Generate a reply",
    "chat.rollback": "Roll back",
    "chat.rollbackReply": "Roll back the last reply",
    "chat.rollbackMessage": "Roll back the last message",
    "chat.rollbackTitle": "Remove this message from the conversation",
    "chat.cancel": "Cancel",
    "chat.saveSend": "Save & send",
    "chat.saveSendLabel": "Save and send the edited message",
    "chat.progress": "Processing the prompt: {pct}% of {total} tokens{reused}{eta}",
    "chat.progressCached": " ({cached} cached)",
    "chat.progressEta": " · about {left} s left",
    "chat.announceStopped": "Reply stopped. {text}",
    "chat.announceFinished": "Reply finished. {text}",
    "chat.notConnectedRetry": "Not connected to the server; try again in a moment",
    "chat.notConnected": "Not connected to the server",
    "chat.notSent": "Not connected; message not sent",
    "chat.startFailed": "Could not start the conversation: {message}",
    "md.reasoning": "Reasoning",
    "md.copyCode": "Copy code",

    // the status bar
    "status.label": "Status",
    "status.connection": "Connection",
    "status.model": "Model",
    "status.modelUnnamed": "model",
    "status.modelLoading": "loading model…",
    "status.speedTitle": "Decode speed of the last reply",
    "status.ttftTitle": "Time to first token of the last reply",
    "status.contextTitle": "Context used by the last turn",
    "status.contextLabel": "Context used",
    "status.cachedTitle": "Prompt tokens reused from the cache",
    "status.speed": "{rate} tok/s",
    "status.ttft": "TTFT {ms} ms",
    "status.context": "{used} / {limit} tokens",
    "status.cached": "{count} cached",
    "status.dropped": {
      one: "{count} older turn left out to fit the context",
      other: "{count} older turns left out to fit the context",
    },
    "conn.idle": "ready",
    "conn.loading": "loading model",
    "conn.open": "connected",
    "conn.connecting": "connecting",
    "conn.reconnecting": "reconnecting",
    "conn.unauthorized": "API key needed",
    "conn.invalid": "invalid session id",

    // story mode
    "story.view": "Story mode",
    "story.promptLabel": "Prompt",
    "story.promptAria": "Story prompt",
    "story.defaultPrompt": "Once upon a time",
    "story.generate": "Generate",
    "story.generateLabel": "Generate continuation",
    "story.append": "Append to prompt",
    "story.appendTitle": "Append the output to the prompt",
    "story.output": "Story output",
    "story.placeholder": "The continuation appears here.",
    "story.empty": "Write the beginning of a story first",
    "story.failed": "Story failed: {message}",
    "story.tokens": "{count} tokens",
    "story.finish.length": "max tokens reached",
    "story.finish.stopped": "stopped",
    "story.finish.stop": "stop",

    // import and export
    "transfer.exportFailed": "Export failed: {message}",
    "transfer.exported": {
      one: "Exported {count} conversation",
      other: "Exported {count} conversations",
    },
    "transfer.imported": {
      one: "Imported {count} conversation",
      other: "Imported {count} conversations",
    },
    "transfer.notJson": "{name}: not JSON",
    "transfer.notImported": "Not imported: {list}",

    // the settings dialog
    "settings.title": "Settings",
    "settings.scope.story": "Sampling for story mode (kept in this browser).",
    "settings.scope.session": "For this conversation; saved on the server.",
    "settings.scope.draft": "For the new conversation; applied when you send its first message.",
    "settings.systemPrompt": "System prompt",
    "settings.none": "(none)",
    "settings.temperature": "Temperature",
    "settings.topK": "Top-k",
    "settings.topP": "Top-p",
    "settings.minP": "Min-p",
    "settings.maxTokens": "Max tokens",
    "settings.seed": "Seed",
    "settings.repetitionPenalty": "Repetition penalty",
    "settings.presencePenalty": "Presence penalty",
    "settings.frequencyPenalty": "Frequency penalty",
    "settings.hintEmptyOff": "(empty: off)",
    "settings.hintZeroOff": "(0: off)",
    "settings.hintOneOff": "(1: off)",
    "settings.hintRandom": "(empty: random)",
    "settings.preset": "Preset",
    "settings.presetChoose": "Choose a preset…",
    "settings.presetName": "New preset name",
    "settings.presetSave": "Save preset",
    "settings.presetNeedsName": "Name the preset first",
    "settings.presetSaved": "Preset “{name}” saved",
    "preset.Precise": "Precise",
    "preset.Balanced": "Balanced",
    "preset.Creative": "Creative",
    "settings.global": "Also use these as the defaults for new chats (in this browser)",
    "settings.language": "Language",
    "settings.apiKey": "API key",
    "settings.apiKeyHint": "(only if the server was started with --api-key; kept in this browser)",
    "settings.reset": "Reset to defaults",
    "settings.cancel": "Cancel",
    "settings.save": "Save",
    "settings.saved.story": "Settings saved for story mode",
    "settings.saved.session": "Settings saved for this conversation",
    "settings.saved.draft": "Settings saved for the new chat",
    "settings.savedGlobal": " and as the default for new chats",
    "settings.notNumber": "{name} must be a number",
    "settings.required": "{name} is required",
    "settings.notWhole": "{name} must be a whole number",
    "settings.atLeast": "{name} must be at least {min}",
    "settings.atMost": "{name} must be at most {max}",

    // the shortcuts dialog
    "help.title": "Keyboard shortcuts",
    "help.search": "Search conversations",
    "help.stop": "Stop the reply",
    "help.regenerate": "Regenerate the last reply",
    "help.send": "Send / new line",
    "help.list": "This list (outside a text field)",
    "help.mac1": "On a Mac, ",
    "help.mac2": " works where ",
    "help.mac3": " is written. Drop a text file on the message box to attach it.",
    "help.close": "Close",
  },

  "zh-CN": {
    "page.skip": "跳到消息输入框",
    "sidebar.label": "对话",
    "sidebar.show": "显示对话列表",
    "sidebar.hide": "隐藏对话列表",
    "sidebar.newChatButton": "+ 新对话",
    "tabs.label": "模式",
    "tabs.chat": "聊天",
    "tabs.story": "故事",
    "sessions.search": "搜索对话",
    "sessions.list": "对话列表",
    "sessions.none": "还没有对话。",
    "sessions.noMatch": "没有匹配的对话。",
    "sessions.import": "导入",
    "sessions.exportAll": "导出全部",
    "sessions.shortcuts": "快捷键",
    "sessions.untitled": "未命名",
    "sessions.newTitle": "新标题",
    "sessions.rename": "重命名",
    "sessions.renameTitle": "重命名“{title}”",
    "sessions.renameFailed": "重命名失败：{message}",
    "sessions.delete": "删除",
    "sessions.deleteTitle": "删除“{title}”",
    "sessions.deleteFailed": "删除失败：{message}",
    "sessions.deleted": "已删除“{title}”。",
    "sessions.undo": "撤销",
    "top.export": "导出此对话",
    "top.exportTitle": "导出此对话（JSON）",
    "top.settings": "设置",
    "theme.light": "浅色",
    "theme.dark": "深色",
    "theme.system": "跟随系统",
    "theme.systemShown": "跟随系统（{mode}）",
    "theme.aria": "主题：{shown}。切换到{next}",
    "theme.title": "主题：{shown}",
    "banner.unreachable": "无法连接服务器。",
    "banner.modelLoading": "模型仍在加载。",
    "banner.reconnectIn": "{lead}{secs} 秒后重新连接…",
    "banner.reconnectNow": "{lead}正在重新连接…",
    "banner.retry": "立即重试",
    "banner.auth": "服务器需要 API 密钥，或所填密钥不正确。",
    "banner.openSettings": "打开设置",
    "app.configFailed": "无法读取服务器配置：{message}",
    "app.storyTitle": "故事模式",
    "app.storyDocTitle": "故事 · hexin",
    "api.unreachable": "无法连接服务器",
    "api.gateway": "无法连接服务器（网关错误）",

    "chat.view": "对话",
    "chat.new": "新对话",
    "chat.jump": "↓ 最新",
    "chat.jumpLabel": "滚动到最新消息",
    "chat.attachments": "附加的文件",
    "chat.input": "消息",
    "chat.placeholder": "输入消息",
    "chat.placeholderLoading": "正在加载模型…",
    "chat.send": "发送",
    "chat.sendLabel": "发送消息",
    "chat.sendTitleLoading": "模型仍在加载",
    "chat.sendTitleUnreachable": "无法连接服务器",
    "chat.stop": "停止",
    "chat.stopping": "正在停止…",
    "chat.stopLabel": "停止生成",
    "chat.notText": "“{name}”不是文本文件",
    "chat.tooLong": "“{name}”太长，无法附加（超过 {max} 个字符）",
    "chat.removeAttachment": "移除 {name}",
    "chat.notFoundTitle": "找不到对话",
    "chat.notFoundHeading": "此对话不存在",
    "chat.notFoundText": "此服务器上没有会话“{id}”，可能已被删除。",
    "chat.startNew": "开始新对话",
    "chat.unavailableHeading": "暂时无法加载此对话",
    "chat.unavailableText": "无法连接服务器。对话记录保存在服务器上，连接恢复后会立即显示。",
    "chat.emptyHeading": "想聊些什么？",
    "chat.emptyKeys": "Enter 发送，Shift+Enter 换行，Esc 停止回复。",
    "chat.emptySettings": "采样设置和系统提示词在 ⚙ 中。",
    "chat.systemPrompt": "系统提示词",
    "chat.you": "你",
    "chat.assistant": "助手",
    "chat.toolResult": "工具结果 · {name}",
    "chat.noText": "（无文本）",
    "chat.interrupted": "已中断",
    "chat.stopped": "已停止",
    "chat.cut": "在 {count} 个 token 处截断",
    "chat.cutTitle": "回复已达到 token 上限",
    "chat.prevVersion": "上一个版本",
    "chat.nextVersion": "下一个版本",
    "chat.copy": "复制",
    "chat.copied": "已复制",
    "chat.copyFailed": "复制失败",
    "chat.copyMessage": "复制消息",
    "chat.edit": "编辑",
    "chat.editMessage": "编辑消息",
    "chat.continue": "继续",
    "chat.continueLabel": "继续生成回复",
    "chat.regenerate": "重新生成",
    "chat.regenerateLabel": "重新生成回复",
    "chat.reply": "回复",
    "chat.replyLabel": "生成回复",
    "chat.rollback": "回滚",
    "chat.rollbackReply": "回滚最后一条回复",
    "chat.rollbackMessage": "回滚最后一条消息",
    "chat.rollbackTitle": "从对话中移除这条消息",
    "chat.cancel": "取消",
    "chat.saveSend": "保存并发送",
    "chat.saveSendLabel": "保存并发送编辑后的消息",
    "chat.progress": "正在处理提示词：{pct}%，共 {total} 个 token{reused}{eta}",
    "chat.progressCached": "（{cached} 个已缓存）",
    "chat.progressEta": " · 约剩 {left} 秒",
    "chat.announceStopped": "回复已停止。{text}",
    "chat.announceFinished": "回复完成。{text}",
    "chat.notConnectedRetry": "未连接到服务器，请稍后再试",
    "chat.notConnected": "未连接到服务器",
    "chat.notSent": "未连接，消息未发送",
    "chat.startFailed": "无法开始对话：{message}",
    "md.reasoning": "思考过程",
    "md.copyCode": "复制代码",

    "status.label": "状态",
    "status.connection": "连接",
    "status.model": "模型",
    "status.modelUnnamed": "模型",
    "status.modelLoading": "正在加载模型…",
    "status.speedTitle": "上一条回复的生成速度",
    "status.ttftTitle": "上一条回复的首 token 延迟",
    "status.contextTitle": "上一轮使用的上下文",
    "status.contextLabel": "已用上下文",
    "status.cachedTitle": "从缓存复用的提示词 token",
    "status.speed": "{rate} token/秒",
    "status.ttft": "首 token {ms} 毫秒",
    "status.context": "{used} / {limit} token",
    "status.cached": "缓存 {count}",
    "status.dropped": "为适应上下文，省略了 {count} 轮较早的对话",
    "conn.idle": "就绪",
    "conn.loading": "正在加载模型",
    "conn.open": "已连接",
    "conn.connecting": "正在连接",
    "conn.reconnecting": "正在重新连接",
    "conn.unauthorized": "需要 API 密钥",
    "conn.invalid": "会话 ID 无效",

    "story.view": "故事模式",
    "story.promptLabel": "提示词",
    "story.promptAria": "故事提示词",
    "story.defaultPrompt": "从前，",
    "story.generate": "生成",
    "story.generateLabel": "生成续写",
    "story.append": "追加到提示词",
    "story.appendTitle": "把生成的内容追加到提示词后",
    "story.output": "故事输出",
    "story.placeholder": "续写内容会显示在这里。",
    "story.empty": "请先写下故事的开头",
    "story.failed": "故事生成失败：{message}",
    "story.tokens": "{count} 个 token",
    "story.finish.length": "已达最大 token 数",
    "story.finish.stopped": "已停止",
    "story.finish.stop": "已结束",

    "transfer.exportFailed": "导出失败：{message}",
    "transfer.exported": "已导出 {count} 个对话",
    "transfer.imported": "已导入 {count} 个对话",
    "transfer.notJson": "{name}：不是 JSON",
    "transfer.notImported": "未导入：{list}",

    "settings.title": "设置",
    "settings.scope.story": "故事模式的采样设置（保存在此浏览器中）。",
    "settings.scope.session": "仅用于此对话，保存在服务器上。",
    "settings.scope.draft": "用于新对话，发送第一条消息时生效。",
    "settings.systemPrompt": "系统提示词",
    "settings.none": "（无）",
    "settings.temperature": "温度",
    "settings.topK": "Top-k",
    "settings.topP": "Top-p",
    "settings.minP": "Min-p",
    "settings.maxTokens": "最大 token 数",
    "settings.seed": "随机种子",
    "settings.repetitionPenalty": "重复惩罚",
    "settings.presencePenalty": "存在惩罚",
    "settings.frequencyPenalty": "频率惩罚",
    "settings.hintEmptyOff": "（留空：关闭）",
    "settings.hintZeroOff": "（0：关闭）",
    "settings.hintOneOff": "（1：关闭）",
    "settings.hintRandom": "（留空：随机）",
    "settings.preset": "预设",
    "settings.presetChoose": "选择预设…",
    "settings.presetName": "新预设名称",
    "settings.presetSave": "保存预设",
    "settings.presetNeedsName": "请先为预设命名",
    "settings.presetSaved": "已保存预设“{name}”",
    "preset.Precise": "精确",
    "preset.Balanced": "均衡",
    "preset.Creative": "创意",
    "settings.global": "同时设为新对话的默认值（仅限此浏览器）",
    "settings.language": "语言",
    "settings.apiKey": "API 密钥",
    "settings.apiKeyHint": "（仅当服务器以 --api-key 启动时需要；保存在此浏览器中）",
    "settings.reset": "恢复默认",
    "settings.cancel": "取消",
    "settings.save": "保存",
    "settings.saved.story": "已保存故事模式的设置",
    "settings.saved.session": "已保存此对话的设置",
    "settings.saved.draft": "已保存新对话的设置",
    "settings.savedGlobal": "，并设为新对话的默认值",
    "settings.notNumber": "{name}必须是数字",
    "settings.required": "{name}不能为空",
    "settings.notWhole": "{name}必须是整数",
    "settings.atLeast": "{name}不能小于 {min}",
    "settings.atMost": "{name}不能大于 {max}",

    "help.title": "快捷键",
    "help.search": "搜索对话",
    "help.stop": "停止回复",
    "help.regenerate": "重新生成最后一条回复",
    "help.send": "发送 / 换行",
    "help.list": "显示此列表（不在输入框中时）",
    "help.mac1": "在 Mac 上，",
    "help.mac2": " 可代替 ",
    "help.mac3": "。把文本文件拖到消息框即可附加。",
    "help.close": "关闭",
  },
};

/** A supported language for a BCP 47 tag: any Chinese is zh-CN, any English is en. */
function supported(tag) {
  const low = String(tag || "").toLowerCase();
  if (low.startsWith("zh")) return "zh-CN";
  if (low === "en" || low.startsWith("en-")) return "en";
  return null;
}

function stored() {
  try {
    return localStorage.getItem(STORAGE_KEY);
  } catch {
    return null; // storage may be disabled
  }
}

/** The language to start in: the one chosen in this browser, else the first of the
 * browser's preferred languages that we have (so ["fr", "zh-TW"] gives zh-CN), else en. */
function initial() {
  const chosen = STRINGS[stored()] ? stored() : null;
  if (chosen) return chosen;
  const prefs = navigator.languages?.length ? navigator.languages : [navigator.language];
  for (const tag of prefs) {
    const found = supported(tag);
    if (found) return found;
  }
  return "en";
}

let current = initial();
document.documentElement.lang = current;

const events = new EventTarget();

/** The language in use: "en" or "zh-CN". */
export function lang() {
  return current;
}

/** The locale numbers and dates are formatted in (fixed per language, so that English
 * always reads "12,345" as it did before the UI was translated). */
export function locale() {
  return LOCALES[current];
}

/** The text for ``key`` in the current language, with ``{name}`` replaced by vars.name.
 * A plural entry ({one, other}) is chosen by vars.count. */
export function t(key, vars = {}) {
  let text = STRINGS[current][key] ?? STRINGS.en[key] ?? key;
  if (typeof text === "object") {
    const form = new Intl.PluralRules(locale()).select(Number(vars.count));
    text = text[form] ?? text.other;
  }
  return text.replace(/\{(\w+)\}/g, (whole, name) => (name in vars ? String(vars[name]) : whole));
}

/** Fill in the marked elements under ``root`` (and root itself): data-i18n sets the
 * text, data-i18n-attr="attr:key;attr2:key2" sets attributes. */
export function applyI18n(root = document) {
  const all = (sel) => {
    const found = [...root.querySelectorAll(sel)];
    if (root instanceof Element && root.matches(sel)) found.unshift(root);
    return found;
  };
  for (const el of all("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of all("[data-i18n-attr]")) {
    for (const pair of el.dataset.i18nAttr.split(";")) {
      const [attr, key] = pair.split(":").map((s) => s.trim());
      if (attr && key) el.setAttribute(attr, t(key));
    }
  }
}

/** Switch the language at once (no reload): remember it in this browser, update
 * <html lang> and the marked static text, then let the views re-render their own. */
export function setLang(code) {
  const next = STRINGS[code] ? code : supported(code) || "en";
  try {
    localStorage.setItem(STORAGE_KEY, next);
  } catch {
    /* storage may be disabled: the switch still holds for this page */
  }
  if (next === current) return;
  current = next;
  document.documentElement.lang = next;
  applyI18n(document);
  events.dispatchEvent(new Event("change"));
}

/** Call ``fn`` after every switch of language (views re-render their built text). */
export function onLangChange(fn) {
  events.addEventListener("change", () => fn(current));
}

/** The keys of each table (for the tests: both languages must have the same ones). */
export function keys(code) {
  return Object.keys(STRINGS[code] || {});
}
