"""Structured output: response_format json_schema / json_object enforced while decoding
(llguidance), through the OpenAI SDK's own parse helper, on the default SmolLM2 app."""

from __future__ import annotations

import concurrent.futures
import json
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

ASK = [{"role": "user", "content": "Describe the capital of France."}]


class City(BaseModel):
    name: str = Field(max_length=24)
    country: Literal["France", "Germany", "Italy", "Spain"]
    population_millions: int = Field(ge=0, le=40)


class Landmark(BaseModel):
    name: str = Field(max_length=30)
    year_built: int = Field(ge=1000, le=2025)


class Guide(BaseModel):
    city: City
    landmarks: list[Landmark] = Field(min_length=1, max_length=3)
    rating: float = Field(ge=0, le=5)
    tags: list[Literal["art", "food", "history", "nightlife"]] = Field(max_length=4)


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    confidence: int = Field(ge=0, le=100)


@pytest.mark.parametrize("schema", [City, Guide, Verdict], ids=["flat-enum-bounded", "nested-arrays", "tiny"])
def test_parse_returns_a_valid_object(client, schema):
    completion = client.chat.completions.parse(
        model="smollm2", messages=ASK, response_format=schema, max_tokens=200, temperature=0
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, schema)  # the SDK validated it against the pydantic model
    assert schema.model_validate_json(choice.message.content) == choice.message.parsed


def test_streamed_structured_output_equals_the_whole_answer(client):
    kw = {"model": "smollm2", "messages": ASK, "response_format": City, "max_tokens": 120, "temperature": 0}
    whole = client.chat.completions.parse(**kw).choices[0].message.content
    with client.chat.completions.stream(**kw) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == whole
    assert isinstance(final.choices[0].message.parsed, City)


def test_json_object_gives_a_json_object(client):
    r = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Give me a JSON object about Paris."}],
        response_format={"type": "json_object"}, max_tokens=150, temperature=0,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut at max_tokens: still a valid prefix of an object
        assert r.choices[0].message.content.startswith("{")


def test_free_sequences_sharing_the_batch_are_unchanged(client):
    free = {"model": "smollm2", "messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 24, "temperature": 0}
    alone = client.chat.completions.create(**free).choices[0].message.content
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        constrained = [pool.submit(client.chat.completions.parse, model="smollm2", messages=ASK, response_format=Guide,
                                   max_tokens=200, temperature=0) for _ in range(3)]
        together = [pool.submit(lambda: client.chat.completions.create(**free).choices[0].message.content) for _ in range(3)]
        assert [f.result() for f in together] == [alone] * 3
        assert all(isinstance(f.result().choices[0].message.parsed, Guide) for f in constrained)


@pytest.mark.parametrize(
    "fmt, fragment",
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}, "schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, "schema"),
        ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "name"),
        ({"type": "xml"}, "response_format"),
        ({"type": "json_schema"}, "json_schema"),
    ],
    ids=["unknown-type", "dangling-ref", "bad-name", "unknown-format", "no-schema"],
)
def test_an_unusable_response_format_is_a_400(orchard, fmt, fragment):
    r = httpx.post(
        f"{orchard}/v1/chat/completions",
        json={"model": "smollm2", "messages": ASK, "response_format": fmt, "max_tokens": 8},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert fragment in (error["message"] + (error["param"] or ""))


def test_a_schema_request_cannot_break_the_replica(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="smollm2", messages=ASK, max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/a"}}}}},
        )
    assert client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=4).choices[0].message.content


class _Nested:
    """A schema nested ``depth`` levels, written out as text (json.dumps itself would recurse too deep)."""

    def __init__(self, depth: int):
        self.text = '{"type": "object", "properties": {"a": ' * depth + '{"type": "integer"}' + "}}" * depth


@pytest.mark.parametrize(
    "schema, expect",
    [
        (_Nested(900), 400),  # deeper than any real schema (and than Python's recursion limit)
        ({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)}}, 400),  # > 100k chars
        ({"type": "integer", "minimum": 10, "maximum": 5}, 400),  # unsatisfiable
        ({"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"}, 200),
        ({"type": "string", "pattern": "(a|aa)*(b|bb)*" * 50}, 200),  # backtracking bait: llguidance lexes linearly
    ],
    ids=["deep", "huge", "unsatisfiable", "recursive", "pattern-bomb"],
)
def test_hostile_schemas_get_a_400_or_an_answer_and_the_replica_carries_on(orchard, client, schema, expect):
    body = {"model": "smollm2", "messages": ASK, "max_tokens": 32,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "SCHEMA"}}}
    text = json.dumps(body).replace('"SCHEMA"', schema.text if isinstance(schema, _Nested) else json.dumps(schema))
    r = httpx.post(f"{orchard}/v1/chat/completions", content=text, headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code == expect, r.text[:300]
    assert client.chat.completions.create(model="smollm2", messages=ASK, max_tokens=4).choices[0].message.content
