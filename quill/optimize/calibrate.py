"""Activation statistics of a model over a calibration text: what structured pruning ranks by.

The model runs as the engine runs it (`ModelRunner.prompt_logits`, windows of the text prefilled
as prompts), with recorders put around the modules whose inputs are measured. Quill's layers skip
PyTorch's hook machinery (`layers/module.py`), so a recorder is a module that replaces the
measured one in its parent, notes its input, and calls it.

Measures, per decoder layer (the sums the rankings are made of, as in NVIDIA's Minitron):
- MLP channels: mean |activation| of each intermediate channel (the down projection's input);
- attention heads: mean L2 norm of each query head's output (the output projection's input);
- the block: mean cosine similarity of the residual stream before and after it (ShortGPT's block
  importance is 1 - that: a block that hardly turns its input matters little);
- per input column of each projection, the sum of squares of its inputs (Wanda's ||X_j||), which
  also ranks the residual stream's channels (`hidden_importance`).

Whole layers can instead be ranked by what removing them costs (`layers_to_drop_by_loss`): the
next-token loss on the calibration text with each candidate skipped, greedily, one layer at a
time. On SmolLM2-135M, dropping 10 of 30 layers so chose layers that left held-out perplexity
78 (teacher 22.5, first 8,192 held-out tokens in 512-token windows) where the 10 least-changing
blocks left 98 and the best contiguous run of 10 (Gromov et al.'s angular distance) 135.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from quill.config import ModelConfig
from quill.optimize.evaluate import corpus_path, scoring_runner, tokenize_corpus
from quill.tokenizer import Tokenizer

DEFAULT_CALIBRATION_TOKENS = 4096
CALIBRATION_WINDOW = 256
# Tokens each candidate of the loss ranking is scored on: each layer dropped costs about
# layers / 2 passes of the model over them (see layers_to_drop_by_loss).
LOSS_RANKING_TOKENS = 2048


@dataclass
class Activations:
    """Per layer sums over the calibration tokens (divide by `tokens` for means)."""

    tokens: int = 0
    mlp: list[torch.Tensor] = field(default_factory=list)  # [intermediate] sum |a|
    heads: list[torch.Tensor] = field(default_factory=list)  # [num_heads] sum ||head output||
    block_cosine: list[torch.Tensor] = field(default_factory=list)  # scalar sum cos(in, out)
    input_squares: dict[str, torch.Tensor] = field(default_factory=dict)  # Quill module name -> [in] sum x^2

    def mlp_importance(self, layer: int) -> torch.Tensor:
        return self.mlp[layer] / self.tokens

    def head_importance(self, layer: int) -> torch.Tensor:
        return self.heads[layer] / self.tokens

    def hidden_importance(self, layers: list[int]) -> torch.Tensor:
        """[hidden] per residual-stream channel, the L2 norm over the text of the normalized stream
        entering each of `layers`' attention and MLP, summed over them (the projections' inputs:
        after the norm's weight, so a channel the norms scale down counts for less)."""
        return sum(self.input_squares[f"layers.{i}.{module}"].sqrt()
                   for i in layers for module in ("self_attn.qkv_proj", "mlp.gate_up_proj"))

    def layer_importance(self) -> torch.Tensor:
        """[layers] 1 - mean cosine similarity of each block's input and output."""
        return 1 - torch.stack(self.block_cosine) / self.tokens


class _Recorder(nn.Module):
    """Stands in for `inner`, handing each input to `note` before calling it."""

    def __init__(self, inner: nn.Module, note) -> None:
        super().__init__()
        self.inner, self.note = inner, note

    def forward(self, x: torch.Tensor, *args, **kwargs):
        self.note(x.detach().float())
        return self.inner(x, *args, **kwargs)


def _add(store: dict, key, value: torch.Tensor) -> None:
    store[key] = store[key] + value if key in store else value


def _windows(num_tokens: int) -> list[tuple[int, int]]:
    """(start, end) of the windows the text runs in, side by side: each token counted once, with
    up to a window of context."""
    return [(start, min(start + CALIBRATION_WINDOW, num_tokens)) for start in range(0, num_tokens, CALIBRATION_WINDOW)]


def measure(model: nn.Module, config: ModelConfig, token_ids: list[int], *, progress: bool = False) -> Activations:
    """Run `token_ids` through `model` (a Quill network, float weights) in windows and return the
    statistics above. The recorders are removed again before returning."""
    sums: dict = {}
    residuals: list[torch.Tensor | None] = [None] * (config.num_layers + 1)  # the stream entering each layer, and the final norm
    layers = model.layers
    head_dim, heads = config.head_dim, config.num_heads
    replaced: list[tuple[nn.Module, str, nn.Module]] = []

    def wrap(parent: nn.Module, name: str, note) -> None:
        inner = getattr(parent, name)
        replaced.append((parent, name, inner))
        setattr(parent, name, _Recorder(inner, note))

    def squares(key: str):
        return lambda x: _add(sums, ("sq", key), (x * x).sum(0))

    for i, layer in enumerate(layers):
        attention, mlp = layer.self_attn, layer.mlp
        wrap(layer, "input_layernorm", lambda x, i=i: residuals.__setitem__(i, x))
        wrap(attention, "qkv_proj", squares(f"layers.{i}.self_attn.qkv_proj"))
        wrap(attention, "o_proj", lambda x, i=i: (
            _add(sums, ("heads", i), x.view(len(x), heads, head_dim).norm(dim=-1).sum(0)),
            squares(f"layers.{i}.self_attn.o_proj")(x)))
        wrap(mlp, "gate_up_proj", squares(f"layers.{i}.mlp.gate_up_proj"))
        wrap(mlp, "down_proj", lambda x, i=i: (_add(sums, ("mlp", i), x.abs().sum(0)),
                                                squares(f"layers.{i}.mlp.down_proj")(x)))
    wrap(model, "norm", lambda x: residuals.__setitem__(config.num_layers, x))

    spans = _windows(len(token_ids))
    runner = scoring_runner(model, config, min(CALIBRATION_WINDOW, len(token_ids)))
    result = Activations()
    try:
        with torch.no_grad():
            for start, end in tqdm(spans, unit="window", desc="calibrating", disable=not progress, leave=False):
                runner.prompt_logits(token_ids[start:end])
                result.tokens += end - start
                for i in range(config.num_layers):
                    cosine = torch.cosine_similarity(residuals[i], residuals[i + 1], dim=-1).sum()
                    _add(sums, ("cos", i), cosine.double())
    finally:
        for parent, name, inner in reversed(replaced):
            setattr(parent, name, inner)
    result.mlp = [sums["mlp", i] for i in range(config.num_layers)]
    result.heads = [sums["heads", i] for i in range(config.num_layers)]
    result.block_cosine = [sums["cos", i] for i in range(config.num_layers)]
    result.input_squares = {key[1]: value for key, value in sums.items() if key[0] == "sq"}
    return result


class _Replay(nn.Module):
    """First in a candidate's layer list: hands on the residual stream recorded where its layers
    begin (back in the model's dtype: exactly the values the layers before would compute)."""

    def __init__(self) -> None:
        super().__init__()
        self.stream: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta) -> torch.Tensor:
        return self.stream.to(x.dtype)


def layers_to_drop_by_loss(model: nn.Module, config: ModelConfig, token_ids: list[int], count: int, *,
                           progress: bool = False) -> list[int]:
    """Greedy depth pruning: `count` times, remove the layer whose absence raises the mean
    next-token loss on `token_ids` least, scoring again after each removal (a layer's worth
    changes as its neighbours go). Returns the removed layers in the order removed. `model` (a
    Quill network) runs with a candidate's layers alone and is restored before returning.

    The layers before a candidate compute what they computed with it, so each round records the
    stream entering every kept layer once, and a candidate's pass runs only the layers after it
    (`_Replay` stands for the rest): about half the layer passes of running each candidate whole."""
    spans = [(start, end) for start, end in _windows(len(token_ids)) if end - start > 1]  # a loss needs two tokens
    runner = scoring_runner(model, config, min(CALIBRATION_WINDOW, len(token_ids)))
    every_layer, fused = model.layers, getattr(model, "fused_layers", None)
    model.fused_layers = None  # the fused kernels run every layer; skipping needs the modules one by one
    replay = _Replay()

    def loss(layers: list[nn.Module], streams: list[torch.Tensor] | None = None) -> float:
        model.layers = nn.ModuleList(layers if streams is None else [replay, *layers])
        total = 0.0
        for window, (start, end) in enumerate(spans):
            replay.stream = None if streams is None else streams[window]
            logits = runner.prompt_logits(token_ids[start:end])[:-1]
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(token_ids[start + 1:end]),
                                                             reduction="sum"))
        return total

    def record(kept: list[int]) -> list[list[torch.Tensor]]:
        """[kept layer][window]: the stream entering each kept layer, from one pass."""
        streams: list[list[torch.Tensor]] = [[] for _ in kept]
        for position, i in enumerate(kept):
            every_layer[i].input_layernorm = _Recorder(every_layer[i].input_layernorm, streams[position].append)
        try:
            loss([every_layer[i] for i in kept])
        finally:
            for i in kept:
                every_layer[i].input_layernorm = every_layer[i].input_layernorm.inner
        return streams

    kept, removed = list(range(config.num_layers)), []
    candidates = sum(config.num_layers - k for k in range(count))
    bar = tqdm(total=candidates, unit="candidate", desc="ranking layers", disable=not progress, leave=False)
    try:
        with torch.no_grad():
            for _ in range(count):
                streams, scores = record(kept), []
                for position, layer in enumerate(kept):
                    scores.append((loss([every_layer[i] for i in kept[position + 1:]], streams[position]), layer))
                    bar.update()
                removed.append(min(scores)[1])  # ties: the lower layer
                kept.remove(removed[-1])
    finally:
        model.layers, model.fused_layers = every_layer, fused
        bar.close()
    return removed


def calibration_tokens(tokenizer: Tokenizer, path: str | Path | None, max_tokens: int | None) -> list[int]:
    """The first `max_tokens` tokens (all: None) of the calibration text (the shipped corpus's dev split by default)."""
    return tokenize_corpus(tokenizer, path or corpus_path("dev"), max_tokens)
