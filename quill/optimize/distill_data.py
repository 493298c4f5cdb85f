"""What distillation trains on: token sequences, and the teacher's top-k logits for each, cached.

Sequences come from the shipped corpus's dev split (the held-out split stays for evaluation), a
text file, a JSONL file (a "text" field, or "prompt" + "completion", per line), or continuations
the teacher writes itself (`generate`), which is what a chat model's student should imitate. The
text is tokenized as one stream and cut into sequences of `seq_len` tokens.

The teacher runs once: its logits at every position of every sequence, as Quill computes them
(`ModelRunner.prompt_logits`), are cut to the top k and written to a safetensors file keyed on
the teacher and the tokens, so a resumed or repeated run reads them back instead. Several
students distilled on the same text can share one such file (`quill distill --teacher-cache`):
a run on other text, or from another teacher, computes afresh and replaces it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from quill.errors import InvalidRequestError
from quill.models.loader import load_model
from quill.optimize.evaluate import corpus_path, scoring_runner
from quill.paths import written_whole
from quill.tokenizer import Tokenizer


@dataclass
class TeacherTargets:
    tokens: torch.Tensor  # int64 [sequences, seq_len]
    top_logits: torch.Tensor  # float32 [sequences, seq_len, k]: the teacher's k largest logits at each position
    top_ids: torch.Tensor  # int64 [sequences, seq_len, k]: their token ids


def read_texts(path: str | Path | None) -> list[str]:
    """The training texts: the dev split by default, a .jsonl file's records, or a text file whole."""
    path = Path(path) if path else corpus_path("dev")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read training data {path}: {exc}") from exc
    if path.suffix != ".jsonl":
        return [raw]
    texts = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            texts.append(record["text"] if "text" in record else record["prompt"] + record["completion"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidRequestError(f"{path}:{number}: expected a JSON object with \"text\", or \"prompt\" "
                                      f"and \"completion\" ({exc})") from exc
    return texts


def sequences(token_ids: list[int], seq_len: int, max_sequences: int | None = None) -> torch.Tensor:
    """[n, seq_len] consecutive pieces of the stream (a last, shorter piece is dropped)."""
    if seq_len < 2:
        raise InvalidRequestError(f"--seq-len must be at least 2, got {seq_len}")
    n = len(token_ids) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    if n == 0:
        raise InvalidRequestError(f"the training data holds {len(token_ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(token_ids[:n * seq_len]).view(n, seq_len)


def text_tokens(tokenizer: Tokenizer, texts: list[str]) -> list[int]:
    """The texts as one stream, each ended by the end-of-sequence token."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    return ids


def generate_texts(teacher: str | Path, prompts: list[list[int]], max_tokens: int, seed: int,
                   dtype: str) -> list[list[int]]:
    """Prompt + the teacher's own continuation (temperature 0.8, seeded), as token ids."""
    from quill.llm import LLM
    from quill.sampling_params import SamplingParams

    llm = LLM(teacher, dtype=dtype, seed=seed)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=seed))
    return [prompt + list(out.token_ids) for prompt, out in zip(prompts, outputs)]


def teacher_targets(teacher: str | Path, tokens: torch.Tensor, k: int, cache: Path, *, dtype: str = "bfloat16",
                    progress: bool = True) -> TeacherTargets:
    """The teacher's top-k logits for `tokens`, from `cache` when it was written for the same teacher,
    k and tokens, else computed (one forward pass per sequence) and written there."""
    key = _cache_key(teacher, tokens, k, dtype)
    cached = _read_cache(cache, key)
    if cached is not None:
        return cached
    model, config = load_model(teacher, getattr(torch, dtype))  # as Quill runs it: quantized weights native
    if k > config.vocab_size:
        raise InvalidRequestError(f"--top-k {k} is larger than the vocabulary ({config.vocab_size})")
    runner = scoring_runner(model, config, tokens.shape[1])
    values, ids = [], []
    for row in tqdm(tokens, unit="seq", desc="teacher logits", disable=not progress, leave=False):
        top = runner.prompt_logits(row.tolist()).topk(k, dim=-1)
        values.append(top.values)
        ids.append(top.indices)
    targets = TeacherTargets(tokens, torch.stack(values), torch.stack(ids))
    cache.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(cache) as partial:  # an interrupted write leaves no cache
        save_file({"tokens": tokens.contiguous(), "top_logits": targets.top_logits.contiguous(),
                   "top_ids": targets.top_ids.to(torch.int32).contiguous()}, str(partial), metadata={"key": key})
    return targets


def _cache_key(teacher: str | Path, tokens: torch.Tensor, k: int, dtype: str) -> str:
    digest = hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16]
    return json.dumps({"teacher": str(Path(teacher).resolve()) if Path(teacher).exists() else str(teacher),
                       "k": k, "dtype": dtype, "tokens": digest, "shape": list(tokens.shape)})


def _read_cache(cache: Path, key: str) -> TeacherTargets | None:
    if not cache.is_file():
        return None
    # Anything else at that path (a model, a GGUF file) is the user's: replacing it would lose it.
    refusal = f"{cache} is not a cache of teacher logits; refusing to overwrite it (remove it or name another file)"
    try:
        with safe_open(str(cache), framework="pt") as f:
            written_for = (f.metadata() or {}).get("key")
            if written_for is None or set(f.keys()) != {"tokens", "top_logits", "top_ids"}:
                raise InvalidRequestError(refusal)
            if written_for != key:
                return None  # written for other data or another teacher: compute afresh
            return TeacherTargets(f.get_tensor("tokens"), f.get_tensor("top_logits"), f.get_tensor("top_ids").long())
    except (OSError, SafetensorError) as exc:
        raise InvalidRequestError(f"{refusal}: {exc}") from exc
