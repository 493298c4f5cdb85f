"""One HTTP request's run through the engine: `Run` submits its prompts (one engine request per
prompt, each with n completions), merges their output streams into per-choice state (`Choice`)
and hands them out one `Update` at a time; closing it aborts whatever is unfinished, so a request
that ends early (client gone, error, shutdown) frees its KV blocks at once. It knows nothing of
the server's books (admission, metrics, cost): `answer.LiveAnswer` keeps those from its updates.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from quill.engine.async_engine import AsyncEngine
from quill.outputs import RequestMetrics
from quill.sampling_params import SamplingParams

_DONE = object()  # a prompt's engine stream has ended


@dataclass
class Choice:
    index: int  # in the response: prompt_index * n + the engine's index
    prompt_index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_logprobs: list | None = None  # when asked for (complete with the choice's first output)
    text: str = ""
    finish_reason: str | None = None  # None until it finishes ("abort" is never set here)
    metrics: RequestMetrics | None = None  # the engine's, as of the latest output
    last_output_time: float | None = None  # time.perf_counter() of the latest output


@dataclass
class Update:
    """What one engine output changed in one choice."""

    choice: Choice
    delta: str  # new text
    new_token_ids: list[int]
    new_logprobs: list | None  # this output's logprob records, when asked for
    finished: bool
    first: bool  # the choice's first output (its first token)
    gap: float | None  # seconds since the choice's previous output


class Run:
    def __init__(self, engine: AsyncEngine, response_id: str, prompts: list[list[int]],
                 params: SamplingParams) -> None:
        self.engine = engine
        self.prompts = prompts
        self.params = params
        n = params.n
        self.choices = [Choice(index=i * n + j, prompt_index=i) for i in range(len(prompts)) for j in range(n)]
        self.engine_ids = [response_id if len(prompts) == 1 else f"{response_id}-{i}" for i in range(len(prompts))]
        self._unfinished = [n] * len(prompts)
        self._outputs: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._open_streams = 0
        self._closed = False

    # ------------------------------------------------------------------------ results
    @property
    def completed(self) -> bool:
        """Every choice ran to its natural end (stop or length), so its result is the whole answer."""
        return all(c.finish_reason in ("stop", "length") for c in self.choices)

    @property
    def finish_reasons(self) -> list[str]:
        return [c.finish_reason or "abort" for c in self.choices]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.choices)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens served from the prefix cache (counted once per prompt, not per choice)."""
        firsts = (self.choices[i * self.params.n].metrics for i in range(len(self.prompts)))
        return sum(m.num_cached_prompt_tokens for m in firsts if m is not None)

    # ---------------------------------------------------------------------- the run
    def start(self) -> None:
        """Submit every prompt to the engine (refusals come out of `next`)."""
        for index in range(len(self.prompts)):
            self._pumps.append(asyncio.ensure_future(self._pump(index)))
        self._open_streams = len(self._pumps)

    async def next(self) -> Update | None:
        """The next output of any prompt as an update of its choice; None once every stream ended."""
        while self._open_streams:
            index, item = await self._outputs.get()
            if item is _DONE:
                self._open_streams -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                return self._apply(index, item)
        return None

    def interrupt(self, error: Exception) -> None:
        """End the run early: `next` raises `error` once the outputs before it are handed out."""
        if not self._closed:
            self._outputs.put_nowait((None, error))

    def close(self) -> None:
        """Abort unfinished engine requests. Synchronous on purpose: it runs inside cancelled tasks,
        where awaiting would be cancelled again. Safe to call repeatedly."""
        if self._closed:
            return
        self._closed = True
        for pump in self._pumps:
            pump.cancel()
        for engine_id, unfinished in zip(self.engine_ids, self._unfinished):
            if unfinished:
                self.engine.abort(engine_id)

    async def _pump(self, index: int) -> None:
        """One prompt's engine stream into the run's queue of outputs."""
        try:
            async for output in self.engine.generate(self.prompts[index], self.params, self.engine_ids[index]):
                self._outputs.put_nowait((index, output))
        except Exception as exc:
            self._outputs.put_nowait((index, exc))
        finally:
            self._outputs.put_nowait((index, _DONE))

    def _apply(self, prompt_index: int, output) -> Update:
        choice = self.choices[prompt_index * self.params.n + output.index]
        now = time.perf_counter()
        first = choice.last_output_time is None
        gap = None if first else now - choice.last_output_time
        choice.last_output_time = now
        if first and output.prompt_logprobs is not None:
            choice.prompt_logprobs = list(output.prompt_logprobs)
        start = len(choice.token_ids)
        choice.token_ids.extend(output.new_token_ids)
        new_logprobs = None
        if output.logprobs is not None:
            # The engine's list grows on its own thread: take exactly this output's entries.
            new_logprobs = output.logprobs[start:len(choice.token_ids)]
            choice.logprobs.extend(new_logprobs)
        choice.text = output.text
        choice.metrics = output.metrics
        if output.finished:
            choice.finish_reason = output.finish_reason
            self._unfinished[prompt_index] -= 1
        return Update(choice, output.delta, output.new_token_ids, new_logprobs, output.finished, first, gap)
