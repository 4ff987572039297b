"""Speculative decoding (prompt lookup) inside the continuous batch, on the real SmolLM2
without Ray: greedy answers are token for token those of plain decoding, alone and mixed in
a batch with sequences that do not speculate (sampled, penalised), which keep their own
answers too; drafts are really verified and accepted."""

from __future__ import annotations

import asyncio

import pytest

from mlx_orchard.engines.llm import LLMEngine
from mlx_orchard.engines.sampling import SamplingParams
from mlx_orchard.engines.speculative import PromptLookup, SpeculativeConfig

pytestmark = pytest.mark.asyncio(loop_scope="module")

PASSAGE = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. He lit the lamp, "
    "wiped the salt from the glass, and wrote the weather in his logbook before the ships came home."
)
COPYING = [
    f"Repeat this text exactly: {PASSAGE}",
    f"Rewrite this text, replacing 'lighthouse' with 'watchtower': {PASSAGE}",
    f"Copy the first sentence of this text: {PASSAGE}",
    f"Fix the spelling: The quick brown fox jumpd over the lazzy dog. {PASSAGE}",
    "Repeat after me: one two three four five six seven eight nine ten one two three four five.",
    "def add(a, b):\n    return a + b\n\nRename the function add to plus and show the code.",
    f"Put this text in quotes: {PASSAGE}",
    "Repeat the list: apples, pears, plums, apples, pears, plums, apples, pears, plums.",
    f"Summarize in the same words: {PASSAGE}",
    "Write the alphabet twice: a b c d e f g h i j k l m n o p q r s t u v w x y z.",
]
FREE = [
    "Write a poem about the sea.",
    "What is the capital of France?",
    "Tell me a joke about cats.",
    "Explain gravity to a child.",
    "List three colours.",
    "Why is the sky blue?",
    "Describe a sunset.",
    "What do bees make?",
    "Name a famous painter.",
    "Say hello in Spanish.",
]
PROMPTS = COPYING + FREE  # 20
GREEDY = SamplingParams(max_tokens=32, temperature=0)


@pytest.fixture(scope="module")
def engines(smollm2_dir):
    plain = LLMEngine(smollm2_dir, max_batch_size=16, prefill_batch_size=16, prefix_cache_size=0)
    # adaptive=False: every step with a draft verifies it, so these tests cover the verifying
    # step on this machine whatever it measures faster (the bench measures the adaptive one).
    spec = LLMEngine(smollm2_dir, max_batch_size=16, prefill_batch_size=16, prefix_cache_size=8,
                     speculative=SpeculativeConfig(adaptive=False))
    yield plain, spec
    plain.shutdown()
    spec.shutdown()


def encode(engine: LLMEngine, text: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": text}])


async def answer(engine: LLMEngine, text: str, params: SamplingParams = GREEDY) -> tuple[list[int], str]:
    ids, parts = [], []
    async for chunk in engine.generate(encode(engine, text), params):
        ids += chunk.token_ids
        parts.append(chunk.text)
    return ids, "".join(parts)


async def test_prompt_lookup_drafts_what_followed_the_latest_match():
    lookup = PromptLookup(SpeculativeConfig(num_draft_tokens=3, ngram_max=3, ngram_min=2))
    context = [1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 2, 3]
    assert lookup.draft(context) == [7, 8, 2]  # (2, 3) last seen before 7 8 2
    assert lookup.draft(context + [7]) == [8, 2, 3]  # (3, 7)
    assert lookup.draft([5, 6, 7]) == []  # nothing repeats
    assert PromptLookup(SpeculativeConfig()).draft([4, 4]) == []  # the suffix never matches itself


async def test_greedy_answers_are_unchanged_alone(engines):
    plain, spec = engines
    before = spec.stats()
    for text in PROMPTS:
        assert await answer(spec, text) == await answer(plain, text), text
    after = spec.stats()
    assert after.draft_tokens > before.draft_tokens
    assert after.accepted_tokens - before.accepted_tokens > 100  # the copying prompts are drafted right
    # fewer steps than tokens: several tokens were accepted per step
    assert after.steps - before.steps < after.generated_tokens - before.generated_tokens


async def test_greedy_answers_are_unchanged_in_a_mixed_batch_of_16(engines):
    plain, spec = engines
    # 16 at once: 12 greedy (speculating), 2 seeded samples and 2 with a repetition penalty
    # (neither speculates, both share the verifying steps and must keep their own answers).
    sampled = SamplingParams(max_tokens=30, temperature=0.8, seed=7)
    penalised = SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.3)
    batch = [(t, GREEDY) for t in PROMPTS[:6] + PROMPTS[10:16]]
    batch += [(PROMPTS[6], sampled), (PROMPTS[16], sampled), (PROMPTS[7], penalised), (PROMPTS[17], penalised)]
    expected = [await answer(plain, t, p) for t, p in batch]
    before = spec.stats().accepted_tokens
    got = await asyncio.gather(*(answer(spec, t, p) for t, p in batch))
    assert got == expected
    assert spec.stats().accepted_tokens > before


async def test_a_draft_cut_by_max_tokens_or_a_stop_string_ends_where_plain_decoding_does(engines):
    plain, spec = engines
    text = COPYING[0]
    for params in (SamplingParams(max_tokens=7, temperature=0), SamplingParams(max_tokens=40, temperature=0, stop=["salt"])):
        got, want = await answer(spec, text, params), await answer(plain, text, params)
        assert got == want
    assert len((await answer(spec, text, SamplingParams(max_tokens=7, temperature=0)))[0]) == 7


async def test_logprobs_of_accepted_drafts_match_plain_decoding(engines):
    plain, spec = engines
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=2)

    async def logprobs(engine):
        return [lp async for chunk in engine.generate(encode(engine, COPYING[0]), params) for lp in chunk.logprobs]

    got, want = await logprobs(spec), await logprobs(plain)
    assert [lp.token for lp in got] == [lp.token for lp in want]
    assert [lp.logprob for lp in got] == pytest.approx([lp.logprob for lp in want], abs=2e-3)
    assert [[t.token for t in lp.top_logprobs] for lp in got] == [[t.token for t in lp.top_logprobs] for lp in want]


async def test_the_prefix_cache_keeps_what_a_speculating_sequence_held(engines):
    plain, spec = engines
    first = await answer(spec, COPYING[1], SamplingParams(max_tokens=9, temperature=0))
    # The same prompt again starts from the cached KV (cut back to the tokens it held) and
    # still answers as plain decoding does.
    stream = spec.generate(encode(spec, COPYING[1]), SamplingParams(max_tokens=9, temperature=0))
    await stream.admitted()
    assert stream.cached_tokens > 0
    again = "".join([c.text async for c in stream])
    assert again == first[1] == (await answer(plain, COPYING[1], SamplingParams(max_tokens=9, temperature=0)))[1]


# ---- a draft model drafts (the same batch step verifies) ----


async def test_a_draft_model_keeps_greedy_answers_alone_and_in_a_batch(smollm2_dir, engines, tmp_path):
    """Two drafts of SmolLM2's vocabulary: itself (drafts mostly accepted) and a random
    2-layer model (drafts mostly rejected: every rollback path); answers equal plain decoding."""
    from tests.tiny_models import write_tiny_llama

    plain, _ = engines
    tiny = write_tiny_llama(tmp_path / "tiny", smollm2_dir, seed=3)
    # the last one longer than a draft catch-up chunk (512 tokens): prefilled alone first
    texts = PROMPTS[:4] + PROMPTS[10:14] + [f"Copy the first sentence of this text: {PASSAGE * 14}"]
    expected = [await answer(plain, t) for t in texts]
    for draft, least_acceptance in ((smollm2_dir, 0.8), (tiny, 0.0)):
        engine = LLMEngine(smollm2_dir, max_batch_size=16, prefix_cache_size=0, draft_model=draft,
                           speculative=SpeculativeConfig(adaptive=False))
        try:
            assert [await answer(engine, t) for t in texts[:2]] == expected[:2]
            assert list(await asyncio.gather(*(answer(engine, t) for t in texts))) == expected
            stats = engine.stats()
            assert stats.draft_tokens > 0 and stats.accepted_tokens >= least_acceptance * stats.draft_tokens
        finally:
            engine.shutdown()


async def test_a_draft_model_of_another_vocabulary_is_refused(smollm2_dir, tmp_path):
    import json

    from tests.tiny_models import write_tiny_llama

    other = write_tiny_llama(tmp_path / "other", smollm2_dir, seed=4)
    spec = json.loads((other / "tokenizer.json").read_text())
    added = spec["added_tokens"][-1]  # a special token no merge uses, spelled otherwise
    spec["model"]["vocab"]["<|other|>"] = spec["model"]["vocab"].pop(added["content"])
    added["content"] = "<|other|>"
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="another vocabulary"):
        LLMEngine(smollm2_dir, draft_model=other, speculative=SpeculativeConfig())
