// Conversations, kept in this browser's localStorage (never on the server), and their export and
// import as JSON. Whatever is read back (storage another version wrote, a file someone sent) is
// checked and reduced to the fields below, with their types, before the page uses it.
//
// A conversation: {id, title, created, updated, settings, messages}
//   settings: {model, system, temperature, top_p, max_tokens, seed, extra} (null: the server's default)
//   message:  {role: "user" | "assistant", content, stats?, tool_calls?, stopped?, error?, model?}

const STORAGE_KEY = "quill.conversations";
export const EXPORT_FORMAT = "quill-conversations";
const EXPORT_VERSION = 1;
const NUMBER_SETTINGS = ["temperature", "top_p", "max_tokens", "seed"];
const TEXT_SETTINGS = ["model", "system", "extra"];

export function newId() {
  return `c${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;
}

export function newConversation(settings = {}) {
  const now = Date.now();
  return {id: newId(), title: "New chat", created: now, updated: now, settings: cleanSettings(settings), messages: []};
}

/** The saved conversations, newest first; unreadable storage gives none (and is kept aside). */
export function loadConversations() {
  const raw = localStorage.getItem(STORAGE_KEY);
  if (!raw) return [];
  try {
    return cleanList(JSON.parse(raw));
  } catch (error) {
    localStorage.setItem(`${STORAGE_KEY}.unreadable`, raw);
    console.warn("Quill: saved conversations were unreadable and were set aside:", error);
    return [];
  }
}

/** Save every conversation; throws when the browser's storage is full. */
export function saveConversations(conversations) {
  localStorage.setItem(STORAGE_KEY, JSON.stringify(conversations));
}

export function exportJSON(conversations) {
  return JSON.stringify({format: EXPORT_FORMAT, version: EXPORT_VERSION, exported: new Date().toISOString(),
    conversations}, null, 2);
}

/** The conversations in an export file's text; throws an Error saying what is wrong with it. */
export function parseExport(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch (error) {
    throw new Error(`The file is not JSON (${error.message}).`);
  }
  if (!data || data.format !== EXPORT_FORMAT || !Array.isArray(data.conversations)) {
    throw new Error(`The file is not a Quill conversation export (expected "format": "${EXPORT_FORMAT}").`);
  }
  return cleanList(data.conversations);
}

/** Conversations with the same id are replaced by the imported ones; the rest are added. */
export function merge(existing, imported) {
  const ids = new Set(imported.map((c) => c.id));
  return [...imported, ...existing.filter((c) => !ids.has(c.id))].sort((a, b) => b.updated - a.updated);
}

function cleanList(list) {
  if (!Array.isArray(list)) throw new Error("expected a list of conversations");
  return list.map(cleanConversation).sort((a, b) => b.updated - a.updated);
}

function text(value, fallback = "") {
  return typeof value === "string" ? value : fallback;
}

function number(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

function cleanConversation(raw, index) {
  if (!raw || typeof raw !== "object" || !Array.isArray(raw.messages)) {
    throw new Error(`conversation ${index + 1} has no list of messages`);
  }
  const created = number(raw.created) ?? Date.now();
  return {
    id: text(raw.id) || newId(),
    title: text(raw.title, "Untitled").slice(0, 200) || "Untitled",
    created,
    updated: number(raw.updated) ?? created,
    settings: cleanSettings(raw.settings),
    messages: raw.messages.map((message, at) => cleanMessage(message, index, at)),
  };
}

function cleanSettings(raw) {
  const settings = {};
  for (const name of NUMBER_SETTINGS) settings[name] = number(raw?.[name]);
  for (const name of TEXT_SETTINGS) settings[name] = text(raw?.[name]);
  return settings;
}

function cleanMessage(raw, conversation, index) {
  if (!raw || (raw.role !== "user" && raw.role !== "assistant") || typeof raw.content !== "string") {
    throw new Error(`conversation ${conversation + 1}, message ${index + 1}: expected a user or assistant ` +
      "message with text content");
  }
  const message = {role: raw.role, content: raw.content};
  if (raw.stats && typeof raw.stats === "object") message.stats = cleanStats(raw.stats);
  if (Array.isArray(raw.tool_calls)) {
    message.tool_calls = raw.tool_calls.map((call) => ({
      id: text(call?.id), name: text(call?.name), arguments: text(call?.arguments),
    }));
  }
  if (raw.stopped === true) message.stopped = true;
  if (typeof raw.error === "string") message.error = raw.error;
  if (typeof raw.model === "string") message.model = raw.model;
  return message;
}

/** An answer's stats (see view.js's statsLine) with the types the page expects. */
export function cleanStats(raw) {
  const cost = raw.cost && typeof raw.cost === "object" ? raw.cost : null;
  const reference = {};
  for (const [name, usd] of Object.entries(cost?.reference_usd && typeof cost.reference_usd === "object"
    ? cost.reference_usd : {})) {
    if (number(usd) !== null) reference[name] = usd;
  }
  return {
    ttft: number(raw.ttft), client_ttft: number(raw.client_ttft), tokens_per_second: number(raw.tokens_per_second),
    prompt_tokens: number(raw.prompt_tokens), completion_tokens: number(raw.completion_tokens),
    cache: ["hit", "miss", "bypass"].includes(raw.cache) ? raw.cache : null,
    finish_reason: text(raw.finish_reason) || null,
    cost: cost && {self_hosted_usd: number(cost.self_hosted_usd), saved_usd: number(cost.saved_usd),
      reference_usd: reference},
  };
}
