"""What a model (or a quantized copy of it) makes of a text: perplexity and greedy agreement.

The corpus is tokenized once and cut into windows of `window` tokens that overlap by half: the
first window scores all its tokens, each later one only its second half, so every token after
the first is scored exactly once, with at least `window // 2` tokens of context once there are
that many. Each window is one forward pass through the engine's model runner, set up as the
engine's defaults set it up, over all its positions as one prompt (`ModelRunner.prompt_logits`):
the logits are those the engine computes for that prompt, bit for bit, and no sampling is involved.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from quill.config import EngineConfig, ModelConfig
from quill.engine.runner import ModelRunner, int8_activations_for, kv_cache_dtype
from quill.errors import InvalidRequestError
from quill.models.loader import load_model_and_tokenizer
from quill.tokenizer import Tokenizer

DEFAULT_WINDOW = 512


def corpus_path(split: str = "heldout") -> Path:
    """The evaluation corpus shipped with Quill: "heldout" (for reported numbers) or "dev"."""
    return Path(str(resources.files("quill") / "data" / "eval" / f"{split}.txt"))


@dataclass
class ScoringModel:
    model: torch.nn.Module
    config: ModelConfig
    tokenizer: Tokenizer


def load_scoring_model(model: str | Path, dtype: str = "bfloat16", dequantize: bool = False) -> ScoringModel:
    """The bare network and tokenizer of a checkpoint, loaded as `LLM` would load them (quantized
    weights native unless `dequantize`), without an engine or KV cache of its own."""
    loaded = load_model_and_tokenizer(model, getattr(torch, dtype), dequantize=dequantize)
    return ScoringModel(loaded.model, loaded.config, loaded.tokenizer)


def tokenize_corpus(tokenizer: Tokenizer, path: str | Path, max_tokens: int | None = None) -> list[int]:
    """The corpus file's tokens (all of them, or the first `max_tokens`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read corpus {path}: {exc}") from exc
    return tokenizer.encode(text)[:max_tokens]


def scoring_runner(model: torch.nn.Module, config: ModelConfig, max_tokens: int,
                   int8_activations: bool | None = None) -> ModelRunner:
    """A model runner with room for `max_tokens`, configured as an engine with default settings
    configures its own (block size, KV-cache dtype, and `int8_activations` unless given). It binds
    the model's attention caches, so never build one for a model an engine is running."""
    defaults = EngineConfig()
    weight = model.embed_tokens.weight
    return ModelRunner(model, config, num_blocks=-(-max_tokens // defaults.block_size), block_size=defaults.block_size,
                       kv_cache_dtype=kv_cache_dtype(defaults.kv_cache_dtype, weight.dtype, weight.device),
                       device=weight.device,
                       int8_activations=int8_activations_for(int8_activations, weight.dtype, weight.device))


def windows(num_tokens: int, window: int) -> Iterator[tuple[int, int, int]]:
    """(start, end, first_scored): the forward pass sees tokens[start:end] and scores the
    predictions of tokens[first_scored:end], each from the tokens before it in the window."""
    if window < 2:
        raise InvalidRequestError(f"the window must hold at least 2 tokens, got {window}")
    stride = window // 2
    scored_until, start = 1, 0  # token 0 has no context to be predicted from
    while scored_until < num_tokens:
        end = min(start + window, num_tokens)
        yield start, end, scored_until
        scored_until, start = end, start + stride


@dataclass
class Scores:
    """A model's predictions over a corpus: per scored token, its negative log-likelihood
    (nats) and the model's own greedy choice of that token."""

    nll: torch.Tensor  # float64 [tokens scored]
    greedy: torch.Tensor  # int64 [tokens scored]: argmax of the logits that predicted each token

    @property
    def tokens_scored(self) -> int:
        return len(self.nll)

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    def agreement(self, reference: Scores) -> float:
        """Fraction of positions where both models' greedy next token is the same."""
        if reference.tokens_scored != self.tokens_scored:
            raise InvalidRequestError(f"cannot compare scores over {self.tokens_scored} and "
                                      f"{reference.tokens_scored} tokens: use the same corpus, window and tokenizer")
        return float((self.greedy == reference.greedy).double().mean())


def score(model, config: ModelConfig, token_ids: list[int], window: int = DEFAULT_WINDOW,
          progress: bool = False, int8_activations: bool | None = None) -> Scores:
    """Score every token of `token_ids` after the first (see the module docstring), with
    `int8_activations` as `scoring_runner` takes it."""
    if len(token_ids) < 2:
        raise InvalidRequestError("the corpus must hold at least 2 tokens to score")
    if min(window, len(token_ids)) > config.max_position_embeddings:
        raise InvalidRequestError(f"window {window} is longer than the model's context "
                                  f"({config.max_position_embeddings} tokens)")
    targets = torch.tensor(token_ids)
    nll, greedy = [], []
    spans = list(windows(len(token_ids), window))
    runner = scoring_runner(model, config, min(window, len(token_ids)), int8_activations)
    for start, end, first in tqdm(spans, unit="window", desc="scoring", disable=not progress, leave=False):
        logits = runner.prompt_logits(token_ids[start:end])[first - start - 1:end - start - 1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        nll.append(-log_probs.gather(1, targets[first:end, None])[:, 0].double())
        greedy.append(logits.argmax(dim=-1))
    return Scores(torch.cat(nll), torch.cat(greedy))
