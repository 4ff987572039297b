"""``/v1/chat/completions``: request, response and stream chunk, in the order of OpenAI's docs."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictBool, field_validator, model_serializer, model_validator

from mlx_orchard.errors import InvalidRequestError
from mlx_orchard.protocol.common import OpenAIRequest, OpenAIResponse, Usage
from mlx_orchard.protocol.sampling import SamplingRequest
from mlx_orchard.protocol.tools import FUNCTION_NAME, MAX_TOOLS, ChatTool, NamedToolChoice, template_arguments, tool_request
from mlx_orchard.wire import TokenLogprob, ToolRequest

_MAX_PARTS = 1024  # content parts per message


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str = Field(min_length=1, description="a data:image/...;base64 URL or an http(s) URL")
    detail: Literal["auto", "low", "high"] = "auto"


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _url_string(cls, v):  # some clients send the URL itself
        return {"url": v} if isinstance(v, str) else v


class CalledFunction(BaseModel):
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str = Field(max_length=1_000_000)


class MessageToolCall(BaseModel):
    id: str = Field(max_length=256)
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart | ImagePart | dict[str, Any]], Field(max_length=_MAX_PARTS)] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[MessageToolCall] | None = Field(None, max_length=MAX_TOOLS)  # assistant turns
    tool_call_id: str | None = Field(None, max_length=256)  # tool turns
    reasoning_content: str | None = None  # assistant turns, as this server returned them

    def template_message(self) -> dict[str, Any]:
        # "developer" is OpenAI's newer name for "system"; chat templates know "system".
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.parts()}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": template_arguments(c.function.arguments)}}
                for c in self.tool_calls
            ]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id or ""
            if self.name:
                out["name"] = self.name
        return out

    def parts(self) -> str | list[dict[str, Any]]:
        """The content as chat templates take it: text, or (with images) a list of text and
        image parts, each image ``{"type": "image", "url", "detail"}`` until the ingress
        has loaded it (see ``images.take_images``)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if not any(isinstance(p, ImagePart) for p in self.content):
            return self.text()
        out: list[dict[str, Any]] = []
        for part in self.content:
            if isinstance(part, ImagePart):
                out.append({"type": "image", "url": part.image_url.url, "detail": part.image_url.detail})
            else:
                out.append({"type": "text", "text": self._text_of(part)})
        return out

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(self._text_of(part) for part in self.content)

    @staticmethod
    def _text_of(part: Any) -> str:
        if isinstance(part, TextPart):
            return part.text
        kind = part.type if isinstance(part, ImagePart) else part.get("type")
        raise InvalidRequestError(f"content part of type {kind!r} is not supported here", param="messages")


_TEMPLATE_RESERVED = {"messages", "tools", "add_generation_prompt", "tokenize", "chat_template", "continue_final_message"}


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1, max_length=8192)
    max_completion_tokens: int | None = Field(None, ge=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated alias of max_completion_tokens")
    logprobs: StrictBool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    # vLLM's extension: extra variables for the chat template (enable_thinking=False, ...).
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v):
        if v is None:
            return v
        if set(v) & _TEMPLATE_RESERVED:
            raise ValueError(f"chat_template_kwargs may not set {sorted(set(v) & _TEMPLATE_RESERVED)}")
        if len(json.dumps(v)) > 16_384:
            raise ValueError("chat_template_kwargs is longer than 16384 characters")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        self.tool_request()  # a named tool that is not offered is a 400 now
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def tool_request(self) -> ToolRequest | None:
        choice = self.tool_choice
        name = choice.function.name if isinstance(choice, NamedToolChoice) else choice
        return tool_request([t.function.spec() for t in self.tools or []], name, self.parallel_tool_calls)

    def template_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            kwargs.setdefault("reasoning_effort", self.reasoning_effort)
        return kwargs

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.template_message() for m in self.messages]


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ChatToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class TopLogprobOut(BaseModel):
    token: str
    bytes: list[int] | None
    logprob: float


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None


def choice_logprobs(items: list[TokenLogprob] | None) -> ChoiceLogprobs | None:
    if items is None:
        return None
    return ChoiceLogprobs(
        content=[
            TokenLogprobOut(
                token=t.token,
                bytes=t.bytes,
                logprob=t.logprob,
                top_logprobs=[TopLogprobOut(token=a.token, bytes=a.bytes, logprob=a.logprob) for a in t.top_logprobs],
            )
            for t in items
        ]
    )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ChatToolCall] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason | None
    logprobs: ChoiceLogprobs | None = None


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ChatCompletion(OpenAIResponse):
    id: str = Field(default_factory=lambda: completion_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class _Sparse(BaseModel):
    """Sent without its unset fields, as OpenAI streams tool-call deltas: clients merge
    deltas key by key, so a ``"type": null`` in a fragment would erase the type."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunction(_Sparse):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Sparse):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(OpenAIResponse):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
