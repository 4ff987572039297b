"""Tool-call and reasoning parsers on recorded outputs of each format (from the models'
own chat templates and model cards), fed whole and one character at a time."""

from __future__ import annotations

import json

import pytest

from mlx_orchard.parsers.output import REASONING_FORMATS, HarmonyParser, OutputParser, Piece
from mlx_orchard.parsers.tool_formats import detect_tool_format, tool_format

FUNCTIONS = {
    "get_weather": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
    "get_time": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}},
}


def run(parser, text: str, chunk: int | None) -> list[Piece]:
    pieces: list[Piece] = []
    step = chunk or len(text) or 1
    for i in range(0, len(text), step):
        pieces += parser.feed(text[i : i + step])
    pieces += parser.finish()
    return pieces


def summary(pieces: list[Piece]) -> dict:
    out: dict = {"text": "", "reasoning": "", "calls": []}
    for p in pieces:
        if p.kind == "tool_call":
            assert p.call is not None
            out["calls"].append((p.call.name, json.loads(p.call.arguments)))
        else:
            out[p.kind] += p.text
    return out


def parse(fmt: str, text: str, chunk: int | None = None, reasoning: str | None = None, in_reasoning=False) -> dict:
    if fmt == "harmony":
        return summary(run(HarmonyParser(FUNCTIONS), text, chunk))
    parser = OutputParser(tool_format(fmt), FUNCTIONS, REASONING_FORMATS.get(reasoning or ""), in_reasoning)
    return summary(run(parser, text, chunk))


CASES = [
    # (format, recorded output, expected text, expected calls)
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "",
     [("get_weather", {"city": "Paris"})]),
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>', "Let me check.",
     [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"zone": "CET"})]),
    ("hermes", "No tools needed: 2 < 3.", "No tools needed: 2 < 3.", []),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Oslo"}}', "", [("get_weather", {"city": "Oslo"})]),
    ("llama3", '<|python_tag|>{"name": "get_time", "parameters": {"zone": "UTC"}}; {"name": "get_weather", "parameters": {"city": "Rome"}}',
     "", [("get_time", {"zone": "UTC"}), ("get_weather", {"city": "Rome"})]),
    ("llama3", "The answer is {x}.", "The answer is {x}.", []),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lyon"}}]', "", [("get_weather", {"city": "Lyon"})]),
    ("mistral_v11", '[TOOL_CALLS]get_weather[ARGS]{"city": "Nice"}[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}', "",
     [("get_weather", {"city": "Nice"}), ("get_time", {"zone": "CET"})]),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nSan Francisco\n</parameter>\n<parameter=days>\n3\n</parameter>\n"
                    "</function>\n</tool_call>", "", [("get_weather", {"city": "San Francisco", "days": 3})]),
    ("harmony", "<|channel|>analysis<|message|>User wants weather.<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather "
                '<|constrain|>json<|message|>{"city": "Tokyo"}<|call|>', "", [("get_weather", {"city": "Tokyo"})]),
    ("harmony", "<|channel|>analysis<|message|>Simple.<|end|><|start|>assistant<|channel|>final<|message|>Hello there.<|return|>",
     "Hello there.", []),
]


@pytest.mark.parametrize("chunk", [None, 1, 3])
@pytest.mark.parametrize(("fmt", "output", "text", "calls"), CASES)
def test_recorded_outputs(fmt, output, text, calls, chunk):
    got = parse(fmt, output, chunk)
    assert got["text"] == text
    assert got["calls"] == calls


def test_harmony_reasoning_is_split_out():
    got = parse("harmony", CASES[-1][1], chunk=2)
    assert got["reasoning"] == "Simple."


MALFORMED = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>'),  # broken JSON
    ("hermes", '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>'),  # not a function of the request
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": [1, 2]}\n</tool_call>'),  # arguments not an object
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),  # cut off by max_tokens
    ("llama3", '{"name": "get_weather", "parameters": '),
    ("mistral", "[TOOL_CALLS] not json at all"),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</tool_call>"),
]


@pytest.mark.parametrize("chunk", [None, 1])
@pytest.mark.parametrize(("fmt", "output"), MALFORMED)
def test_malformed_calls_come_back_as_text(fmt, output, chunk):
    got = parse(fmt, output, chunk)
    assert got["calls"] == []
    assert got["text"] == output


def test_no_markup_in_streamed_text_deltas():
    output = 'Sure.<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    parser = OutputParser(tool_format("hermes"), FUNCTIONS)
    kinds = []
    for ch in output:
        for piece in parser.feed(ch):
            assert "<" not in piece.text
            kinds.append(piece.kind)
    kinds += [p.kind for p in parser.finish()]
    assert [k for i, k in enumerate(kinds) if not i or kinds[i - 1] != k] == ["text", "tool_call"]


def test_text_that_only_looks_like_a_marker_start_is_released():
    parser = OutputParser(tool_format("hermes"), FUNCTIONS)
    assert summary(parser.feed("a <tool")) == {"text": "a", "reasoning": "", "calls": []}
    assert summary(parser.feed("box> b")) == {"text": " <toolbox> b", "reasoning": "", "calls": []}


@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_think_reasoning(chunk):
    got = parse("hermes", "<think>\nThe user greets.\n</think>\n\nHello!", chunk, reasoning="think")
    assert got == {"text": "Hello!", "reasoning": "\nThe user greets.\n", "calls": []}
    # Templates that open the think block in the prompt (DeepSeek-R1): the answer starts inside it.
    got = parse("hermes", "Hmm.</think>Hi.", chunk, reasoning="think", in_reasoning=True)
    assert got == {"text": "Hi.", "reasoning": "Hmm.", "calls": []}


def test_reasoning_then_tool_call():
    output = '<think>weather needs a tool</think><tool_call>{"name": "get_weather", "arguments": {"city": "Bern"}}</tool_call>'
    got = parse("hermes", output, 5, reasoning="think")
    assert got == {"text": "", "reasoning": "weather needs a tool", "calls": [("get_weather", {"city": "Bern"})]}


@pytest.mark.parametrize(
    ("template", "fmt"),
    [
        ("{% if tools %}<tools>{{ tools }}</tools> ... <tool_call>{% endif %}", "hermes"),
        ("[AVAILABLE_TOOLS]...[TOOL_CALLS]", "mistral"),
        ("[TOOL_CALLS]{{ name }}[ARGS]", "mistral_v11"),
        ("<tool_call>\n<function={{ name }}>\n<parameter={{ p }}>", "qwen3_coder"),
        ("<|start|>assistant<|channel|>commentary to=functions.{{ name }}", "harmony"),
        ("{{- '<|python_tag|>' }}", "llama3"),
        ("{{ message.content }}", None),
    ],
)
def test_format_detected_from_the_template(template, fmt):
    assert detect_tool_format(template) == fmt


FORCED = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2}}'),
    ("harmony", '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris", "days": 2}'),
]


@pytest.mark.parametrize("chunk", [1, 2, 5, None])
@pytest.mark.parametrize(("fmt", "output"), FORCED)
def test_a_forced_call_streams_its_name_then_its_arguments(fmt, output, chunk):
    """A call the grammar forced is sent as it is written: the name first, then fragments
    that join to exactly the arguments the model wrote."""
    parser = HarmonyParser(FUNCTIONS, stream_calls=True) if fmt == "harmony" else OutputParser(
        tool_format(fmt), FUNCTIONS, stream_calls=True)
    pieces = run(parser, output, chunk)
    kinds = [p.kind for p in pieces]
    assert kinds[0] == "call_begin" and pieces[0].call.name == "get_weather" and kinds[-1] == "call_end"
    assert set(kinds[1:-1]) <= {"call_args"} and all(p.kind != "text" for p in pieces)
    args = "".join(p.text for p in pieces if p.kind == "call_args")
    assert args == '{"city": "Paris", "days": 2}' == pieces[-1].call.arguments
    if chunk == 1:  # the name goes out before the arguments are complete
        assert len([p for p in pieces if p.kind == "call_args"]) > 5


def test_a_forced_call_cut_short_keeps_what_it_has():
    parser = OutputParser(tool_format("hermes"), FUNCTIONS, stream_calls=True)
    pieces = run(parser, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa', 3)
    assert pieces[-1].kind == "call_end" and pieces[-1].call.arguments == '{"city": "Pa'
