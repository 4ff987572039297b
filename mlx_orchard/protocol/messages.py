"""``/v1/messages`` (Anthropic's Messages API): request, message and stream events, as the
Anthropic SDK and Claude Code send and read them."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mlx_orchard.errors import InvalidRequestError
from mlx_orchard.protocol.common import ModelRequest, stop_list
from mlx_orchard.protocol.tools import FUNCTION_NAME, MAX_TOOLS, check_schema, function_spec, tool_request
from mlx_orchard.wire import SamplingParams, ToolRequest


def message_id() -> str:
    return f"msg_{uuid.uuid4().hex}"


class _Block(BaseModel):
    model_config = ConfigDict(extra="allow")  # cache_control, citations, ...


class TextBlock(_Block):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str = Field(max_length=256)
    name: str = Field(pattern=FUNCTION_NAME)
    input: dict[str, Any]


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str = Field(max_length=256)
    content: str | list[TextBlock | dict[str, Any]] | None = None
    is_error: bool | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if not isinstance(part, TextBlock):
                raise InvalidRequestError(f"tool_result content of type {part.get('type')!r} is not supported", param="messages")
            parts.append(part.text)
        return "".join(parts)


class ImageSource(BaseModel):
    type: Literal["base64", "url"]
    media_type: Literal["image/png", "image/jpeg", "image/webp", "image/gif"] | None = None
    data: str | None = None
    url: str | None = None

    @model_validator(mode="after")
    def _complete(self):
        if self.type == "base64" and (self.data is None or self.media_type is None):
            raise ValueError("a base64 image source needs media_type and data")
        if self.type == "url" and not self.url:
            raise ValueError("a url image source needs a url")
        return self

    def as_url(self) -> str:
        return f"data:{self.media_type};base64,{self.data}" if self.type == "base64" else str(self.url)


class ImageBlock(_Block):
    type: Literal["image"]
    source: ImageSource


class ThinkingBlock(_Block):
    type: Literal["thinking", "redacted_thinking"]
    thinking: str | None = None


Block = Annotated[TextBlock | ImageBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")]


class InputMessage(BaseModel):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[Block | dict[str, Any]], Field(max_length=1024)]

    def blocks(self) -> list[Any]:
        if isinstance(self.content, str):
            return [TextBlock(type="text", text=self.content)]
        for block in self.content:
            if isinstance(block, dict):
                raise InvalidRequestError(
                    f"content blocks of type {block.get('type')!r} are not supported by a text model", param="messages"
                )
        return list(self.content)


class Tool(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = Field(None, max_length=16_384)
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None

    @field_validator("input_schema")
    @classmethod
    def _bounded(cls, v):
        return check_schema(v)


class ToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, pattern=FUNCTION_NAME)
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(BaseModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=0)


class SystemText(_Block):
    type: Literal["text"]
    text: str


class MessagesRequest(ModelRequest):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[InputMessage] = Field(min_length=1, max_length=8192)
    system: str | list[SystemText] | None = None
    stop_sequences: list[str] | None = Field(None, max_length=16)
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    metadata: dict[str, Any] | None = None
    priority: int | None = Field(None, ge=-1000, le=1000, description="scheduling: lower runs first (vLLM's convention)")

    @field_validator("stop_sequences")
    @classmethod
    def _short_stops(cls, v):
        if v and any(len(s) > 1024 for s in v):
            raise ValueError("each stop sequence is at most 1024 characters")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.tool_choice and self.tool_choice.type == "tool" and not self.tool_choice.name:
            raise ValueError("tool_choice of type tool needs a name")
        self.tool_request()
        return self

    def tool_request(self) -> ToolRequest | None:
        functions = [function_spec(t.name, t.description, t.input_schema) for t in self.tools or []]
        choice = self.tool_choice
        name = None if choice is None else {"auto": "auto", "any": "required", "none": "none"}.get(choice.type, choice.name)
        parallel = None if choice is None or choice.disable_parallel_tool_use is None else not choice.disable_parallel_tool_use
        return tool_request(functions, name, parallel)

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            stop=stop_list(self.stop_sequences),
        )

    def template_kwargs(self) -> dict[str, Any]:
        # Templates that can switch thinking on and off (Qwen3) read enable_thinking.
        if self.thinking is None:
            return {}
        return {"enable_thinking": self.thinking.type != "disabled"}

    def template_messages(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self.system:
            text = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)
            out.append({"role": "system", "content": text})
        for message in self.messages:
            texts: list[dict[str, Any]] = []
            calls, results = [], []
            for block in message.blocks():
                if isinstance(block, TextBlock):
                    texts.append({"type": "text", "text": block.text})
                elif isinstance(block, ImageBlock):  # loaded by the ingress, as chat's image parts
                    texts.append({"type": "image", "url": block.source.as_url(), "detail": "auto"})
                elif isinstance(block, ToolUseBlock):
                    calls.append({"id": block.id, "type": "function", "function": {"name": block.name, "arguments": block.input}})
                elif isinstance(block, ToolResultBlock):
                    results.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()})
            out.extend(results)  # tool results answer the previous assistant turn
            if texts or calls or not results:
                images = any(t["type"] == "image" for t in texts)
                turn: dict[str, Any] = {"role": message.role, "content": texts if images else "".join(t["text"] for t in texts)}
                if calls:
                    turn["tool_calls"] = calls
                out.append(turn)
        return out


# ---- response ----


class Usage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


class Message(BaseModel):
    id: str = Field(default_factory=message_id)
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None = None
    stop_sequence: str | None = None
    usage: Usage


def stop_reason(finish: str | None, stop_sequence: str | None) -> str | None:
    if finish == "length":
        return "max_tokens"
    if finish == "tool_calls":
        return "tool_use"
    if stop_sequence is not None:
        return "stop_sequence"
    return "end_turn" if finish else None


def tool_use_block(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """A call as a tool_use block; a call cut short by max_tokens (arguments that are not a
    JSON object yet) comes back as the text it has."""
    try:
        value = json.loads(arguments)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        return {"type": "text", "text": arguments}
    return {"type": "tool_use", "id": call_id, "name": name, "input": value}
