"""Distillation (quill/optimize/distill.py) on tiny random models: training lowers the KL to the
teacher (measured here from both models' full logits as Quill computes them), a resumed run
continues the uninterrupted run's loss curve, the student serves as a draft model, and mismatched
models or bad options are refused clearly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_helpers import all_position_logits, load_model, run_requests, tiny_engine

from quill.models.loader import load_checkpoint
from quill.optimize.distill import DistillError, DistillOptions, distill
from quill.optimize.distill_loss import distillation_loss
from quill.optimize.distill_data import read_texts, sequences
from quill.optimize.hf_export import save_hf_directory
from quill.optimize.prune import PruneOptions, prune
from quill.sampling_params import SamplingParams

BATCH = torch.randint(3, 320, (4, 32), generator=torch.Generator().manual_seed(5))
FAST = DistillOptions(lr=3e-3, batch_size=4, seq_len=32, top_k=320, bf16=False, warmup=0, teacher_dtype="float32",
                      max_tokens=6 * 4 * 32, checkpoint_every=100)


@pytest.fixture(scope="module")
def student(tiny_model_dir, tmp_path_factory):
    """The tiny Llama pruned to half its MLP and a layer fewer: a student that has something to learn."""
    checkpoint = load_checkpoint(tiny_model_dir("llama"))
    config, tensors, _, _ = prune(checkpoint, PruneOptions(mlp_width=64, drop_layers=1), BATCH.flatten().tolist())
    return save_hf_directory(tmp_path_factory.mktemp("student"), config, tensors, checkpoint.path)


def kl_to_teacher(teacher, student) -> float:
    total = 0.0
    for row in BATCH.tolist():
        p = F.log_softmax(all_position_logits(*load_model(teacher), row), -1)
        q = F.log_softmax(all_position_logits(*load_model(student), row), -1)
        total += float(F.kl_div(q, p, log_target=True, reduction="batchmean"))
    return total / len(BATCH)


def test_a_few_steps_on_a_fixed_batch_lower_the_kl(tiny_model_dir, student, tmp_path):
    teacher = tiny_model_dir("llama")
    summary = distill(teacher, student, tmp_path / "out", FAST, token_sequences=BATCH, progress=False)
    assert summary.steps == 6 and summary.losses[-1] < summary.losses[0]
    before, after = kl_to_teacher(teacher, student), kl_to_teacher(teacher, tmp_path / "out")
    assert after < 0.8 * before
    assert (tmp_path / "out" / "loss.png").stat().st_size > 0
    assert load_checkpoint(tmp_path / "out").config == load_checkpoint(student).config


def test_resume_continues_the_same_loss_curve(tiny_model_dir, student, tmp_path):
    teacher = tiny_model_dir("llama")
    whole = distill(teacher, student, tmp_path / "whole", FAST, token_sequences=BATCH[:, :16].repeat(2, 1),
                    progress=False)
    options = FAST
    cut = distill(teacher, student, tmp_path / "cut", options, token_sequences=BATCH[:, :16].repeat(2, 1),
                  progress=False, should_stop=lambda step: step >= 3)
    assert cut.stopped_early and len(cut.losses) == 3
    resumed = distill(teacher, student, tmp_path / "cut", options, token_sequences=BATCH[:, :16].repeat(2, 1),
                      resume=True, progress=False)
    assert resumed.steps == whole.steps
    torch.testing.assert_close(torch.tensor(resumed.losses), torch.tensor(whole.losses), rtol=1e-5, atol=1e-6)
    ours = load_checkpoint(tmp_path / "cut").tensors
    assert all(torch.allclose(t, ours[name], atol=1e-5) for name, t in load_checkpoint(tmp_path / "whole").tensors.items())


def test_resume_refuses_changed_options(tiny_model_dir, student, tmp_path):
    teacher = tiny_model_dir("llama")
    distill(teacher, student, tmp_path / "a", FAST, token_sequences=BATCH, progress=False,
            should_stop=lambda step: step >= 1)
    with pytest.raises(DistillError, match="options differ.*lr"):
        distill(teacher, student, tmp_path / "a", DistillOptions(**{**FAST.__dict__, "lr": 1e-2}),
                token_sequences=BATCH, resume=True, progress=False)


def test_loss_is_the_kl_when_the_teacher_keeps_every_token():
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    ids = torch.arange(11).expand(2, 5, 11)
    for temperature in (1.0, 2.0):
        expected = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                            log_target=True, reduction="sum") / 10 * temperature ** 2
        torch.testing.assert_close(distillation_loss(student, teacher, ids, None, temperature), expected)
    tokens = torch.randint(0, 11, (2, 5))
    mixed = distillation_loss(student, teacher, ids, tokens, 1.0, ce_weight=1.0)
    torch.testing.assert_close(mixed, F.cross_entropy(student[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()))


def _plain_distillation_loss(student, teacher, ids, tokens, temperature, ce_weight):
    """The loss as autograd would have it, written independently of distill_loss.py."""
    log_q = F.log_softmax(student.float() / temperature, -1).gather(-1, ids)
    log_p = F.log_softmax(teacher / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature ** 2
    ce = F.cross_entropy(student[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    return (1 - ce_weight) * kl + ce_weight * ce


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hand_written_loss_gradient_matches_autograd(dtype):
    vocab, k = 600, 7  # more than one chunk of rows: 3 x 100 positions
    teacher = torch.randn(3, 100, k)
    ids = torch.stack([torch.randperm(vocab)[:k] for _ in range(300)]).view(3, 100, k)
    tokens = torch.randint(0, vocab, (3, 100))
    for temperature in (1.0, 2.0):
        for ce_weight in (0.0, 0.5):
            logits = (torch.randn(3, 100, vocab) * 3).to(dtype)
            ours, plain = logits.clone().requires_grad_(), logits.clone().requires_grad_()
            loss = distillation_loss(ours, teacher, ids, tokens, temperature, ce_weight)
            expected = _plain_distillation_loss(plain, teacher, ids, tokens, temperature, ce_weight)
            loss.backward()
            expected.backward()
            torch.testing.assert_close(loss, expected)
            assert ours.grad.dtype == dtype
            tolerance = {} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-5}
            torch.testing.assert_close(ours.grad.float(), plain.grad.float(), **tolerance)


def test_a_distilled_student_serves_as_draft_model(tiny_model_dir, student, tmp_path):
    teacher = tiny_model_dir("llama")
    distill(teacher, student, tmp_path / "out", FAST, token_sequences=BATCH, progress=False)
    prompts = [BATCH[0, :6].tolist(), BATCH[1, :9].tolist()]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    plain = run_requests(tiny_engine(teacher), prompts, params)
    speculative = tiny_engine(teacher, speculative=str(tmp_path / "out"), num_speculative_tokens=3)
    assert run_requests(speculative, prompts, params) == plain


def test_different_tokenizers_are_refused(tiny_model_with_tokenizer, tmp_path):
    with pytest.raises(DistillError, match="different tokenizers"):
        distill(tiny_model_with_tokenizer("llama", "bpe"), tiny_model_with_tokenizer("llama", "spm"), tmp_path / "o",
                FAST, token_sequences=BATCH, progress=False)


def test_different_vocabularies_are_refused_before_anything_is_written(tiny_model_dir, tmp_path):
    """A GGUF student is first written out as a float directory: not before the refusal."""
    import tiny_models
    from quill.optimize.quantize import quantize_checkpoint

    other = tiny_models.build_llama(tmp_path / "bigger", vocab_size=384)
    quantize_checkpoint(other, tmp_path / "bigger.gguf", "f32", with_tokenizer=False, progress=False)
    with pytest.raises(DistillError, match="different vocabularies"):
        distill(tiny_model_dir("llama"), tmp_path / "bigger.gguf", tmp_path / "o", FAST, token_sequences=BATCH,
                progress=False)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("change, message", [
    ({"temperature": 0}, "--temperature"), ({"ce_weight": 1.5}, "--ce-weight"), ({"batch_size": 0}, "--batch-size"),
    ({"max_minutes": -1}, "--max-minutes"),
])
def test_bad_options_are_refused_clearly(change, message):
    with pytest.raises(DistillError, match=message):
        DistillOptions(**change).check()


def test_too_little_data_is_refused(tiny_model_dir, student, tmp_path):
    with pytest.raises(DistillError, match="fewer than one step"):
        distill(tiny_model_dir("llama"), student, tmp_path / "o", DistillOptions(batch_size=8, seq_len=32),
                token_sequences=BATCH, progress=False)
    with pytest.raises(Exception, match="fewer than one sequence"):
        sequences(list(range(10)), 32)


def test_jsonl_data_is_read_by_record(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n\n{"prompt": "a", "completion": "b"}\n')
    assert read_texts(path) == ["one", "ab"]
    path.write_text('{"other": 1}\n')
    with pytest.raises(Exception, match="d.jsonl:1"):
        read_texts(path)


def test_distill_command_trains_on_a_text_file(tiny_model_with_tokenizer, tmp_path, capsys):
    from quill.cli import main

    teacher = tiny_model_with_tokenizer("llama", "bpe")
    data = tmp_path / "data.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher), "--student", str(teacher), "-o", str(out), "--data", str(data),
                 "--seq-len", "32", "--batch-size", "2", "--max-tokens", "128", "--top-k", "8", "-q"]) == 0
    assert "2/2 steps" in capsys.readouterr().out
    assert (out / "checkpoint" / "teacher-topk.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert load_checkpoint(out).config == load_checkpoint(teacher).config


def test_students_sharing_a_teacher_cache_run_the_teacher_once(tiny_model_with_tokenizer, tmp_path, monkeypatch):
    from quill.cli import main
    from quill.optimize import distill_data

    teacher = tiny_model_with_tokenizer("llama", "bpe")
    data, other = tmp_path / "data.txt", tmp_path / "other.txt"
    data.write_text("The quick brown fox jumps over the lazy dog. " * 60)
    other.write_text("A small river runs past the old mill and into the sea. " * 60)
    cache = tmp_path / "teacher.safetensors"

    def command(out, text):
        return ["distill", "--teacher", str(teacher), "--student", str(teacher), "-o", str(tmp_path / out),
                "--data", str(text), "--teacher-cache", str(cache), "--seq-len", "32", "--batch-size", "2",
                "--max-tokens", "128", "--top-k", "8", "-q"]

    assert main(command("first", data)) == 0
    written = cache.read_bytes()
    assert not (tmp_path / "first" / "checkpoint" / "teacher-topk.safetensors").exists()
    teacher_runs = []
    real_load = distill_data.load_model
    monkeypatch.setattr(distill_data, "load_model", lambda *a, **k: teacher_runs.append(a) or real_load(*a, **k))
    assert main(command("second", data)) == 0
    assert teacher_runs == [] and cache.read_bytes() == written
    assert main(command("third", other)) == 0  # other text: the teacher runs and the file is replaced
    assert len(teacher_runs) == 1 and cache.read_bytes() != written


@pytest.mark.parametrize("kind", ["safetensors", "other"])
def test_a_teacher_cache_path_holding_another_file_is_not_overwritten(tiny_model_dir, student, tmp_path, kind):
    from safetensors.torch import save_file

    precious = tmp_path / "model.bin"
    if kind == "safetensors":
        save_file({"weight": torch.ones(3)}, str(precious))
    else:
        precious.write_bytes(b"GGUF" + bytes(range(64)))
    before = precious.read_bytes()
    with pytest.raises(Exception, match="not a cache of teacher logits"):
        distill(tiny_model_dir("llama"), student, tmp_path / "out", FAST, token_sequences=BATCH, cache=precious,
                progress=False)
    assert precious.read_bytes() == before


def test_generate_trains_on_the_teachers_own_continuations_of_data_prompts(tiny_model_with_tokenizer, tmp_path):
    from quill.optimize.distill import _training_sequences
    from quill.tokenizer import load_tokenizer

    teacher = tiny_model_with_tokenizer("llama", "bpe")
    data = tmp_path / "data.txt"
    data.write_text("A small river runs past the old mill and into the sea. " * 40)
    options = DistillOptions(seq_len=48, seed=7)
    first = _training_sequences(teacher, options, data, generate=3)
    assert torch.equal(first, _training_sequences(teacher, options, data, generate=3))  # seeded
    stream = load_tokenizer(teacher).encode(data.read_text())
    assert first[0, :32].tolist() == stream[:32]  # the first prompt, then what the teacher wrote
    assert first[0, 32:].tolist() != stream[32:48]
