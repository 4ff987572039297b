"""The prefix cache's disk tier on the real SmolLM2, without Ray: a conversation's prefix
survives an engine restart, answers are unchanged, the tier stays within its bytes."""

from __future__ import annotations

import pytest

from mlx_orchard.engines.llm import LLMEngine
from mlx_orchard.engines.prefix_disk import DiskPrefixCache
from mlx_orchard.engines.sampling import SamplingParams

pytestmark = pytest.mark.asyncio(loop_scope="module")
GREEDY = SamplingParams(max_tokens=8, temperature=0)
TURN = [{"role": "system", "content": "You are a helpful assistant. " * 20}, {"role": "user", "content": "Name a colour."}]


async def answer(engine, ids):
    stream = engine.generate(ids, GREEDY)
    await stream.admitted()
    text = "".join([c.text async for c in stream])
    return text, stream.cached_tokens


def engine_with_disk(smollm2_dir, directory, disk_bytes=1 << 30):
    return LLMEngine(smollm2_dir, max_batch_size=4, prefix_cache_size=4, prefix_cache_dir=directory,
                     prefix_cache_disk_bytes=disk_bytes)


async def test_a_prefix_survives_a_restart(smollm2_dir, tmp_path):
    first = engine_with_disk(smollm2_dir, tmp_path)
    ids = first.encode_chat(TURN)
    text, cached = await answer(first, ids)
    assert cached == 0 and first.stats().prefix_cache_disk_bytes > 0
    first.shutdown()

    second = engine_with_disk(smollm2_dir, tmp_path)  # a new replica: empty memory, same disk
    try:
        follow = second.encode_chat(TURN + [{"role": "assistant", "content": text}, {"role": "user", "content": "Another?"}])
        again, cached = await answer(second, ids)  # the same prompt: served from disk
        assert again == text and cached >= len(ids) - 1
        _, cached = await answer(second, follow)  # the next turn extends it (now from memory)
        assert cached >= len(ids) - 1
        stats = second.stats()
        assert stats.prefix_cache_disk_hits == 1
        assert stats.prefilled_tokens < len(follow) - len(ids) + 16  # only what was new was prefilled
    finally:
        second.shutdown()


async def test_the_disk_tier_is_bounded_in_bytes(smollm2_dir, tmp_path):
    engine = engine_with_disk(smollm2_dir, tmp_path, disk_bytes=30 << 20)
    try:
        for i in range(4):
            await answer(engine, engine.encode_chat([{"role": "user", "content": f"Topic {i}: " + "tell me more " * 60}]))
        stats = engine.stats()
        assert 0 < stats.prefix_cache_disk_bytes <= 30 << 20
    finally:
        engine.shutdown()
    disk = DiskPrefixCache(next(p for p in tmp_path.iterdir() if p.is_dir()), 30 << 20)
    assert 0 < disk.nbytes <= 30 << 20 and len(disk) >= 1
