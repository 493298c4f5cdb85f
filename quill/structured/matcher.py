"""One sequence's place in its grammar: advance with committed tokens, fill token masks, roll back.

The matcher library is llguidance, chosen by measurement (benchmarks/structured_matchers.py, 2-core
AMD EPYC, no AMX, shared machine: medians of 5 runs, indicative only):

                                   llguidance       xgrammar 0.2.9     outlines-core 0.2.14
  SmolLM2 (49,152 tokens)
    tokenizer set-up               0.3 s            1.0 s              0.3 s
    compile to first mask, cold    0.7-2.1 ms       5-24 ms            15 ms-3.5 s (regex DFA)
    compile, cached schema         0.06-0.24 ms     0.03-0.2 ms        0.07-1.3 ms
    mask per token p50 / p99       14 / 230 us      1 / 15 us          1 / 90 us
  Gemma 3 (262,144 tokens): see the module docstring of the benchmark and the report of issue 17.
  JSON Schema keywords it cannot enforce refused (a 400), ignored (silently wrong), of 29 checked:
                                   5 / 0            0 / 5              2 / 6 (+1 broken)
  Lark/GBNF grammars               yes              yes (EBNF)         no (regular only)
  dependencies                     none             torch, transformers, triton (~GBs)   none

All three mask far faster than a forward pass (SmolLM2 decodes a token in ~10 ms here), and the
masks are computed while the forward pass runs, so mask speed does not decide. What decides:
llguidance refuses every keyword it cannot enforce, so a request is honoured or gets a 400, never
silently unconstrained (xgrammar ignores `allOf`, `not`, `if`/`then`, `uniqueItems`,
`dependentRequired`; outlines-core ignores numeric bounds and `multipleOf`); it compiles the
fastest cold (a server meets many one-off schemas); it is one small wheel with no dependencies
(xgrammar requires triton and transformers, which would pull a CUDA stack onto CPU installs); and
it has Lark grammars with inline JSON schemas (`%json`) and lazy lexemes, which tool calling uses.

llguidance builds a grammar's lexer lazily, so the first mask of a new grammar carries most of its
compile cost (that is the p99 above); copies of a compiled matcher share what was built.
"""
from __future__ import annotations

import torch

MASK_WORD_BITS = 32  # llguidance masks: one bit per token, little-endian in int32 words


def mask_words(vocab_size: int) -> int:
    return -(-vocab_size // MASK_WORD_BITS)


class GrammarMatcher:
    """A wrapper over `llguidance.LLMatcher` with the operations the engine uses. Its methods are
    called from one thread at a time (the engine thread, or the mask worker while it owns it)."""

    def __init__(self, matcher) -> None:
        self._matcher = matcher

    def advance(self, token_id: int) -> bool:
        """Consume a committed token. False if the grammar rejects it (the matcher is then broken)."""
        return self._matcher.consume_token(token_id)

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many of `token_ids` the grammar accepts in a row from here (nothing is consumed)."""
        return self._matcher.validate_tokens(token_ids) if token_ids else 0

    def fill_mask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into `row` (contiguous int32, `mask_words(vocab)` long).
        llguidance releases the GIL while it computes."""
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def fill_masks(self, rows: torch.Tensor, draft_token_ids: list[int]) -> None:
        """Row j: the mask after the first j drafts (row 0: after the committed tokens). Rows after
        the first draft the grammar rejects are left as they are: verification stops at that draft
        (it is never the masked target's choice), so they are never read. The matcher ends where
        it began."""
        self.fill_mask(rows[0])
        num_valid = self.valid_prefix(draft_token_ids)
        for j, token_id in enumerate(draft_token_ids[:num_valid]):
            self._matcher.consume_token(token_id)
            self.fill_mask(rows[j + 1])
        if num_valid:
            self._matcher.rollback(num_valid)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens and not self._matcher.rollback(num_tokens):
            raise RuntimeError(f"grammar matcher could not roll back {num_tokens} tokens: {self.error}")

    def reset(self) -> None:
        self._matcher.reset()

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and nothing but EOS may follow: the output ends here."""
        return self._matcher.is_stopped()

    @property
    def is_accepting(self) -> bool:
        """The output so far is a complete sentence of the grammar (it may still go on)."""
        return self._matcher.is_accepting()

    @property
    def error(self) -> str:
        return self._matcher.get_error()
