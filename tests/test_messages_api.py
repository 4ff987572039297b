"""/v1/messages through the Anthropic Python SDK (strict validation): create, stream, a tool
round trip, stop sequences, errors in Anthropic's shape — on the default app's SmolLM2."""

from __future__ import annotations

import anthropic
import httpx
import jsonschema
import pytest

from tests.tool_specs import MESSAGES_WEATHER

MODEL = "smollm2"
WEATHER = MESSAGES_WEATHER


# This SDK no longer takes sampling parameters for Claude models; Orchard still reads them.
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def claude(orchard):
    return anthropic.Anthropic(base_url=orchard, api_key="unused", max_retries=0, _strict_response_validation=True)


def test_create_and_stream_give_the_same_text(claude):
    kw = {"model": MODEL, "max_tokens": 24, **GREEDY, "system": "Answer briefly.",
          "messages": [{"role": "user", "content": "Name three fruits."}]}
    whole = claude.messages.create(**kw)
    assert whole.role == "assistant" and whole.stop_reason in ("end_turn", "max_tokens")
    [block] = whole.content
    assert block.type == "text" and block.text
    assert whole.usage.input_tokens > 0 and whole.usage.output_tokens > 0

    with claude.messages.stream(**kw) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == block.text
    assert final.content[0].text == block.text and final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_max_tokens_and_stop_sequences(claude):
    r = claude.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "Tell me a story."}], **GREEDY)
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 3
    free = claude.messages.create(model=MODEL, max_tokens=30, messages=[{"role": "user", "content": "Count from 1 to 10."}], **GREEDY)
    text = free.content[0].text
    stop = text.strip().split()[1][:2]  # something the answer is known to contain
    cut = claude.messages.create(model=MODEL, max_tokens=30, messages=[{"role": "user", "content": "Count from 1 to 10."}],
                                 **GREEDY, stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert stop not in cut.content[0].text and text.startswith(cut.content[0].text)


def test_a_tool_round_trip(claude):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = claude.messages.create(model=MODEL, max_tokens=80, **GREEDY, tools=[WEATHER],
                                   tool_choice={"type": "tool", "name": "get_weather"}, messages=ask)
    assert first.stop_reason == "tool_use"
    [use] = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather"
    jsonschema.validate(use.input, WEATHER["input_schema"])

    second = claude.messages.create(
        model=MODEL, max_tokens=30, **GREEDY, tools=[WEATHER],
        messages=ask + [
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 degrees and sunny"}]},
        ],
    )
    assert second.content and any(b.type == "text" and b.text.strip() for b in second.content)


def test_a_forced_call_cut_by_max_tokens_is_not_a_500(claude):
    r = claude.messages.create(model=MODEL, max_tokens=3, **GREEDY, tools=[WEATHER], tool_choice={"type": "any"},
                               messages=[{"role": "user", "content": "Weather in Rome?"}])
    assert r.stop_reason == "max_tokens"


def test_a_streamed_tool_call(claude):
    with claude.messages.stream(model=MODEL, max_tokens=80, **GREEDY, tools=[WEATHER], tool_choice={"type": "any"},
                                messages=[{"role": "user", "content": "Weather in Rome?"}]) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_start" in events and "content_block_stop" in events
    uses = [b for b in final.content if b.type == "tool_use"]
    assert uses and final.stop_reason == "tool_use"
    jsonschema.validate(uses[0].input, WEATHER["input_schema"])


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "hi"}]},  # no max_tokens
        {"max_tokens": 8, "messages": []},
        {"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
        {"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}},
        {"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "temperature": 1.5},
    ],
    ids=["no-max-tokens", "no-messages", "image", "unknown-tool", "temperature"],
)
def test_bad_requests_are_400(orchard, claude, body):
    r = httpx.post(f"{orchard}/v1/messages", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]  # the one error body every route answers, which Anthropic's SDK reads too
    assert error["type"] == "invalid_request_error" and error["message"]
    if "max_tokens" in body:  # the SDK itself insists on max_tokens
        known = {k: v for k, v in body.items() if k != "temperature"}
        with pytest.raises(anthropic.BadRequestError):
            claude.messages.create(model=MODEL, **known, extra_body={k: v for k, v in body.items() if k not in known})
    assert claude.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}]).content


def test_unknown_model_is_404(claude):
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-opus-9", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
