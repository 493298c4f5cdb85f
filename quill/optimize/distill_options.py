"""`quill distill`'s options, free of torch so that the CLI can list their defaults without loading it."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from quill.errors import QuillError


class DistillError(QuillError):
    """A distillation the user asked for cannot be done (bad option, mismatched models)."""


@dataclass(frozen=True)
class DistillOptions:
    temperature: float = 1.0
    top_k: int = 64  # teacher logits kept per position
    ce_weight: float = 0.0  # share of the next-token loss in the mix (0: KL only)
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.03  # fraction of the steps spent warming up
    batch_size: int = 4  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    epochs: int = 1
    max_tokens: int | None = None  # training tokens; overrides epochs (data repeats if needed)
    max_minutes: float | None = None  # stop training (and save) after this long; the schedule does not shrink
    seed: int = 0
    bf16: bool = True  # bfloat16 autocast for the forward pass (master weights stay float32)
    checkpoint_every: int = 50
    teacher_dtype: str = "bfloat16"
    device: str = "auto"  # where the student trains: cpu, cuda, cuda:N, or auto (CUDA when present)

    def check(self) -> None:
        rules = {"temperature": self.temperature > 0, "top_k": self.top_k >= 1, "ce_weight": 0 <= self.ce_weight <= 1,
                 "lr": self.lr > 0, "weight_decay": self.weight_decay >= 0, "warmup": 0 <= self.warmup < 1,
                 "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1, "seq_len": self.seq_len >= 2,
                 "epochs": self.epochs >= 1, "max_tokens": self.max_tokens is None or self.max_tokens >= 1,
                 "max_minutes": self.max_minutes is None or self.max_minutes > 0,
                 "checkpoint_every": self.checkpoint_every >= 1}
        bad = [name for name, ok in rules.items() if not ok]
        if bad:
            name = bad[0]
            raise DistillError(f"--{name.replace('_', '-')} is out of range: {getattr(self, name)}")

    @property
    def sequences_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def curve_settings(self) -> dict:
        """What determines the loss curve: a resumed run must share it."""
        return {k: v for k, v in asdict(self).items() if k not in ("max_minutes", "device")}
