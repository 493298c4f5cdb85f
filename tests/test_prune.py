"""Pruning (quill/optimize/prune.py) on tiny random models: what it removes is the lowest-importance
structure by importances measured here independently (transformers and forward hooks), the result
loads in Quill (HF and GGUF) and transformers with the logits of the tensors it holds, and a
trimmed vocabulary is never generated."""
from __future__ import annotations

import pytest
import torch
from engine_helpers import all_position_logits, load_model, run_requests, tiny_engine

from quill.models.loader import build_model, load_checkpoint
from quill.models.registry import FAMILIES
from quill.optimize.hf_export import save_hf_directory
from quill.optimize.prune import PruneError, PruneOptions, check_options, prune, trimmed_vocabulary
from quill.sampling_params import SamplingParams
from quill.weights.gguf_export import write_gguf

TOKENS = torch.Generator().manual_seed(1)
CALIBRATION = torch.randint(3, 320, (200,), generator=TOKENS).tolist()  # one window: both sides see the same context


def reference_importances(path, token_ids):
    """MLP channel, query head and block importances measured on transformers' model with hooks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    mlp, heads, stream = {}, {}, {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(
            lambda m, args, i=i: mlp.__setitem__(i, args[0][0].abs().mean(0))))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, args, i=i: heads.__setitem__(i, args[0][0].view(-1, cfg.num_attention_heads, head_dim)
                                                   .norm(dim=-1).mean(0))))
        hooks.append(layer.register_forward_pre_hook(lambda m, args, kwargs, i=i: stream.__setitem__(
            i, (args[0] if args else kwargs["hidden_states"])[0]), with_kwargs=True))
    hooks.append(model.model.norm.register_forward_pre_hook(
        lambda m, args: stream.__setitem__(len(model.model.layers), args[0][0])))
    with torch.no_grad():
        model(torch.tensor([token_ids]))
    for hook in hooks:
        hook.remove()
    n = len(model.model.layers)
    blocks = torch.stack([1 - torch.cosine_similarity(stream[i], stream[i + 1], dim=-1).mean() for i in range(n)])
    return [mlp[i] for i in range(n)], [heads[i] for i in range(n)], blocks


def lowest(scores: torch.Tensor, k: int) -> set[int]:
    return set(scores.argsort()[:k].tolist())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_pruning_removes_the_lowest_importance_structures(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    checkpoint = load_checkpoint(path)
    c = checkpoint.config
    options = PruneOptions(mlp_width=64, heads_keep=0.5, drop_layers=1, layer_ranking="change", multiple=32)
    _, _, plan, _ = prune(checkpoint, options, CALIBRATION)
    mlp, heads, blocks = reference_importances(path, CALIBRATION)

    assert set(range(c.num_layers)) - set(plan.layers) == lowest(blocks, 1)
    group = c.num_heads // c.num_kv_heads
    for layer in plan.layers:
        assert set(range(c.intermediate_size)) - set(plan.mlp[layer]) == lowest(mlp[layer], c.intermediate_size - 64)
        removed = set(range(c.num_heads)) - set(plan.heads[layer])
        expected = {g * group + h for g in range(c.num_kv_heads)
                    for h in lowest(heads[layer].view(c.num_kv_heads, group)[g], group - group // 2)}
        assert removed == expected


def reference_hidden_importance(path, token_ids) -> torch.Tensor:
    """Per residual-stream channel: the L2 norm over the tokens of what the attention and the MLP
    read (the q and gate projections' inputs, after each norm), summed over the layers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    norms, hooks = [], []
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.mlp.gate_proj):
            hooks.append(proj.register_forward_pre_hook(lambda m, args: norms.append(args[0][0].norm(dim=0))))
    with torch.no_grad():
        model(torch.tensor([token_ids]))
    for hook in hooks:
        hook.remove()
    return torch.stack(norms).sum(0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_hidden_channels_removed_are_those_the_layers_read_least(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    checkpoint = load_checkpoint(path)
    hidden = checkpoint.config.hidden_size
    _, _, plan, _ = prune(checkpoint, PruneOptions(hidden_width=32), CALIBRATION)
    importance = reference_hidden_importance(path, CALIBRATION)
    assert set(range(hidden)) - set(plan.hidden) == lowest(importance, hidden - 32)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_a_narrower_hidden_size_round_trips_through_quill_and_transformers(tiny_model_dir, tmp_path, arch):
    """Every tensor with a hidden-size axis loses the same channels: transformers and Quill (HF and
    GGUF) compute the same logits from the result, tied head (qwen2) or not (llama), with q/k norms
    (qwen3) and biases (qwen2), and with the other cuts at once."""
    from transformers import AutoModelForCausalLM

    checkpoint = load_checkpoint(tiny_model_dir(arch))
    options = PruneOptions(hidden_width=32, heads_keep=0.5, mlp_width=64, drop_layers=1, layer_ranking="change")
    config, tensors, plan, _ = prune(checkpoint, options, CALIBRATION)
    assert config.hidden_size == 32 and len(plan.hidden) == 32
    assert tensors["model.embed_tokens.weight"].shape == (config.vocab_size, 32)
    out = save_hf_directory(tmp_path / "narrow", config, tensors, checkpoint.path)
    write_gguf(tmp_path / "narrow.gguf", FAMILIES.named(config.architecture), config, tensors)

    ids = CALIBRATION[:24]
    ours = all_position_logits(*load_model(out), ids)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(all_position_logits(*load_model(tmp_path / "narrow.gguf"), ids), ours,
                               atol=1e-5, rtol=1e-5)


def reference_layer_drops(path, token_ids, count: int) -> list[int]:
    """Greedy depth pruning measured on transformers' model: `count` times, the layer whose removal
    leaves the lowest next-token loss on `token_ids`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    every_layer, ids = list(model.model.layers), torch.tensor([token_ids])
    layer_types = getattr(model.config, "layer_types", None)

    def loss(kept):
        model.model.layers = torch.nn.ModuleList(every_layer[i] for i in kept)
        if layer_types:  # transformers picks each layer's mask by its position in this list
            model.config.layer_types = [layer_types[i] for i in kept]
        with torch.no_grad():
            return model(ids, labels=ids, use_cache=False).loss.item()

    kept, removed = list(range(len(every_layer))), []
    for _ in range(count):
        removed.append(min((loss([i for i in kept if i != layer]), layer) for layer in kept)[1])
        kept.remove(removed[-1])
    return removed


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_layers_dropped_by_loss_are_the_greedy_cheapest(tiny_model_dir, arch):
    path = tiny_model_dir(arch)
    checkpoint = load_checkpoint(path)
    options = PruneOptions(drop_layers=2, ranking_dtype="float32")
    config, _, plan, _ = prune(checkpoint, options, CALIBRATION)
    dropped = reference_layer_drops(path, CALIBRATION, 2)
    assert plan.layers == [i for i in range(checkpoint.config.num_layers) if i not in dropped]
    assert config.num_layers == checkpoint.config.num_layers - 2


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_pruned_model_round_trips_through_quill_and_transformers(tiny_model_dir, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    checkpoint = load_checkpoint(tiny_model_dir(arch))
    config, tensors, plan, _ = prune(checkpoint, PruneOptions(mlp_keep=0.5, heads_keep=0.5, drop_layers=1), CALIBRATION)
    assert config.num_layers == checkpoint.config.num_layers - 1 and config.num_heads == checkpoint.config.num_heads // 2
    assert config.intermediate_size % 32 == 0
    out = save_hf_directory(tmp_path / "pruned", config, tensors, checkpoint.path)
    reloaded = load_checkpoint(out)
    assert reloaded.config == config
    assert all(torch.equal(reloaded.tensors[name], t) for name, t in tensors.items() if name in reloaded.tensors)

    write_gguf(tmp_path / "pruned.gguf", FAMILIES.named(config.architecture), config, tensors)
    from_gguf = load_checkpoint(tmp_path / "pruned.gguf")
    assert from_gguf.config.num_layers == config.num_layers and from_gguf.config.num_heads == config.num_heads

    ids = CALIBRATION[:24]
    ours = all_position_logits(*load_model(out), ids)
    theirs = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(all_position_logits(*load_model(tmp_path / "pruned.gguf"), ids), ours, atol=1e-5, rtol=1e-5)


def test_nothing_pruned_leaves_the_logits_bit_identical(tiny_model_dir, tmp_path):
    checkpoint = load_checkpoint(tiny_model_dir("llama"))
    options = PruneOptions(mlp_keep=1.0, heads_keep=1.0, hidden_keep=1.0, drop_layers=0)
    config, tensors, _, _ = prune(checkpoint, options, CALIBRATION)
    out = save_hf_directory(tmp_path / "same", config, tensors, checkpoint.path)
    ids = CALIBRATION[:32]
    assert torch.equal(all_position_logits(*load_model(out), ids), all_position_logits(*load_model(checkpoint.path), ids))


@pytest.mark.parametrize("arch", ["llama", "gemma3-softcap"])
def test_trimmed_vocabulary_is_never_generated_and_agrees_where_kept(tiny_model_dir, tmp_path, arch):
    checkpoint = load_checkpoint(tiny_model_dir(arch))
    config, tensors, plan, _ = prune(checkpoint, PruneOptions(trim_vocab=64), CALIBRATION, frozenset({1, 2}))
    kept = set(plan.vocab)
    assert len(kept) == 64 and {1, 2} <= kept and config.output_token_ids == tuple(plan.vocab)
    assert tensors["lm_head.weight"].shape == (64, config.hidden_size)
    assert tensors["model.embed_tokens.weight"].shape[0] == config.vocab_size  # inputs stay complete
    out = save_hf_directory(tmp_path / "trimmed", config, tensors, checkpoint.path)
    assert load_checkpoint(out).config == config

    ids = CALIBRATION[:48]
    full = all_position_logits(*load_model(checkpoint.path), ids).argmax(-1)
    trimmed_logits = all_position_logits(*load_model(out), ids)
    trimmed = trimmed_logits.argmax(-1)
    assert set(trimmed.tolist()) <= kept
    assert torch.isinf(trimmed_logits[:, sorted(set(range(config.vocab_size)) - kept)]).all()
    in_kept = torch.tensor([t in kept for t in full.tolist()])
    assert in_kept.any() and torch.equal(full[in_kept], trimmed[in_kept])

    engine = tiny_engine(out)
    drawn = run_requests(engine, [ids[:5], ids[5:12]], SamplingParams(max_tokens=40, temperature=1.5, seed=3,
                                                                      ignore_eos=True))
    assert all(t in kept for tokens in drawn for t in tokens)


def test_trimmed_vocabulary_keeps_special_tokens_and_the_most_used():
    kept = trimmed_vocabulary([5, 5, 5, 7, 7, 9, 300], vocab_size=320, keep=4, special_ids=frozenset({2}))
    assert kept == [2, 5, 7, 9]
    with pytest.raises(PruneError, match="special tokens"):
        trimmed_vocabulary([5], 320, 1, frozenset({1, 2}))


def test_trimmed_vocabulary_round_trips_through_gguf(tiny_model_dir, tmp_path):
    checkpoint = load_checkpoint(tiny_model_dir("llama"))
    config, tensors, _, _ = prune(checkpoint, PruneOptions(trim_vocab=50), CALIBRATION)
    write_gguf(tmp_path / "t.gguf", FAMILIES.named("llama"), config, tensors)
    reloaded = load_checkpoint(tmp_path / "t.gguf")
    assert reloaded.config.output_token_ids == config.output_token_ids
    assert torch.equal(reloaded.tensors["lm_head.weight"], tensors["lm_head.weight"])


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_sparsity_zeroes_the_lowest_scores_of_each_row(tiny_model_dir, method):
    checkpoint = load_checkpoint(tiny_model_dir("llama"))
    _, tensors, _, zeroed = prune(checkpoint, PruneOptions(sparsity=0.5, sparsity_method=method), CALIBRATION)
    weight = tensors["model.layers.0.mlp.down_proj.weight"]
    assert ((weight == 0).sum(1) == weight.shape[1] // 2).all()
    if method == "magnitude":  # the kept weights of a row are all larger than the zeroed ones
        original = checkpoint.tensors["model.layers.0.mlp.down_proj.weight"].abs()
        kept_min = torch.where(weight != 0, original, torch.inf).amin(1)
        dropped_max = torch.where(weight == 0, original, -torch.inf).amax(1)
        assert (kept_min >= dropped_max).all()
    assert zeroed == sum(int((t == 0).sum()) for name, t in tensors.items() if "layers" in name and t.ndim == 2)


def test_two_four_keeps_two_of_every_four(tiny_model_dir):
    checkpoint = load_checkpoint(tiny_model_dir("llama"))
    _, tensors, _, _ = prune(checkpoint, PruneOptions(two_four=True), CALIBRATION)
    weight = tensors["model.layers.1.self_attn.q_proj.weight"]
    assert ((weight.view(weight.shape[0], -1, 4) != 0).sum(-1) == 2).all()


@pytest.mark.parametrize("options, message", [
    (PruneOptions(mlp_keep=0), "--mlp-keep must be a fraction"),
    (PruneOptions(heads_keep=1.5), "--heads-keep must be a fraction"),
    (PruneOptions(drop_layers=3), "--drop-layers must be in"),
    (PruneOptions(mlp_width=100), "multiple of 32"),
    (PruneOptions(mlp_width=64, mlp_keep=0.5), "not both"),
    (PruneOptions(trim_vocab=0), "--trim-vocab"),
    (PruneOptions(drop_layers=1, layer_ranking="random"), "--layer-ranking must be one of"),
    (PruneOptions(drop_layers=1, ranking_dtype="int8"), "ranking_dtype must be"),
    (PruneOptions(sparsity=1.0), "--sparsity"),
    (PruneOptions(heads_keep=0.25, multiple=64), "heads"),
    (PruneOptions(hidden_keep=0), "--hidden-keep must be a fraction"),
    (PruneOptions(hidden_width=48), "--hidden-width must be a multiple of 32"),
    (PruneOptions(hidden_width=96), r"--hidden-width must be a multiple of 32 in \(0, 64\]"),
    (PruneOptions(hidden_width=32, hidden_keep=0.5), "not both"),
    (PruneOptions(hidden_width=42, multiple=2), "not a multiple of the 4 query heads"),
])
def test_bad_options_are_refused_clearly(tiny_model_dir, options, message):
    config = load_checkpoint(tiny_model_dir("llama")).config
    with pytest.raises(PruneError, match=message):
        check_options(options, config)


def test_width_pruning_refuses_fused_checkpoints(tiny_model_dir):
    with pytest.raises(PruneError, match="not phi3"):
        check_options(PruneOptions(mlp_keep=0.5), load_checkpoint(tiny_model_dir("phi3")).config)
    check_options(PruneOptions(drop_layers=1), load_checkpoint(tiny_model_dir("phi3")).config)  # depth works for any


def test_hidden_pruning_refuses_a_model_that_scales_its_embedding_by_it(tiny_model_dir):
    with pytest.raises(PruneError, match="square root of the hidden size"):
        check_options(PruneOptions(hidden_width=32), load_checkpoint(tiny_model_dir("gemma3")).config)


def test_build_model_of_a_pruned_config_runs(tiny_model_dir):
    checkpoint = load_checkpoint(tiny_model_dir("qwen3"))
    config, tensors, _, _ = prune(checkpoint, PruneOptions(heads_keep=0.5, mlp_width=96), CALIBRATION)
    model = build_model(config, tensors)
    assert model.layers[0].self_attn.num_heads == 2 and model.layers[0].mlp.intermediate_size == 96


def test_prune_command_writes_a_model_that_loads_with_its_tokenizer(tiny_model_with_tokenizer, tmp_path, capsys):
    from quill.cli import main
    from quill.tokenizer import load_tokenizer

    source = tiny_model_with_tokenizer("llama", "bpe")
    for out in (tmp_path / "pruned", tmp_path / "pruned.gguf"):
        assert main(["prune", str(source), "-o", str(out), "--mlp-width", "64", "--drop-layers", "1",
                     "--calibration-tokens", "200", "-q"]) == 0
        config = load_checkpoint(out).config
        assert (config.intermediate_size, config.num_layers) == (64, 2)
        text = "The pruned model reads text as the source does."
        assert load_tokenizer(out).encode(text) == load_tokenizer(source).encode(text)
    assert "parameters:" in capsys.readouterr().out


def test_prune_command_reports_bad_options(tiny_model_with_tokenizer, tmp_path, capsys):
    from quill.cli import main

    assert main(["prune", str(tiny_model_with_tokenizer("llama", "bpe")), "-o", str(tmp_path / "x"),
                 "--mlp-keep", "0"]) == 2
    assert "--mlp-keep must be a fraction" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_output_that_cannot_be_written_is_refused_before_any_work(tiny_model_dir, tmp_path):
    from quill.optimize.prune import prune_checkpoint

    (tmp_path / "taken.gguf").mkdir()
    (tmp_path / "a_file").write_text("")  # where a Hugging Face directory would go
    for output in (tmp_path / "missing" / "out.gguf", tmp_path / "taken.gguf", tmp_path / "a_file"):
        with pytest.raises(PruneError, match="cannot write the output"):
            prune_checkpoint(tiny_model_dir("llama"), output, PruneOptions(mlp_keep=0.5), progress=False)
