"""Tool calling and logprobs on /v1/chat/completions, through the OpenAI SDK (strict response
validation) on the default app: SmolLM2 with Hermes-style tools in its template."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.tool_specs import CHAT_WEATHER

MODEL = "smollm2"
WEATHER = CHAT_WEATHER
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "The local time in a time zone.",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}}, "required": ["zone"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _valid(call, tools) -> dict:
    schema = next(t["function"]["parameters"] for t in tools if t["function"]["name"] == call.function.name)
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, schema)
    return args


def test_a_named_tool_call_is_schema_valid_and_the_result_is_answered(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=NAMED,
                                           max_tokens=80, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    _valid(call, [WEATHER, TIME])

    follow_up = ASK + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    second = client.chat.completions.create(model=MODEL, messages=follow_up, tools=[WEATHER, TIME], max_tokens=40, temperature=0)
    assert second.choices[0].message.content.strip()
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


def test_required_with_parallel_calls_off_gives_exactly_one_valid_call(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=80, temperature=0)
    [call] = r.choices[0].message.tool_calls
    _valid(call, [WEATHER, TIME])


def test_streamed_tool_call_deltas_reassemble_to_the_whole_call(client):
    kw = {"model": MODEL, "messages": ASK, "tools": [WEATHER, TIME], "tool_choice": NAMED, "max_tokens": 80, "temperature": 0}
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    finish, text, fragments = None, "", 0
    for chunk in client.chat.completions.create(**kw, stream=True):
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.index not in calls:  # OpenAI's order: id and name first
                assert d.id and d.function.name
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
            calls[d.index]["arguments"] += d.function.arguments or ""
            fragments += bool(d.function.arguments)
        finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    assert text == ""  # no markup leaked into the text
    assert fragments > 2  # a forced call's arguments stream as they are written
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [(whole.function.name, json.loads(whole.function.arguments))]


def test_the_sdk_stream_helper_collects_the_call(client):
    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=NAMED, max_tokens=80,
                                        temperature=0) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls
    _valid(call, [WEATHER])


class GetWeather(BaseModel):
    """The current weather in a city."""

    city: str = Field(max_length=40)
    unit: Literal["celsius", "fahrenheit"]


def test_parse_with_a_pydantic_function_tool(client):
    r = client.chat.completions.parse(model=MODEL, messages=ASK, tools=[openai.pydantic_function_tool(GetWeather)],
                                      tool_choice="required", max_tokens=120, temperature=0)
    calls = r.choices[0].message.tool_calls
    assert calls and all(isinstance(c.function.parsed_arguments, GetWeather) for c in calls)


def test_tool_choice_none_answers_in_text(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=16, temperature=0)
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_auto_with_a_response_format_gives_a_call_or_a_valid_answer(client):
    class Answer(BaseModel):
        city: str = Field(max_length=20)

    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
    r = client.chat.completions.parse(model=MODEL, messages=ASK, tools=[strict], response_format=Answer, max_tokens=80, temperature=0)
    message = r.choices[0].message
    if message.tool_calls:
        _valid(message.tool_calls[0], [WEATHER])
    else:
        assert isinstance(message.parsed, Answer)


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "launch_rocket"}}}, "launch_rocket"),
        ({"tool_choice": "required"}, "no tools"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"tools": [WEATHER, WEATHER]}, "same name"),
        ({"tools": [WEATHER], "tool_choice": NAMED, "response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}], "tool_choice": "required"},
         "tools"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 3}, "logprobs"),
        ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ],
    ids=["unknown-named", "required-without-tools", "bad-name", "duplicate", "forced-and-format", "bad-schema",
         "too-many-top", "top-without-logprobs", "reserved-template-kwarg"],
)
def test_bad_tool_and_logprob_requests_are_400(orchard, client, extra, fragment):
    r = httpx.post(f"{orchard}/v1/chat/completions", json={"model": MODEL, "messages": ASK, "max_tokens": 8, **extra}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert fragment in error["message"] + (error["param"] or "")
    assert client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4).choices[0].message.content


def test_chat_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == choice.message.content
    for t in content:
        assert t.logprob <= 0
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert t.top_logprobs[0].token == t.token  # greedy: the chosen token is the most likely
        assert bytes(t.bytes).decode() == t.token

    streamed = []
    for chunk in client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=8, temperature=0, logprobs=True,
                                                top_logprobs=3, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]


def test_completion_logprobs_legacy_shape(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) <= 2 for top in lp.top_logprobs)
