"""Grammar-matcher libraries compared for Quill's structured output: llguidance, xgrammar, outlines-core.

    python benchmarks/structured_matchers.py                 # both real tokenizers, JSON to benchmarks/results/
    python benchmarks/structured_matchers.py --quick         # SmolLM2 only, one repeat: does it run

For each library and each real tokenizer (SmolLM2: 49,152 tokens; Gemma 3: 262,144):
- tokenizer set-up: building the library's view of the vocabulary (once per model);
- compile, cold: from a schema/regex/grammar to the first token mask of a fresh matcher (llguidance
  builds its lexer lazily during the first mask, so "time to first mask" is the fair comparison);
- compile, cached: the same with whatever the library lets a server keep per schema (llguidance: a
  compiled matcher deep-copied; xgrammar: its compiler cache; outlines-core: the Index);
- mask time per token: filling a bitmask at every position while a valid instance is consumed,
  p50 and p99 over all positions of all cases and repeats;
- features: does each JSON-schema keyword (and regex, Lark/EBNF, rollback) get *enforced* (the
  valid instance accepted, the invalid one rejected), *ignored* (both accepted: the silent failure
  Quill must never have), *refused* (a compile error: Quill can turn that into a 400), or *broken*
  (the valid instance rejected).

xgrammar declares torch, transformers and triton as dependencies, so install it with
`pip install --no-deps xgrammar apache-tvm-ffi` to keep a CPU torch. Timings on a shared machine
are noisy: medians of --repeats runs, indicative only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from quill.structured.constraints import JSON_COMPILE_OPTIONS

# Every library writes JSON in Quill's layout (json.dumps separators, no other whitespace).
JSON_SEPARATORS = (JSON_COMPILE_OPTIONS["item_separator"], JSON_COMPILE_OPTIONS["key_separator"])

# (name, schema, a valid instance): the cases timed for compile and mask cost.
TIMED_SCHEMAS = [
    ("person", {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
                "required": ["name", "age"], "additionalProperties": False},
     {"name": "Ada Lovelace", "age": 36}),
    ("tool_call", {"type": "object", "properties": {
        "name": {"const": "get_weather"},
        "arguments": {"type": "object", "properties": {
            "location": {"type": "string", "description": "city and country"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14}},
            "required": ["location", "unit"], "additionalProperties": False}},
        "required": ["name", "arguments"], "additionalProperties": False},
     {"name": "get_weather", "arguments": {"location": "Paris, France", "unit": "celsius", "days": 3}}),
    ("order", {"type": "object", "$defs": {"item": {"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
        "price": {"type": "number", "minimum": 0}},
        "required": ["sku", "quantity", "price"], "additionalProperties": False}},
        "properties": {
            "customer": {"type": "object", "properties": {"email": {"type": "string", "format": "email"},
                                                          "vip": {"type": "boolean"}},
                         "required": ["email"], "additionalProperties": False},
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 10},
            "note": {"anyOf": [{"type": "string", "maxLength": 80}, {"type": "null"}]}},
        "required": ["customer", "items"], "additionalProperties": False},
     {"customer": {"email": "ada@example.com", "vip": True},
      "items": [{"sku": "ABC-1234", "quantity": 2, "price": 9.5}, {"sku": "XYZ-0001", "quantity": 1, "price": 120}],
      "note": None}),
    ("wide", {"type": "object", "properties": {
        **{f"text_{i}": {"type": "string", "maxLength": 40} for i in range(10)},
        **{f"count_{i}": {"type": "integer", "minimum": 0, "maximum": 1000} for i in range(10)},
        **{f"flag_{i}": {"type": "boolean"} for i in range(10)}},
        "required": [f"text_{i}" for i in range(10)] + [f"count_{i}" for i in range(10)] + [f"flag_{i}" for i in range(10)],
        "additionalProperties": False},
     {**{f"text_{i}": f"value number {i}" for i in range(10)}, **{f"count_{i}": i * 37 for i in range(10)},
      **{f"flag_{i}": i % 2 == 0 for i in range(10)}}),
]
TIMED_REGEX = ("phone", r"\(\d{3}\) \d{3}-\d{4}", "(555) 123-4567")
TIMED_CHOICE = ("choice", ["positive", "negative", "neutral"], "neutral")
# An arithmetic grammar in each library's dialect (llguidance: Lark; xgrammar: GBNF-style EBNF).
LARK_GRAMMAR = """
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]+/
"""
EBNF_GRAMMAR = """
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")"
number ::= [0-9]+
"""
GRAMMAR_INSTANCE = "(12+3)*4-5/6"

# (feature, schema, valid instance, invalid instance)
FEATURES = [
    ("integer minimum/maximum", {"type": "integer", "minimum": 0, "maximum": 10}, 7, 11),
    ("number exclusiveMinimum", {"type": "number", "exclusiveMinimum": 0}, 0.5, -1),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, 15, 7),
    ("string minLength/maxLength", {"type": "string", "minLength": 2, "maxLength": 4}, "abc", "a"),
    ("string pattern", {"type": "string", "pattern": "^[a-z]+-[0-9]+$"}, "ab-12", "ab12"),
    ("format date-time", {"type": "string", "format": "date-time"}, "2024-05-01T10:00:00Z", "yesterday"),
    ("format email", {"type": "string", "format": "email"}, "a@b.io", "not an email"),
    ("format uuid", {"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000", "1234"),
    ("enum", {"enum": ["red", "green"]}, "red", "blue"),
    ("const", {"const": "yes"}, "yes", "no"),
    ("type list (nullable)", {"type": ["string", "null"]}, None, 3),
    ("anyOf", {"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "x"),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "string"}]}, "x", None),
    ("allOf", {"allOf": [{"type": "integer"}, {"minimum": 5}]}, 6, 2),
    ("$ref / $defs", {"$defs": {"n": {"type": "integer"}}, "type": "object",
                      "properties": {"a": {"$ref": "#/$defs/n"}}, "required": ["a"]}, {"a": 1}, {"a": "x"}),
    ("recursive $ref", {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["v", "kids"], "additionalProperties": False}}, "$ref": "#/$defs/node"},
     {"v": 1, "kids": [{"v": 2, "kids": []}]}, {"v": 1, "kids": [{"v": "x", "kids": []}]}),
    ("required", {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, {"a": 1}, {}),
    ("optional property", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                           "required": ["a"], "additionalProperties": False}, {"a": 1}, {"b": "x"}),
    ("additionalProperties: false", {"type": "object", "properties": {"a": {"type": "integer"}},
                                     "additionalProperties": False}, {"a": 1}, {"a": 1, "b": 2}),
    ("additionalProperties: schema", {"type": "object", "additionalProperties": {"type": "integer"}},
     {"x": 1}, {"x": "y"}),
    ("minItems/maxItems", {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}, [1, 2], []),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    ("prefixItems", {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
     [1, "a"], ["a", 1]),
    ("patternProperties", {"type": "object", "patternProperties": {"^n_": {"type": "integer"}},
                           "additionalProperties": False}, {"n_a": 1}, {"n_a": "x"}),
    ("minProperties", {"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 1},
     {"a": 1}, {}),
    ("not", {"not": {"type": "string"}}, 1, "x"),
    ("if/then/else", {"type": "integer", "if": {"minimum": 10}, "then": {"multipleOf": 2}}, 12, 11),
    ("propertyNames", {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"},
                       "additionalProperties": {"type": "integer"}}, {"ab": 1}, {"AB": 1}),
    ("dependentRequired", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "dependentRequired": {"a": ["b"]}}, {"a": 1, "b": 2}, {"a": 1}),
]


# ------------------------------------------------------------------------------------ adapters
class Matcher:
    """The operations Quill needs from a library, on one tokenizer."""

    name: str

    def compile(self, kind: str, spec) -> object: ...
    def new(self, compiled) -> object: ...
    def fill(self, matcher, mask: torch.Tensor) -> None: ...
    def consume(self, matcher, token: int) -> bool: ...
    def accepts_end(self, matcher) -> bool: ...
    def rollback(self, matcher, n: int) -> None: ...


class Llguidance(Matcher):
    name = "llguidance"

    def __init__(self, tokenizer) -> None:
        import llguidance

        self.llg = llguidance
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size,
                                                eos_token=sorted(tokenizer.eos_token_ids))
        self.eos = min(tokenizer.eos_token_ids)

    def compile(self, kind: str, spec):
        M = self.llg.LLMatcher
        if kind == "json":
            grammar = M.grammar_from_json_schema(spec, defaults=JSON_COMPILE_OPTIONS)
        elif kind == "regex":
            grammar = M.grammar_from_regex(spec)
        elif kind == "choice":
            grammar = M.grammar_from_regex("|".join(_regex_escape(c) for c in spec))
        else:
            grammar = M.grammar_from_lark(spec)
        matcher = M(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def new(self, compiled):
        return compiled.deep_copy()

    def fill(self, matcher, mask):
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)

    def consume(self, matcher, token):
        return matcher.consume_token(token)

    def accepts_end(self, matcher):
        return matcher.is_accepting()

    def rollback(self, matcher, n):
        matcher.rollback(n)


class Xgrammar(Matcher):
    name = "xgrammar"

    def __init__(self, tokenizer) -> None:
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        self.xgr = xgrammar
        hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend)
        self.info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=tokenizer.vocab_size,
                                                            stop_token_ids=sorted(tokenizer.eos_token_ids))
        self.compiler = self.fresh_compiler()
        self.eos = min(tokenizer.eos_token_ids)

    def fresh_compiler(self):
        return self.xgr.GrammarCompiler(self.info, max_threads=os.cpu_count() or 1)

    def compile(self, kind: str, spec, compiler=None):
        compiler = compiler or self.compiler
        if kind == "json":
            return compiler.compile_json_schema(json.dumps(spec), any_whitespace=False, separators=JSON_SEPARATORS)
        if kind == "regex":
            return compiler.compile_regex(spec)
        if kind == "choice":
            return compiler.compile_regex("|".join(_regex_escape(c) for c in spec))
        return compiler.compile_grammar(spec)

    def new(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, mask):
        matcher.fill_next_token_bitmask(mask)

    def consume(self, matcher, token):
        return matcher.accept_token(token)

    def accepts_end(self, matcher):
        return matcher.accept_token(self.eos) and matcher.is_terminated()

    def rollback(self, matcher, n):
        matcher.rollback(n)


class OutlinesCore(Matcher):
    name = "outlines-core"

    def __init__(self, tokenizer) -> None:
        import llguidance  # only to decode every token to its bytes
        import outlines_core

        self.oc = outlines_core
        decoder = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size)
        self.eos = min(tokenizer.eos_token_ids)
        by_bytes: dict[bytes, list[int]] = {}
        for token_id in range(tokenizer.vocab_size):
            if token_id not in tokenizer.eos_token_ids and token_id not in tokenizer.special_token_ids:
                by_bytes.setdefault(decoder.decode_bytes([token_id]), []).append(token_id)
        by_bytes.pop(b"", None)
        self.vocabulary = outlines_core.Vocabulary(self.eos, by_bytes)

    def compile(self, kind: str, spec):
        if kind == "json":
            regex = self.oc.json_schema.build_regex_from_schema(json.dumps(spec), r"[ ]?")
        elif kind == "regex":
            regex = spec
        elif kind == "choice":
            regex = "|".join(_regex_escape(c) for c in spec)
        else:
            raise ValueError("outlines-core has no context-free grammars (regular languages only)")
        return self.oc.Index(regex, self.vocabulary)

    def new(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, matcher, mask):
        matcher.write_mask_into(mask.data_ptr(), mask.numel(), 4)

    def consume(self, matcher, token):
        try:
            matcher.advance(token, return_tokens=False)
            return True
        except Exception:
            return False

    def accepts_end(self, matcher):
        return matcher.is_finished()

    def rollback(self, matcher, n):
        matcher.rollback_state(n)


ADAPTERS = {"llguidance": Llguidance, "xgrammar": Xgrammar, "outlines-core": OutlinesCore}


def _regex_escape(text: str) -> str:
    return "".join("\\" + c if c in r".^$*+?()[]{}|\/" else c for c in text)


# ------------------------------------------------------------------------------------ measuring
def _timed_cases(adapter: Matcher) -> list[tuple[str, str, object, str]]:
    """(name, kind, spec, valid text) for every timed case the library can express."""
    cases = [(name, "json", schema, json.dumps(instance)) for name, schema, instance in TIMED_SCHEMAS]
    cases += [(TIMED_REGEX[0], "regex", TIMED_REGEX[1], TIMED_REGEX[2]),
              (TIMED_CHOICE[0], "choice", TIMED_CHOICE[1], TIMED_CHOICE[2])]
    if adapter.name == "llguidance":
        cases.append(("arith grammar", "grammar", LARK_GRAMMAR, GRAMMAR_INSTANCE))
    elif adapter.name == "xgrammar":
        cases.append(("arith grammar", "grammar", EBNF_GRAMMAR, GRAMMAR_INSTANCE))
    return cases


def _mask(vocab_size: int) -> torch.Tensor:
    return torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)


def _compile_cold(adapter: Matcher, kind: str, spec, vocab_size: int) -> float:
    started = time.perf_counter()
    compiler = adapter.fresh_compiler() if isinstance(adapter, Xgrammar) else None
    compiled = adapter.compile(kind, spec, compiler) if compiler else adapter.compile(kind, spec)
    adapter.fill(adapter.new(compiled), _mask(vocab_size))
    return time.perf_counter() - started


def _compile_cached(adapter: Matcher, compiled, kind: str, spec, vocab_size: int) -> float:
    started = time.perf_counter()
    if isinstance(adapter, Xgrammar):
        compiled = adapter.compile(kind, spec)  # a hit in the compiler's cache
    adapter.fill(adapter.new(compiled), _mask(vocab_size))
    return time.perf_counter() - started


def _mask_walk(adapter: Matcher, compiled, token_ids: list[int], vocab_size: int) -> list[float]:
    """Seconds per mask along a valid instance; raises if the library rejects it."""
    matcher, mask, times = adapter.new(compiled), _mask(vocab_size), []
    for token in token_ids:
        started = time.perf_counter()
        adapter.fill(matcher, mask)
        times.append(time.perf_counter() - started)
        if not adapter.consume(matcher, token):
            raise AssertionError(f"{adapter.name} rejected a valid instance")
    return times


def _accepts(adapter: Matcher, kind: str, spec, text: str, tokenizer) -> bool:
    matcher = adapter.new(adapter.compile(kind, spec))
    return all(adapter.consume(matcher, t) for t in tokenizer.encode(text, add_special_tokens=False)) \
        and adapter.accepts_end(matcher)


def _feature(adapter: Matcher, kind: str, spec, valid: str, invalid: str, tokenizer) -> str:
    try:
        adapter.compile(kind, spec)
    except Exception:
        return "refused"
    if not _accepts(adapter, kind, spec, valid, tokenizer):
        return "broken"
    return "ignored" if _accepts(adapter, kind, spec, invalid, tokenizer) else "enforced"


def _rollback_works(adapter: Matcher, tokenizer) -> str:
    """Consume a valid instance, roll back 3 tokens, re-consume: the masks must match the first pass."""
    name, schema, instance = TIMED_SCHEMAS[1]
    compiled = adapter.compile("json", schema)
    tokens = tokenizer.encode(json.dumps(instance), add_special_tokens=False)
    matcher, first, again = adapter.new(compiled), [], []
    for token in tokens:
        mask = _mask(tokenizer.vocab_size)
        adapter.fill(matcher, mask)
        first.append(mask)
        adapter.consume(matcher, token)
    try:
        adapter.rollback(matcher, 3)
    except Exception:
        return "no"
    for token in tokens[-3:]:
        mask = _mask(tokenizer.vocab_size)
        adapter.fill(matcher, mask)
        again.append(mask)
        adapter.consume(matcher, token)
    return "yes" if all(torch.equal(a, b) for a, b in zip(first[-3:], again)) and adapter.accepts_end(matcher) else "wrong"


def measure(adapter_cls, tokenizer, repeats: int, features: bool) -> dict:
    started = time.perf_counter()
    adapter = adapter_cls(tokenizer)
    result = {"library": adapter.name, "tokenizer_setup_s": time.perf_counter() - started, "cases": {}}
    mask_times: list[float] = []
    for name, kind, spec, text in _timed_cases(adapter):
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        try:
            cold = [_compile_cold(adapter, kind, spec, tokenizer.vocab_size) for _ in range(repeats)]
        except Exception as exc:
            result["cases"][name] = {"error": str(exc)[:200]}
            continue
        compiled = adapter.compile(kind, spec)
        cached = [_compile_cached(adapter, compiled, kind, spec, tokenizer.vocab_size) for _ in range(repeats)]
        walks = [_mask_walk(adapter, compiled, token_ids, tokenizer.vocab_size) for _ in range(repeats)]
        for walk in walks:
            mask_times.extend(walk)
        result["cases"][name] = {"compile_cold_ms": 1e3 * statistics.median(cold),
                                 "compile_cached_ms": 1e3 * statistics.median(cached),
                                 "tokens": len(token_ids)}
    result["mask_us_p50"] = 1e6 * _percentile(mask_times, 50)
    result["mask_us_p99"] = 1e6 * _percentile(mask_times, 99)
    if features:
        result["features"] = {f: _feature(adapter, "json", schema, json.dumps(valid), json.dumps(invalid), tokenizer)
                              for f, schema, valid, invalid in FEATURES}
        result["features"]["regex"] = _feature(adapter, "regex", r"[a-z]{2,3}\d", "ab1", "a1", tokenizer)
        result["features"]["Lark/EBNF grammar"] = _feature(
            adapter, "grammar", EBNF_GRAMMAR if adapter.name == "xgrammar" else LARK_GRAMMAR,
            GRAMMAR_INSTANCE, "(1+", tokenizer)
        result["features"]["rollback"] = _rollback_works(adapter, tokenizer)
    return result


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# ------------------------------------------------------------------------------------ reporting
def host() -> dict:
    """The CPU (model, AMX or not) and the software the figures came from."""
    flags, model = set(), platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.processor()):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "amx": "amx_tile" in flags, "avx512": "avx512f" in flags, "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def print_report(results: list[dict]) -> None:
    from quill.table import format_table

    case_names = list(dict.fromkeys(c for r in results for c in r["cases"]))
    header = ["tokenizer", "library", "setup s", "mask p50 us", "mask p99 us",
              *[f"{c} cold/cached ms" for c in case_names]]
    rows = []
    for r in results:
        cells = []
        for c in case_names:
            case = r["cases"].get(c)
            cells.append("-" if case is None else "error" if "error" in case
                         else f"{case['compile_cold_ms']:.1f}/{case['compile_cached_ms']:.2f}")
        rows.append([r["tokenizer"], r["library"], f"{r['tokenizer_setup_s']:.2f}", f"{r['mask_us_p50']:.0f}",
                     f"{r['mask_us_p99']:.0f}", *cells])
    print(format_table(header, rows))
    with_features = [r for r in results if "features" in r]
    if with_features:
        print()
        libraries = list(dict.fromkeys(r["library"] for r in with_features))
        first = {r["library"]: r["features"] for r in reversed(with_features)}
        features = list(next(iter(first.values())))
        print(format_table(["feature", *libraries], [[f, *[first[lib][f] for lib in libraries]] for f in features]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3"])
    parser.add_argument("--libraries", nargs="+", choices=list(ADAPTERS), default=list(ADAPTERS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="SmolLM2 only, one repeat")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "structured_matchers.json")
    args = parser.parse_args()
    if args.quick:
        args.models, args.repeats = ["smollm2"], 1

    from quill.tokenizer import load_tokenizer
    from quill.weights.hub import resolve_model

    results = []
    for model in args.models:
        tokenizer = load_tokenizer(resolve_model(model))
        for library in args.libraries:
            print(f"{model}: {library} ...", file=sys.stderr, flush=True)
            result = measure(ADAPTERS[library], tokenizer, args.repeats, features=model == args.models[0])
            results.append({"tokenizer": f"{model} ({tokenizer.vocab_size})", **result})
    print_report(results)
    if not args.quick:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"host": host(), "repeats": args.repeats, "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
