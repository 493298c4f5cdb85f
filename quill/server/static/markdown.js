// Markdown to DOM for untrusted text: model output, the user's own messages, imported files.
//
// Safety rule: nothing here ever parses a string as HTML. Elements come from the fixed set this
// file creates (p, h1-h6, ul/ol/li, blockquote, pre/code, table, em/strong/del, a, br, hr), and
// every piece of message text becomes a text node, so `<script>` or `<img onerror=…>` in a message
// shows as those characters. Links keep only http(s) and mailto targets (no `javascript:`), open
// in a new tab without a referrer, and images are shown as links: the page never loads anything a
// message points to.
//
// Covered: ATX headings, paragraphs (a single newline is a line break, as chat users expect),
// fenced code (an unclosed fence runs to the end, so a streaming code block renders as code), lists
// (nested by indentation), block quotes, GitHub tables, rules, and inline code, emphasis,
// strikethrough, links, <autolinks>, bare URLs and backslash escapes.

import { highlight } from "./highlight.js";

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?/;
const LIST_ITEM = /^( *)([-*+]|\d{1,9}[.)])(?:[ \t]+(.*)|$)/;
const TABLE_RULE = /^ *\|? *:?-+:? *(?:\| *:?-+:? *)*\|? *$/;
const PUNCTUATION = /[!"#$%&'()*+,\-./:;<=>?@[\\\]^_`{|}~]/;
const SAFE_PROTOCOLS = new Set(["http:", "https:", "mailto:"]);
const BARE_URL = /^https?:\/\/[^\s<>"]*[^\s<>".,:;'!?)\]]/;
const AUTOLINK = /^<((?:https?:\/\/|mailto:)[^\s<>]+)>/;
const MAX_DEPTH = 24; // nested quotes/lists/emphasis beyond this render as text: no runaway recursion
const MAX_LINK_SCAN = 2000; // characters searched for a link's closing bracket or parenthesis

/** `text` as a DocumentFragment of safe elements and text nodes. */
export function renderMarkdown(text) {
  const fragment = document.createDocumentFragment();
  const lines = String(text).replace(/\r\n?/g, "\n").replace(/\t/g, "    ").split("\n");
  blocks(lines, fragment, 0);
  return fragment;
}

/** The URL a link may point to, or null: absolute http(s) and mailto only. */
export function safeHref(raw) {
  try {
    const url = new URL(raw.trim());
    return SAFE_PROTOCOLS.has(url.protocol) ? url.href : null;
  } catch {
    return null;
  }
}

function element(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

const blank = (line) => line.trim() === "";
const indentOf = (line) => line.length - line.trimStart().length;

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line);
}

// ------------------------------------------------------------------------------------- blocks

function blocks(lines, parent, depth) {
  if (depth > MAX_DEPTH) {
    parent.append(document.createTextNode(lines.join("\n")));
    return;
  }
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let match;
    if (blank(line)) {
      i += 1;
    } else if ((match = FENCE.exec(line))) {
      i = fencedCode(lines, i, match, parent);
    } else if ((match = HEADING.exec(line))) {
      const heading = element(`h${match[1].length}`);
      inline(match[2] || "", heading, depth);
      parent.append(heading);
      i += 1;
    } else if (RULE.test(line)) {
      parent.append(element("hr"));
      i += 1;
    } else if (QUOTE.test(line)) {
      i = blockQuote(lines, i, parent, depth);
    } else if (LIST_ITEM.test(line)) {
      i = list(lines, i, parent, depth);
    } else if (i + 1 < lines.length && line.includes("|") && TABLE_RULE.test(lines[i + 1])) {
      i = table(lines, i, parent, depth);
    } else {
      i = paragraph(lines, i, parent, depth);
    }
  }
}

function fencedCode(lines, start, match, parent) {
  const [, fence, info] = match;
  const closing = new RegExp(`^ {0,3}${fence[0] === "`" ? "`" : "~"}{${fence.length},}\\s*$`);
  let end = start + 1;
  while (end < lines.length && !closing.test(lines[end])) end += 1;
  parent.append(codeBlock(lines.slice(start + 1, end).join("\n"), info));
  return end + 1;
}

/** A code block: a header with the language and a copy button (wired up by the page), then the code. */
export function codeBlock(code, info) {
  const wrapper = element("div", "code-block");
  const head = element("div", "code-head");
  const language = element("span", "code-lang");
  language.textContent = info || "text";
  const copy = element("button", "copy-code");
  copy.type = "button";
  copy.textContent = "Copy";
  copy.title = "Copy the code";
  head.append(language, copy);
  const pre = element("pre");
  const codeElement = element("code");
  codeElement.append(highlight(code, info));
  pre.append(codeElement);
  wrapper.append(head, pre);
  return wrapper;
}

function blockQuote(lines, start, parent, depth) {
  const inner = [];
  let i = start;
  while (i < lines.length && QUOTE.test(lines[i])) {
    inner.push(lines[i].replace(QUOTE, ""));
    i += 1;
  }
  const quote = element("blockquote");
  blocks(inner, quote, depth + 1);
  parent.append(quote);
  return i;
}

function list(lines, start, parent, depth) {
  const first = LIST_ITEM.exec(lines[start]);
  const ordered = /\d/.test(first[2]);
  const baseIndent = first[1].length;
  const listElement = element(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) listElement.start = parseInt(first[2], 10);
  let i = start;
  while (i < lines.length) {
    const item = LIST_ITEM.exec(lines[i]);
    if (!item || item[1].length !== baseIndent || /\d/.test(item[2]) !== ordered) break;
    const contentIndent = baseIndent + item[2].length + 1;
    const itemLines = [item[3] || ""];
    i += 1;
    while (i < lines.length) {
      const line = lines[i];
      if (blank(line)) {
        let next = i + 1;
        while (next < lines.length && blank(lines[next])) next += 1;
        if (next < lines.length && indentOf(lines[next]) > baseIndent) {
          itemLines.push("");
          i += 1;
          continue;
        }
        break;
      }
      const indent = indentOf(line);
      if (indent > baseIndent) {
        itemLines.push(line.slice(Math.min(indent, contentIndent)));
      } else if (LIST_ITEM.test(line) || startsBlock(line)) {
        break;
      } else {
        itemLines.push(line); // a lazy continuation of the item's paragraph
      }
      i += 1;
    }
    const listItem = element("li");
    blocks(itemLines, listItem, depth + 1);
    listElement.append(listItem);
  }
  parent.append(listElement);
  return i;
}

function tableCells(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim());
}

function table(lines, start, parent, depth) {
  const header = tableCells(lines[start]);
  const aligns = tableCells(lines[start + 1]).map((cell) =>
    cell.startsWith(":") && cell.endsWith(":") ? "center" : cell.endsWith(":") ? "right" : cell.startsWith(":") ? "left" : "");
  const wrapper = element("div", "table-wrap");
  const tableElement = element("table");
  const row = (cells, tag) => {
    const tr = element("tr");
    header.forEach((_, column) => {
      const cell = element(tag);
      if (aligns[column]) cell.classList.add(`align-${aligns[column]}`);
      inline(cells[column] || "", cell, depth);
      tr.append(cell);
    });
    return tr;
  };
  const head = element("thead");
  head.append(row(header, "th"));
  const body = element("tbody");
  let i = start + 2;
  while (i < lines.length && !blank(lines[i]) && lines[i].includes("|")) {
    body.append(row(tableCells(lines[i]), "td"));
    i += 1;
  }
  tableElement.append(head, body);
  wrapper.append(tableElement);
  parent.append(wrapper);
  return i;
}

function paragraph(lines, start, parent, depth) {
  const text = [lines[start]];
  let i = start + 1;
  while (i < lines.length && !blank(lines[i]) && !startsBlock(lines[i]) && !/^ {0,3}([-*+]|1[.)])[ \t]/.test(lines[i])) {
    text.push(lines[i]);
    i += 1;
  }
  const p = element("p");
  inline(text.map((line) => line.trim()).join("\n"), p, depth);
  parent.append(p);
  return i;
}

// ------------------------------------------------------------------------------------- inline

const EMPHASIS = {"*": ["em", "strong", "strong em"], "_": ["em", "strong", "strong em"], "~": [null, "del", null]};

function inline(text, parent, depth) {
  if (depth > MAX_DEPTH) {
    parent.append(document.createTextNode(text));
    return;
  }
  let buffer = "";
  const flush = () => {
    if (buffer) parent.append(document.createTextNode(buffer));
    buffer = "";
  };
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    const rest = () => text.slice(i, i + MAX_LINK_SCAN);
    let match;
    if (c === "\\" && i + 1 < text.length && PUNCTUATION.test(text[i + 1])) {
      buffer += text[i + 1];
      i += 2;
    } else if (c === "\n") {
      flush();
      parent.append(element("br"));
      i += 1;
    } else if (c === "`") {
      const run = /^`+/.exec(rest())[0];
      const close = findCodeClose(text, i + run.length, run.length);
      if (close < 0) {
        buffer += run;
        i += run.length;
      } else {
        flush();
        const code = element("code");
        let content = text.slice(i + run.length, close).replace(/\n/g, " ");
        if (/^ .*[^ ] $/.test(content)) content = content.slice(1, -1);
        code.textContent = content;
        parent.append(code);
        i = close + run.length;
      }
    } else if (c in EMPHASIS && (match = emphasis(text, i))) {
      flush();
      let target = parent;
      for (const tag of match.tags) {
        const node = element(tag);
        target.append(node);
        target = node;
      }
      inline(match.inner, target, depth + 1);
      i = match.end;
    } else if ((c === "[" || (c === "!" && text[i + 1] === "[")) && (match = link(text, i))) {
      flush();
      parent.append(linkElement(match, depth));
      i = match.end;
    } else if (c === "<" && (match = AUTOLINK.exec(rest()))) {
      flush();
      parent.append(anchor(match[1], match[1]));
      i += match[0].length;
    } else if ((c === "h" || c === "H") && !/\w/.test(text[i - 1] || "") && (match = BARE_URL.exec(rest()))) {
      flush();
      parent.append(anchor(match[0], match[0]));
      i += match[0].length;
    } else {
      buffer += c;
      i += 1;
    }
  }
  flush();
}

function findCodeClose(text, from, length) {
  let at = from;
  while ((at = text.indexOf("`".repeat(length), at)) >= 0) {
    const before = text[at - 1];
    const after = text[at + length];
    if (before !== "`" && after !== "`") return at;
    at += length;
  }
  return -1;
}

function emphasis(text, start) {
  const c = text[start];
  const run = new RegExp(`^\\${c}{1,3}`).exec(text.slice(start, start + 3))[0];
  const tag = EMPHASIS[c][run.length - 1];
  const after = text[start + run.length];
  if (!tag || after === undefined || /\s/.test(after)) return null;
  if (c === "_" && /[\p{L}\p{N}]/u.test(text[start - 1] || "")) return null; // snake_case is not emphasis
  let at = start + run.length;
  while ((at = text.indexOf(run, at + 1)) >= 0) {
    const before = text[at - 1];
    const next = text[at + run.length];
    const closes = !/\s/.test(before) && before !== c && before !== "\\" && next !== c &&
      !(c === "_" && /[\p{L}\p{N}]/u.test(next || ""));
    if (closes) return {tags: tag.split(" "), inner: text.slice(start + run.length, at), end: at + run.length};
  }
  return null;
}

function link(text, start) {
  const image = text[start] === "!";
  const open = start + (image ? 1 : 0);
  let depth = 0;
  let close = -1;
  for (let i = open; i < Math.min(text.length, open + MAX_LINK_SCAN); i += 1) {
    if (text[i] === "\\") i += 1;
    else if (text[i] === "[") depth += 1;
    else if (text[i] === "]" && --depth === 0) {
      close = i;
      break;
    }
  }
  if (close < 0 || text[close + 1] !== "(") return null;
  const target = /^\(\s*<?([^\s()<>]*(?:\([^\s()]*\)[^\s()<>]*)*)>?(?:\s+("[^"]*"|'[^']*'))?\s*\)/
    .exec(text.slice(close + 1, close + 1 + MAX_LINK_SCAN));
  if (!target) return null;
  return {image, label: text.slice(open + 1, close), href: target[1], end: close + 1 + target[0].length};
}

function linkElement(match, depth) {
  const href = safeHref(match.href);
  if (!href) { // not a link this page will follow: show what it said, as text
    const span = element("span", "unsafe-link");
    inline(match.label, span, depth + 1);
    span.append(document.createTextNode(` (${match.href})`));
    return span;
  }
  const a = anchor(href, null);
  if (match.image) a.textContent = `[image: ${match.label || href}]`;
  else inline(match.label, a, depth + 1);
  return a;
}

function anchor(rawHref, text) {
  const href = safeHref(rawHref);
  if (!href) return document.createTextNode(text ?? rawHref);
  const a = element("a");
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  if (text !== null) a.textContent = text;
  return a;
}
