// The live load panel: running and waiting requests and KV-cache use, read from the server's
// Prometheus /metrics every few seconds while the page is visible.

import { getText } from "./api.js";

const POLL_MS = 2000;
const GAUGES = {
  running: "quill:num_requests_running",
  waiting: "quill:num_requests_waiting",
  kv: "quill:kv_cache_usage_perc",
};

/** The panel's gauges from Prometheus text, summed over models; null where a gauge is missing. */
export function parseLoad(text) {
  const values = {running: null, waiting: null, kv: null};
  for (const line of text.split("\n")) {
    if (line.startsWith("#")) continue;
    const match = /^([^\s{]+)(?:\{[^}]*\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    for (const [name, metric] of Object.entries(GAUGES)) {
      if (match[1] === metric) values[name] = (values[name] ?? 0) + Number(match[2]);
    }
  }
  return values;
}

/** Show the server's load in `panel` until the page goes away. */
export function startLoadPanel(panel) {
  const show = (text, title = "") => {
    panel.textContent = text;
    panel.title = title;
  };
  const poll = async () => {
    if (document.hidden) return;
    try {
      const load = parseLoad(await getText("/metrics"));
      const kv = load.kv === null ? "—" : `${(load.kv * 100).toFixed(load.kv < 0.1 ? 1 : 0)}%`;
      show(`${load.running ?? "—"} running · ${load.waiting ?? "—"} waiting · KV ${kv}`,
        "the server's engine now: sequences running and waiting, and the share of the KV cache in use");
      panel.dataset.running = String(load.running ?? "");
    } catch (error) {
      show("load unavailable", error.message);
    }
  };
  poll();
  setInterval(poll, POLL_MS);
  document.addEventListener("visibilitychange", poll);
}
