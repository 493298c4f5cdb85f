"""Knowledge distillation (`quill distill`): train a student to match a teacher's next-token
distribution, usually a pruned copy of the teacher (`prune.py`) recovering what pruning cost.

Loss: the KL divergence from the teacher's top-k distribution (cached once by `distill_data.py`)
to the student's, optionally mixed with the next-token cross-entropy (`distill_loss.py`).

Training needs gradients, which Quill's inference modules do not give (custom C matmuls, a paged
KV cache, no autograd). The student therefore trains as transformers' module for its config.json
(`hf_export.py` writes one for any student, GGUF sources included) and is saved back as a Hugging
Face directory that Quill loads and `quill quantize` converts. transformers is the `train` extra.

The loop: AdamW over float32 master weights, the forward pass under bfloat16 autocast, gradient
accumulation, linear warmup then cosine decay to a tenth of the rate, budgets in tokens and
minutes. A checkpoint (weights, AdamW moments, step, the loss curve; safetensors and JSON, no
pickle) is written every `checkpoint_every` steps and at the end; `resume` continues from it on
the same curve, since which sequences each step trains on follows from the seed and the step alone.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from quill.config import ModelConfig
from quill.errors import QuillError
from quill.optimize.distill_loss import distillation_loss
from quill.optimize.distill_options import DistillError, DistillOptions
from quill.models.loader import load_checkpoint
from quill.optimize.distill_data import (TeacherTargets, generate_texts, read_texts, sequences, teacher_targets,
                                         text_tokens)
from quill.optimize.hf_export import save_hf_directory
from quill.tokenizer import load_tokenizer
from quill.weights.hub import resolve_model

_MIN_LR_RATIO = 0.1  # the cosine schedule ends at a tenth of the peak rate
_PROMPT_TOKENS = 32  # prompts for --generate: the first tokens of the training sequences


@dataclass
class DistillSummary:
    output: Path
    steps: int
    total_steps: int
    tokens: int
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False


def total_steps(options: DistillOptions, num_sequences: int) -> int:
    if num_sequences < options.sequences_per_step:
        raise DistillError(f"the data holds {num_sequences} sequences of {options.seq_len} tokens, fewer than one "
                           f"step's {options.sequences_per_step} (--batch-size x --grad-accum)")
    if options.max_tokens:
        return math.ceil(options.max_tokens / (options.sequences_per_step * options.seq_len))
    return options.epochs * (num_sequences // options.sequences_per_step)


def step_sequences(options: DistillOptions, num_sequences: int, step: int) -> list[int]:
    """The sequences step `step` trains on: a seeded shuffle per pass over the data, so that the
    order depends on nothing but the seed (a resumed run trains on what the whole run would have)."""
    per_pass = num_sequences // options.sequences_per_step * options.sequences_per_step
    picks = []
    for position in range(step * options.sequences_per_step, (step + 1) * options.sequences_per_step):
        epoch, offset = divmod(position, per_pass)
        order = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(options.seed * 1000003 + epoch))
        picks.append(int(order[offset]))
    return picks


def learning_rate(options: DistillOptions, step: int, steps: int) -> float:
    warmup = int(options.warmup * steps)
    if step < warmup:
        return options.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return options.lr * (_MIN_LR_RATIO + (1 - _MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model: torch.nn.Module, targets: TeacherTargets, options: DistillOptions, checkpoint_dir: Path,
          device: torch.device, *, resume: bool = False, should_stop: Callable[[int], bool] | None = None,
          progress: bool = True) -> DistillSummary:
    """Distil into `model` (a transformers causal LM, float32) in place, on `device`; see the module docstring.
    `should_stop(step)` is asked after every step (the minutes budget is one)."""
    torch.manual_seed(options.seed)
    model.to(device)
    num_sequences = len(targets.tokens)
    steps = total_steps(options, num_sequences)
    # The fused AdamW updates each tensor in one pass: 0.04 s a step for SmolLM2's pruned student
    # against 0.18 s for the default (AMD EPYC family 26, 2 cores).
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay, fused=True)
    state = {"step": 0, "losses": [], "tokens": 0}
    if resume:
        state = _load_checkpoint(checkpoint_dir, model, optimizer, options)
    model.train()
    started, tokens_at_start = time.perf_counter(), state["tokens"]
    bar = tqdm(total=steps, initial=state["step"], unit="step", desc="distilling", disable=not progress)
    stopped = False
    while state["step"] < steps:
        step = state["step"]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(options, step, steps)
        picks = step_sequences(options, num_sequences, step)
        loss_sum = 0.0
        for micro in range(options.grad_accum):
            rows = torch.tensor(picks[micro * options.batch_size:(micro + 1) * options.batch_size])
            tokens = targets.tokens[rows].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=options.bf16):
                logits = model(tokens).logits
            loss = distillation_loss(logits, targets.top_logits[rows].to(device), targets.top_ids[rows].to(device),
                                     tokens, options.temperature, options.ce_weight) / options.grad_accum
            loss.backward()
            loss_sum += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["losses"].append(loss_sum)
        state["tokens"] += len(picks) * options.seq_len
        rate = (state["tokens"] - tokens_at_start) / max(time.perf_counter() - started, 1e-9)
        bar.update()
        bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{rate:.0f}")
        stopped = state["step"] < steps and bool(should_stop and should_stop(state["step"]))
        if state["step"] % options.checkpoint_every == 0 or state["step"] == steps or stopped:
            _save_checkpoint(checkpoint_dir, model, optimizer, options, state)
        if stopped:
            break
    bar.close()
    model.eval()
    return DistillSummary(checkpoint_dir, state["step"], steps, state["tokens"], state["losses"], stopped)


def _save_checkpoint(directory: Path, model, optimizer, options: DistillOptions, state: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    names = {id(p): name for name, p in model.named_parameters()}  # tied weights appear once
    save_file({name: p.detach().cpu().contiguous() for name, p in model.named_parameters()},
              str(directory / "weights.partial"))
    moments = {}
    for p, values in optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            moments[f"{names[id(p)]}:{key}"] = values[key].detach().cpu().contiguous()
    save_file(moments, str(directory / "optimizer.partial"))
    (directory / "state.partial").write_text(json.dumps(state | {"options": options.curve_settings()}))
    for name, suffix in (("weights", "safetensors"), ("optimizer", "safetensors"), ("state", "json")):
        (directory / f"{name}.partial").replace(directory / f"{name}.{suffix}")  # state.json last: it says all is there


def _load_checkpoint(directory: Path, model, optimizer, options: DistillOptions) -> dict:
    try:
        state = json.loads((directory / "state.json").read_text())
        weights = load_file(str(directory / "weights.safetensors"))
        moments = load_file(str(directory / "optimizer.safetensors"))
    except (OSError, ValueError) as exc:
        raise DistillError(f"cannot resume from {directory}: {exc}") from exc
    saved = state.pop("options")
    changed = sorted(k for k, v in options.curve_settings().items() if saved.get(k) != v)
    if changed:
        raise DistillError(f"cannot resume from {directory}: options differ from the interrupted run's ({', '.join(changed)})")
    model.load_state_dict(weights, strict=False)
    for name, p in model.named_parameters():
        if f"{name}:step" in moments:
            optimizer.state[p] = {key: moments[f"{name}:{key}"].to(p.device if key != "step" else "cpu")
                                  for key in ("exp_avg", "exp_avg_sq", "step")}
    return state


def _training_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise DistillError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}")
    return torch.device(name)


def check_same_tokenizer(teacher: Path, student: Path, teacher_config: ModelConfig, student_config: ModelConfig) -> None:
    """Distillation compares distributions token by token: both models must use the same tokenizer."""
    if teacher_config.vocab_size != student_config.vocab_size:
        raise DistillError(f"teacher and student have different vocabularies ({teacher_config.vocab_size} and "
                           f"{student_config.vocab_size} tokens): distillation needs one tokenizer")
    vocabularies = []
    for path in (teacher, student):
        try:
            vocabularies.append(load_tokenizer(path).backend.get_vocab())
        except QuillError:
            vocabularies.append(None)  # a bare checkpoint (no tokenizer): the vocabulary size is all we can compare
    if None not in vocabularies and vocabularies[0] != vocabularies[1]:
        raise DistillError(f"teacher {teacher} and student {student} use different tokenizers")


def _training_student(checkpoint, student: Path, work: Path, device: torch.device):
    """transformers' module for the student (its `checkpoint`, loaded from `student`), and its
    config and directory (a GGUF or quantized student goes through a float Hugging Face directory
    under `work` first)."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise DistillError("quill distill trains with transformers: pip install 'quill[train]'") from None
    if checkpoint.config.output_token_ids:
        raise DistillError("the student's output vocabulary is trimmed; distil first, then --trim-vocab")
    if checkpoint.format != "safetensors":
        student = save_hf_directory(work / "student-init", checkpoint.config, checkpoint.tensors, student)
    # On a CPU, eager attention trains faster than PyTorch's flash kernel at these lengths: 1.64 s
    # against 1.84 s forward and backward, 4 x 256 tokens of the pruned SmolLM2 (AMD EPYC family 26, 2 cores).
    attention = "eager" if device.type == "cpu" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32, attn_implementation=attention)
    return model, checkpoint.config, student


def distill(teacher: str | Path, student: str | Path, output: str | Path, options: DistillOptions, *,
            data: str | Path | None = None, generate: int = 0, token_sequences: torch.Tensor | None = None,
            cache: str | Path | None = None, resume: bool = False, progress: bool = True,
            should_stop: Callable[[int], bool] | None = None) -> DistillSummary:
    """`quill distill`: train `student` on `teacher`'s distributions and save it as a Hugging Face
    directory `output` (checkpoints and the teacher's cached logits in output/checkpoint unless
    `cache` names another file, the loss curve in output/loss.png).
    Data: `token_sequences` [n, seq_len] if given, else `data` (see `distill_data.read_texts`),
    else the shipped dev split; with `generate`, that many teacher continuations of its prompts."""
    options.check()
    teacher_path, student_path, output = resolve_model(teacher), resolve_model(student), Path(output)
    teacher_config = load_checkpoint(teacher_path, keep_quantized=True).config
    device = _training_device(options.device)
    student_checkpoint = load_checkpoint(student_path, torch.float32)
    # before anything is written: a student of another vocabulary must not leave a float copy behind
    check_same_tokenizer(teacher_path, student_path, teacher_config, student_checkpoint.config)
    model, student_config, student_path = _training_student(student_checkpoint, student_path, output, device)
    if token_sequences is None:
        token_sequences = _training_sequences(teacher_path, options, data, generate)
    cache = Path(cache or output / "checkpoint" / "teacher-topk.safetensors")
    targets = teacher_targets(teacher_path, token_sequences, options.top_k, cache, dtype=options.teacher_dtype,
                              progress=progress)
    if options.max_minutes:
        deadline = time.monotonic() + options.max_minutes * 60
        budget = lambda step: time.monotonic() > deadline  # noqa: E731
        stop = budget if should_stop is None else (lambda step: budget(step) or should_stop(step))
    else:
        stop = should_stop
    summary = train(model, targets, options, output / "checkpoint", device, resume=resume, should_stop=stop,
                    progress=progress)
    tensors = {name: p.detach().cpu() for name, p in model.state_dict().items()}
    save_hf_directory(output, student_config, tensors, student_path)
    summary.output = output
    (output / "distill.json").write_text(json.dumps({"teacher": str(teacher_path), "student": str(student_path),
                                                     "options": asdict(options), "steps": summary.steps,
                                                     "tokens": summary.tokens, "losses": summary.losses}) + "\n")
    plot_losses(summary.losses, output / "loss.png")
    return summary


def _training_sequences(teacher: Path, options: DistillOptions, data, generate: int) -> torch.Tensor:
    tokenizer = load_tokenizer(teacher)
    needed = math.ceil(options.max_tokens / options.seq_len) if options.max_tokens else None
    stream = text_tokens(tokenizer, read_texts(data))
    if generate:
        prompts = sequences(stream, _PROMPT_TOKENS, generate)[:, :_PROMPT_TOKENS].tolist()
        samples = generate_texts(teacher, prompts, options.seq_len - _PROMPT_TOKENS, options.seed, options.teacher_dtype)
        stream = [t for sample in samples for t in sample + [tokenizer.eos_token_id or 0]]
    return sequences(stream, options.seq_len, needed)


def plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    steps = range(1, len(losses) + 1)
    # Each step's loss is one batch's: over varied text it swings more than it trends, so a
    # moving average over a fiftieth of the run is drawn over it.
    width = max(1, len(losses) // 50)
    smooth = [sum(losses[max(0, i + 1 - width):i + 1]) / min(width, i + 1) for i in range(len(losses))]
    axes.plot(steps, losses, alpha=0.3 if width > 1 else 1.0, label="per step")
    if width > 1:
        axes.plot(steps, smooth, label=f"mean of {width} steps")
        axes.legend()
    axes.set_xlabel("step")
    axes.set_ylabel("distillation loss")
    axes.set_yscale("log")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
