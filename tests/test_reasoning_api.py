"""Reasoning split from the answer on all three APIs: SmolLM2 under a chat template that
opens a <think> block in the prompt (as DeepSeek-R1's and Qwen3's do) and closes it when
``enable_thinking`` is false. The model never closes the block itself, so everything it
writes is reasoning — unless thinking is switched off. One Serve app for the module."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.conftest import default_args

APP = "reasoning"
MODEL = "smollm2-think"
ASK = [{"role": "user", "content": "Is 17 a prime number?"}]
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}{% else %}{{ '<think>\\n' }}{% endif %}"
    "{% endif %}"
)


@pytest.fixture(scope="module")
def app(serve_instance, smollm2_dir):
    from ray import serve

    from graph import build_app

    args = default_args()
    config = {
        "ingress": args["ingress"],
        "runtime": args["runtime"],
        "pools": {"llm": {"deployment": {"ray_actor_options": {"num_cpus": 0.1}}}},
        "llm": [{"name": MODEL, "source": str(smollm2_dir), "chat_template": TEMPLATE, "reasoning_parser": "think",
                 "kv_cache_gb": 0.05, "max_batch_size": 8, "prefix_cache_size": 0}],
    }
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    yield f"{serve_instance}/{APP}"
    serve.delete(APP)


@pytest.fixture(scope="module")
def sdk(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app}/v1", api_key="unused", _strict_response_validation=True, max_retries=0, timeout=180)


def test_chat_reasoning_content_and_its_stream(sdk):
    r = sdk.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, temperature=0)
    message = r.choices[0].message
    reasoning = message.model_extra["reasoning_content"]
    assert reasoning and "<think>" not in reasoning and not message.content

    streamed, content = "", ""
    for chunk in sdk.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, temperature=0, stream=True):
        delta = chunk.choices[0].delta
        streamed += (delta.model_extra or {}).get("reasoning_content") or ""
        content += delta.content or ""
    assert streamed == reasoning and content == ""


def test_thinking_switched_off_through_chat_template_kwargs(sdk):
    r = sdk.chat.completions.create(model=MODEL, messages=ASK, max_tokens=16, temperature=0,
                                    extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    message = r.choices[0].message
    assert message.content and not (message.model_extra or {}).get("reasoning_content")


def test_responses_reasoning_item(sdk):
    r = sdk.responses.create(model=MODEL, input="Is 17 a prime number?", max_output_tokens=16, temperature=0)
    [item] = [i for i in r.output if i.type == "reasoning"]
    assert item.content[0].text
    events = [e.type for e in sdk.responses.create(model=MODEL, input="Is 17 a prime number?", max_output_tokens=16,
                                                   temperature=0, stream=True)]
    assert "response.reasoning_text.delta" in events and "response.output_text.delta" not in events


def test_anthropic_thinking_blocks(app):
    claude = anthropic.Anthropic(base_url=app, api_key="unused", max_retries=0, _strict_response_validation=True)
    greedy = {"extra_body": {"temperature": 0}}
    r = claude.messages.create(model=MODEL, max_tokens=16, messages=ASK, **greedy)
    assert r.content[0].type == "thinking" and r.content[0].thinking
    with claude.messages.stream(model=MODEL, max_tokens=16, messages=ASK, **greedy) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "thinking" and final.content[0].thinking == r.content[0].thinking
    off = claude.messages.create(model=MODEL, max_tokens=16, messages=ASK, thinking={"type": "disabled"}, **greedy)
    assert [b.type for b in off.content] == ["text"]
