"""Function tools as requests declare them, and the checks every API shares (chat
completions, Responses and Anthropic Messages declare them in their own shapes)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from mlx_orchard.wire import ToolRequest

MAX_TOOLS = 128  # OpenAI's limit
_MAX_SCHEMA_CHARS = 100_000
_MAX_SCHEMA_DEPTH = 64
FUNCTION_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


def check_schema(schema: dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON schema bounded in depth and size before it reaches json.dumps, a template or
    the grammar compiler (a deeply nested one would raise RecursionError there)."""
    if schema is None:
        return schema
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > _MAX_SCHEMA_DEPTH:
            raise ValueError(f"the JSON schema is nested deeper than {_MAX_SCHEMA_DEPTH} levels")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children)
    if len(json.dumps(schema)) > _MAX_SCHEMA_CHARS:
        raise ValueError(f"the JSON schema is longer than {_MAX_SCHEMA_CHARS} characters")
    return schema


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = Field(None, max_length=16_384)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _bounded(cls, v):
        return check_schema(v)

    def spec(self) -> dict[str, Any]:
        return function_spec(self.name, self.description, self.parameters)


class ChatTool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    name: str = Field(pattern=FUNCTION_NAME)


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


def function_spec(name: str, description: str | None, parameters: dict[str, Any] | None) -> dict[str, Any]:
    """A function as the replica takes it (and chat templates render it), from any API's shape."""
    out: dict[str, Any] = {"name": name, "parameters": parameters or {"type": "object", "properties": {}}}
    if description:
        out["description"] = description
    return out


def template_arguments(text: str) -> Any:
    """A call's arguments as chat templates expect them: a mapping (most render it with tojson)."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def tool_request(functions: list[dict[str, Any]] | None, choice: str | None, parallel: bool | None) -> ToolRequest | None:
    """What the replica gets; ``choice`` is auto / required / none or a function's name.
    Raises ValueError (a 400) when the choice names a function the request does not offer,
    or asks for a call with no tools."""
    if not functions:
        if choice not in (None, "none", "auto"):
            raise ValueError("tool_choice asks for a tool call but the request has no tools")
        return None
    names = [f["name"] for f in functions]
    if len(set(names)) != len(names):
        raise ValueError("two tools have the same name")
    choice = choice or "auto"
    if choice not in ("auto", "required", "none") and choice not in names:
        raise ValueError(f"tool_choice names {choice!r}, which is not one of the tools")
    return ToolRequest(functions=functions, choice=choice, parallel=True if parallel is None else parallel)
