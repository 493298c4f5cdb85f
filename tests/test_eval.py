"""Perplexity and greedy agreement (`quill eval`), and the evaluation corpus shipped with Quill."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from engine_helpers import load_model
from quill.cli import main
from quill.config import EngineConfig
from quill.engine.engine import Engine
from quill.models import loader
from quill.optimize.evaluate import corpus_path, score, scoring_runner, windows
from quill.optimize.quantize import quantize_checkpoint
from quill.sampling_params import SamplingParams
from quill.models.loader import load_checkpoint
from quill.models.registry import FAMILIES
from quill.weights.gguf_export import write_gguf
from tokenizer_helpers import tiny_sentencepiece_metadata

TOKENS = torch.randint(0, 320, (70,), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def transformers_model(llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()


def transformers_nll(model, token_ids: list[int]) -> torch.Tensor:
    """Per-token NLL of token_ids[1:] given everything before it, from transformers."""
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0, :-1].double()
    return -torch.log_softmax(logits, -1).gather(1, torch.tensor(token_ids[1:])[:, None])[:, 0]


@pytest.mark.parametrize("num_tokens, window", [(2, 2), (10, 4), (70, 16), (70, 17), (100, 512)])
def test_windows_score_every_token_once_with_half_a_window_of_context(num_tokens, window):
    scored = []
    for start, end, first in windows(num_tokens, window):
        assert end - start <= window and start < first <= end
        assert first - start >= min(window // 2, first - 1) or start == 0
        scored.extend(range(first, end))
    assert scored == list(range(1, num_tokens))


def test_perplexity_of_one_window_matches_transformers(llama, transformers_model):
    model, config = load_model(llama)
    scores = score(model, config, TOKENS, window=512)
    expected = transformers_nll(transformers_model, TOKENS)
    assert scores.tokens_scored == len(TOKENS) - 1
    torch.testing.assert_close(scores.nll, expected, atol=1e-4, rtol=0)
    assert math.isclose(scores.perplexity, math.exp(expected.mean()), rel_tol=1e-4)


def test_sliding_windows_match_transformers_window_by_window(llama, transformers_model):
    """The same windows recomputed independently, one transformers forward pass each."""
    model, config = load_model(llama)
    scores = score(model, config, TOKENS, window=16)
    expected = torch.cat([transformers_nll(transformers_model, TOKENS[start:end])[first - start - 1:]
                          for start, end, first in windows(len(TOKENS), 16)])
    torch.testing.assert_close(scores.nll, expected, atol=1e-4, rtol=0)
    assert scores.mean_nll != pytest.approx(score(model, config, TOKENS, window=512).mean_nll, abs=1e-6)


def test_greedy_agreement(llama, tiny_model_dir, tmp_path):
    model, config = load_model(llama)
    reference = score(model, config, TOKENS, window=32)
    assert reference.agreement(reference) == 1.0
    quantized = tmp_path / "q8_0.gguf"
    quantize_checkpoint(llama, quantized, "q8_0", with_tokenizer=False, progress=False)  # scores token ids only
    agreement = score(*load_model(quantized), TOKENS, window=32).agreement(reference)
    assert 0.8 < agreement <= 1.0
    with pytest.raises(ValueError, match="cannot compare"):
        reference.agreement(score(model, config, TOKENS[:40], window=32))


# --- the corpus ----------------------------------------------------------------------------------

def test_corpus_ships_as_package_data_with_a_disjoint_heldout_split():
    heldout, dev = corpus_path("heldout"), corpus_path("dev")
    assert heldout.stat().st_size > 100_000 and dev.stat().st_size > 250_000
    heldout_paragraphs = set(heldout.read_text(encoding="utf-8").split("\n\n"))
    dev_paragraphs = set(dev.read_text(encoding="utf-8").split("\n\n"))
    assert len(heldout_paragraphs & dev_paragraphs) < 0.01 * len(heldout_paragraphs)  # a few stock phrases at most
    readme = (heldout.parent / "README.md").read_text(encoding="utf-8")
    assert "python3.11-doc" in readme and "PSF License" in readme and (heldout.parent / "LICENSE").exists()
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text(encoding="utf-8")
    assert '"data/eval/*.txt"' in pyproject


# --- the command line ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf_pair(llama, tmp_path_factory):
    """A float GGUF with a tokenizer, and its int4 copy."""
    folder = tmp_path_factory.mktemp("eval")
    checkpoint = load_checkpoint(llama)
    float_path = folder / "f32.gguf"
    write_gguf(float_path, FAMILIES.named("llama"), checkpoint.config, checkpoint.tensors, tiny_sentencepiece_metadata())
    int4_path = folder / "int4.gguf"
    quantize_checkpoint(float_path, int4_path, "int4", progress=False)
    (folder / "corpus.txt").write_text("Hello world. " * 100, encoding="utf-8")
    return float_path, int4_path, folder / "corpus.txt"


@pytest.mark.parametrize("length", [20, 40])
def test_eval_scores_the_logits_the_engine_samples_from(tiny_gguf_pair, length):
    """An int4 model in bf16, short and long prompts: eval's logits at the prompt's last position
    are those the engine samples from, bit for bit."""
    _, int4_path, _ = tiny_gguf_pair
    prompt = TOKENS[:length]
    model, config = loader.load_model(int4_path, torch.bfloat16)
    logprobs = torch.log_softmax(scoring_runner(model, config, length).prompt_logits(prompt)[-1], -1)
    engine_model, _ = loader.load_model(int4_path, torch.bfloat16)
    engine = Engine(engine_model, config, None, EngineConfig(dtype="bfloat16"))
    engine.add_request(prompt, SamplingParams(max_tokens=1, temperature=0, logprobs=5))
    while engine.has_unfinished():
        outputs = engine.step()
    first = outputs[-1].logprobs[0]
    top = logprobs.topk(5)
    assert first.top == list(zip(top.indices.tolist(), top.values.tolist()))


def test_cli_eval_reports_perplexity_and_agreement(tiny_gguf_pair, capsys):
    float_path, int4_path, corpus = tiny_gguf_pair
    assert main(["eval", str(int4_path), "--reference", str(float_path), "--corpus", str(corpus),
                 "--window", "32", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert f"{int4_path}: perplexity " in out and f"{float_path}: perplexity " in out
    assert f"greedy agreement with {float_path}: " in out and "window 32" in out


@pytest.mark.parametrize("args, message", [
    (["--max-tokens", "1"], "--max-tokens must be at least 2"),
    (["--window", "1"], "the window must hold at least 2 tokens"),
    (["--window", "1024"], "longer than the model's context"),
    (["--corpus", "/nonexistent/corpus.txt"], "cannot read corpus"),
])
def test_cli_eval_errors(tiny_gguf_pair, capsys, args, message):
    float_path, _, corpus = tiny_gguf_pair
    argv = ["eval", str(float_path), "--corpus", str(corpus), *args]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
