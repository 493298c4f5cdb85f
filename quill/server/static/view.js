// How a message looks: its text (Markdown for answers, plain text for the user's own messages),
// tool calls as their own blocks, the stats line under an answer, and the buttons beside it.
// Everything is built with createElement and textContent (see markdown.js for why).

import { renderMarkdown } from "./markdown.js";
import { cleanStats } from "./store.js";

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, action, title) {
  const node = element("button", `action ${action}`, label);
  node.type = "button";
  node.dataset.action = action;
  if (title) node.title = title;
  return node;
}

/** The element of message `index` of a conversation (`streaming`: the answer being written). */
export function messageElement(message, index, streaming = false) {
  const article = element("article", `message ${message.role}`);
  article.dataset.index = String(index);
  const role = element("div", "role", message.role === "user" ? "You" : message.model || "Assistant");
  const body = element("div", "body");
  article.append(role, body);
  fillMessage(article, message, streaming);
  return article;
}

/** Redraw a message's body, tool calls, stats and buttons in place. */
export function fillMessage(article, message, streaming = false) {
  article.classList.toggle("streaming", streaming);
  const body = article.querySelector(".body");
  if (message.role === "user") {
    body.className = "body plain";
    body.textContent = message.content;
  } else {
    body.className = "body markdown";
    body.replaceChildren(renderMarkdown(message.content));
    if (streaming && !message.content && !message.tool_calls?.length) body.append(element("span", "cursor", "…"));
  }
  for (const old of article.querySelectorAll(":scope > .tool-calls, :scope > .notice, :scope > .stats, " +
    ":scope > .actions")) old.remove();
  if (message.tool_calls?.length) article.append(toolCalls(message.tool_calls));
  if (message.error) article.append(element("div", "notice error", message.error));
  if (message.stopped) article.append(element("div", "notice", "Stopped."));
  if (message.stats) article.append(statsLine(message.stats));
  if (!streaming) article.append(actions(message));
}

function toolCalls(calls) {
  const box = element("div", "tool-calls");
  for (const call of calls) {
    const block = element("div", "tool-call");
    block.append(element("div", "tool-name", `Tool call: ${call.name || "(unnamed)"}`));
    let args = call.arguments;
    try {
      args = JSON.stringify(JSON.parse(args), null, 2);
    } catch {
      // not (yet) complete JSON: show it as it came
    }
    const pre = element("pre");
    pre.append(element("code", "", args));
    block.append(pre);
    box.append(block);
  }
  return box;
}

function actions(message) {
  const bar = element("div", "actions");
  if (message.role === "user") {
    bar.append(button("Edit", "edit", "Edit this message and send it again"));
  } else {
    bar.append(button("Copy", "copy", "Copy the answer's text"), button("Regenerate", "regenerate", "Answer again"));
  }
  return bar;
}

// ------------------------------------------------------------------------------------- stats

export function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(2)} s`;
}

export function formatUSD(dollars) {
  if (dollars === null || dollars === undefined) return "—";
  if (dollars === 0) return "$0";
  if (dollars >= 0.01) return `$${dollars.toFixed(4)}`;
  return `$${Number(dollars.toPrecision(2))}`;
}

/** The line under an answer: latency, speed, tokens, the response cache, and the cost compared. */
export function statsLine(stats) {
  const line = element("div", "stats");
  const item = (label, value, title) => {
    const span = element("span", "stat", `${label} ${value}`.trim());
    if (title) span.title = title;
    line.append(span);
  };
  const ttft = stats.ttft ?? stats.client_ttft;
  item("TTFT", formatSeconds(ttft), stats.ttft === null ? "time to first token, measured in the browser"
    : "time to first token, measured by the server");
  if (stats.tokens_per_second !== null) item("", `${stats.tokens_per_second.toFixed(1)} tok/s`, "decode speed");
  if (stats.prompt_tokens !== null) item("", `${stats.prompt_tokens} in`, "prompt tokens");
  if (stats.completion_tokens !== null) item("", `${stats.completion_tokens} out`, "generated tokens");
  if (stats.cache) {
    item("cache", stats.cache, stats.cache === "hit" ? "answered from the response cache: no engine work"
      : stats.cache === "miss" ? "computed and stored in the response cache" : "not cacheable (sampled, or opted out)");
  }
  const cost = stats.cost;
  if (cost) {
    if (stats.cache === "hit") {
      item("self-hosted", `$0 (saved ${formatUSD(cost.saved_usd)})`, "a cache hit costs nothing to compute");
    } else {
      item("self-hosted", formatUSD(cost.self_hosted_usd), cost.self_hosted_usd === null
        ? "the server has not measured its throughput yet" : "this machine's cost per hour, by its measured speed");
    }
    for (const [name, usd] of Object.entries(cost.reference_usd || {})) {
      item(name, formatUSD(usd), `the same tokens at ${name}'s list price`);
    }
  }
  return line;
}

/** The stats of an answer from its stream: the usage chunk, the cache header, browser timings. */
export function statsOf(usage, cacheHeader, clientTTFT, finishReason) {
  const quill = usage?.quill || {};
  return cleanStats({
    ttft: quill.time_to_first_token, client_ttft: clientTTFT, tokens_per_second: quill.tokens_per_second,
    prompt_tokens: usage?.prompt_tokens, completion_tokens: usage?.completion_tokens,
    cache: cacheHeader || (quill.cache_hit === true ? "hit" : null), finish_reason: finishReason, cost: quill.cost,
  });
}
