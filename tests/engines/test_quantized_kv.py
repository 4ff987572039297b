"""The quantized KV cache inside the continuous batch (``kv_bits``), on the real SmolLM2
without Ray: canary answers stay right at 8 bits, sequences joining and leaving a running
batch answer as they do alone, the prefix cache (memory and disk) serves quantized KV, and a
fixed KV budget admits more sequences at once than without quantization."""

from __future__ import annotations

import asyncio

import pytest

from mlx_orchard.engines.llm import LLMEngine
from mlx_orchard.engines.sampling import SamplingParams
from mlx_orchard.engines.speculative import SpeculativeConfig

pytestmark = pytest.mark.asyncio(loop_scope="module")

GREEDY = SamplingParams(max_tokens=32, temperature=0)
QUESTIONS = [
    "What is the capital of France?",
    "List the numbers from 1 to 10.",
    "Write a poem about the sea.",
    "Repeat: the cat sat on the mat. the cat sat on the mat.",
    "Name three colours.",
    "What do bees make?",
]


@pytest.fixture(scope="module")
def engine(smollm2_dir, tmp_path_factory):
    e = LLMEngine(smollm2_dir, max_batch_size=8, prefill_batch_size=2, prefix_cache_size=8, kv_bits=8,
                  prefix_cache_dir=tmp_path_factory.mktemp("prefix"), prefix_cache_disk_bytes=1 << 30)
    yield e
    e.shutdown()


def encode(engine: LLMEngine, text: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": text}])


async def answer(engine: LLMEngine, text: str, params: SamplingParams = GREEDY) -> str:
    return "".join([c.text async for c in engine.generate(encode(engine, text), params)])


async def test_canary_answers_stay_right_at_8_bits(engine):
    assert "Paris" in await answer(engine, QUESTIONS[0])
    assert "1, 2, 3, 4, 5, 6, 7, 8, 9, 10" in await answer(engine, QUESTIONS[1])
    assert engine.stats().kv_bytes_per_token > 0


async def test_sequences_joining_a_running_quantized_batch_answer_as_alone(engine):
    alone = [await answer(engine, q) for q in QUESTIONS]

    async def late(i: int) -> str:
        await asyncio.sleep(0.15 * i)  # arrivals spread over running steps: merge, extend, filter
        return await answer(engine, QUESTIONS[i])

    assert await asyncio.gather(*(late(i) for i in range(len(QUESTIONS)))) == alone


async def test_quantized_kv_and_speculation_share_a_batch(smollm2_dir, engine):
    """Verifying drafts runs the quantized attention over several query positions, a kernel
    that rounds differently from the one-position one: greedy answers may part only where
    the two best tokens are tied to within rounding, and there the other one is taken."""
    both = LLMEngine(smollm2_dir, max_batch_size=8, prefix_cache_size=0, kv_bits=8,
                     speculative=SpeculativeConfig(adaptive=False))
    params = SamplingParams(max_tokens=32, temperature=0, logprobs=2)

    async def tokens(e: LLMEngine, q: str) -> list:
        return [lp async for chunk in e.generate(encode(e, q), params) for lp in chunk.logprobs]

    try:
        got = await asyncio.gather(*(tokens(both, q) for q in QUESTIONS))
        for q, mine in zip(QUESTIONS, got):
            plain = await tokens(engine, q)
            same = next((i for i, (a, b) in enumerate(zip(mine, plain)) if a.token != b.token), len(plain))
            if same < len(plain):
                first, second = plain[same].top_logprobs[:2]
                assert mine[same].token == second.token and first.logprob - second.logprob < 0.05, q
        assert both.stats().accepted_tokens > 0
    finally:
        both.shutdown()


async def test_the_prefix_cache_serves_quantized_kv_from_memory_and_after_a_restart_from_disk(smollm2_dir, engine):
    system = "You are a careful assistant who answers in one short sentence. " * 6  # a prefix worth keeping
    conversation = [{"role": "system", "content": system}, {"role": "user", "content": "What is the capital of Italy?"}]
    first = "".join([c.text async for c in engine.generate(engine.encode_chat(conversation), GREEDY)])
    stream = engine.generate(engine.encode_chat(conversation), GREEDY)
    await stream.admitted()
    assert stream.cached_tokens > len(engine.encode(system)) // 2
    assert "".join([c.text async for c in stream]) == first

    restarted = LLMEngine(smollm2_dir, prefix_cache_size=8, kv_bits=8, prefix_cache_dir=engine.prefix_cache_dir,
                          prefix_cache_disk_bytes=1 << 30)
    try:
        stream = restarted.generate(restarted.encode_chat(conversation), GREEDY)
        await stream.admitted()
        assert stream.cached_tokens > 0
        assert "".join([c.text async for c in stream]) == first
        assert restarted.stats().prefix_cache_disk_hits == 1
    finally:
        restarted.shutdown()


async def test_a_fixed_kv_budget_admits_more_sequences_at_8_bits(smollm2_dir, engine):
    params = SamplingParams(max_tokens=200, temperature=0)
    prompt = encode(engine, "Write a long story about a dragon.")
    full = LLMEngine(smollm2_dir, max_batch_size=16, prefix_cache_size=0)
    budget = 3 * (len(prompt) + 200) * full.kv_bytes_per_token  # three full-precision sequences
    full.shutdown()

    async def peak_running(**kw) -> tuple[int, int]:
        e = LLMEngine(smollm2_dir, max_batch_size=16, prefill_batch_size=16, prefix_cache_size=0, kv_cache_bytes=budget, **kw)
        try:
            streams = [e.generate(prompt, params) for _ in range(12)]
            tasks = [asyncio.create_task(s.admitted()) for s in streams]
            await asyncio.sleep(1.0)
            peak = e.stats().running
            for t in tasks:
                t.cancel()  # leaves: admitted or still queued, each stream is closed
            await asyncio.gather(*tasks, return_exceptions=True)
            for s in streams:
                await s.aclose()
            return peak, e.kv_bytes_per_token
        finally:
            e.shutdown()

    (plain, _), (quantized, per_token) = await peak_running(), await peak_running(kv_bits=8)
    assert plain == 3
    # as many as the quantized bytes allow: ~3.6x here (float32 KV), ~1.8x for bfloat16
    assert quantized == min(12, budget // ((len(prompt) + 200) * per_token)) > plain
