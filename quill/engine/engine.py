"""The synchronous engine core. `step()` is the heartbeat: schedule, run the model once, sample,
append, detokenize, emit outputs, free finished requests. Everything else drives this.

With speculative decoding on, a step may commit several tokens per request: the drafts proposed
at the end of the previous step are verified by this step's forward, the KV of rejected ones is
rolled back, and new drafts are proposed for the next step.

Structured output (`quill.structured`): the grammar masks of the step's constrained requests are
filled on a worker thread while the forward pass runs, applied before sampling (greedy picks are
instead vetted after it: see quill/structured/decoding.py), and each committed token advances its
request's matcher; a complete grammar ends the request ("stop"), a grammar that
breaks mid-output ends that completion alone ("error", with `RequestOutput.error`)."""
from __future__ import annotations

import functools
import itertools
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from quill.config import EngineConfig, ModelConfig
from quill.engine.detokenizer import IncrementalDetokenizer
from quill.engine.device_sampler import sample_on_device
from quill.engine.kv_cache import KVCacheManager, plan_kv_cache
from quill.engine.limits import EngineLimits
from quill.engine.request import Request, RequestStatus
from quill.engine.batch import StepChannel
from quill.engine.runner import ModelRunner, int8_activations_for, kv_bytes_per_token, kv_cache_dtype
from quill.engine.sampler import TokenLogprob, sample
from quill.engine.scheduler import ScheduledBatch, Scheduler
from quill.errors import InvalidRequestError, StructuredOutputError
from quill.outputs import RequestOutput
from quill.sampling_params import SamplingParams
from quill.speculative import SpeculativeStats, Speculator, build_speculator
from quill.structured import MaskJob, StructuredDecoding, StructuredStats

log = logging.getLogger("quill")


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    prefix_cache_hit_rate: float
    num_prompt_tokens: int  # processed by the model (prefix-cache hits excluded)
    num_generated_tokens: int
    num_preemptions: int
    # Seconds the engine spent in steps, split between prompt (prefill) and output (decode)
    # tokens by their share of each step's rows: the basis of the measured cost per token.
    prefill_seconds: float
    decode_seconds: float
    # Speculative decoding (zero when off); see quill/speculative/speculator.py.
    spec_num_drafts: int = 0  # verification rounds
    spec_num_draft_tokens: int = 0  # draft tokens proposed and verified
    spec_num_accepted_tokens: int = 0
    spec_acceptance_rate: float = 0.0
    spec_mean_accepted_length: float = 0.0  # tokens committed per verification round
    structured: StructuredStats = field(default_factory=StructuredStats)  # constrained decoding


class Engine:
    def __init__(self, model: nn.Module, model_config: ModelConfig, tokenizer, config: EngineConfig, *,
                 step_channel: StepChannel | None = None) -> None:
        """`tokenizer` may be None for a token-ids-only engine (no text, no stop strings). With
        tensor parallelism, `model` is rank 0's shard and `step_channel` sends each step to the
        other ranks (see `quill.distributed`); the KV budget is then the whole model's, 1/N per rank."""
        config.validate()
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.config = config
        window = min(config.max_model_len or model_config.max_position_embeddings,
                     model_config.max_position_embeddings)
        dtype = getattr(torch, config.dtype)
        device = next(model.parameters()).device  # the model was placed by whoever built it
        cache_dtype = kv_cache_dtype(config.kv_cache_dtype, dtype, device)
        int8_activations = int8_activations_for(config.int8_activations, dtype, device)
        # Sized before anything is allocated: the budget bounds the cache, and the window fits it.
        self.kv_plan = plan_kv_cache(config.kv_cache_memory, kv_bytes_per_token(model_config, cache_dtype),
                                     config.block_size, window, config.max_num_seqs,
                                     window_chosen=config.max_model_len is not None)
        self.max_model_len = self.kv_plan.max_model_len
        num_blocks = self.kv_plan.num_blocks
        self.kv_cache = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self._limits = EngineLimits(self.max_model_len, model_config.vocab_size, num_blocks, config.block_size,
                                    config.dtype, self.kv_plan.nbytes)
        self.scheduler = Scheduler(self.kv_cache, max_num_seqs=config.max_num_seqs,
                                   max_num_batched_tokens=config.max_num_batched_tokens)
        self.runner = ModelRunner(model, model_config, num_blocks=num_blocks, block_size=config.block_size,
                                  kv_cache_dtype=cache_dtype, device=device, decode_graphs=config.decode_graphs,
                                  max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len,
                                  channel=step_channel, int8_activations=int8_activations)
        if config.int8_activations and not self.runner.int8_layers:
            log.warning("int8_activations changes nothing here: no 4-bit layer takes 8-bit activations (they need "
                        "the C kernels, and inputs and groups in multiples of 32)")
        self.speculator: Speculator | None = None if config.speculative is None else build_speculator(
            config, model_config, tokenizer, num_blocks=num_blocks, max_model_len=self.max_model_len, device=device,
            kv_cache_dtype=cache_dtype, row_block=self.runner.row_block, int8_activations=int8_activations)
        # Constrained decoding needs the tokenizer (token bytes); set up on first use.
        self.structured = None if tokenizer is None else StructuredDecoding(tokenizer, model_config.vocab_size)
        self.requests: dict[str, Request] = {}  # unfinished requests by internal id
        self._groups: dict[str, list[str]] = {}  # user-facing request id -> internal ids
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._seed_source = torch.Generator().manual_seed(config.seed)
        self._ids = itertools.count()
        self._num_prompt_tokens = 0
        self._num_generated_tokens = 0
        self._num_preemptions = 0
        self._prefill_seconds = 0.0
        self._decode_seconds = 0.0

    # ----------------------------------------------------------------- requests in and out
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this engine has no tokenizer: pass token ids", param="prompt")
            prompt_text, prompt_ids = prompt, self.tokenizer.encode(prompt)
        else:
            prompt_text, prompt_ids = None, list(prompt)
        self._check_prompt(prompt_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer", param="stop")
        matchers = self._matchers(params)
        members = []
        for index in range(params.n):
            internal_id = request_id if params.n == 1 else f"{request_id}#{index}"
            request = Request(internal_id, prompt_ids, params, self._generator(params, index), prompt_text,
                              group_id=request_id, index=index)
            if self.runner.device.type != "cpu":  # the device sampler draws there, seeded alike
                request.device_generator = torch.Generator(self.runner.device).manual_seed(
                    request.generator.initial_seed())
            if self.tokenizer is not None:
                self._detokenizers[internal_id] = IncrementalDetokenizer(
                    self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop, include_stop_str_in_output=params.include_stop_str_in_output,
                )
            self.requests[internal_id] = request
            if matchers:
                self.structured.attach(internal_id, matchers[index])
            self.scheduler.add(request)
            members.append(internal_id)
        self._groups[request_id] = members
        return request_id

    def _matchers(self, params: SamplingParams) -> list:
        """One grammar matcher per completion of a constrained request (none otherwise)."""
        if params.constraint is None:
            return []
        if self.structured is None:
            raise InvalidRequestError(f"{params.constraint.kind} needs a tokenizer: this engine has none")
        return self.structured.matchers(params.constraint, params.n)

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator:
        """A private generator: seeded requests (and each of their n completions) are reproducible."""
        if params.seed is not None:
            seed = params.seed + index
        else:
            seed = int(torch.randint(2**62, (1,), generator=self._seed_source))
        return torch.Generator().manual_seed(seed)

    def _check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        # The window fits the KV cache (see plan_kv_cache): a prompt within it always fits the cache.
        self._limits.check_request(prompt_ids, params)

    def limits(self) -> EngineLimits:
        """What a request must fit (read-only, fixed once the engine is built)."""
        return self._limits

    def abort(self, request_id: str) -> None:
        """Stop a request (all its n completions) now and free its KV blocks. Unknown or
        finished ids are ignored."""
        for internal_id in self._groups.pop(request_id, ()):
            request = self.requests.get(internal_id)
            if request is not None:
                self._finish(request, "abort", time.perf_counter())

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def is_unfinished(self, request_id: str) -> bool:
        """Whether the request (any of its n completions) is still waiting or running."""
        return request_id in self._groups

    # ----------------------------------------------------------------------------- the step
    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        self._num_preemptions += batch.num_preempted
        if not batch:
            return []
        # Masks are filled on a worker while the model runs (see quill/structured/decoding.py).
        mask_job = self.structured.start(batch.requests, batch.num_new_tokens) if self.structured else None
        forward = self.runner.execute(batch.requests, batch.num_new_tokens)
        now = time.perf_counter()
        num_prefill = self._record_computed(batch, forward.prompt_logprobs)
        to_sample = forward.to_sample
        outputs = [self._append_tokens(request, tokens, logprobs, now) for request, (tokens, logprobs)
                   in zip(to_sample, self._sample(to_sample, forward.logits, mask_job))]
        if self.speculator is not None:
            self.speculator.propose([r for r in to_sample if r.status is RequestStatus.RUNNING],
                                    self.structured.draft_prefix if self.structured else None)
        self._account_step_time(time.perf_counter() - started, num_prefill, batch.total_tokens)
        return outputs

    def _record_computed(self, batch: ScheduledBatch, scored: list[tuple[Request, list[TokenLogprob]]]) -> int:
        """Mark the step's tokens computed (their full blocks cached) and keep the prompt tokens it
        scored; returns how many of its tokens were prompt tokens."""
        for request, records in scored:
            request.prompt_logprobs.extend(records)
        num_prefill = 0
        for request, num_new in zip(batch.requests, batch.num_new_tokens):
            request.num_computed_tokens += num_new - len(request.draft_token_ids)  # drafts count once accepted
            self.kv_cache.cache_computed_blocks(request)
            if request.num_computed_tokens <= request.num_prompt_tokens:
                num_prefill += num_new
        self._num_prompt_tokens += num_prefill
        return num_prefill

    def _account_step_time(self, seconds: float, num_prefill: int, num_tokens: int) -> None:
        """Split a step's time between prefill and decode in proportion to their rows: every row
        of the flattened batch goes through every weight, which dominates a step's cost."""
        prefill = seconds * num_prefill / num_tokens
        self._prefill_seconds += prefill
        self._decode_seconds += seconds - prefill

    def _sample(self, requests: list[Request], logits: torch.Tensor,
                mask_job: MaskJob | None) -> list[tuple[list[int], list]]:
        """The tokens (and logprob records) each request commits this step."""
        eos_ids = self.tokenizer.eos_token_ids if self.tokenizer is not None else frozenset()
        if not any(r.draft_token_ids for r in requests):
            # On the CPU the plain sampler; on a GPU its tensor-op twin, which copies back only the
            # chosen tokens (and logprobs asked for) instead of the logits.
            sampler = functools.partial(sample if logits.device.type == "cpu" else sample_on_device,
                                        eos_token_ids=eos_ids)
            tokens, logprobs = (self.structured.sample(mask_job, requests, logits, sampler) if self.structured
                                else sampler(logits, requests))
            return [([t], [lp]) for t, lp in zip(tokens, logprobs)]
        masks = self.structured.collect(mask_job, requests) if self.structured else None
        verdicts = self.speculator.verify(logits.cpu(), requests, eos_ids, masks)
        for request, verdict in zip(requests, verdicts):
            if request.draft_token_ids:  # keep the accepted drafts' KV, release the rejected ones'
                request.num_computed_tokens += verdict.num_accepted
                self.kv_cache.trim(request, request.num_tokens + len(verdict.token_ids))
                request.draft_token_ids = []
        return [(v.token_ids, v.logprobs) for v in verdicts]

    def _append_tokens(self, request: Request, token_ids: list[int], logprobs: list[TokenLogprob | None],
                       now: float) -> RequestOutput:
        """Commit tokens one by one, stopping at the first that finishes the request (a stop
        string or id inside a run of accepted drafts ends it there)."""
        detokenizer = self._detokenizers.get(request.request_id)
        delta = ""
        finish_reason = error = None
        new_token_ids = []
        if request.params.max_tokens == 0:  # the prompt alone (scoring it): the token sampled is dropped
            token_ids, finish_reason = [], "length"
        for token_id, logprob in zip(token_ids, logprobs):
            request.token_ids.append(token_id)
            new_token_ids.append(token_id)
            if logprob is not None:
                request.logprobs.append(logprob)
            if detokenizer is not None:
                delta += detokenizer.add(token_id)
            try:
                # A complete grammar is a complete answer ("stop"), even on the max_tokens-th token.
                grammar_complete = self.structured is not None and self.structured.advance(request, token_id)
            except StructuredOutputError as failed:  # this request's grammar broke: it alone ends
                finish_reason, error = "error", failed
                break
            finish_reason = "stop" if grammar_complete else self._finish_reason(request, token_id, detokenizer)
            if finish_reason is not None:
                break
        self._num_generated_tokens += len(new_token_ids)
        metrics = request.metrics
        metrics.num_generated_tokens += len(new_token_ids)
        if metrics.last_token_time is not None:
            gap = now - metrics.last_token_time
            metrics.max_inter_token_latency = max(metrics.max_inter_token_latency or 0.0, gap)
        metrics.first_token_time = metrics.first_token_time or now
        metrics.last_token_time = now
        if finish_reason is not None:
            if detokenizer is not None and not detokenizer.stopped:
                delta += detokenizer.flush()
            self._finish(request, finish_reason, now)
        return RequestOutput(
            request_id=request.group_id, index=request.index, prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids, token_ids=request.output_token_ids,
            text=detokenizer.text if detokenizer is not None else "", delta=delta,
            finished=finish_reason is not None, finish_reason=finish_reason,
            metrics=metrics, new_token_ids=new_token_ids,
            logprobs=request.logprobs if request.params.logprobs is not None else None, error=error,
            prompt_logprobs=request.prompt_logprobs if request.params.prompt_logprobs is not None else None,
        )

    def _finish(self, request: Request, finish_reason: str, now: float) -> None:
        request.finish_reason = finish_reason
        request.metrics.finished_time = now
        self.scheduler.finish(request)
        if self.speculator is not None:
            self.speculator.finish(request)
        if self.structured is not None:
            self.structured.finish(request.request_id)
        self.requests.pop(request.request_id, None)
        self._detokenizers.pop(request.request_id, None)
        group = self._groups.get(request.group_id)
        if group is not None and all(member not in self.requests for member in group):
            del self._groups[request.group_id]

    def _finish_reason(self, request: Request, token_id: int, detokenizer) -> str | None:
        params = request.params
        if detokenizer is not None and detokenizer.stopped:
            return "stop"
        if token_id in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and self.tokenizer is not None and token_id in self.tokenizer.eos_token_ids:
            return "stop"
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return "length"
        return None

    def stats(self) -> EngineStats:
        kv = self.kv_cache.stats()
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_kv_blocks=kv.num_blocks, num_free_kv_blocks=kv.num_free_blocks, kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.prefix_cache_queries, prefix_cache_hits=kv.prefix_cache_hits,
            prefix_cache_hit_rate=kv.hit_rate, num_prompt_tokens=self._num_prompt_tokens,
            num_generated_tokens=self._num_generated_tokens, num_preemptions=self._num_preemptions,
            prefill_seconds=self._prefill_seconds, decode_seconds=self._decode_seconds,
            **self._speculative_stats(),
            structured=self.structured.stats() if self.structured is not None else StructuredStats(),
        )

    def _speculative_stats(self) -> dict[str, float]:
        spec = self.speculator.stats if self.speculator is not None else SpeculativeStats()
        return dict(spec_num_drafts=spec.num_drafts, spec_num_draft_tokens=spec.num_draft_tokens,
                    spec_num_accepted_tokens=spec.num_accepted_tokens, spec_acceptance_rate=spec.acceptance_rate,
                    spec_mean_accepted_length=spec.mean_accepted_length)
