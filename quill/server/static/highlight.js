// Syntax highlighting for code blocks: comments, strings, numbers and keywords of a few language
// families, as <span class="tok-…"> elements around text nodes. Code is untrusted text: it only
// ever becomes text nodes. An unknown language is shown plain rather than guessed at.

const C_COMMENTS = String.raw`\/\/[^\n]*|\/\*[\s\S]*?(?:\*\/|$)`;
const HASH_COMMENTS = String.raw`#[^\n]*`;
const QUOTED = String.raw`"(?:[^"\\\n]|\\.)*"?|'(?:[^'\\\n]|\\.)*'?`;
const NUMBER = String.raw`\b(?:0[xX][\da-fA-F_]+|\d[\d_]*(?:\.\d+)?(?:[eE][+-]?\d+)?)\b`;

const FAMILIES = {
  python: {
    comments: HASH_COMMENTS,
    strings: String.raw`[rRbBfFuU]{0,2}(?:"""[\s\S]*?(?:"""|$)|'''[\s\S]*?(?:'''|$)|${QUOTED})`,
    keywords: "and as assert async await break class continue def del elif else except False finally for from " +
      "global if import in is lambda None nonlocal not or pass raise return True try while with yield match case self",
  },
  javascript: {
    comments: C_COMMENTS,
    strings: String.raw`${QUOTED}|\x60(?:[^\x60\\]|\\.)*\x60?`,
    keywords: "async await break case catch class const continue debugger default delete do else export extends " +
      "false finally for from function if import in instanceof let new null of return static super switch this " +
      "throw true try typeof undefined var void while with yield interface type enum implements readonly",
  },
  c: {
    comments: C_COMMENTS,
    strings: QUOTED,
    keywords: "auto bool break case catch char class const constexpr continue default delete do double else enum " +
      "extern false final float fn for func go goto if impl import int let long loop match mod mut namespace new " +
      "nil null nullptr override package private protected pub public return self short signed sizeof static " +
      "struct super switch template this throw true try type typedef typename union unsigned use using var " +
      "virtual void volatile where while string interface defer chan map range select fallthrough boolean",
  },
  shell: {
    comments: HASH_COMMENTS,
    strings: QUOTED,
    keywords: "if then else elif fi for while until do done case esac in function return exit export local " +
      "readonly set unset echo cd source alias sudo",
  },
  sql: {
    comments: String.raw`--[^\n]*|\/\*[\s\S]*?(?:\*\/|$)`,
    strings: QUOTED,
    keywords: "select from where and or not insert into values update set delete create table drop alter add " +
      "primary key foreign references join left right inner outer on group by order having limit offset as " +
      "distinct null is in like between union all case when then else end index view count sum avg min max",
    ignoreCase: true,
  },
  json: {comments: "(?!)", strings: QUOTED, keywords: "true false null"},
  yaml: {comments: HASH_COMMENTS, strings: QUOTED, keywords: "true false null yes no on off"},
};

const ALIASES = {
  python: "python", py: "python", python3: "python",
  javascript: "javascript", js: "javascript", jsx: "javascript", mjs: "javascript",
  typescript: "javascript", ts: "javascript", tsx: "javascript",
  c: "c", h: "c", cpp: "c", "c++": "c", cc: "c", hpp: "c", java: "c", cs: "c", csharp: "c", go: "c",
  golang: "c", rust: "c", rs: "c", kotlin: "c", kt: "c", swift: "c", scala: "c", php: "c",
  bash: "shell", sh: "shell", shell: "shell", zsh: "shell", console: "shell",
  sql: "sql", json: "json", jsonc: "json", yaml: "yaml", yml: "yaml", toml: "yaml",
};

const compiled = new Map();

function pattern(name) {
  if (!compiled.has(name)) {
    const family = FAMILIES[name];
    const keywords = family.keywords.split(" ").map((word) => word.replace(/[+]/g, "\\+")).join("|");
    const source = `(?<comment>${family.comments})|(?<string>${family.strings})|(?<number>${NUMBER})` +
      `|(?<keyword>\\b(?:${keywords})\\b)`;
    compiled.set(name, new RegExp(source, family.ignoreCase ? "gi" : "g"));
  }
  return compiled.get(name);
}

/** The language family a code fence's info string names, or null. */
export function languageOf(info) {
  return ALIASES[(info || "").trim().toLowerCase()] || null;
}

/** `code` as a DocumentFragment: text nodes, with spans around the tokens of its language. */
export function highlight(code, info) {
  const fragment = document.createDocumentFragment();
  const name = languageOf(info);
  if (!name) {
    fragment.append(document.createTextNode(code));
    return fragment;
  }
  const regex = pattern(name);
  regex.lastIndex = 0;
  let last = 0;
  for (const match of code.matchAll(regex)) {
    if (match[0] === "") continue;
    const kind = Object.keys(match.groups).find((group) => match.groups[group] !== undefined);
    if (match.index > last) fragment.append(document.createTextNode(code.slice(last, match.index)));
    const span = document.createElement("span");
    span.className = `tok-${kind}`;
    span.textContent = match[0];
    fragment.append(span);
    last = match.index + match[0].length;
  }
  if (last < code.length) fragment.append(document.createTextNode(code.slice(last)));
  return fragment;
}
