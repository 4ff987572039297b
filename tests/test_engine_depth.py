"""Engine depth (issue #11) through Serve: an agent loop served from the prefix cache, SSE
keep-alive comments during a long prefill. One Serve app for the module: SmolLM2 twice in
one pool, with the prefix cache and without (the reference answers), and a third time with
speculative decoding."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.conftest import default_args
from tests.tool_specs import CHAT_WEATHER

APP = "depth"
CACHED, UNCACHED, SPECULATIVE = "smollm2-cached", "smollm2-nocache", "smollm2-spec"
WEATHER = CHAT_WEATHER
CITIES = ["Paris", "Oslo", "Rome", "Lima", "Cairo"]


@pytest.fixture(scope="module")
def app(serve_instance, smollm2_dir):
    from ray import serve

    from graph import build_app

    args = default_args()
    common = {"source": str(smollm2_dir), "chat_template": "smollm2-tools", "tool_parser": "hermes", "kv_cache_gb": 0.1,
              "max_batch_size": 16}
    config = {
        "ingress": {**args["ingress"], "sse_keepalive_s": 0.25},
        "runtime": args["runtime"],
        "pools": {"llm": {"deployment": {"ray_actor_options": {"num_cpus": 0.1}}}},
        "llm": [{"name": CACHED, **common}, {"name": UNCACHED, **common, "prefix_cache_size": 0},
                # adaptive: false, so every step with a draft verifies it whatever this machine measures
                {"name": SPECULATIVE, **common, "speculative": {"method": "prompt_lookup", "adaptive": False}}],
    }
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    yield f"{serve_instance}/{APP}"
    serve.delete(APP)


@pytest.fixture(scope="module")
def sdk(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app}/v1", api_key="unused", _strict_response_validation=True, max_retries=0, timeout=300)


def agent_loop(sdk: openai.OpenAI, model: str) -> list[tuple[str, int, int]]:
    """Five turns of a tool-using conversation: each turn asks about a city, the model calls
    the tool (forced), the tool answers, the model answers. Returns, per model call, its
    output, prompt tokens and cached tokens."""
    messages: list[dict] = [{"role": "system", "content": "You are a weather assistant. Use the tool."}]
    record = []
    for city in CITIES:
        messages.append({"role": "user", "content": f"What is the weather in {city}?"})
        call = sdk.chat.completions.create(model=model, messages=messages, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=40, temperature=0)
        message = call.choices[0].message
        record.append((message.tool_calls[0].function.arguments, call.usage.prompt_tokens,
                       call.usage.prompt_tokens_details.cached_tokens))
        messages.append(message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": json.dumps({"temperature": 20})})
        answer = sdk.chat.completions.create(model=model, messages=messages, tools=[WEATHER], max_tokens=12, temperature=0)
        text = answer.choices[0].message.content or ""
        record.append((text, answer.usage.prompt_tokens, answer.usage.prompt_tokens_details.cached_tokens))
        messages.append({"role": "assistant", "content": text})
    return record


def test_an_agent_loop_is_served_from_the_prefix_cache(sdk):
    cached = agent_loop(sdk, CACHED)
    reference = agent_loop(sdk, UNCACHED)
    assert [out for out, _, _ in cached] == [out for out, _, _ in reference]  # the cache changes no answer
    assert all(hit == 0 for _, _, hit in reference)
    for (_, previous_prompt, _), (_, prompt, hit) in zip(cached, cached[1:]):
        assert hit >= 0.9 * previous_prompt, (hit, previous_prompt, prompt)


def test_a_long_prefill_sends_keep_alive_comments(app, sdk):
    body = {"model": CACHED, "stream": True, "max_tokens": 2, "temperature": 0,
            "messages": [{"role": "user", "content": f"Request {time.time()}. " + "Tell me about the sea. " * 300}]}
    lines, first_content = [], None
    with httpx.stream("POST", f"{app}/v1/chat/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            lines.append(line)
            if first_content is None and line.startswith("data: {") and json.loads(line[6:])["choices"] and \
                    json.loads(line[6:])["choices"][0]["delta"].get("content"):
                first_content = len(lines)
    comments = [i for i, line in enumerate(lines) if line == ": keep-alive"]
    assert comments and comments[0] < (first_content or len(lines))
    assert [line for line in lines if line][-1] == "data: [DONE]"
    # The SDK skips the comments.
    text = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(**body) if c.choices)
    assert text


def test_a_speculating_model_streams_the_same_greedy_answers(sdk):
    passage = "The ferry left the harbour at noon, crossed the bay in an hour and docked beside the old market."
    texts = []
    for prompt in (f"Repeat this text exactly: {passage}", "What is the capital of France?"):
        messages = [{"role": "user", "content": prompt}]
        stream = sdk.chat.completions.create(model=SPECULATIVE, messages=messages, max_tokens=48, temperature=0, stream=True)
        texts.append("".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices))
        reference = sdk.chat.completions.create(model=UNCACHED, messages=messages, max_tokens=48, temperature=0)
        assert texts[-1] == reference.choices[0].message.content
    assert passage[:40] in texts[0] and "Paris" in texts[1]  # the model's real answers
