"""One model's output conventions: how it writes tool calls and reasoning, from its config
or read off its chat template, and what a request with tools needs from it (the tools for
the template, a grammar when a call is forced, a parser per choice)."""

from __future__ import annotations

import json

from mlx_orchard.errors import InvalidRequestError
from mlx_orchard.parsers.output import REASONING_FORMATS, HarmonyParser, OutputParser
from mlx_orchard.parsers.tool_formats import SpecialToken, detect_tool_format, forced_grammar, tool_format
from mlx_orchard.wire import ToolRequest


def detect_reasoning(template: str | None) -> str | None:
    if not template:
        return None
    if "<|channel|>" in template:
        return "harmony"
    for name, (start, _) in REASONING_FORMATS.items():
        if start in template:
            return name
    return None


class ModelOutput:
    def __init__(self, template: str | None, *, tool_parser: str | None = None, reasoning_parser: str | None = None):
        name = tool_parser or detect_tool_format(template)
        self.tool_format = tool_format(name) if name else None
        reasoning = reasoning_parser or detect_reasoning(template)
        self.harmony = name == "harmony" or reasoning == "harmony"
        self.reasoning = REASONING_FORMATS.get(reasoning or "")

    def keeps_special_tokens(self, special: SpecialToken) -> bool:
        """Whether the text must keep special tokens for the markers to be seen."""
        if self.harmony:
            return True
        markers = list(self.reasoning or ())
        if self.tool_format is not None:
            markers += [self.tool_format.start, *self.tool_format.also_starts, self.tool_format.end or ""]
        return any(m and special(m) is not None and m != "<|python_tag|>" for m in markers)

    def template_tools(self, tools: ToolRequest | None) -> list[dict] | None:
        """The tools as chat templates take them (None: the prompt shows no tools)."""
        if tools is None or tools.choice == "none" or not tools.functions:
            return None
        if self.tool_format is None:
            raise InvalidRequestError(
                "this model has no tool-call format (its chat template shows no tools); "
                "set tool_parser and a chat_template with tools in its config",
                param="tools",
            )
        return [{"type": "function", "function": f} for f in tools.functions]

    def grammar(self, tools: ToolRequest | None, json_schema: str | None, special: SpecialToken) -> str | None:
        """A Lark grammar when the request forces a call (``required`` or a named function),
        or may call one or answer in a JSON schema; None: nothing beyond ``json_schema``."""
        if tools is None or tools.choice == "none" or not tools.functions or self.tool_format is None:
            return None
        forced = tools.choice != "auto"
        if not forced and json_schema is None:
            return None
        if forced and json_schema is not None:
            raise InvalidRequestError(
                "response_format cannot be combined with tool_choice that forces a call", param="response_format"
            )
        functions = tools.functions
        if tools.choice not in ("auto", "required"):
            functions = [f for f in functions if f["name"] == tools.choice]
        return forced_grammar(
            self.tool_format,
            functions,
            parallel=tools.parallel and tools.choice in ("auto", "required"),
            special=special,
            answer_schema=None if json_schema is None else json.loads(json_schema),
        )

    def forced_prefix(self, tools: ToolRequest | None) -> str:
        """The opening a forced call must have (up to its arguments when the function is named)."""
        if tools is None or tools.choice in ("auto", "none") or not tools.functions or self.tool_format is None:
            return ""
        return self.tool_format.forced_prefix(None if tools.choice == "required" else tools.choice)

    def parser(self, tools: ToolRequest | None, in_reasoning: bool) -> OutputParser | HarmonyParser | None:
        """A parser for one choice, or None when the text passes through as it is. A forced
        call streams its arguments as they are written (the grammar keeps them valid)."""
        functions = {}
        if tools is not None and tools.choice != "none":
            functions = {f["name"]: f for f in tools.functions}
        forced = bool(functions) and tools is not None and tools.choice != "auto"
        if self.harmony:
            return HarmonyParser(functions, stream_calls=forced)
        if not self.reasoning and not (functions and self.tool_format):
            return None
        assert tools is not None or not functions
        single = tools is not None and (not tools.parallel or tools.choice not in ("auto", "required"))
        stream = forced and self.tool_format is not None and (self.tool_format.one_call_per_region or single)
        return OutputParser(self.tool_format, functions, self.reasoning, in_reasoning, stream_calls=stream)

    def starts_in_reasoning(self, prompt_tail: str) -> bool:
        """Templates that open the reasoning block in the prompt (DeepSeek-R1, Qwen3 thinking)."""
        if not self.reasoning:
            return False
        start, end = self.reasoning
        return prompt_tail.rfind(start) > prompt_tail.rfind(end)
