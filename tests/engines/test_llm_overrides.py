"""Per-model overrides of the LLM engine: context length, a max_tokens ceiling, a chat template."""

from __future__ import annotations

import pytest

from mlx_orchard.engines.llm import LLMEngine
from mlx_orchard.errors import ContextLengthExceededError, InvalidRequestError
from mlx_orchard.wire import SamplingParams

TEMPLATE = "{% for m in messages %}<<{{ m['role'] }}: {{ m['content'] }}>>{% endfor %}{% if add_generation_prompt %}A:{% endif %}"


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    e = LLMEngine(smollm2_dir, max_batch_size=4, prefix_cache_size=0, context_length=64, max_tokens_limit=5,
                  chat_template=TEMPLATE)
    yield e
    e.shutdown()


def test_the_chat_template_override_renders_the_prompt(engine):
    ids = engine.encode_chat([{"role": "user", "content": "hi"}])
    assert engine.decode(ids) == "<<user: hi>>A:"


def test_the_context_length_override_bounds_prompt_and_answer(engine):
    assert engine.context_length == 64
    ids = engine.encode("word " * 60)
    with pytest.raises(ContextLengthExceededError):
        engine.check_request(ids, SamplingParams(max_tokens=5))
    engine.check_request(ids[:50], SamplingParams(max_tokens=5))


@pytest.mark.asyncio(loop_scope="module")
async def test_max_tokens_above_the_ceiling_is_refused_and_the_default_stays_under_it(engine):
    ids = engine.encode_chat([{"role": "user", "content": "Tell me a long story."}])
    with pytest.raises(InvalidRequestError) as e:
        engine.check_request(ids, SamplingParams(max_tokens=6))
    assert e.value.param == "max_tokens"
    stream = engine.generate(ids, SamplingParams(temperature=0))
    await stream.admitted()
    chunks = [c async for c in stream]
    assert chunks[-1].completion_tokens <= 5
