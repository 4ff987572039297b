"""Forced tool calls and logprobs on the real SmolLM2 engine, without Ray."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_orchard.engines.llm import LLMEngine
from mlx_orchard.engines.sampling import SamplingParams
from mlx_orchard.parsers.model_output import ModelOutput
from mlx_orchard.parsers.output import HarmonyParser, OutputParser
from mlx_orchard.parsers.tool_formats import TOOL_FORMATS
from mlx_orchard.wire import ToolRequest

pytestmark = pytest.mark.asyncio(loop_scope="module")

TEMPLATE = (Path(__file__).resolve().parents[2] / "mlx_orchard" / "templates" / "smollm2-tools.jinja").read_text()
WEATHER = {
    "name": "get_weather",
    "description": "Current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "unit", "days"],
    },
}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}}, "required": ["zone"]}}


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    e = LLMEngine(smollm2_dir, max_batch_size=8, prefill_batch_size=4, prefix_cache_size=0, chat_template=TEMPLATE)
    yield e
    e.shutdown()


async def generate(engine, ids, params) -> tuple[str, list]:
    text, logprobs = "", []
    async for chunk in engine.generate(ids, params):
        text += chunk.text
        logprobs += chunk.logprobs or []
    return text, logprobs


def parse(parser, text: str) -> tuple[str, list]:
    pieces = parser.feed(text) + parser.finish()
    return "".join(p.text for p in pieces if p.kind == "text"), [p.call for p in pieces if p.kind in ("tool_call", "call_end")]


@pytest.mark.parametrize("fmt", sorted(TOOL_FORMATS))
@pytest.mark.parametrize("choice", ["required", "get_weather"])
@pytest.mark.parametrize("prefill", [False, True], ids=["decoded", "opening-prefilled"])
async def test_a_forced_call_is_valid_in_every_format(engine, fmt, choice, prefill):
    """Whatever the format, the grammar makes even a 135M model write a call that parses
    and whose arguments match the function's schema — also when the call's opening is
    written into the prompt and the grammar reads it as already generated."""
    output = ModelOutput(TEMPLATE, tool_parser=fmt)
    tools = ToolRequest(functions=[WEATHER, TIME], choice=choice, parallel=False)
    ids = engine.encode_chat([{"role": "user", "content": "What is the weather in Paris?"}], tools=output.template_tools(tools))
    grammar = output.grammar(tools, None, engine.special_token)
    opening = output.forced_prefix(tools) if prefill else ""
    extra = engine.encode_continuation(opening)
    params = SamplingParams(max_tokens=120, temperature=0, grammar=grammar, prefilled=len(extra))
    text, _ = await generate(engine, ids + extra, params)
    parser = output.parser(tools, in_reasoning=False)
    assert isinstance(parser, HarmonyParser if fmt == "harmony" else OutputParser)
    rest, calls = parse(parser, opening + text)
    assert len(calls) == 1, text
    assert rest == ""
    args = json.loads(calls[0].arguments)
    if choice == "get_weather" or calls[0].name == "get_weather":
        assert calls[0].name == "get_weather"
        assert set(args) == {"city", "unit", "days"} and args["unit"] in ("celsius", "fahrenheit") and 1 <= args["days"] <= 7
    else:
        assert calls[0].name == "get_time" and isinstance(args["zone"], str)


async def test_logprobs_match_a_direct_forward_pass(engine):
    ids = engine.encode_chat([{"role": "user", "content": "Name a colour."}])
    text, logprobs = await generate(engine, ids, SamplingParams(max_tokens=6, temperature=0, logprobs=5))
    assert len(logprobs) == 6
    context = list(ids)
    for lp in logprobs:
        logits = engine.model(mx.array([context]))[0, -1].astype(mx.float32)
        direct = logits - mx.logsumexp(logits)
        best = int(mx.argmax(direct).item())
        assert lp.logprob == pytest.approx(direct[best].item(), abs=1e-3)
        assert lp.logprob <= 0
        assert [t.logprob for t in lp.top_logprobs] == sorted((t.logprob for t in lp.top_logprobs), reverse=True)
        assert len(lp.top_logprobs) == 5 and lp.top_logprobs[0].logprob == pytest.approx(lp.logprob)
        assert bytes(lp.bytes).decode("utf-8", "replace") == engine.decode([best]) or lp.token.startswith("bytes:")
        context.append(best)
    assert "".join(lp.token for lp in logprobs) == text  # an ASCII answer: every token is whole text


async def test_token_bytes_of_a_split_character(engine):
    """"🦜" is three byte-level tokens in SmolLM2's vocabulary: their bytes join to the
    character; alone, each is shown as bytes."""
    pieces = [engine.token_bytes(t) for t in engine.encode("🦜")]
    assert len(pieces) == 3
    assert b"".join(bytes(raw) for _, raw in pieces) == "🦜".encode()
    assert pieces[0][0] == "bytes:\\xf0\\x9f"
