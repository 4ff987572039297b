"""Tool-call formats: where a call starts and ends in the text, how to read one, and the
grammar that forces one (``tool_choice`` ``required`` or a named function).

Each format is what a model family was trained to write. A call that does not parse, or
names a function the request did not offer, is not a call: the caller gets its text back.
Adding a format is one subclass and one line in ``TOOL_FORMATS``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# A marker that is one special token of the model is matched by id in grammars (its text
# never comes out of a tokenizer's ordinary encoding).
SpecialToken = Callable[[str], int | None]

# llguidance's JSON options inside Lark (``%json``): compact, as the answers of constrained
# sequences elsewhere (a small model pads free whitespace until max_tokens).
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_MAX_PARALLEL = 16  # calls one forced answer may hold


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")


class ToolFormat:
    """One family's way of writing tool calls."""

    name: str
    start: str  # the text that opens a call
    also_starts: tuple[str, ...] = ()  # other openings the model may use
    end: str | None  # the text that closes it; None: the call runs to the end of the answer
    at_start_only = False  # the opening is only a call at the very start of the answer
    keep_start = False  # the opening text is part of the call's body (Llama 3's "{")
    # A forced call has exactly the grammar's layout, so its arguments can stream as they are
    # written: ``streamed`` matches the body up to them (group 1: the name), ``streamed_suffix``
    # characters follow them. None: the call is read whole (and checked) before it is sent.
    streamed: re.Pattern | None = None
    streamed_suffix = 0
    one_call_per_region = True  # parallel calls are separate regions (else a forced parallel call is read whole)

    def forced_prefix(self, name: str | None) -> str:
        """How every sentence of ``forced()`` begins (up to the arguments when the function
        is named): the server writes it into the prompt, so the model starts after it —
        one prefill instead of a decode step per token of boilerplate."""
        return ""

    def parse(self, body: str, functions: dict[str, dict]) -> list[ToolCall]:
        """The calls in one call region (between ``start`` and ``end``); ValueError if it is not one."""
        raise NotImplementedError

    def forced(self, functions: list[dict], parallel: bool, special: SpecialToken) -> str:
        """Lark rules (llguidance's dialect), the top one named ``calls``, whose every sentence
        is one call (or several with ``parallel``) to one of ``functions``, its arguments valid
        against the function's schema."""
        raise NotImplementedError


def _lit(text: str, special: SpecialToken) -> str:
    token = special(text)
    return f"<[{token}]>" if token is not None else json.dumps(text)


def _json_rule(schema: dict) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_STYLE})


def _params(function: dict) -> dict:
    return _closed(function.get("parameters") or {"type": "object", "properties": {}})


def _closed(schema: Any) -> Any:
    """Objects that list their properties take no others unless they say so: a forced call
    then holds the arguments the function declares (as OpenAI's strict mode does), not
    keys a small model invents. (Schemas are bounded in depth by the request's checks.)"""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) if k not in ("enum", "const", "default", "examples") else v for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _call_schema(functions: list[dict], args_key: str) -> dict:
    """One JSON object ``{"name": ..., args_key: {...}}`` for any of ``functions``."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, args_key: _params(f)},
            "required": ["name", args_key],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _repeat(rule: str, separator: str, parallel: bool) -> str:
    return f"calls: {rule} ({json.dumps(separator)} {rule}){{0,{_MAX_PARALLEL - 1}}}" if parallel else f"calls: {rule}"


def checked_call(name: Any, arguments: Any, functions: dict[str, dict]) -> ToolCall:
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        arguments = json.loads(arguments)
    if not isinstance(name, str) or name not in functions:
        raise ValueError(f"not a function of this request: {name!r}")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ValueError("the arguments are not a JSON object")
    return ToolCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False))


def _json_calls(text: str, args_keys: tuple[str, ...], functions: dict[str, dict], separators: str = "") -> list[ToolCall]:
    """JSON call objects one after another (separated by whitespace or ``separators``)."""
    decoder, calls, pos = json.JSONDecoder(), [], 0
    text = text.strip()
    while pos < len(text):
        value, pos = decoder.raw_decode(text, pos)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, dict):
                raise ValueError("a tool call is a JSON object")
            args = next((item[k] for k in args_keys if k in item), None)
            calls.append(checked_call(item.get("name"), args, functions))
        while pos < len(text) and (text[pos].isspace() or text[pos] in separators):
            pos += 1
    if not calls:
        raise ValueError("no tool call")
    return calls


class Hermes(ToolFormat):
    """Hermes / Qwen 2.5 / Qwen 3: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``."""

    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"
    streamed = re.compile(r'^\n\{"name": "([^"]+)", "arguments": ')
    streamed_suffix = 2  # "}\n"

    def forced_prefix(self, name):
        return '<tool_call>\n{"name": "' + (f'{name}", "arguments": ' if name else "")

    def parse(self, body, functions):
        return _json_calls(body, ("arguments", "parameters"), functions)

    def forced(self, functions, parallel, special):
        call = f"{_lit(self.start, special)} \"\\n\" body \"\\n\" {_lit(self.end, special)}"
        return f"{_repeat('call', chr(10), parallel)}\ncall: {call}\nbody: {_json_rule(_call_schema(functions, 'arguments'))}\n"


class Llama3(ToolFormat):
    """Llama 3.1–3.3 JSON: the whole answer is ``{"name": ..., "parameters": {...}}`` (calls
    separated by ``;``), sometimes after ``<|python_tag|>``."""

    name = "llama3"
    start, end = "{", None
    also_starts = ("<|python_tag|>",)
    at_start_only, keep_start = True, True
    streamed = re.compile(r'^\{"name": "([^"]+)", "parameters": ')
    streamed_suffix = 1  # "}"
    one_call_per_region = False

    def forced_prefix(self, name):
        return '{"name": "' + (f'{name}", "parameters": ' if name else "")

    def parse(self, body, functions):
        return _json_calls(body.removeprefix("<|python_tag|>"), ("parameters", "arguments"), functions, separators=";")

    def forced(self, functions, parallel, special):
        return f"{_repeat('call', '; ', parallel)}\ncall: {_json_rule(_call_schema(functions, 'parameters'))}\n"


class Mistral(ToolFormat):
    """Mistral: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (v3), or
    ``[TOOL_CALLS]name[ARGS]{...}`` repeated (v11+, ``headers=True``)."""

    name = "mistral"
    start, end = "[TOOL_CALLS]", None
    _header = re.compile(r"(?:\[TOOL_CALLS\])?\s*([\w.-]+)\s*\[ARGS\]\s*")

    def __init__(self, headers: bool = False):
        self.headers = headers

    def forced_prefix(self, name):
        if self.headers:
            return "[TOOL_CALLS]" + (f"{name}[ARGS]" if name else "")
        return '[TOOL_CALLS][{"name": "' + (f'{name}", "arguments": ' if name else "")

    def parse(self, body, functions):
        body = body.strip()
        if body.startswith("["):
            return _json_calls(body, ("arguments", "parameters"), functions)
        calls, decoder, pos = [], json.JSONDecoder(), 0
        while pos < len(body):
            match = self._header.match(body, pos)
            if match is None:
                raise ValueError("not a Mistral tool call")
            args, pos = decoder.raw_decode(body, match.end())
            calls.append(checked_call(match.group(1), args, functions))
            while pos < len(body) and body[pos].isspace():
                pos += 1
        return calls

    def forced(self, functions, parallel, special):
        start = _lit(self.start, special)
        if self.headers:
            args = _lit("[ARGS]", special)
            options = " | ".join(f"{json.dumps(f['name'])} {args} a{i}" for i, f in enumerate(functions))
            rules = "".join(f"a{i}: {_json_rule(_params(f))}\n" for i, f in enumerate(functions))
            repeat = f"({start} call){{1,{_MAX_PARALLEL}}}" if parallel else f"{start} call"
            return f"calls: {repeat}\ncall: {options}\n{rules}"
        schema = {"type": "array", "items": _call_schema(functions, "arguments"), "minItems": 1,
                  "maxItems": _MAX_PARALLEL if parallel else 1}
        return f"calls: {start} array\narray: {_json_rule(schema)}\n"


class Qwen3Coder(ToolFormat):
    """Qwen3-Coder XML: ``<tool_call><function=name><parameter=p>value</parameter></function></tool_call>``."""

    name = "qwen3_coder"
    start, end = "<tool_call>", "</tool_call>"

    def forced_prefix(self, name):
        return "<tool_call>\n<function=" + (f"{name}>\n" if name else "")
    _function = re.compile(r"^\s*<function=([^>\s]+)>(.*)</function>\s*$", re.DOTALL)
    _parameter = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?</parameter>", re.DOTALL)

    def parse(self, body, functions):
        match = self._function.match(body)
        if match is None:
            raise ValueError("not a Qwen3-Coder tool call")
        name, inner = match.groups()
        props = _params(functions.get(name, {})).get("properties", {})
        args = {p: self._value(v, props.get(p, {})) for p, v in self._parameter.findall(inner)}
        if self._parameter.sub("", inner).strip():
            raise ValueError("text between the parameters")
        return [checked_call(name, args, functions)]

    @staticmethod
    def _value(text: str, schema: dict) -> Any:
        if schema.get("type") == "string" or ("enum" in schema and all(isinstance(e, str) for e in schema["enum"])):
            return text
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text

    def forced(self, functions, parallel, special):
        rules, options = [], []
        for i, f in enumerate(functions):
            props = _params(f).get("properties", {})
            required = set(_params(f).get("required", []))
            parts = []
            for j, (p, schema) in enumerate(props.items()):
                value = f"v{i}_{j}"
                if schema.get("type") == "string" and "enum" in schema:
                    rules.append(f"{value}: " + " | ".join(json.dumps(str(e)) for e in schema["enum"]))
                elif schema.get("type") == "string":
                    low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
                    rules.append(f"{value}: /[^<]{{{low},{'' if high is None else int(high)}}}/")
                else:
                    rules.append(f"{value}: {_json_rule(schema)}")
                part = f'"<parameter={p}>\\n" {value} "\\n</parameter>\\n"'
                parts.append(part if p in required else f"({part})?")
            options.append(f'"<function={f["name"]}>\\n" {" ".join(parts)} "</function>"'.replace("  ", " "))
        call = f'{_lit(self.start, special)} "\\n" fn "\\n" {_lit(self.end, special)}'
        return f"{_repeat('call', chr(10), parallel)}\ncall: {call}\nfn: {' | '.join(options)}\n" + "\n".join(rules) + "\n"


class Harmony(ToolFormat):
    """OpenAI's harmony (gpt-oss): ``<|channel|>commentary to=functions.name <|constrain|>json<|message|>{...}<|call|>``.
    Its channels carry reasoning and text too: ``HarmonyParser`` reads the whole answer."""

    name = "harmony"
    start, end = "<|channel|>", None

    def forced_prefix(self, name):
        return "<|channel|>commentary to=functions." + (f"{name} <|constrain|>json<|message|>" if name else "")

    def parse(self, body, functions):  # HarmonyParser hands over (recipient, body) pairs instead
        raise NotImplementedError

    def forced(self, functions, parallel, special):
        options = " | ".join(
            f'{_lit("<|channel|>", special)} "commentary to=functions.{f["name"]} " {_lit("<|constrain|>", special)} '
            f'"json" {_lit("<|message|>", special)} a{i}'
            for i, f in enumerate(functions)
        )
        rules = "".join(f"a{i}: {_json_rule(_params(f))}\n" for i, f in enumerate(functions))
        # One call: <|call|> ends the turn (it is an end-of-sequence token).
        return f"calls: {options}\n{rules}"


def forced_grammar(fmt: ToolFormat, functions: list[dict], *, parallel: bool, special: SpecialToken,
                   answer_schema: dict | None = None) -> str:
    """The grammar of an answer that must call a tool; with ``answer_schema``, one that may
    instead be a JSON answer matching it (``tool_choice=auto`` with ``response_format``)."""
    rules = fmt.forced(functions, parallel, special)
    if answer_schema is None:
        return "start: calls\n" + rules
    return f"start: calls | answer\nanswer: {_json_rule(answer_schema)}\n" + rules


TOOL_FORMATS: dict[str, Callable[[], ToolFormat]] = {
    "hermes": Hermes,
    "qwen": Hermes,
    "llama3": Llama3,
    "mistral": Mistral,
    "mistral_v11": lambda: Mistral(headers=True),
    "qwen3_coder": Qwen3Coder,
    "harmony": Harmony,
}


def tool_format(name: str) -> ToolFormat:
    try:
        return TOOL_FORMATS[name]()
    except KeyError:
        raise ValueError(f"unknown tool parser {name!r}; known: {sorted(TOOL_FORMATS)}") from None


def detect_tool_format(template: str | None) -> str | None:
    """The format a chat template renders tool calls in, when it says."""
    if not template:
        return None
    if "<|channel|>" in template and "to=functions" in template:
        return "harmony"
    if "[TOOL_CALLS]" in template:
        return "mistral_v11" if "[ARGS]" in template else "mistral"
    if "<function=" in template and "<parameter=" in template:
        return "qwen3_coder"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or ('"parameters"' in template and "<|eom_id|>" in template):
        return "llama3"
    return None
