// Quill's HTTP API as the page uses it: every call carries the user's API key (kept in
// sessionStorage only: it is gone when the browser session ends), errors come back as `ApiError`
// with the server's message, and a streamed chat completion is read from its server-sent events.

const KEY_STORAGE = "quill.apiKey";

export class ApiError extends Error {
  constructor(status, message, param = null) {
    super(message);
    this.status = status; // 0 when the server could not be reached or the stream broke
    this.param = param;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? {...extra, Authorization: `Bearer ${key}`} : extra;
}

async function request(path, options = {}) {
  let response;
  try {
    response = await fetch(path, {...options, headers: headers(options.headers)});
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `Cannot reach the server (${error.message}).`);
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

async function errorOf(response) {
  let message = `The server answered ${response.status} ${response.statusText}.`;
  let param = null;
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") {
      message = body.error.message;
      param = body.error.param ?? null;
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, message, param);
}

export async function getJSON(path) {
  return (await request(path)).json();
}

export async function getText(path) {
  return (await request(path)).text();
}

/**
 * Stream a chat completion. `handlers.onOpen(response)` sees the response headers,
 * `handlers.onChunk(choice)` each choice of each chunk, `handlers.onUsage(usage)` the final usage.
 * Resolves when the stream ends; rejects with an AbortError when `signal` aborts (which closes the
 * connection: the server then aborts the generation and frees its memory) or an ApiError.
 */
export async function streamChat(body, signal, handlers) {
  const response = await request("/v1/chat/completions", {
    method: "POST",
    headers: {"Content-Type": "application/json"},
    body: JSON.stringify({...body, stream: true, stream_options: {include_usage: true}}),
    signal,
  });
  handlers.onOpen?.(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (dispatch(event, handlers)) return;
    }
  }
  if (buffer.trim()) dispatch(buffer, handlers);
}

/** Handle one server-sent event; true at [DONE]. */
function dispatch(event, handlers) {
  const data = event.split("\n").filter((line) => line.startsWith("data:"))
    .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
  if (!data) return false;
  if (data === "[DONE]") return true;
  const payload = JSON.parse(data);
  if (payload.error) throw new ApiError(0, payload.error.message || "The generation failed.", payload.error.param);
  if (payload.usage) handlers.onUsage?.(payload.usage);
  for (const choice of payload.choices || []) handlers.onChunk?.(choice);
  return false;
}
