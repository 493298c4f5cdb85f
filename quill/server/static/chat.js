// The chat page: conversations in the sidebar, the selected one's messages, the composer and the
// settings. Sending streams an answer from /v1/chat/completions; Stop (or Escape) aborts the
// request, which makes the server abort the generation. Regenerate and edit-and-resend cut the
// conversation at that message and ask again. Everything the user or the model wrote is shown
// through view.js, which never interprets it as HTML.

import { ApiError, getJSON, setApiKey, streamChat } from "./api.js";
import { startLoadPanel } from "./load.js";
import * as store from "./store.js";
import { fillMessage, messageElement, statsOf } from "./view.js";

const $ = (id) => document.getElementById(id);
const NUMBER_FIELDS = ["temperature", "top_p", "max_tokens", "seed"];
const TITLE_LENGTH = 60;

const state = {
  conversations: store.loadConversations(),
  current: null,
  models: [],
  generation: null, // {controller, conversation, message}
};

// ------------------------------------------------------------------------------- persistence

function persist() {
  try {
    store.saveConversations(state.conversations);
  } catch (error) {
    showBanner(`Could not save the conversations in this browser: ${error.message}`);
  }
}

function touch(conversation) {
  conversation.updated = Date.now();
  state.conversations.sort((a, b) => b.updated - a.updated);
  persist();
  renderList();
}

// ------------------------------------------------------------------------------------ banner

function showBanner(text, kind = "error") {
  $("banner-text").textContent = text;
  $("banner").className = `banner ${kind}`;
  $("banner").hidden = false;
}

function hideBanner() {
  $("banner").hidden = true;
}

// ------------------------------------------------------------------------------ conversations

function renderList() {
  const items = state.conversations.map((conversation) => {
    const item = document.createElement("li");
    item.dataset.id = conversation.id;
    item.classList.toggle("active", conversation === state.current);
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.textContent = conversation.title;
    open.title = conversation.title;
    open.addEventListener("click", () => select(conversation));
    const rename = iconButton("✎", "Rename", () => startRename(item, conversation));
    const remove = iconButton("×", "Delete", () => deleteConversation(conversation));
    item.append(open, rename, remove);
    return item;
  });
  $("conversations").replaceChildren(...items);
}

function iconButton(label, title, action) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = `icon ${title.toLowerCase()}`;
  button.textContent = label;
  button.title = title;
  button.setAttribute("aria-label", title);
  button.addEventListener("click", action);
  return button;
}

function startRename(item, conversation) {
  const input = document.createElement("input");
  input.className = "rename";
  input.value = conversation.title;
  input.setAttribute("aria-label", "Conversation title");
  let done = false;
  const finish = (save) => {
    if (done) return;
    done = true;
    if (save && input.value.trim()) {
      conversation.title = input.value.trim().slice(0, 200);
      persist();
    }
    renderList();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") {
      event.stopPropagation();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
  item.replaceChildren(input);
  input.focus();
  input.select();
}

function deleteConversation(conversation) {
  if (!confirm(`Delete the conversation "${conversation.title}"?`)) return;
  if (state.generation?.conversation === conversation) state.generation.controller.abort();
  state.conversations = state.conversations.filter((c) => c !== conversation);
  persist();
  if (state.current === conversation) select(state.conversations[0] || null);
  else renderList();
}

function select(conversation) {
  if (!conversation) {
    conversation = store.newConversation(state.current?.settings);
    state.conversations.unshift(conversation);
  }
  state.current = conversation;
  // An empty conversation left behind is not worth a line in the list.
  state.conversations = state.conversations.filter((c) => c === conversation || c.messages.length > 0);
  document.body.classList.remove("sidebar-open");
  renderList();
  renderConversation();
  showSettings(conversation.settings);
}

function newChat() {
  if (state.current && state.current.messages.length === 0) {
    $("input").focus();
    return;
  }
  const conversation = store.newConversation(state.current?.settings);
  state.conversations.unshift(conversation);
  select(conversation);
  $("input").focus();
}

function renderConversation() {
  const conversation = state.current;
  const streaming = state.generation?.conversation === conversation ? state.generation.message : null;
  $("messages").replaceChildren(...conversation.messages.map(
    (message, index) => messageElement(message, index, message === streaming)));
  scrollToEnd();
}

function articleOf(conversation, message) {
  if (conversation !== state.current) return null;
  return $("messages").querySelector(`article[data-index="${conversation.messages.indexOf(message)}"]`);
}

function scrollToEnd() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function nearEnd() {
  const box = $("messages");
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

// ---------------------------------------------------------------------------------- settings

function showSettings(settings) {
  $("system").value = settings.system;
  $("extra").value = settings.extra;
  for (const name of NUMBER_FIELDS) $(name).value = settings[name] ?? "";
  if (settings.model && state.models.some((model) => model.id === settings.model)) $("model").value = settings.model;
  checkSettings();
}

/** Read the settings form into the conversation; returns an error message, or null. */
function readSettings() {
  const settings = state.current.settings;
  settings.system = $("system").value;
  settings.extra = $("extra").value;
  settings.model = $("model").value || settings.model;
  for (const name of NUMBER_FIELDS) {
    const input = $(name);
    if (input.validity.badInput) return `${name} is not a number`;
    settings[name] = input.value.trim() === "" ? null : Number(input.value);
  }
  if (settings.extra.trim()) {
    let extra;
    try {
      extra = JSON.parse(settings.extra);
    } catch (error) {
      return `More request fields: not JSON (${error.message})`;
    }
    if (!extra || typeof extra !== "object" || Array.isArray(extra)) return "More request fields: expected a JSON object";
  }
  return null;
}

function checkSettings() {
  const error = state.current ? readSettings() : null;
  $("settings-error").textContent = error || "";
  $("settings-error").hidden = !error;
  if (error) $("settings").open = true;
  return error;
}

async function loadServerDefaults() {
  try {
    const page = await getJSON("/ui/config.json");
    const defaults = page.defaults;
    $("temperature").placeholder = `${defaults.temperature} (server default)`;
    $("top_p").placeholder = `${defaults.top_p} (server default)`;
    $("seed").placeholder = "random";
    $("max_tokens").placeholder = `${page.default_max_tokens} (server default)`;
  } catch (error) {
    console.warn("Quill: no server defaults", error);
  }
}

// ---------------------------------------------------------------------------- server, auth

async function connect() {
  try {
    const models = await getJSON("/v1/models");
    state.models = models.data || [];
    const options = state.models.map((model) => {
      const option = document.createElement("option");
      option.value = model.id;
      option.textContent = model.id;
      return option;
    });
    $("model").replaceChildren(...options);
    if (state.current) showSettings(state.current.settings);
    $("auth-form").hidden = true;
    document.body.dataset.connected = "true";
    hideBanner();
  } catch (error) {
    document.body.dataset.connected = "false";
    if (error.status === 401) showAuth(error.message);
    else showBanner(`Cannot list the server's models: ${error.message}`);
  }
}

function showAuth(message) {
  $("auth-message").textContent = message;
  $("auth-form").hidden = false;
  $("api-key").focus();
}

// ------------------------------------------------------------------------------- generation

function chatRequest(conversation) {
  const settings = conversation.settings;
  const messages = [];
  if (settings.system.trim()) messages.push({role: "system", content: settings.system});
  for (const message of conversation.messages) {
    if (message.role === "user" || message.content) messages.push({role: message.role, content: message.content});
  }
  const body = {model: settings.model || state.models[0]?.id, messages};
  for (const name of NUMBER_FIELDS) {
    if (settings[name] !== null) body[name] = settings[name];
  }
  return settings.extra.trim() ? {...body, ...JSON.parse(settings.extra)} : body;
}

function send() {
  const text = $("input").value;
  if (state.generation || !text.trim() || checkSettings()) return;
  const conversation = state.current;
  if (conversation.messages.length === 0 && conversation.title === "New chat") {
    conversation.title = text.trim().split("\n")[0].slice(0, TITLE_LENGTH);
  }
  conversation.messages.push({role: "user", content: text});
  $("input").value = "";
  resizeInput();
  renderConversation();
  generate(conversation);
}

function mergeToolCalls(message, deltas) {
  message.tool_calls ||= [];
  for (const delta of deltas) {
    const index = delta.index ?? message.tool_calls.length;
    const call = (message.tool_calls[index] ||= {id: "", name: "", arguments: ""});
    if (delta.id) call.id = delta.id;
    if (delta.function?.name) call.name += delta.function.name;
    if (delta.function?.arguments) call.arguments += delta.function.arguments;
  }
}

async function generate(conversation) {
  if (state.generation || checkSettings()) return;
  const body = chatRequest(conversation);
  const message = {role: "assistant", content: "", model: body.model};
  conversation.messages.push(message);
  touch(conversation);
  const controller = new AbortController();
  state.generation = {controller, conversation, message};
  if (conversation === state.current) {
    $("messages").append(messageElement(message, conversation.messages.length - 1, true));
    scrollToEnd();
  }
  setBusy(true);
  const started = performance.now();
  let clientTTFT = null;
  let cacheHeader = null;
  let usage = null;
  let finishReason = null;
  let queued = false;
  const redraw = () => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => {
      queued = false;
      const article = articleOf(conversation, message);
      if (!article || state.generation?.message !== message) return;
      const follow = nearEnd();
      fillMessage(article, message, true);
      if (follow) scrollToEnd();
    });
  };
  try {
    await streamChat(body, controller.signal, {
      onOpen: (response) => { cacheHeader = response.headers.get("X-Quill-Cache"); },
      onChunk: (choice) => {
        const delta = choice.delta || {};
        if (clientTTFT === null && (delta.content || delta.tool_calls)) {
          clientTTFT = (performance.now() - started) / 1000;
        }
        if (delta.content) message.content += delta.content;
        if (delta.tool_calls) mergeToolCalls(message, delta.tool_calls);
        if (choice.finish_reason) finishReason = choice.finish_reason;
        redraw();
      },
      onUsage: (value) => { usage = value; },
    });
  } catch (error) {
    if (error.name === "AbortError") {
      message.stopped = true;
    } else {
      message.error = error.message;
      if (error instanceof ApiError && error.status === 401) showAuth(error.message);
    }
  } finally {
    state.generation = null;
    if (usage || clientTTFT !== null) message.stats = statsOf(usage, cacheHeader, clientTTFT, finishReason);
    const article = articleOf(conversation, message);
    if (article) {
      const follow = nearEnd();
      fillMessage(article, message, false);
      if (follow) scrollToEnd();
    }
    setBusy(false);
    touch(conversation);
  }
}

function stop() {
  state.generation?.controller.abort();
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

// ------------------------------------------------------------------ message actions (delegated)

function onMessageClick(event) {
  const target = event.target.closest("button");
  if (!target) return;
  const article = target.closest("article.message");
  const index = Number(article?.dataset.index);
  const message = state.current.messages[index];
  if (target.classList.contains("copy-code")) {
    copy(target.closest(".code-block").querySelector("code").textContent, target);
  } else if (target.dataset.action === "copy") {
    copy(message.content, target);
  } else if (target.dataset.action === "regenerate" && !state.generation) {
    state.current.messages = state.current.messages.slice(0, index);
    renderConversation();
    generate(state.current);
  } else if (target.dataset.action === "edit" && !state.generation) {
    startEdit(article, index);
  }
}

function startEdit(article, index) {
  const message = state.current.messages[index];
  const editor = document.createElement("textarea");
  editor.className = "edit-box";
  editor.value = message.content;
  editor.setAttribute("aria-label", "Edit the message");
  const resend = document.createElement("button");
  resend.type = "button";
  resend.className = "primary";
  resend.textContent = "Send";
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.textContent = "Cancel";
  const bar = document.createElement("div");
  bar.className = "edit-actions";
  bar.append(resend, cancel);
  article.querySelector(".body").replaceChildren(editor, bar);
  article.querySelector(".actions")?.remove();
  const submit = () => {
    if (!editor.value.trim() || state.generation) return;
    const conversation = state.current;
    conversation.messages = [...conversation.messages.slice(0, index), {role: "user", content: editor.value}];
    renderConversation();
    generate(conversation);
  };
  resend.addEventListener("click", submit);
  cancel.addEventListener("click", renderConversation);
  editor.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    } else if (event.key === "Escape") {
      event.stopPropagation();
      renderConversation();
    }
  });
  editor.focus();
}

async function copy(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // no clipboard API (a page served over plain HTTP to another machine): select and copy
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  const label = button.textContent;
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = label; }, 1200);
}

// ------------------------------------------------------------------------- export and import

function exportAll() {
  const blob = new Blob([store.exportJSON(state.conversations)], {type: "application/json"});
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = `quill-conversations-${new Date().toISOString().slice(0, 10)}.json`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

async function importFile(file) {
  try {
    const imported = store.parseExport(await file.text());
    state.conversations = store.merge(state.conversations, imported);
    select(imported[0] || state.current);
    persist();
    showBanner(`Imported ${imported.length} conversation${imported.length === 1 ? "" : "s"}.`, "info");
  } catch (error) {
    showBanner(`Cannot import ${file.name}: ${error.message}`);
  }
}

// ------------------------------------------------------------------------------- composer

function resizeInput() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 240)}px`;
}

function wire() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("input").addEventListener("input", resizeInput);
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.generation) {
      event.preventDefault();
      stop();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("messages").addEventListener("click", onMessageClick);
  $("menu").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));
  $("scrim").addEventListener("click", () => document.body.classList.remove("sidebar-open"));
  $("banner-close").addEventListener("click", hideBanner);
  $("export").addEventListener("click", exportAll);
  $("import").addEventListener("click", () => $("import-file").click());
  $("import-file").addEventListener("change", (event) => {
    const [file] = event.target.files;
    if (file) importFile(file);
    event.target.value = "";
  });
  for (const id of ["system", "extra", "model", ...NUMBER_FIELDS]) {
    $(id).addEventListener("change", () => {
      if (!checkSettings()) persist();
    });
  }
  $("auth-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey($("api-key").value.trim());
    $("api-key").value = "";
    connect();
  });
}

async function start() {
  wire();
  select(state.conversations[0] || null);
  startLoadPanel($("load"));
  await loadServerDefaults();
  await connect();
}

start();
