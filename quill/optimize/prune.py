"""Structured pruning guided by activations on a calibration text (`quill prune`), and unstructured
sparsity as a quality baseline.

What goes, per decoder layer, ranked by the statistics of `calibrate.py` (as in NVIDIA's Minitron):
- MLP channels (`mlp_keep` or `mlp_width`): the lowest mean |activation| entering the down
  projection; every layer keeps the same number (the config has one width), rounded to a multiple
  of `multiple` (32: the block of every GGML type; 256 for k-quants) so `quill quantize` works;
- query heads (`heads_keep`): the lowest mean output norm, the same number from every grouped-query
  group, so each group keeps its key/value head and the layout stays GQA;
- channels of the residual stream, the model's hidden size (`hidden_keep` or `hidden_width`): the
  lowest importance summed over the kept layers' normalized inputs (each channel's L2 norm over the
  text, entering the attention and the MLP), as Minitron ranks embedding channels. The embedding,
  every norm and every projection lose the same channels; the RMS norms then average over fewer
  channels, which distillation absorbs. Not for Gemma 3, whose embedding scale is sqrt(hidden size);
- whole layers (`drop_layers`): by default those whose absence costs the least next-token loss
  on the calibration text, chosen one at a time (`calibrate.layers_to_drop_by_loss`); with
  `layer_ranking="change"`, those whose output is most like their input (1 - cosine: one pass,
  but a worse choice, see calibrate.py);
- the output vocabulary (`trim_vocab`): the LM head keeps the rows of the tokens the calibration
  text uses most (ties: the lower id, which in a BPE vocabulary is the earlier, commoner merge)
  and the tokens generation needs (BOS, stop tokens, the chat template's); the input embedding
  stays whole. The result records the kept ids in its config (`ModelConfig.output_token_ids`)
  and its logits are -inf elsewhere, so the model never generates a trimmed token, and picks
  what the full model picks whenever that is kept.
Nothing is retrained here: distillation (`distill.py`) recovers what pruning cost.

Unstructured magnitude or Wanda (|W| * ||X_j||) sparsity and 2:4 masks zero weights in place and
save nothing on a CPU (no sparse kernels): they are quality baselines for the same table.

Output: a Hugging Face directory (`hf_export.py`), or a float GGUF file when the output ends in
.gguf; both carry the source's tokenizer. A trimmed vocabulary loads in Quill only.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from quill.config import ModelConfig
from quill.errors import QuillError
from quill.models.loader import build_model, load_checkpoint
from quill.models.registry import FAMILIES
from quill.optimize.calibrate import (DEFAULT_CALIBRATION_TOKENS, LOSS_RANKING_TOKENS, Activations, calibration_tokens,
                                      layers_to_drop_by_loss, measure)
from quill.optimize.gguf_tokenizer import checkpoint_tokenizer
from quill.optimize.hf_export import save_hf_directory
from quill.paths import unwritable_reason, written_whole
from quill.tokenizer import Tokenizer, load_tokenizer
from quill.weights.checkpoint import Checkpoint
from quill.weights.gguf_export import write_gguf
from quill.weights.hub import resolve_model

SPARSITY_METHODS = ("magnitude", "wanda")
LAYER_RANKINGS = ("loss", "change")
_LINEARS = {  # HF projection -> the Quill module whose input it reads (where Wanda's ||X_j|| is measured)
    "self_attn.q_proj": "self_attn.qkv_proj", "self_attn.k_proj": "self_attn.qkv_proj",
    "self_attn.v_proj": "self_attn.qkv_proj", "self_attn.o_proj": "self_attn.o_proj",
    "mlp.gate_proj": "mlp.gate_up_proj", "mlp.up_proj": "mlp.gate_up_proj", "mlp.down_proj": "mlp.down_proj",
}


# Families whose checkpoints keep q/k/v and gate/up apart (Phi-3 fuses them; Qwen3-MoE has experts).
_WIDTH_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma3"})
# Families that multiply the embedding by sqrt(hidden_size): a narrower stream would change that scale.
_SCALED_EMBEDDING_FAMILIES = frozenset({"gemma3"})
# Hugging Face tensors with a hidden-size axis, by name suffix, and which axis it is: the projections
# reading the stream (columns), those writing it (rows), and the norms over it. Any other tensor of a
# layer has no such axis (q/k norms are over a head's width).
_HIDDEN_AXES = {"self_attn.q_proj.weight": 1, "self_attn.k_proj.weight": 1, "self_attn.v_proj.weight": 1,
                "mlp.gate_proj.weight": 1, "mlp.up_proj.weight": 1,
                "self_attn.o_proj.weight": 0, "self_attn.o_proj.bias": 0, "mlp.down_proj.weight": 0,
                "mlp.down_proj.bias": 0, "input_layernorm.weight": 0, "post_attention_layernorm.weight": 0,
                "model.embed_tokens.weight": 1, "lm_head.weight": 1, "model.norm.weight": 0}


class PruneError(QuillError):
    """A pruning the user asked for cannot be done (bad option, unsupported model)."""


@dataclass(frozen=True)
class PruneOptions:
    mlp_keep: float | None = None  # fraction of MLP channels kept
    mlp_width: int | None = None  # or the new intermediate size itself
    heads_keep: float | None = None  # fraction of query heads kept in each GQA group
    hidden_keep: float | None = None  # fraction of residual-stream channels kept
    hidden_width: int | None = None  # or the new hidden size itself
    drop_layers: int = 0
    layer_ranking: str = "loss"  # how layers to drop are chosen: LAYER_RANKINGS
    ranking_dtype: str = "bfloat16"  # the loss ranking's arithmetic (its passes dominate the time)
    trim_vocab: int | None = None  # rows the LM head keeps
    multiple: int = 32  # widths are multiples of this
    sparsity: float | None = None  # unstructured baseline: fraction of each row zeroed
    sparsity_method: str = "wanda"
    two_four: bool = False  # 2:4 baseline: two of every four consecutive weights zeroed
    calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS

    @property
    def needs_activations(self) -> bool:
        """Whether anything is ranked by activations (the vocabulary is ranked by token counts)."""
        wanda = (self.sparsity or self.two_four) and self.sparsity_method == "wanda"
        by_change = self.drop_layers and self.layer_ranking == "change"
        return bool(self.mlp_keep or self.mlp_width or self.heads_keep or self.prunes_hidden or by_change or wanda)

    @property
    def prunes_hidden(self) -> bool:
        return bool(self.hidden_keep or self.hidden_width)


@dataclass
class PrunePlan:
    """What stays, in the source model's indices."""

    layers: list[int]
    mlp: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept channels
    heads: dict[int, list[int]] = field(default_factory=dict)  # layer -> kept query heads
    hidden: list[int] | None = None  # kept residual-stream channels
    vocab: list[int] | None = None  # kept output token ids


@dataclass
class PruneSummary:
    source: Path
    output: Path
    params_before: int
    params_after: int
    config: ModelConfig
    plan: PrunePlan
    zeroed: int = 0  # weights zeroed by the unstructured baselines


def check_options(options: PruneOptions, config: ModelConfig) -> None:
    """Every option against the model, before anything slow; PruneError names the option."""
    for name in ("mlp_keep", "heads_keep", "hidden_keep"):
        value = getattr(options, name)
        if value is not None and not 0 < value <= 1:
            raise PruneError(f"--{name.replace('_', '-')} must be a fraction in (0, 1], got {value}")
    if options.multiple <= 0:
        raise PruneError(f"--multiple must be positive, got {options.multiple}")
    for name, full in (("mlp", config.intermediate_size), ("hidden", config.hidden_size)):
        keep, width = getattr(options, f"{name}_keep"), getattr(options, f"{name}_width")
        if keep is not None and width is not None:
            raise PruneError(f"give --{name}-keep or --{name}-width, not both")
        if width is not None and not (0 < width <= full and width % options.multiple == 0):
            raise PruneError(f"--{name}-width must be a multiple of {options.multiple} in (0, {full}] "
                             f"(quantized formats store rows in blocks of {options.multiple}), got {width}")
    if not 0 <= options.drop_layers < config.num_layers:
        raise PruneError(f"--drop-layers must be in [0, {config.num_layers - 1}] for a model of "
                         f"{config.num_layers} layers, got {options.drop_layers}")
    if options.layer_ranking not in LAYER_RANKINGS:
        raise PruneError(f"--layer-ranking must be one of {', '.join(LAYER_RANKINGS)}, got {options.layer_ranking!r}")
    if options.ranking_dtype not in ("bfloat16", "float32"):
        raise PruneError(f"ranking_dtype must be bfloat16 or float32, got {options.ranking_dtype!r}")
    if options.trim_vocab is not None and not 0 < options.trim_vocab <= config.vocab_size:
        raise PruneError(f"--trim-vocab must be in (0, {config.vocab_size}], got {options.trim_vocab}")
    if options.sparsity is not None and not 0 <= options.sparsity < 1:
        raise PruneError(f"--sparsity must be a fraction in [0, 1), got {options.sparsity}")
    if options.sparsity_method not in SPARSITY_METHODS:
        raise PruneError(f"--sparsity-method must be one of {', '.join(SPARSITY_METHODS)}, got {options.sparsity_method!r}")
    if options.sparsity is not None and options.two_four:
        raise PruneError("give --sparsity or --two-four, not both")
    if options.calibration_tokens < 1:
        raise PruneError(f"--calibration-tokens must be positive, got {options.calibration_tokens}")
    if config.num_experts or config.architecture not in _WIDTH_FAMILIES:
        if (options.mlp_keep or options.mlp_width or options.heads_keep or options.prunes_hidden or options.sparsity
                or options.two_four):
            raise PruneError(f"width pruning and sparsity support {', '.join(sorted(_WIDTH_FAMILIES))} "
                             f"(separate q/k/v and gate/up projections, no experts), not {config.architecture}")
    if options.prunes_hidden:
        if config.architecture in _SCALED_EMBEDDING_FAMILIES:
            raise PruneError(f"--hidden-keep/--hidden-width cannot prune {config.architecture}: it scales its "
                             "embedding by the square root of the hidden size, which pruning would change")
        heads, width = heads_per_group(options, config) * config.num_kv_heads, hidden_width(options, config)
        if width % heads:
            raise PruneError(f"--hidden-{'width' if options.hidden_width else 'keep'} leaves a hidden size of "
                             f"{width}, not a multiple of the {heads} query heads that "
                             "transformers requires (fewer heads with --heads-keep can make it one)")
    if options.heads_keep is not None:
        width = heads_per_group(options, config) * config.num_kv_heads * config.head_dim
        if width % options.multiple:
            raise PruneError(f"--heads-keep {options.heads_keep} leaves query heads {width} wide, not a multiple "
                             f"of {options.multiple} (quantized formats store rows in blocks of {options.multiple})")


def mlp_width(options: PruneOptions, config: ModelConfig) -> int:
    """The intermediate size after pruning."""
    return _kept_width(options.mlp_keep, options.mlp_width, config.intermediate_size, options.multiple)


def hidden_width(options: PruneOptions, config: ModelConfig) -> int:
    """The hidden size after pruning."""
    return _kept_width(options.hidden_keep, options.hidden_width, config.hidden_size, options.multiple)


def _kept_width(keep: float | None, width: int | None, full: int, multiple: int) -> int:
    """`width`, or `keep` of `full` rounded to the nearest multiple (at least one)."""
    if width is not None:
        return width
    if keep is None or keep == 1:
        return full
    return max(multiple, round(keep * full / multiple) * multiple)


def heads_per_group(options: PruneOptions, config: ModelConfig) -> int:
    group = config.num_heads // config.num_kv_heads
    return group if options.heads_keep is None else max(1, round(options.heads_keep * group))


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """The indices of the `k` largest scores (ties: the lower index), ascending."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return sorted(order[:k])


def plan_pruning(config: ModelConfig, activations: Activations | None, token_ids: list[int], options: PruneOptions,
                 special_ids: frozenset[int] = frozenset(), dropped: list[int] | None = None) -> PrunePlan:
    """Which layers, channels, heads and output tokens stay (see the module docstring): the layers
    not in `dropped` if given, else those the activations rank highest; without `activations`,
    every channel and head."""
    plan = PrunePlan(list(range(config.num_layers)))
    if options.trim_vocab is not None and options.trim_vocab < config.vocab_size:
        plan.vocab = trimmed_vocabulary(token_ids, config.vocab_size, options.trim_vocab, special_ids)
    if dropped is not None:
        plan.layers = [i for i in range(config.num_layers) if i not in dropped]
    elif activations is not None:
        plan.layers = _top(activations.layer_importance(), config.num_layers - options.drop_layers)
    if activations is None:
        return plan
    layers = plan.layers
    if (hidden := hidden_width(options, config)) != config.hidden_size:
        plan.hidden = _top(activations.hidden_importance(layers), hidden)
    width, per_group = mlp_width(options, config), heads_per_group(options, config)
    group = config.num_heads // config.num_kv_heads
    for layer in layers:
        if width != config.intermediate_size:
            plan.mlp[layer] = _top(activations.mlp_importance(layer), width)
        if per_group != group:
            scores = activations.head_importance(layer).view(config.num_kv_heads, group)
            plan.heads[layer] = [g * group + h for g in range(config.num_kv_heads) for h in _top(scores[g], per_group)]
    return plan


def trimmed_vocabulary(token_ids: list[int], vocab_size: int, keep: int, special_ids: frozenset[int]) -> list[int]:
    """The `keep` output tokens to keep: each of `special_ids`, then the most used (ties: lower id)."""
    special = sorted(i for i in special_ids if i < vocab_size)
    if len(special) > keep:
        raise PruneError(f"--trim-vocab {keep} cannot hold the model's {len(special)} special tokens")
    counts = torch.bincount(torch.tensor(token_ids, dtype=torch.long), minlength=vocab_size).double()
    counts[special] = float("inf")
    return _top(counts, keep)


def apply_plan(config: ModelConfig, tensors: dict[str, torch.Tensor], plan: PrunePlan) -> tuple[ModelConfig, dict]:
    """The pruned config and tensors (Hugging Face names); the inputs are left as they were."""
    out = {name: t for name, t in tensors.items() if not name.startswith("model.layers.")}
    for new, old in enumerate(plan.layers):
        prefix = f"model.layers.{old}."
        layer = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)}
        if old in plan.mlp:
            keep = torch.tensor(plan.mlp[old])
            for name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                layer[name] = layer[name][keep]
            layer["mlp.down_proj.weight"] = layer["mlp.down_proj.weight"][:, keep]
        if old in plan.heads:
            rows = torch.tensor([h * config.head_dim + d for h in plan.heads[old] for d in range(config.head_dim)])
            for name in ("self_attn.q_proj.weight", "self_attn.q_proj.bias"):
                if name in layer:
                    layer[name] = layer[name][rows]
            layer["self_attn.o_proj.weight"] = layer["self_attn.o_proj.weight"][:, rows]
        out |= {f"model.layers.{new}.{name}": t for name, t in layer.items()}
    changes: dict = {"num_layers": len(plan.layers),
                     "layer_types": tuple(config.layer_types[i] for i in plan.layers),
                     "rope_layers": tuple(config.rope_layers[i] for i in plan.layers)}
    if plan.mlp:
        changes["intermediate_size"] = len(next(iter(plan.mlp.values())))
    if plan.heads:
        changes["num_heads"] = len(next(iter(plan.heads.values())))
    if plan.vocab is not None:
        head = out.get("lm_head.weight") if not config.tie_word_embeddings else None
        out["lm_head.weight"] = (out["model.embed_tokens.weight"] if head is None else head)[torch.tensor(plan.vocab)]
        changes |= {"tie_word_embeddings": False, "output_token_ids": tuple(plan.vocab)}
    if plan.hidden is not None:
        out = _keep_hidden_channels(out, torch.tensor(plan.hidden))
        changes["hidden_size"] = len(plan.hidden)
    return replace(config, **changes), out


def _keep_hidden_channels(tensors: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """`tensors` with only the `keep` channels along every hidden-size axis (`_HIDDEN_AXES`)."""
    out = {}
    for name, tensor in tensors.items():
        suffix = name.split(".", 3)[3] if name.startswith("model.layers.") else name
        axis = _HIDDEN_AXES.get(suffix)
        out[name] = tensor if axis is None else tensor.index_select(axis, keep)
    return out


def sparsify(tensors: dict[str, torch.Tensor], config: ModelConfig, activations: Activations | None,
             options: PruneOptions) -> tuple[dict[str, torch.Tensor], int]:
    """Zero weights of every layer projection, row by row (Wanda's comparison group): a fraction
    `sparsity` of each row, or two of every four consecutive. Returns new tensors and the count zeroed."""
    if not options.two_four and not options.sparsity:
        return tensors, 0
    out, zeroed = dict(tensors), 0
    for layer in range(config.num_layers):
        for hf, quill_name in _LINEARS.items():
            name = f"model.layers.{layer}.{hf}.weight"
            weight = tensors[name]
            score = weight.abs().float()
            if options.sparsity_method == "wanda":
                if activations is None:
                    raise PruneError("Wanda sparsity needs calibration activations")
                score = score * activations.input_squares[f"layers.{layer}.{quill_name}"].sqrt()
            mask = _two_four_mask(score) if options.two_four else _row_mask(score, options.sparsity)
            out[name] = weight * mask
            zeroed += int((~mask).sum())
    return out, zeroed


def _row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight stays: all but the `sparsity` lowest-scoring of each row."""
    drop = int(sparsity * score.shape[1])
    mask = torch.ones_like(score, dtype=torch.bool)
    if drop:
        mask.scatter_(1, score.argsort(dim=1, stable=True)[:, :drop], False)
    return mask


def _two_four_mask(score: torch.Tensor) -> torch.Tensor:
    rows, cols = score.shape
    if cols % 4:
        raise PruneError(f"2:4 sparsity needs widths that are multiples of 4, got {cols}")
    groups = score.view(rows, cols // 4, 4)
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, groups.argsort(dim=2, stable=True)[..., :2], False)
    return mask.view(rows, cols)


def count_parameters(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> int:
    """Parameters the model holds (a tied head counted once)."""
    tied = config.tie_word_embeddings
    return sum(t.numel() for name, t in tensors.items() if not (tied and name == "lm_head.weight"))


def prune(checkpoint: Checkpoint, options: PruneOptions, token_ids: list[int],
          special_ids: frozenset[int] = frozenset(), *,
          progress: bool = False) -> tuple[ModelConfig, dict, PrunePlan, int]:
    """Prune a float checkpoint, ranking by its activations on the first `calibration_tokens` of
    `token_ids` (the calibration text) and the output vocabulary by all of them. Returns the new
    config and tensors, the plan, and how many weights the baselines zeroed."""
    config = checkpoint.config
    check_options(options, config)
    calibration = token_ids[:options.calibration_tokens]
    activations = dropped = None
    if options.needs_activations:
        activations = measure(build_model(config, checkpoint.tensors, torch.float32), config, calibration,
                              progress=progress)
    if options.drop_layers and options.layer_ranking == "loss":
        model = build_model(config, checkpoint.tensors, getattr(torch, options.ranking_dtype))
        dropped = layers_to_drop_by_loss(model, config, calibration[:LOSS_RANKING_TOKENS], options.drop_layers,
                                         progress=progress)
    plan = plan_pruning(config, activations, token_ids, options, special_ids, dropped)
    tensors, zeroed = sparsify(checkpoint.tensors, config, activations, options)
    new_config, tensors = apply_plan(config, tensors, plan)
    return new_config, tensors, plan, zeroed


def prune_checkpoint(source: str | Path, output: str | Path, options: PruneOptions, *,
                     calibration: str | Path | None = None, progress: bool = True) -> PruneSummary:
    """`quill prune`: prune `source` (a name, HF directory or GGUF file; quantized weights are
    expanded to float32) into `output`: a Hugging Face directory, or a float32 GGUF file when it
    ends in .gguf. Calibrates on `calibration` (default: the shipped corpus's dev split)."""
    path, output = resolve_model(source), Path(output)
    if output.resolve() == path.resolve():
        raise PruneError("the output would overwrite the source checkpoint")
    reason = unwritable_reason(output) if output.suffix == ".gguf" else (
        f"{output} is a file, not a directory" if output.exists() and not output.is_dir() else None)
    if reason is not None:
        raise PruneError(f"cannot write the output: {reason}")
    checkpoint = load_checkpoint(path, torch.float32)
    check_options(options, checkpoint.config)
    tokenizer = load_tokenizer(path)
    token_ids = calibration_tokens(tokenizer, calibration, None)  # counting tokens is cheap: all of them
    config, tensors, plan, zeroed = prune(checkpoint, options, token_ids, generation_tokens(tokenizer), progress=progress)
    save_checkpoint(output, config, tensors, checkpoint)
    if output.is_dir():
        record = {"source": str(path), "options": asdict(options), "calibration": str(calibration or "dev split"),
                  "kept": asdict(plan)}
        (output / "quill_prune.json").write_text(json.dumps(record, indent=1) + "\n")
    return PruneSummary(path, output, count_parameters(checkpoint.config, checkpoint.tensors),
                        count_parameters(config, tensors), config, plan, zeroed)


def generation_tokens(tokenizer: Tokenizer) -> frozenset[int]:
    """Tokens a trimmed vocabulary must keep whatever the text: BOS, the stop tokens, and the
    special tokens the chat template writes (not every special token: Gemma 3 has thousands unused)."""
    template = tokenizer.chat_template or ""
    used = {i for i, token in tokenizer.backend.get_added_tokens_decoder().items()
            if token.special and token.content and token.content in template}
    return frozenset(used | tokenizer.eos_token_ids | ({tokenizer.bos_token_id} - {None}))


def save_checkpoint(output: Path, config: ModelConfig, tensors: dict, source: Checkpoint) -> None:
    """A Hugging Face directory, or a float32 GGUF file (with the source's tokenizer) for a .gguf path."""
    if output.suffix == ".gguf":
        with written_whole(output) as partial:
            write_gguf(partial, FAMILIES.named(config.architecture), config, tensors,
                       checkpoint_tokenizer(source).metadata)
    else:
        save_hf_directory(output, config, tensors, source.path)
