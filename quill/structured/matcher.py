"""One sequence's place in its grammar: advance with committed tokens, fill token masks, roll back.

The matcher library is llguidance, chosen by measurement (benchmarks/structured_matchers.py, results
in benchmarks/results/structured_matchers.json: 2-core AMD EPYC, AVX-512, no AMX, a heavily shared
machine, medians of 5 runs: indicative only):

                                 llguidance 1.9.1   xgrammar 0.2.9     outlines-core 0.2.14
  SmolLM2 (49,152 tokens)
    tokenizer set-up             0.2 s              1.0 s              0.4 s
    compile to first mask, cold  0.4-1.0 ms         4-33 ms            5 ms-2.9 s
    compile, cached grammar      0.01-0.03 ms       0.01-0.07 ms       <0.01 ms
    mask per token p50 / p99     9 / 137 us         1 / 16 us          1 / 72 us
  Gemma 3 (262,144 tokens)
    tokenizer set-up             4.1 s              2.6 s              3.2 s
    compile to first mask, cold  0.4-1.1 ms         0.3-137 ms         0.5-371 s
    mask per token p50 / p99     8 / 522 us         2 / 198 us         2 / 8,920 us
  29 JSON Schema features: enforced / refused / silently ignored (or broken)
                                 24 / 5 / 0         23 / 0 / 6         20 / 2 / 7
  Lark or EBNF grammars          yes (Lark, GBNF)   yes (EBNF)         no (regular only)
  rollback (speculation)         yes                yes                yes
  dependencies                   none               torch, transformers, triton   none

Every one of them masks far faster than a forward pass (SmolLM2 decodes a token in ~10 ms here)
and the masks are filled while the forward pass runs, so mask speed does not decide. What does:
llguidance refuses every keyword it cannot enforce (uniqueItems, not, if/then/else, propertyNames,
dependentRequired), so a request is honoured or gets a 400, never silently unconstrained, while
xgrammar ignores allOf, uniqueItems, not, if/then/else and dependentRequired, and outlines-core
numeric bounds and multipleOf; it compiles the fastest cold (a server meets many one-off
schemas: outlines-core needs minutes for a 30-property object on Gemma's vocabulary); it is one
small wheel with no dependencies (xgrammar requires triton and transformers, which would pull a
CUDA stack onto CPU installs); and its Lark grammars embed JSON schemas (`%json`) and lazy
lexemes, which tool calling uses.

llguidance builds a grammar's lexer lazily, so the first mask of a new grammar carries most of its
compile cost (that is the p99 above); copies of a compiled matcher share what was built.
"""
from __future__ import annotations

import functools

import torch

MASK_WORD_BITS = 32  # llguidance masks: one bit per token, little-endian in int32 words


def mask_words(vocab_size: int) -> int:
    return -(-vocab_size // MASK_WORD_BITS)


def fill_masks(jobs: list[tuple[GrammarMatcher, int, list[int]]], bits: torch.Tensor) -> None:
    """For each (matcher, first row, drafts): row first + j of `bits` ([rows, words] int32,
    contiguous) gets the mask after the first j drafts (row first: after the committed tokens).
    Rows after the first draft the grammar rejects are left as they are: verification stops at
    that draft (it is never the masked target's choice), so they are never read. Matchers end
    where they began.

    One call into llguidance for the whole batch, which holds no GIL while it works: a Python loop
    would take the GIL back after every mask, each time from the engine thread in the middle of
    its forward pass, while this way the worker thread takes it twice a step."""
    executor, pointer, row_bytes, num_rows = _executor(), bits.data_ptr(), bits.shape[1] * bits.element_size(), bits.shape[0]
    plain = [(matcher._matcher, first_row) for matcher, first_row, drafts in jobs if not drafts]
    with_drafts = [(matcher._matcher, first_row, drafts) for matcher, first_row, drafts in jobs if drafts]
    if plain:
        executor.unsafe_compute_mask_ptr(plain, pointer, row_bytes, num_rows)
    if with_drafts:  # llguidance wants at least one draft per entry here
        executor.unsafe_compute_mask_ptr_with_draft_token(with_drafts, pointer, row_bytes, num_rows)


@functools.cache
def _executor():
    import llguidance

    # One thread: masks take microseconds, and the forward pass running beside them wants every core.
    return llguidance.LLExecutor(num_threads=1)


class GrammarMatcher:
    """A wrapper over `llguidance.LLMatcher` with the operations the engine uses. Its methods are
    called from one thread at a time (the engine thread, or the mask worker while it owns it)."""

    def __init__(self, matcher, unvettable: frozenset[int] = frozenset(), forcing: bool = True) -> None:
        self._matcher = matcher
        self._unvettable = unvettable  # see `vet`
        self._forcing = forcing  # False: the grammar has llguidance's no_forcing option

    def advance(self, token_id: int) -> bool:
        """Consume a committed token. False if the grammar rejects it (the matcher is then broken)."""
        return self._matcher.consume_token(token_id)

    def valid_prefix(self, token_ids: list[int]) -> int:
        """How many of `token_ids` the grammar accepts in a row from here (nothing is consumed)."""
        return self._matcher.validate_tokens(token_ids) if token_ids else 0

    def vet(self, token_id: int) -> int | None:
        """The token a greedy pick under the next mask (`fill_mask`) takes, given `token_id`, the pick
        made without it; None when only the mask can tell. Microseconds, where SmolLM2's masks take
        50-300 us. (Masking only removes candidates: the masked argmax is the unmasked one if allowed.)

        llguidance's mask is one of three things (TokenParser::compute_mask_inner in its source):
        - the grammar forces bytes (`,"price":` after a value, say) and their canonical tokenization
          starts with a whole token: that token alone (`compute_ff_tokens`), the pick whatever
          `token_id` was. `validate_tokens` would accept any tokenization of the forced bytes;
        - it forces bytes otherwise (a token healing across them): None, the mask decides;
        - nothing forced: the tokens whose bytes the parser accepts, plus EOS when the grammar may end.
          For a token with bytes (not EOS, not special, not an empty id: `unvettable`) that is exactly
          what `validate_tokens` checks, byte by byte through the same lexer and parser.
        A grammar with llguidance's `no_forcing` option masks forced bytes as in the second case.
        tests/test_structured_real.py holds all this against the masks on both real vocabularies."""
        if self._matcher.compute_ff_bytes():
            forced = self._matcher.compute_ff_tokens() if self._forcing else []
            return forced[0] if forced else None
        if token_id in self._unvettable or self._matcher.validate_tokens([token_id]) != 1:
            return None
        return token_id

    def fill_mask(self, row: torch.Tensor) -> None:
        """Write the allowed next tokens into `row` (contiguous int32, `mask_words(vocab)` long).
        llguidance releases the GIL while it computes."""
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

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
