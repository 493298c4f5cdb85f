"""`quill quantize` on tiny random models: every type round-trips through Quill's GGUF loader and
gguf-py's reader, int4/int8 run natively, and user errors exit 2 with a message."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from engine_helpers import all_position_logits
from quill.cli import main
from quill.layers.quantized import Int4Linear, Int8Linear
from quill.optimize import QUANT_TYPES
from quill.optimize.quantize import quantize_checkpoint, quantize_int4, quantize_int8
from quill.models.loader import build_model, load_checkpoint
from quill.models.registry import FAMILIES
from quill.weights.gguf_export import write_gguf
from tokenizer_helpers import tiny_sentencepiece_metadata

Q = gguf.GGMLQuantizationType
PROMPT = [1, 17, 250, 3, 99, 42, 7, 7, 7, 310, 64, 128, 5, 200, 33, 18, 91, 0, 4, 150]
MATRIX_TYPE = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}


@pytest.fixture(scope="module")
def source(tiny_model_with_tokenizer):
    """The tiny Llama (untied LM head) as a Hugging Face directory, with a Llama 3 style tokenizer."""
    return tiny_model_with_tokenizer("llama", "bpe")


@pytest.fixture(scope="module")
def quantized(source, tmp_path_factory):
    """quantized(qtype, **options) -> (path, summary), each written once."""
    made = {}

    def get(qtype, **options):
        key = (qtype, *sorted(options.items()))
        if key not in made:
            path = tmp_path_factory.mktemp("quantized") / f"{qtype}.gguf"
            made[key] = path, quantize_checkpoint(source, path, qtype, progress=False, **options)
        return made[key]

    return get


def expected_values(qtype: str, values: torch.Tensor) -> np.ndarray:
    """What quantizing then dequantizing one matrix gives. Rows are quantized independently, so
    llama's q/k row permutation in the file does not change the values."""
    v = values.numpy()
    if qtype == "int8":
        return quantize_int8(v).dequantize().numpy()
    if qtype == "int4":
        return quantize_int4(v, 32).dequantize().numpy()
    qt = Q.F16 if qtype == "f16" else MATRIX_TYPE[qtype]
    return gguf.quants.dequantize(gguf.quants.quantize(v, qt), qt).reshape(v.shape)


def logits(path, keep_quantized=False, dtype=torch.float32):
    checkpoint = load_checkpoint(path, keep_quantized=keep_quantized)
    model = build_model(checkpoint.config, checkpoint.tensors, dtype)
    return model, all_position_logits(model, checkpoint.config, PROMPT).float()


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_every_type_round_trips_through_quills_loader(source, quantized, qtype):
    path, summary = quantized(qtype)
    float_tensors = load_checkpoint(source).tensors
    loaded = load_checkpoint(path).tensors
    embeddings = "f16" if qtype.startswith("int") else "q8_0"
    for name, tensor in float_tensors.items():
        if tensor.ndim == 1:
            assert torch.equal(loaded[name], tensor), name
            continue
        kind = embeddings if name in ("model.embed_tokens.weight", "lm_head.weight") else qtype
        np.testing.assert_array_equal(loaded[name].numpy(), expected_values(kind, tensor), err_msg=name)
    _, reference = logits(source)
    _, dequantized = logits(path)
    # Random weights are as hard as it gets for 4 bits; the values above are the exact check.
    similarity = torch.nn.functional.cosine_similarity(dequantized.flatten(), reference.flatten(), dim=0)
    assert similarity > (0.9995 if qtype in ("q8_0", "int8") else 0.98)
    assert summary.output_bytes < summary.source_bytes and not summary.fallbacks


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_gguf_reader_parses_every_type(quantized, qtype):
    path, _ = quantized(qtype)
    reader = gguf.GGUFReader(path)
    types = {t.name: Q(t.tensor_type) for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == Q.F32
    embedding_type = Q.F16 if qtype.startswith("int") else Q.Q8_0
    assert types["token_embd.weight"] == types["output.weight"] == embedding_type
    if qtype in MATRIX_TYPE:
        assert types["blk.0.attn_q.weight"] == types["blk.2.ffn_down.weight"] == MATRIX_TYPE[qtype]
        assert "quill.quantization.type" not in reader.fields
        return
    assert types["blk.0.attn_q.weight.codes"] == Q.I8
    assert types["blk.0.attn_q.weight.scales"] == types["blk.0.attn_q.weight.offsets"] == Q.F32
    codes = reader.get_tensor(list(types).index("blk.2.ffn_down.weight.codes"))
    assert codes.data.shape == (64, 160 // 2 if qtype == "int4" else 160)  # numpy order: rows first
    field = reader.fields["quill.quantization.type"]
    assert bytes(field.parts[field.data[0]]).decode() == qtype
    assert ("quill.quantization.group_size" in reader.fields) == (qtype == "int4")


@pytest.mark.parametrize("qtype, layer", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_int_types_run_natively_and_match_the_dequantized_path(quantized, qtype, layer):
    path, _ = quantized(qtype)
    model, native = logits(path, keep_quantized=True, dtype=torch.bfloat16)
    names = {name for name, module in model.named_modules() if isinstance(module, layer)} - {"lm_head"}
    assert names == {f"layers.{i}.{proj}" for i in range(3)
                     for proj in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")}
    assert isinstance(model.lm_head, Int8Linear)  # the float head of a quantized model reads int8 too
    _, dequantized = logits(path, dtype=torch.bfloat16)
    torch.testing.assert_close(native, dequantized, atol=0.02 * dequantized.abs().max().item(), rtol=0)
    assert (native.argmax(-1) == dequantized.argmax(-1)).float().mean() > 0.9


def test_int4_group_size_and_fallback(quantized):
    """Group 64 does not divide down_proj's 160 columns: those matrices keep Q8_0."""
    path, summary = quantized("int4", group_size=64)
    assert summary.fallbacks == {"int4 g64 -> Q8_0": 3}
    assert summary.tensor_types["int4 g64"] == 18 and summary.tensor_types["Q8_0"] == 3
    checkpoint = load_checkpoint(path, keep_quantized=True)
    assert checkpoint.tensors["model.layers.0.self_attn.q_proj.weight"].group_size == 64
    down = checkpoint.tensors["model.layers.0.mlp.down_proj.weight"]  # Q8_0 stays quantized (byte codes)
    assert (down.source, down.bits, down.group_size) == ("Q8_0", 8, 32)


def test_embeddings_option(quantized):
    path, summary = quantized("q4_0", embeddings="same")
    types = {t.name: Q(t.tensor_type) for t in gguf.GGUFReader(path).tensors}
    assert types["token_embd.weight"] == types["output.weight"] == Q.Q4_0
    path, summary = quantized("q4_1", embeddings="f16")
    assert summary.tensor_types["F16"] == 2


def test_tied_model_with_biases_from_a_float_gguf(tiny_model_dir, tmp_path):
    """Qwen2: biases stay F32, the tied embedding is written once; a float GGUF source keeps its tokenizer."""
    checkpoint = load_checkpoint(tiny_model_dir("qwen2"))
    float_path = tmp_path / "f16.gguf"
    write_gguf(float_path, FAMILIES.named("qwen2"), checkpoint.config, checkpoint.tensors, tiny_sentencepiece_metadata(),
               dtype="f16")
    out = tmp_path / "int4.gguf"
    summary = quantize_checkpoint(float_path, out, "int4", progress=False)
    assert summary.has_tokenizer
    loaded = load_checkpoint(out, keep_quantized=True)
    assert torch.equal(loaded.tensors["model.layers.0.self_attn.q_proj.bias"],
                       checkpoint.tensors["model.layers.0.self_attn.q_proj.bias"])
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(out).tensors}
    assert loaded.metadata["tokenizer.ggml.tokens"] == tiny_sentencepiece_metadata()["tokenizer.ggml.tokens"]


# --- the command line ----------------------------------------------------------------------------

def test_cli_quantize_prints_a_summary(source, tmp_path, capsys):
    out = tmp_path / "q4_1.gguf"
    assert main(["quantize", str(source), "-o", str(out), "--type", "q4_1", "-q"]) == 0
    printed = capsys.readouterr()
    assert f"wrote {out}" in printed.out and "x smaller" in printed.out and "21 Q4_1" in printed.out
    assert "tokenizer" not in printed.err  # it is in the file
    assert out.exists() and not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("args, message", [
    (["--type", "q4_0", "--group-size", "64"], "--group-size applies to int4 only"),
    (["--type", "int4", "--group-size", "48"], "group size must be one of 32, 64, 128, 256"),
    (["--type", "int8", "--embeddings", "same"], "--embeddings same is for GGML types"),
])
def test_cli_rejects_bad_options(source, tmp_path, capsys, args, message):
    assert main(["quantize", str(source), "-o", str(tmp_path / "out.gguf"), *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("where", ["missing/out.gguf", "."])
def test_an_output_that_cannot_be_written_is_refused_before_any_work(source, tmp_path, capsys, where):
    assert main(["quantize", str(source), "-o", str(tmp_path / where), "--type", "q8_0", "-q"]) == 2
    assert "cannot write the output" in capsys.readouterr().err and not list(tmp_path.rglob("*.partial"))


def test_cli_rejects_an_unknown_type(source, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", str(source), "-o", str(tmp_path / "out.gguf"), "--type", "q3_k"])
    assert exit_info.value.code == 2 and "invalid choice: 'q3_k'" in capsys.readouterr().err


def test_cli_refuses_a_quantized_source_unless_asked(quantized, tmp_path, capsys):
    q4_path, _ = quantized("q4_0")
    out = tmp_path / "again.gguf"
    assert main(["quantize", str(q4_path), "-o", str(out), "--type", "q8_0", "-q"]) == 2
    assert "is already quantized (Q4_0, Q8_0)" in capsys.readouterr().err and not out.exists()
    assert main(["quantize", str(q4_path), "-o", str(out), "--type", "q8_0", "-q", "--allow-requantize"]) == 0
