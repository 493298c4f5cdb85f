"""The LM head's logits in float32, exact where it matters.

A bfloat16 matmul rounds its output to bfloat16: 8 significant bits, so a logit of 20 can be off
by 0.06. That is enough to turn a near-tie into an exact tie or flip it, and greedy output then
depends on rounding rather than on the model (SmolLM2's answer to "What is the capital of France?"
flipped between "The capital of France is Paris" and "L'Étoile..." this way). The whole vocabulary in
float32 would cost four times the bandwidth of the largest matrix, so only the tokens that could
be the maximum, those within the head's error bound of it, are recomputed exactly.

With quantized weights the big head matrix is read through the int8 kernel (half the bytes of
bf16; `int8_lm_head`); its error bound is wider, and the candidates are recomputed from the
float weight it was made from, so greedy decisions are those of the float head. The recomputed
logits are summed in one fixed order (`fixed_order_dot`), and the head's kernel computes every row
alike, so no logit depends on the rows beside it. (The int8 kernel also beats a bf16 matmul over
the float head at every row count: 2.1 against 6.9 ms for one row of SmolLM2's 49,152 x 576 head,
20.8 against 23.8 ms for 64, single-threaded on an AMD EPYC.)
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from quill.layers.embedding import Q8Table
from quill.layers.fixed_order import fixed_order_dot
from quill.layers.module import InferenceModule
from quill.layers.quantized import Int8Linear

# A bf16 output v is within 2**-8 * |v| of the float32 one; 2**-9 more covers the float32 sums.
_BF16_RELATIVE_ERROR = 2.0 ** -8 + 2.0 ** -9


def int8_lm_head(weight: torch.Tensor) -> Int8Linear:
    """An int8 copy of a float LM head (often the tied embedding table), keeping the float weight
    for the exact recomputation of the top candidates."""
    head = Int8Linear.from_float(weight)
    head.exact_weight = weight  # shared with the embedding when tied: no copy
    return head


class TableHead(InferenceModule):
    """The LM head tied to a `Q8Table`, multiplying by the table's own packed rows: no copy of its
    own, and no approximation of the weights either. Its logits are the exact ones summed in the
    kernel's order rather than `fixed_order_dot`'s, then rounded to bf16 like any bf16 product's
    (for a float32 model: not rounded, but with weights and activations rounded to bf16 first);
    the rows near the maximum are recomputed as every head's are. Against the int8 head this replaced (SmolLM2, AMD
    EPYC): the same speed, 28 MB less memory; Gemma 3's, 168 MB less."""

    def __init__(self, table: Q8Table) -> None:
        super().__init__()
        self.exact_weight = table  # the rows the candidates are recomputed from
        self.matmul = table.matmul
        # Two float32 sums of the same k exact products differ by at most 2k * 2**-24 * sum |w_i x_i|,
        # and sum |w_i x_i| is at most |w|_2 |x|_2: the bound is this times |x|_2.
        rounding = 0.0 if table.dtype == torch.bfloat16 else 2.0 ** -8
        self.error_per_unit_x = (rounding + 2 * table.shape[1] * 2.0 ** -24) * table.max_row_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, 1]: how far outputs (before their rounding to bf16) can be from the exact logits."""
        return self.error_per_unit_x * x.float().norm(dim=-1, keepdim=True)


def lm_head_logits(lm_head: nn.Module, hidden: torch.Tensor, *,
                   reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """[rows, vocab] float32 logits, exact near each row's maximum. `reduce_max` turns the row
    maxima [rows, 1] of a slice of the vocabulary into the whole vocabulary's (tensor parallelism)."""
    exact_weight = getattr(lm_head, "exact_weight", None)
    logits = lm_head(hidden).float()
    weight = exact_weight if exact_weight is not None else getattr(lm_head, "weight", None)
    if weight is None or (exact_weight is None and weight.dtype == torch.float32):
        return logits  # a quantized head with no float weight to consult, or exact already
    return _refine_near_maximum(logits, weight, hidden, None if exact_weight is None else lm_head.error_bound(hidden),
                                reduce_max)


def output_token_ids(config) -> torch.Tensor | None:
    """The ids a trimmed LM head's rows stand for (`ModelConfig.output_token_ids`), or None. A
    plain CPU tensor rather than a buffer: the model is built on the meta device and filled from
    the checkpoint, which holds no such tensor (the config does); it meets the logits' device when used."""
    return torch.tensor(config.output_token_ids, device="cpu") if config.output_token_ids else None


def full_vocabulary_logits(logits: torch.Tensor, token_ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """The logits of a trimmed LM head (one column per id in `token_ids`) spread over the whole
    vocabulary, -inf for every token the head does not have, so that no sampler, logit bias or
    drafter can pick one. Without `token_ids` the logits are returned as they are."""
    if token_ids is None:
        return logits
    full = logits.new_full((logits.shape[0], vocab_size), float("-inf"))
    full[:, token_ids.to(logits.device)] = logits
    return full


def _refine_near_maximum(logits: torch.Tensor, weight: torch.Tensor, hidden: torch.Tensor,
                         head_error: torch.Tensor | None = None,
                         reduce_max: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Recompute in float32, from `weight`, the logits that could be the row's maximum: those
    within the bf16 rounding of it, plus `head_error` (the int8 head's bound, [rows, 1])."""
    row_max = logits.amax(dim=-1, keepdim=True)  # 10x faster than max(dim).values on a CPU
    if reduce_max is not None:
        row_max = reduce_max(row_max)
    error = _BF16_RELATIVE_ERROR * row_max.abs()
    if head_error is not None:
        error = error + head_error
    # A logit near the maximum is within `error` of its exact value, so the exact maximum is
    # among these.
    rows, tokens = (logits >= row_max - 2 * error).nonzero(as_tuple=True)
    logits[rows, tokens] = fixed_order_dot(weight[tokens], hidden[rows])  # the same sum however many
    return logits
