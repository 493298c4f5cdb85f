"""The model runner: the one place where scheduler decisions become tensors.

It owns the KV-cache tensors, flattens a scheduled batch into one forward pass (token ids,
positions, cache slots), and returns logits only for the requests whose last known token was
processed this step (a partial prefill chunk has nothing to sample yet). A request with scheduled
draft tokens gets them appended to its input and one logits row per position from its last token
on, for the verifier; each of its queries is attended as a decoding row of its own, so that every
row is bit-identical to what plain one-token decoding would compute (see `quill.layers.attention`).
On the CPU every matmul and every attention row is computed the same way whatever else the step
holds (see `quill.layers.matmul` and `quill.layers.attention`), so a request's tokens and logprobs
do not depend on the batch, the chunking of its prompt or the prefix cache.

A step is planned as plain data first (`plan` -> `StepBatch`), then run (`run`): with tensor
parallelism, rank 0's runner sends each batch to the other ranks' runners (`quill.distributed`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from quill.config import ModelConfig
from quill.errors import InvalidRequestError
from quill.engine.batch import PromptPlan, StepBatch, StepChannel
from quill.engine.decode_graphs import build_decode_runner
from quill.engine.request import Request
from quill.engine.sampler import TokenLogprob, token_logprobs
from quill.hardware import return_freed_memory_to_os
from quill.layers.attention import AttentionMetadata, PagedAttention, PromptSpan, SingleQueryRows
from quill.layers.linear import prepare_linears_for_cpu
from quill.layers.matmul import describe_paths, kernel_path
from quill.layers.quantized import KERNEL_ROW_BLOCK, QuantizedLinear

log = logging.getLogger("quill")

# Prompt-logprob rows turned into logits at a time: a chunk never holds [rows, vocab] logits all at
# once (512 rows of Gemma 3's 262,144-token vocabulary would be 537 MB of float32).
PROMPT_SCORING_ROWS = 64


@dataclass
class StepLogits:
    """What a forward pass gives the engine: the logits of the requests that sample (one row each,
    or one per position for a request verifying drafts), and the records of the prompt tokens
    scored this step (`SamplingParams.prompt_logprobs`), per request, in prompt order."""

    to_sample: list[Request]
    logits: torch.Tensor
    prompt_logprobs: list[tuple[Request, list[TokenLogprob]]] = field(default_factory=list)


def kv_cache_dtype(requested: str, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype for a model computing in `dtype`: `requested` (an `EngineConfig`
    kv_cache_dtype), where "auto" means the compute dtype, except that on the CPU a bf16 or fp16
    model keeps float16 keys and values. Decoding reads the whole cache for every token, so half the
    bytes make long contexts faster, and float16 keeps 3 more bits of each key than bfloat16 would
    (llama.cpp's default too). Attention itself computes in float32 on the CPU (see PagedAttention).
    A float32 model keeps a float32 cache: it is the exact reference."""
    if requested != "auto":
        return getattr(torch, requested)
    return torch.float16 if device.type == "cpu" and dtype != torch.float32 else dtype


def int8_activations_for(requested: bool | None, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether 4-bit layers multiply 8-bit activations (`kernels/int4_q8.c`): `requested` (an
    `EngineConfig` int8_activations), where None means yes on the CPU for a bfloat16 model wherever
    the kernel has vector integer dot products (AVX-512 VNNI or AVX2), as llama.cpp computes its
    4-bit formats.
    Against bfloat16 activations it decodes SmolLM2 1.2-1.6x faster and prefills 1.1-1.3x faster in
    most runs (AMD EPYC), at llama.cpp's precision: perplexity 21.52 against its 21.50 and bfloat16
    activations' 21.45 (README: Quantization). Without AVX2 its plain C loops are slower than
    bfloat16 activations' (SmolLM2's four matrices of a layer: 0.82 against 0.56 ms for one row,
    104 against 12.5 for 128), so bfloat16 activations stay the default there. A float32 model is
    the exact reference, and a GPU expands 4-bit weights to bfloat16: both keep their activations."""
    if requested is not None:
        return requested
    return device.type == "cpu" and dtype == torch.bfloat16 and kernel_path("int4_q8") != "portable C"


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    """KV-cache bytes per token for a cache of `dtype` (see `kv_cache_dtype`)."""
    element_size = torch.empty(0, dtype=dtype).element_size()
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * element_size


class ModelRunner:
    def __init__(self, model: nn.Module, config: ModelConfig, *, num_blocks: int, block_size: int,
                 kv_cache_dtype: torch.dtype, device: torch.device, decode_graphs: str = "off",
                 max_num_seqs: int = 1, max_model_len: int = 1, channel: StepChannel | None = None,
                 int8_activations: bool = False) -> None:
        """`channel`: where rank 0 of a tensor-parallel group sends each step for the other ranks
        (`quill.distributed`); None in a single process."""
        if int8_activations and device.type != "cpu":  # refused, not ignored: it would change the output
            raise InvalidRequestError("int8_activations runs 4-bit weights through the CPU kernels; on a GPU "
                                      "the weights are expanded to bfloat16, so leave it off there")
        self.model = model
        self.channel = channel
        if channel is not None:
            channel.open(num_blocks, block_size, kv_cache_dtype, int8_activations)
        self.block_size = block_size
        self.device = device
        # Pure decode steps padded to batch buckets, replayed as CUDA graphs on a GPU (None: as is).
        # Padding rows write into one more block than the KV-cache manager has (see decode_graphs).
        # Off with a step channel: a padded step never goes through `run`, so the other ranks
        # would not see it.
        if channel is not None:
            decode_graphs = "off"
        self.decode = build_decode_runner(decode_graphs, model, has_experts=config.num_experts > 0,
                                          max_num_seqs=max_num_seqs, max_blocks=-(-max_model_len // block_size),
                                          block_size=block_size, pad_block=num_blocks, device=device)
        num_slots = (num_blocks + (self.decode is not None)) * block_size
        attention = [module for module in model.modules() if isinstance(module, PagedAttention)]
        for module in attention:
            module.bind_cache(num_slots, kv_cache_dtype, device)
        # On the CPU prompt tokens are attended as single-query rows too: each then computes exactly
        # what decoding that position would, however the prompt is chunked or served from the
        # prefix cache (see quill.layers.attention). GPUs attend prompts through fused kernels.
        self.prompts_as_rows = device.type == "cpu"
        self.int8_layers = 0  # 4-bit layers multiplying 8-bit activations
        if device.type == "cpu":
            self.int8_layers = prepare_linears_for_cpu(model, int8_activations=int8_activations)
            return_freed_memory_to_os()  # the float weights the packed copies replaced
            log.info(describe_paths(model))
            if hasattr(model, "fuse_layers"):
                model.fuse_layers()
                log.info("decoder layers: %s", "all in one C call per step" if model.fused_layers
                         else "module by module (the model does not qualify for the fused path)")
        self._block_offsets = torch.arange(block_size, device=device)
        self.quantized = any(isinstance(m, QuantizedLinear) for m in model.modules())
        # A step's rows are paid for in blocks of this many (None: row by row, or nearly free).
        self.row_block: int | None = KERNEL_ROW_BLOCK if self.quantized else None
        if device.type == "cuda":
            # cuDNN's attention builds a graph per new shape, and every context length is a new
            # shape: 1.3 ms of CPU time per call on an H100. Flash/memory-efficient kernels need none.
            torch.backends.cuda.enable_cudnn_sdp(False)

    def _context_slots(self, request: Request, num_tokens: int) -> list[int]:
        """Cache slots of the request's first `num_tokens` positions."""
        size = self.block_size
        return [request.block_ids[p // size] * size + p % size for p in range(num_tokens)]

    def _slot(self, request: Request, position: int) -> int:
        return request.block_ids[position // self.block_size] * self.block_size + position % self.block_size

    @torch.inference_mode()
    def execute(self, requests: list[Request], num_new_tokens: list[int]) -> StepLogits:
        """Run one forward pass: the logits of the requests to sample for (one row each, or 1 +
        len(draft_token_ids) consecutive rows for a request verifying drafts), and prompt logprobs."""
        batch, to_sample, scoring = self.plan(requests, num_new_tokens)
        if self.decode is not None and self.decode.takes(num_new_tokens) and not scoring:
            hidden = self.decode.run(batch.token_ids, batch.positions, batch.slot_mapping, batch.single_tables,
                                     batch.single_context_lens)
            return StepLogits(to_sample, self.model.compute_logits(hidden[batch.sample_rows]))
        logits, records = self.run(batch)
        scored, at = [], 0
        for request, count in scoring:
            scored.append((request, records[at:at + count]))
            at += count
        return StepLogits(to_sample, logits, scored)

    def plan(self, requests: list[Request], num_new_tokens: list[int]
             ) -> tuple[StepBatch, list[Request], list[tuple[Request, int]]]:
        """The step as plain data, the requests that get logits rows (in `sample_rows` order), and
        those that score prompt tokens, with how many (in `prompt_logprob_rows` order)."""
        batch = StepBatch()
        to_sample: list[Request] = []
        scoring: list[tuple[Request, int]] = []
        row = 0
        for request, num_new in zip(requests, num_new_tokens):
            start, end = request.num_computed_tokens, request.num_computed_tokens + num_new
            num_drafts = max(0, end - request.num_tokens)  # the scheduler schedules all drafts or none
            batch.token_ids.extend(request.token_ids[start:end])
            if num_drafts:
                batch.token_ids.extend(request.draft_token_ids)
            batch.positions.extend(range(start, end))
            batch.slot_mapping.extend(self._slot(request, p) for p in range(start, end))
            if num_new == 1 or num_drafts or self.prompts_as_rows:  # each query attends alone
                batch.single_rows.extend(range(row, row + num_new))
                batch.single_context_lens.extend(range(start + 1, end + 1))
                batch.single_tables.extend([request.block_ids] * num_new)
            else:  # part of the context cached already: attention reads it all from there
                batch.prompts.append(PromptPlan(row, num_new, end, self._context_slots(request, end) if start else None))
            if request.needs_prompt_logprobs:
                scoring.append((request, _plan_prompt_scoring(batch, request, row, start, end)))
            row += num_new
            if end >= request.num_tokens:
                batch.sample_rows.extend(range(row - 1 - num_drafts, row))
                to_sample.append(request)
        return batch, to_sample, scoring

    @torch.inference_mode()
    def run(self, batch: StepBatch) -> tuple[torch.Tensor, list[TokenLogprob]]:
        """One forward pass over `batch`: float32 logits of its `sample_rows`, on the model's device
        (empty when none), and the records of its `prompt_logprob_rows`. With a step channel (tensor
        parallelism), the other ranks run the same batch."""
        if self.channel is None:
            return self._forward(batch)
        with self.channel.step(batch):
            return self._forward(batch)

    def _forward(self, batch: StepBatch) -> tuple[torch.Tensor, list[TokenLogprob]]:
        device = self.device
        single = None
        if batch.single_rows:
            all_rows = len(batch.single_rows) == len(batch.token_ids)
            rows = None if all_rows else torch.tensor(batch.single_rows, device=device)
            single = SingleQueryRows(rows, batch.single_context_lens, batch.single_tables, self.block_size, device)
        prompts = [PromptSpan(p.start, p.num_queries, p.context_len,
                              None if p.context_slots is None else torch.tensor(p.context_slots, device=device))
                   for p in batch.prompts]
        meta = AttentionMetadata(torch.tensor(batch.slot_mapping, device=device), single, prompts)
        hidden = self.model(torch.tensor(batch.token_ids, device=device),
                            torch.tensor(batch.positions, device=device), meta)
        # Logits stay where they were computed: a GPU samples them there (quill.engine.device_sampler).
        logits = self.model.compute_logits(hidden[batch.sample_rows]) if batch.sample_rows else hidden.new_empty((0, 0))
        return logits, self._score_prompt_tokens(hidden, batch)

    def _score_prompt_tokens(self, hidden: torch.Tensor, batch: StepBatch) -> list[TokenLogprob]:
        """The records of `batch.prompt_logprob_rows`, PROMPT_SCORING_ROWS at a time. The head
        computes every row alike, so a row scores the same here as if it were sampled from."""
        rows, records = batch.prompt_logprob_rows, []
        for at in range(0, len(rows), PROMPT_SCORING_ROWS):
            piece = slice(at, at + PROMPT_SCORING_ROWS)
            logits = self.model.compute_logits(hidden[rows[piece]])
            records += token_logprobs(logits, batch.prompt_logprob_targets[piece], batch.prompt_logprob_top[piece])
        return records

    def prompt_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Float32 logits [tokens, vocab] at every position of `token_ids` prefilled alone, as one
        prompt, into an empty cache: the rows `execute` computes for that prompt (the same
        attention path), all of them instead of the last. What `quill eval` scores. It writes the
        cache from its first block on, so the runner must hold no request, and have room for the tokens."""
        num_tokens = len(token_ids)
        blocks = list(range(-(-num_tokens // self.block_size)))
        positions = list(range(num_tokens))  # consecutive blocks from 0: slot = position
        batch = StepBatch(token_ids=list(token_ids), positions=positions, slot_mapping=positions,
                          sample_rows=positions)
        if self.prompts_as_rows:
            batch.single_rows, batch.single_context_lens = positions, list(range(1, num_tokens + 1))
            batch.single_tables = [blocks] * num_tokens
        else:
            batch.prompts = [PromptPlan(0, num_tokens, num_tokens, None)]
        return self.run(batch)[0].cpu()


def _plan_prompt_scoring(batch: StepBatch, request: Request, first_row: int, start: int, end: int) -> int:
    """Add the rows of a request's positions start..end-1 (from `first_row` on) that score its next
    prompt token, from the first not scored yet (a prompt recomputed after preemption is scored
    once); returns how many. Position p's logits score prompt token p + 1."""
    first = len(request.prompt_logprobs) - 1  # the position that scores the next token
    assert start <= first, "prompt positions computed without scoring (the prefix cache skips such requests)"
    last = min(end, request.num_prompt_tokens - 1)
    for position in range(first, last):
        batch.prompt_logprob_rows.append(first_row + position - start)
        batch.prompt_logprob_targets.append(request.token_ids[position + 1])
        batch.prompt_logprob_top.append(request.params.prompt_logprobs)
    return max(0, last - first)
