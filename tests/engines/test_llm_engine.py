"""The continuous-batching engine on the real SmolLM2, without Ray."""

from __future__ import annotations

import asyncio

import pytest

from mlx_orchard.engines.llm import LLMEngine
from mlx_orchard.engines.sampling import SamplingParams

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    e = LLMEngine(smollm2_dir, max_batch_size=8, prefill_batch_size=4, prefix_cache_size=0)
    yield e
    e.shutdown()


def prompt(engine, text: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": text}])


async def test_closing_a_stream_removes_the_sequence_from_the_batch(engine):
    gen = engine.generate(prompt(engine, "Write a long story."), SamplingParams(max_tokens=500, temperature=0))
    async for chunk in gen:
        if chunk.completion_tokens >= 2:
            break
    await gen.aclose()
    for _ in range(100):
        if engine.stats().running == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.stats().running == 0


async def test_a_seeded_request_samples_the_same_tokens_whatever_shares_its_batch(engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
    ids = prompt(engine, "Invent a name for a cat.")

    async def text(p):
        return "".join([c.text async for c in engine.generate(p, params)])

    alone = await text(ids)
    crowded = await asyncio.gather(
        text(ids), *(text(prompt(engine, f"Count to {n}.")) for n in range(3, 6))
    )
    assert crowded[0] == alone
