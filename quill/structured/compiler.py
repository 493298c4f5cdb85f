"""Compiled grammars for one model's tokenizer, cached by constraint.

Compiling binds a grammar to the vocabulary (llguidance's view of the tokenizer: every token's
bytes, built once per model on first use: 0.3 s for SmolLM2's 49,152 tokens, 3.5 s for Gemma 3's
262,144). Each compiled grammar is kept as a template matcher in an LRU cache keyed by the
constraint's canonical key; a request gets a copy (tens of microseconds) that shares the lexer
states already built, so a repeated schema pays compilation once.
"""
from __future__ import annotations

import time
from collections import OrderedDict

from quill.errors import StructuredOutputError
from quill.structured.constraints import Constraint, grammar_error
from quill.structured.matcher import GrammarMatcher

DEFAULT_CACHE_SIZE = 128  # compiled grammars kept; each holds its lexer states (kilobytes to megabytes)


class GrammarCompiler:
    def __init__(self, tokenizer, vocab_size: int, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        """`vocab_size`: the width of the model's logits (it may differ from the tokenizer's)."""
        self.tokenizer = tokenizer
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        self.cache_size = cache_size
        self._ll_tokenizer = None
        self._unvettable: frozenset[int] = frozenset()  # see GrammarMatcher.vet
        self._templates: OrderedDict[str, object] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.compile_seconds = 0.0

    def matchers(self, constraint: Constraint, count: int = 1) -> list[GrammarMatcher]:
        """`count` fresh matchers at the start of the constraint's grammar."""
        template = self._templates.get(constraint.key)
        if template is None:
            self.misses += 1
            template = self._compile(constraint)
            self._templates[constraint.key] = template
            if len(self._templates) > self.cache_size:
                self._templates.popitem(last=False)
        else:
            self.hits += 1
            self._templates.move_to_end(constraint.key)
        # "no_forcing" anywhere (an option, or only a description) turns off a shortcut: see GrammarMatcher.vet.
        forcing = "no_forcing" not in constraint.grammar
        return [GrammarMatcher(template.deep_copy(), self._unvettable, forcing) for _ in range(count)]

    def _compile(self, constraint: Constraint):
        import llguidance

        started = time.perf_counter()
        matcher = llguidance.LLMatcher(self._tokenizer(), constraint.grammar, log_level=0)
        self.compile_seconds += time.perf_counter() - started
        if matcher.is_error():
            raise grammar_error(matcher.get_error(), constraint.kind)
        return matcher

    def _tokenizer(self):
        """llguidance's tokenizer, built on first use from the backend's own tokenizer.json."""
        if self._ll_tokenizer is None:
            import llguidance

            eos = sorted(self.tokenizer.eos_token_ids) or None
            try:
                self._ll_tokenizer = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                            eos_token=eos)
            except Exception as exc:  # a tokenizer llguidance cannot read: no structured output here
                raise StructuredOutputError(f"structured output is not available for this model's tokenizer: {exc}",
                                            param="model") from None
            # Tokens a mask alone can judge: EOS, special tokens and ids without bytes (a few dozen;
            # 12 ms to find for SmolLM2's 49,152 tokens).
            tokenizer = self._ll_tokenizer
            self._unvettable = frozenset({*tokenizer.eos_tokens, *(
                t for t in range(tokenizer.vocab_size) if tokenizer.is_special_token(t) or not tokenizer.decode_bytes([t]))})
        return self._ll_tokenizer
