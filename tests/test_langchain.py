"""LangChain's ChatOpenAI against Orchard: bind_tools and with_structured_output (every
method), as agent frameworks use them."""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

langchain_openai = pytest.importorskip("langchain_openai")


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    city: str = Field(max_length=40, description="the city")
    unit: Literal["celsius", "fahrenheit"]


class Fruit(BaseModel):
    """A fruit and its colour."""

    name: str = Field(max_length=20)
    colour: Literal["red", "yellow", "green", "orange"]


@pytest.fixture(scope="module")
def llm(orchard):
    return langchain_openai.ChatOpenAI(base_url=f"{orchard}/v1", api_key="unused", model="smollm2", temperature=0,
                                       max_tokens=100, max_retries=0)


def test_bind_tools_returns_a_parsed_tool_call(llm):
    message = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("What is the weather in Paris?")
    [call] = message.tool_calls
    assert call["name"] == "GetWeather" and call["id"]
    GetWeather.model_validate(call["args"])
    assert not message.invalid_tool_calls


def test_bind_tools_streams_tool_call_chunks(llm):
    chunks = list(llm.bind_tools([GetWeather], tool_choice="any").stream("Weather in Oslo?"))
    message = chunks[0]
    for chunk in chunks[1:]:
        message = message + chunk
    [call] = message.tool_calls
    GetWeather.model_validate(call["args"])


# json_mode is left out: it sends no schema, so what a 135M model writes inside the object is
# up to the model (the server's part, a JSON object, is covered in test_structured_output).
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(llm, method):
    fruit = llm.with_structured_output(Fruit, method=method).invoke("Describe a banana.")
    assert isinstance(fruit, Fruit)
