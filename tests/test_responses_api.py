"""/v1/responses through the OpenAI SDK (strict validation): create, stream, parse,
previous_response_id, tools, retrieve/delete, on the default app's SmolLM2."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.tool_specs import RESPONSES_WEATHER

MODEL = "smollm2"
WEATHER = RESPONSES_WEATHER


def test_create_and_stream_give_the_same_text(client):
    kw = {"model": MODEL, "input": "Name three fruits.", "instructions": "Answer briefly.", "max_output_tokens": 24, "temperature": 0}
    whole = client.responses.create(**kw)
    assert whole.status in ("completed", "incomplete") and whole.output_text
    assert whole.usage.input_tokens > 0 and whole.usage.output_tokens > 0

    types, text = [], ""
    for event in client.responses.create(**kw, stream=True):
        types.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
    assert text == whole.output_text
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert types[-1] in ("response.completed", "response.incomplete")

    with client.responses.stream(**kw) as stream:
        final = stream.get_final_response()
    assert final.output_text == whole.output_text


def test_max_output_tokens_makes_it_incomplete(client):
    r = client.responses.create(model=MODEL, input="Tell me a long story about a dragon.", max_output_tokens=5, temperature=0)
    assert r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5


def test_previous_response_id_continues_the_conversation(client):
    first = client.responses.create(model=MODEL, input="My name is Ada. Say hello.", max_output_tokens=12, temperature=0)
    second = client.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                     max_output_tokens=12, temperature=0)
    # The earlier turn and its answer are in the prompt: more input than the first two turns alone.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.previous_response_id == first.id

    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="Again?", previous_response_id=first.id, max_output_tokens=4)


def test_store_false_keeps_nothing(client):
    r = client.responses.create(model=MODEL, input="Hi", store=False, max_output_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="Again?", previous_response_id=r.id, max_output_tokens=4)


class Fruit(BaseModel):
    name: str = Field(max_length=20)
    colour: Literal["red", "yellow", "green", "orange"]
    calories: int = Field(ge=0, le=500)


class Basket(BaseModel):
    fruits: list[Fruit] = Field(min_length=1, max_length=3)


@pytest.mark.parametrize("schema", [Fruit, Basket])
def test_parse_returns_a_valid_object(client, schema):
    r = client.responses.parse(model=MODEL, input="Describe a fruit.", text_format=schema, max_output_tokens=150, temperature=0)
    assert isinstance(r.output_parsed, schema)


def test_a_forced_tool_call_and_its_output(client):
    first = client.responses.create(model=MODEL, input="What is the weather in Paris?", tools=[WEATHER],
                                    tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=80, temperature=0)
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.call_id
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])

    second = client.responses.create(
        model=MODEL, previous_response_id=first.id, tools=[WEATHER], max_output_tokens=30, temperature=0,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"temperature": 18})}],
    )
    assert second.output_text.strip()


def test_a_forced_call_cut_by_max_output_tokens_is_stored(client):
    r = client.responses.create(model=MODEL, input="Weather in Rome?", tools=[WEATHER], tool_choice="required",
                                max_output_tokens=3, temperature=0)
    assert r.status == "incomplete"
    follow = client.responses.create(model=MODEL, input="Go on.", previous_response_id=r.id, max_output_tokens=3)
    assert follow.previous_response_id == r.id


def test_streamed_tool_call_events(client):
    events = list(client.responses.create(model=MODEL, input="Weather in Rome?", tools=[WEATHER], tool_choice="required",
                                          parallel_tool_calls=False, max_output_tokens=80, temperature=0, stream=True))
    types = [e.type for e in events]
    i = types.index("response.function_call_arguments.delta")
    j = types.index("response.function_call_arguments.done")
    assert types[i - 1] == "response.output_item.added" and events[i - 1].item.name == "get_weather"
    # A forced call streams its arguments as they are written: several fragments.
    assert set(types[i:j]) == {"response.function_call_arguments.delta"} and j - i > 1
    assert types[j + 1] == "response.output_item.done"
    assert "response.output_text.delta" not in types
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    jsonschema.validate(json.loads(args), WEATHER["parameters"])
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_input_items_with_a_function_call_history(client):
    r = client.responses.create(
        model=MODEL, max_output_tokens=20, temperature=0, tools=[WEATHER],
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Oslo?"}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": '{"temperature": -3}'},
        ],
    )
    assert r.output_text.strip()


@pytest.mark.parametrize(
    "body, status",
    [
        ({"input": []}, 400),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]}, 400),
        ({"input": "hi", "previous_response_id": "resp_nope"}, 404),
        ({"input": "hi", "tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]}, 400),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}}, 400),
        ({"input": "hi", "max_output_tokens": 0}, 400),
        ({"input": "hi", "store": "yes"}, 400),
    ],
    ids=["empty", "image", "unknown-previous", "unknown-tool", "bad-schema", "zero-tokens", "store-not-bool"],
)
def test_bad_requests(orchard, client, body, status):
    r = httpx.post(f"{orchard}/v1/responses", json={"model": MODEL, "max_output_tokens": 4, **body}, timeout=60)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]
    assert client.responses.create(model=MODEL, input="hi", max_output_tokens=2).output_text is not None
