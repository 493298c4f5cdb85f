"""LM-head logits: bf16 rounding never decides between near-tied tokens."""
from __future__ import annotations

import gguf
import pytest
import torch

from quill.layers.embedding import Q8Table
from quill.layers.linear import Linear, prepare_linears_for_cpu
from quill.layers.logits import TableHead, int8_lm_head, lm_head_logits
from quill.layers.matmul import kernel_available
from quill.weights.quantized import GGMLRows


def test_tokens_near_the_maximum_get_exact_float32_logits():
    torch.manual_seed(0)
    vocab, hidden_size = 2000, 64
    head = Linear(hidden_size, vocab, bias=False).to(torch.bfloat16)
    with torch.no_grad():  # near-ties everywhere: pairs of rows that differ in one low bit
        head.weight[1::2] = head.weight[0::2]
        head.weight[1::2, 0] += head.weight[1::2, 0].abs() * 2 ** -7
    hidden = torch.randn(300, hidden_size).to(torch.bfloat16)
    exact = hidden.float() @ head.weight.float().T
    rounded = head(hidden).float()
    logits = lm_head_logits(head, hidden)

    assert not torch.equal(rounded.argmax(-1), exact.argmax(-1))  # the case this guards against
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))
    top = exact.argmax(-1, keepdim=True)
    torch.testing.assert_close(logits.gather(-1, top), exact.gather(-1, top), atol=1e-5, rtol=0)


def test_float32_heads_are_left_alone():
    head = Linear(16, 50, bias=False)
    hidden = torch.randn(3, 16)
    assert torch.equal(lm_head_logits(head, hidden), head(hidden))


def test_int8_head_picks_the_float_heads_maximum():
    torch.manual_seed(1)
    vocab, hidden_size = 4000, 128
    weight = (torch.randn(vocab, hidden_size) * 0.05).to(torch.bfloat16)
    head = int8_lm_head(weight)
    hidden = (torch.randn(500, hidden_size) * 2).to(torch.bfloat16)
    exact = hidden.float() @ weight.float().T
    approx = head(hidden).float()
    assert (approx - exact).abs().max(dim=-1, keepdim=True).values.le(head.error_bound(hidden)).all()
    assert not torch.equal(approx.argmax(-1), exact.argmax(-1))  # int8 alone would pick other tokens
    assert torch.equal(lm_head_logits(head, hidden).argmax(-1), exact.argmax(-1))


def test_int8_head_of_a_float32_model_is_refined_too():
    torch.manual_seed(2)
    weight = torch.randn(3000, 64) * 0.05
    head = int8_lm_head(weight)
    hidden = torch.randn(200, 64) * 2
    exact = hidden @ weight.T
    assert not torch.equal(head(hidden).float().argmax(-1), exact.argmax(-1))
    assert torch.equal(lm_head_logits(head, hidden).argmax(-1), exact.argmax(-1))


def _q8_0_table(weight: torch.Tensor, dtype: torch.dtype) -> Q8Table:
    """`weight` quantized to GGML Q8_0 blocks, as a table the head is tied to."""
    blocks = gguf.quants.quantize(weight.float().numpy(), gguf.GGMLQuantizationType.Q8_0)
    return Q8Table(GGMLRows(torch.from_numpy(blocks), gguf.GGMLQuantizationType.Q8_0, weight.shape[1], dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
def test_a_head_tied_to_a_q8_0_table_is_within_its_bound_and_picks_the_exact_maximum(dtype):
    """`TableHead` multiplies by the table's own rows; before rounding its logits are within
    `error_bound` of the exact ones (float32 sums of the table's rows), and after refining, the
    maximum is the exact one's, near-ties included."""
    if not kernel_available():
        pytest.skip("no C compiler")
    weight = _near_ties(4000, 128, seed=4)
    table = _q8_0_table(weight, dtype)
    head = TableHead(table)
    rows = table[0:4000].float()
    hidden = (torch.randn(500, 128) * 2).to(torch.bfloat16).to(dtype)
    exact = hidden.float() @ rows.T
    unrounded = head.matmul(hidden.float())  # float32 activations: float32 outputs
    assert (unrounded - exact).abs().max(dim=-1, keepdim=True).values.le(head.error_bound(hidden)).all()
    assert not torch.equal(head(hidden).float().argmax(-1), exact.argmax(-1))  # rounded outputs would pick others
    assert torch.equal(lm_head_logits(head, hidden).argmax(-1), exact.argmax(-1))


def _near_ties(vocab: int, hidden_size: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    weight = (torch.randn(vocab, hidden_size) * 0.05).to(torch.bfloat16)
    weight[1::2] = weight[0::2]  # near-ties that rounding decides
    weight[1::2, 0] += weight[1::2, 0].abs() * 2 ** -7
    return weight


@pytest.mark.parametrize("head_kind", ["int8", "bfloat16", "float32"])
def test_a_rows_logits_do_not_depend_on_the_rows_beside_it(head_kind):
    """Every logit, not only the maximum: logprobs must not change with the batch either."""
    weight = _near_ties(3000, 128, seed=3)
    if head_kind == "int8":
        head = int8_lm_head(weight)
    else:
        head = Linear(128, 3000, bias=False).to(getattr(torch, head_kind))
        with torch.no_grad():
            head.weight.copy_(weight)

        class Model(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lm_head = head
        prepare_linears_for_cpu(Model())
    hidden = (torch.randn(40, 128) * 2).to(weight.dtype if head_kind != "float32" else torch.float32)
    together = lm_head_logits(head, hidden)
    for start, size in [(0, 1), (3, 1), (5, 4), (7, 17), (0, 40)]:
        assert torch.equal(lm_head_logits(head, hidden[start:start + size]), together[start:start + size])
    exact = hidden.float() @ weight.float().T
    assert torch.equal(together.argmax(-1), exact.argmax(-1))
