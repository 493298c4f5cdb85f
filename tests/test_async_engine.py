"""The asyncio front: concurrent streams get exactly the synchronous engine's tokens; cancelled
or abandoned streams abort their requests and free every block."""
from __future__ import annotations

import asyncio

import pytest

from engine_helpers import run_requests, tiny_engine
from quill.engine.async_engine import AsyncEngine
from quill.errors import InvalidRequestError
from quill.sampling_params import SamplingParams

PROMPTS = [[1, 5, 9, 13] * k for k in range(1, 7)]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture
def path(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture
def async_engine(path):
    engine = AsyncEngine(tiny_engine(path))
    yield engine
    engine.shutdown()


async def _collect(engine: AsyncEngine, prompt, params=GREEDY) -> list[int]:
    tokens = []
    async for output in engine.generate(prompt, params):
        tokens.extend(output.new_token_ids)
    return tokens


def _wait_idle(engine: AsyncEngine) -> None:
    async def settle():
        for _ in range(200):
            stats = engine.stats()
            if stats.num_running == stats.num_waiting == 0 and stats.num_free_kv_blocks == stats.num_kv_blocks:
                return
            await asyncio.sleep(0.01)
    asyncio.run(settle())


def test_concurrent_streams_match_sync_engine(async_engine, path):
    expected = run_requests(tiny_engine(path), PROMPTS, GREEDY)

    async def main():
        return await asyncio.gather(*(_collect(async_engine, p) for p in PROMPTS))

    assert asyncio.run(main()) == expected


def test_invalid_request_raises_to_caller(async_engine):
    async def main():
        with pytest.raises(InvalidRequestError, match="empty"):
            await _collect(async_engine, [])
        return await _collect(async_engine, PROMPTS[0])  # the engine keeps serving

    assert len(asyncio.run(main())) == GREEDY.max_tokens


def test_cancelled_and_abandoned_streams_free_blocks(async_engine):
    long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)

    async def main():
        tasks = [asyncio.create_task(_collect(async_engine, p, long)) for p in PROMPTS]
        await asyncio.sleep(0.2)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        stream = async_engine.generate(PROMPTS[1], long)
        async for _ in stream:
            break  # the consumer walks away after one output
        await stream.aclose()

    asyncio.run(main())
    _wait_idle(async_engine)
    stats = async_engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_kv_blocks == stats.num_kv_blocks


def test_external_abort_ends_the_stream(async_engine):
    long = SamplingParams(max_tokens=500, temperature=0, ignore_eos=True)

    async def main():
        received = []
        async for output in async_engine.generate(PROMPTS[2], long, request_id="victim"):
            received.append(output)
            if len(received) == 2:
                async_engine.abort("victim")
        return received

    received = asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert 2 <= len(received) < 500 and not received[-1].finished
    _wait_idle(async_engine)
    assert async_engine.stats().num_free_kv_blocks == async_engine.stats().num_kv_blocks


def test_callers_cancelled_while_their_request_is_added_leak_nothing(async_engine):
    """A client may vanish between submitting and the engine thread adding its request; the
    engine thread must survive and the request must not be left running."""
    busy = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)

    async def main():
        background = asyncio.create_task(_collect(async_engine, PROMPTS[5], busy))
        await asyncio.sleep(0.05)
        for delay in [0, 0, 0.001, 0.002, 0.005, 0.01, 0.02] * 3:
            task = asyncio.create_task(_collect(async_engine, PROMPTS[1], busy))
            await asyncio.sleep(delay)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await background
        return await _collect(async_engine, PROMPTS[0])  # the engine thread is still serving

    assert len(asyncio.run(asyncio.wait_for(main(), timeout=60))) == GREEDY.max_tokens
    _wait_idle(async_engine)
    stats = async_engine.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_kv_blocks == stats.num_kv_blocks
