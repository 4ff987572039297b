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


# ---- hardening: bounds, isolation, recovery, admission ----

from mlx_orchard.engines import llm as llm_module  # noqa: E402
from mlx_orchard.errors import (  # noqa: E402
    ContextLengthExceededError,
    EngineError,
    InvalidRequestError,
    OverloadedError,
)

GREEDY = SamplingParams(max_tokens=10, temperature=0)


async def text_of(engine, ids, params=GREEDY) -> str:
    return "".join([c.text async for c in engine.generate(ids, params)])


@pytest.mark.parametrize(
    "ids, params, param",
    [
        ([1, 2, 49152], GREEDY, "prompt"),
        ([1, -1], GREEDY, "prompt"),
        ([10**12], GREEDY, "prompt"),
        ([1, 2], SamplingParams(max_tokens=4, logit_bias=((49152, 5.0),)), "logit_bias"),
        ([1, 2], SamplingParams(max_tokens=4, logit_bias=((-3, 5.0),)), "logit_bias"),
        ([1, 2], SamplingParams(max_tokens=4, logit_bias=tuple((i, 1.0) for i in range(2000))), "logit_bias"),
        ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
    ],
)
async def test_values_that_would_index_outside_mlx_arrays_are_refused(engine, ids, params, param):
    with pytest.raises(InvalidRequestError) as e:
        engine.generate(ids, params)
    assert e.value.param == param
    assert engine.stats().running == 0 and engine.is_alive()


async def test_out_of_range_seed_and_top_k_are_folded_into_what_mlx_takes(engine):
    ids = prompt(engine, "Invent a name for a dog.")
    big = SamplingParams(max_tokens=6, temperature=1.0, seed=2**64 + 7, top_k=10**9)
    small = SamplingParams(max_tokens=6, temperature=1.0, seed=7)
    assert engine.check_request(ids, big)[1].top_k == 0
    assert await text_of(engine, ids, big) == await text_of(engine, ids, small)
    negative = SamplingParams(max_tokens=6, temperature=1.0, seed=-1)
    assert await text_of(engine, ids, negative) == await text_of(engine, ids, negative)


async def test_a_sequence_whose_logits_processor_raises_fails_alone(engine, monkeypatch):
    real = llm_module.build_logits_processors

    def poisoned(params):
        if params.presence_penalty == 1.5:  # marks the poisoned request
            def boom(tokens, logits):
                raise RuntimeError("a broken logits processor")
            return [boom]
        return real(params)

    monkeypatch.setattr(llm_module, "build_logits_processors", poisoned)
    a, b = prompt(engine, "Name a fruit."), prompt(engine, "Name a river.")
    alone = [await text_of(engine, a), await text_of(engine, b)]
    bad = SamplingParams(max_tokens=10, temperature=0, presence_penalty=1.5)
    results = await asyncio.gather(
        text_of(engine, a), text_of(engine, prompt(engine, "Name a tree."), bad), text_of(engine, b),
        return_exceptions=True,
    )
    assert isinstance(results[1], EngineError)
    assert [results[0], results[2]] == alone
    assert engine.stats().running == 0 and engine.is_alive()


async def test_a_failed_step_is_retried_for_its_sequences(engine):
    ids = [prompt(engine, "Name a mountain."), prompt(engine, "Name a sea.")]
    alone = [await text_of(engine, i) for i in ids]
    failed_before = engine.stats().failed_steps
    generator = engine._generator
    real_step, calls = generator.step, []

    def flaky():
        calls.append(1)
        if len(calls) == 3:  # mid-generation, once
            raise RuntimeError("simulated step failure (e.g. out of memory)")
        return real_step()

    generator.step = flaky
    assert list(await asyncio.gather(*(text_of(engine, i) for i in ids))) == alone
    assert engine.stats().failed_steps == failed_before + 1
    assert engine._generator is not generator


async def test_a_sequence_in_two_failed_steps_fails_and_the_engine_carries_on(engine, monkeypatch):
    real_make = engine._make_generator

    def broken_generator():
        g = real_make()
        g.step = lambda: (_ for _ in ()).throw(RuntimeError("always failing step"))
        return g

    ids = prompt(engine, "Name a bird.")
    expected = await text_of(engine, ids)
    monkeypatch.setattr(engine, "_make_generator", broken_generator)
    engine._generator = broken_generator()
    with pytest.raises(EngineError):
        await asyncio.wait_for(text_of(engine, ids), 30)
    monkeypatch.setattr(engine, "_make_generator", real_make)
    engine._generator = real_make()
    assert engine.is_alive()
    await engine.ping(timeout=5)
    assert await text_of(engine, ids) == expected


async def test_a_full_waiting_list_answers_overloaded(engine, monkeypatch):
    monkeypatch.setattr(engine, "max_waiting", 0)
    with pytest.raises(OverloadedError):
        engine.generate(prompt(engine, "Hi."), GREEDY)


async def test_sequences_are_admitted_only_while_their_kv_cache_fits(engine, monkeypatch):
    ids = [prompt(engine, "Count to five."), prompt(engine, "Count to six.")]
    need = max((len(i) + GREEDY.max_tokens) * engine.kv_bytes_per_token for i in ids)
    alone = [await text_of(engine, i) for i in ids]
    monkeypatch.setattr(engine, "kv_budget", need + 1)  # room for one sequence at a time
    with pytest.raises(ContextLengthExceededError):
        engine.generate(ids[0], SamplingParams(max_tokens=50, temperature=0))
    most = 0

    async def watch():
        nonlocal most
        while True:
            most = max(most, engine.stats().running)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    both = await asyncio.gather(*(text_of(engine, i) for i in ids))
    watcher.cancel()
    assert list(both) == alone
    assert most == 1
    assert engine.stats().kv_reserved_bytes == 0


async def test_a_sequence_that_waits_too_long_for_the_batch_is_shed(engine, monkeypatch):
    long_params = SamplingParams(max_tokens=60, temperature=0)
    ids = prompt(engine, "Write a story about a ship.")
    monkeypatch.setattr(engine, "kv_budget", (len(ids) + 60) * engine.kv_bytes_per_token + 1)
    monkeypatch.setattr(engine, "max_queue_wait_s", 0.3)
    first = engine.generate(ids, long_params)
    await first.admitted()
    second = engine.generate(ids, long_params)  # no KV room until the first finishes
    with pytest.raises(OverloadedError):
        await second.admitted()
    text = "".join([c.text async for c in first])
    assert text and engine.stats().waiting == 0 and engine.stats().running == 0


async def test_n_choices_prefill_their_prompt_once(engine):
    ids = prompt(engine, "Tell me a fact about the moon, in one sentence.")
    # Few tokens: choices 1-3 compute their first logits from a copy of choice 0's KV (one
    # token's step), a request alone from its whole prompt. The two agree to float rounding,
    # which at temperature 1 can flip a near-tie a few tokens in (seen at token 7 here).
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=11)
    before = engine.stats().prefilled_tokens
    texts: dict[int, str] = {0: "", 1: "", 2: "", 3: ""}
    async for chunk in engine.generate(ids, params, n=4):
        texts[chunk.index] += chunk.text
    # Choice 0 prefills the prompt; choices 1-3 re-run only its last token from a copy of its KV.
    assert engine.stats().prefilled_tokens - before == len(ids) + 3
    # Each choice samples as a request of its own with seed + i would.
    for i in range(4):
        alone = SamplingParams(max_tokens=4, temperature=1.0, seed=11 + i)
        assert texts[i] == await text_of(engine, ids, alone)
    assert len(set(texts.values())) > 1


async def test_time_queued_before_the_engine_counts_but_a_free_batch_still_admits(engine, monkeypatch):
    ids = prompt(engine, "Name a lake.")
    monkeypatch.setattr(engine, "max_queue_wait_s", 5.0)
    stream = engine.generate(ids, GREEDY, waited_s=60.0)  # long in Serve's queue, but the batch is free
    await stream.admitted()
    assert "".join([c.text async for c in stream])
    monkeypatch.setattr(engine, "kv_budget", (len(ids) + 60) * engine.kv_bytes_per_token + 1)
    first = engine.generate(ids, SamplingParams(max_tokens=60, temperature=0))
    await first.admitted()
    late = engine.generate(ids, GREEDY, waited_s=60.0)  # no room now, and already waited too long
    with pytest.raises(OverloadedError):
        await asyncio.wait_for(late.admitted(), 5)
    await first.aclose()
