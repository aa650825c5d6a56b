// Import and export of conversations as JSON files, in the sessions API's export format:
// one conversation is one export object; "Export all" writes {"sessions": [...]}. Import
// takes either, or a plain list of exports, and adds each as a new conversation (the
// server gives a copy fresh ids when they are taken).

import { api } from "./api.js";
import { t } from "./i18n.js";
import { toast } from "./util.js";

/** Offer ``data`` as a JSON file download. */
export function download(name, data) {
  const blob = new Blob([JSON.stringify(data, null, 2)], { type: "application/json" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

function fileName(title, id) {
  const slug = (title || id).replace(/[^\p{L}\p{N}]+/gu, "-").replace(/^-|-$/g, "").slice(0, 60);
  return `hexin-${slug || id}.json`;
}

export async function exportChat(id) {
  try {
    const data = await api(`api/sessions/${encodeURIComponent(id)}/export`);
    download(fileName(data.title, id), data);
  } catch (e) {
    toast(t("transfer.exportFailed", { message: e.message }), "error");
  }
}

export async function exportAll() {
  try {
    const { sessions } = await api("api/sessions");
    const all = [];
    for (const s of sessions) {
      all.push(await api(`api/sessions/${encodeURIComponent(s.id)}/export`));
    }
    const day = new Date().toISOString().slice(0, 10);
    download(`hexin-conversations-${day}.json`, { sessions: all });
    toast(t("transfer.exported", { count: all.length }));
  } catch (e) {
    toast(t("transfer.exportFailed", { message: e.message }), "error");
  }
}

/** The exports in a parsed file: one, a list, or {"sessions": [...]}. */
function exportsIn(data) {
  if (Array.isArray(data)) return data;
  if (data && Array.isArray(data.sessions)) return data.sessions;
  return [data];
}

/** Import the conversations in ``files``; returns the ids of those imported. */
export async function importFiles(files) {
  const ids = [];
  const failures = [];
  for (const file of files) {
    let data;
    try {
      data = JSON.parse(await file.text());
    } catch {
      failures.push(t("transfer.notJson", { name: file.name }));
      continue;
    }
    for (const item of exportsIn(data)) {
      try {
        ids.push((await api("api/sessions/import", { method: "POST", body: item })).id);
      } catch (e) {
        failures.push(`${file.name}: ${e.message}`);
      }
    }
  }
  if (ids.length) toast(t("transfer.imported", { count: ids.length }));
  if (failures.length) {
    toast(t("transfer.notImported", { list: failures.join("; ") }), "error", 8000);
  }
  return ids;
}
