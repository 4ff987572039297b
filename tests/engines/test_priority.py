"""Priorities in the engine's scheduler, on the real SmolLM2 without Ray: a more urgent
request pauses a running one when the batch is full; the paused one resumes from the prefix
cache and its answer is unchanged."""

from __future__ import annotations

import asyncio

import pytest

from mlx_orchard.engines.llm import LLMEngine
from mlx_orchard.engines.sampling import SamplingParams

pytestmark = pytest.mark.asyncio(loop_scope="module")

LONG = SamplingParams(max_tokens=48, temperature=0)


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    e = LLMEngine(smollm2_dir, max_batch_size=2, prefill_batch_size=2, prefix_cache_size=8)
    yield e
    e.shutdown()


def prompt(engine, text: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": text}])


async def collect(stream) -> str:
    return "".join([c.text async for c in stream])


async def test_an_urgent_request_pauses_a_running_one_which_resumes_unchanged(engine):
    background = [prompt(engine, f"Write a story about a {animal}.") for animal in ("cat", "dog")]
    alone = [await collect(engine.generate(p, LONG)) for p in background]

    low = [engine.generate(p, LONG, priority=10) for p in background]
    tasks = [asyncio.create_task(collect(s)) for s in low]
    while engine.stats().running < 2:  # the batch is full of background work
        await asyncio.sleep(0.01)
    before = engine.stats().preempted
    urgent = await collect(engine.generate(prompt(engine, "Say hi."), SamplingParams(max_tokens=4, temperature=0), priority=0))
    assert urgent
    assert not all(t.done() for t in tasks)  # it did not wait for the background to finish
    assert engine.stats().preempted > before
    assert await asyncio.gather(*tasks) == alone  # paused and resumed: the same greedy answers


async def test_waiting_requests_are_admitted_by_priority(engine):
    order: list[str] = []

    async def run(name: str, priority: int) -> None:
        await collect(engine.generate(prompt(engine, f"Count to three, {name}."), SamplingParams(max_tokens=3, temperature=0),
                                      priority=priority))
        order.append(name)

    blockers = [asyncio.create_task(collect(engine.generate(prompt(engine, "Tell a long tale."), LONG, priority=-5)))
                for _ in range(2)]
    while engine.stats().running < 2:
        await asyncio.sleep(0.01)
    waiting = [asyncio.create_task(run("later", 5)), asyncio.create_task(run("sooner", 1))]
    await asyncio.gather(*blockers, *waiting)
    assert order == ["sooner", "later"]
