"""Logits of every architecture against Hugging Face transformers on tiny random models, loaded
from the Hugging Face directory and from a GGUF file written from it."""
from __future__ import annotations

import pytest
import torch

from engine_helpers import all_position_logits, load_model, run_requests, tiny_engine
from quill.layers.norm import RMSNorm
from quill.sampling_params import SamplingParams
from quill.models.loader import load_checkpoint
from quill.models.registry import FAMILIES
from quill.weights.gguf_export import write_gguf

PROMPT = [1, 17, 250, 3, 99, 42, 7, 7, 7, 310, 64, 128, 5, 200, 33, 18, 91, 0, 4, 150, 260, 11, 76, 9]


@pytest.fixture(scope="module", params=["llama", "qwen2", "gemma3", "gemma3-softcap", "llama-rope-llama3",
                                        "llama-rope-linear", "qwen3", "smollm3", "phi3",
                                        "qwen3moe"])
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def reference_logits(arch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    path = tiny_model_dir(arch)
    # Eager attention: transformers' SDPA path ignores attention logit soft-capping.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return path, model(torch.tensor([PROMPT])).logits[0]


@pytest.fixture(scope="module")
def gguf_copy(reference_logits, tmp_path_factory):
    path, _ = reference_logits
    checkpoint = load_checkpoint(path)
    out = tmp_path_factory.mktemp("gguf") / "model.gguf"
    write_gguf(out, FAMILIES.named(checkpoint.config.architecture), checkpoint.config, checkpoint.tensors)
    return out


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_logits_match_transformers(reference_logits, gguf_copy, source):
    path, expected = reference_logits
    model, config = load_model(path if source == "hf" else gguf_copy)
    logits = all_position_logits(model, config, PROMPT)
    torch.testing.assert_close(logits, expected, atol=2e-5, rtol=1e-4)


def test_unnormalised_expert_weights_match_transformers_and_have_no_gguf_form(tiny_model_dir, tmp_path):
    """Qwen3-MoE may leave the top-k expert weights as they are (transformers' default); llama.cpp
    always renormalises them, so such a model is refused as GGUF rather than written wrongly."""
    from transformers import AutoModelForCausalLM

    from quill.errors import UnsupportedModelError

    path = tiny_model_dir("qwen3moe-unnormalized")
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(torch.tensor([PROMPT])).logits[0]
    model, config = load_model(path)
    assert not config.norm_topk_prob
    torch.testing.assert_close(all_position_logits(model, config, PROMPT), expected, atol=2e-5, rtol=1e-4)
    checkpoint = load_checkpoint(path)
    with pytest.raises(UnsupportedModelError, match="norm_topk_prob"):
        write_gguf(tmp_path / "moe.gguf", FAMILIES.named("qwen3moe"), checkpoint.config, checkpoint.tensors)


def test_attention_in_bfloat16_as_on_a_gpu(reference_logits, monkeypatch):
    """Off the CPU, attention computes in the cache's dtype: the attention block must hand it
    queries, keys and values all in that dtype (RoPE computes in float32)."""
    from quill.layers import attention

    monkeypatch.setattr(attention, "attention_dtype", lambda cache_dtype, device: cache_dtype)
    path, expected = reference_logits
    model, config = load_model(path, torch.bfloat16)
    logits = all_position_logits(model, config, PROMPT)
    assert logits.dtype == torch.float32 and logits.isfinite().all()
    torch.testing.assert_close(logits, expected, atol=0.3, rtol=0.1)  # bfloat16 throughout


def test_incremental_decode_matches_full_forward(reference_logits):
    """Greedy tokens from the engine (prefill then one token per step through the paged cache)
    are the reference model's argmax at every position of the resulting sequence."""
    from transformers import AutoModelForCausalLM

    path, _ = reference_logits
    generated = run_requests(tiny_engine(path), [PROMPT], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + generated])).logits[0]
    expected = logits[len(PROMPT) - 1:-1].argmax(-1).tolist()
    assert generated == expected


@pytest.mark.parametrize("dim", [64, 256, 576, 640])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_is_the_reference_formula_exactly(dim, dtype, monkeypatch):
    """RMSNorm's PyTorch path calls F.rms_norm for speed; it must round exactly as the spelled-out
    reference."""
    monkeypatch.setenv("QUILL_KERNELS", "0")
    norm, x, reference = _norm_and_reference(dim, dtype)
    assert norm._kernel is None
    assert torch.equal(norm(x), reference)


@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dim", [64, 256, 576, 640])
def test_rms_norm_kernel_rounds_as_the_reference_but_for_its_summation_order(dim, offset):
    """The C kernel sums the squares in another order than PyTorch: the norm can differ in its
    last bit, and so, rarely, an output by one bf16 step. (Measured: 11 of 2.8M values.)"""
    norm, x, reference = _norm_and_reference(dim, torch.bfloat16, offset)
    if norm._kernel is None:
        pytest.skip("no C compiler here")
    out = norm(x)
    assert (out == reference).float().mean() > 0.999
    assert torch.allclose(out.float(), reference.float(), rtol=2 ** -7, atol=0)


def _norm_and_reference(dim: int, dtype: torch.dtype, offset: float = 0.0) -> tuple[RMSNorm, torch.Tensor, torch.Tensor]:
    norm = RMSNorm(dim, 1e-6, weight_offset=offset)
    norm.weight.data = torch.randn(dim).to(dtype)
    x = (torch.randn(37, dim) * 5).to(dtype)
    exact = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    if offset:
        return norm, x, (exact * (norm.weight.float() + offset)).to(dtype)
    return norm, x, norm.weight * exact.to(dtype)
