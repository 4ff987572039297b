"""``/v1/responses`` (OpenAI's Responses API): request, response object, output items and
stream events — the subset a local text model can honour; the rest is a 400."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from mlx_orchard.errors import InvalidRequestError
from mlx_orchard.protocol.common import ModelRequest, OpenAIResponse
from mlx_orchard.protocol.tools import FUNCTION_NAME, MAX_TOOLS, FunctionDefinition, check_schema, template_arguments, tool_request
from mlx_orchard.wire import ToolRequest

_MAX_ITEMS = 8192


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---- request ----


class InputText(BaseModel):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputImage(BaseModel):
    type: Literal["input_image"]
    image_url: str | None = Field(None, min_length=1, description="a data:image/...;base64 URL or an http(s) URL")
    file_id: str | None = None
    detail: Literal["auto", "low", "high"] = "auto"

    @model_validator(mode="after")
    def _has_url(self):
        if self.image_url is None:
            raise ValueError("input_image needs an image_url (file_id is not supported: this server keeps no files)")
        return self


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: str | Annotated[list[InputText | InputImage | dict[str, Any]], Field(max_length=1024)]
    id: str | None = None
    status: str | None = None

    def parts(self) -> str | list[dict[str, Any]]:
        """The content as chat templates take it (images as in ``ChatMessage.parts``)."""
        if isinstance(self.content, str):
            return self.content
        if not any(isinstance(p, InputImage) for p in self.content):
            return self.text()
        return [
            {"type": "image", "url": p.image_url, "detail": p.detail} if isinstance(p, InputImage)
            else {"type": "text", "text": _input_text(p)}
            for p in self.content
        ]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(_input_text(p) for p in self.content)


def _input_text(part: Any) -> str:
    if isinstance(part, InputText):
        return part.text
    kind = part.type if isinstance(part, InputImage) else part.get("type")
    raise InvalidRequestError(f"input content of type {kind!r} is not supported here", param="input")


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function_call"]
    call_id: str = Field(max_length=256)
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str = Field(max_length=1_000_000)
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["function_call_output"]
    call_id: str = Field(max_length=256)
    output: str | list[InputText]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class ReasoningText(BaseModel):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningInputItem(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = []
    content: list[ReasoningText] | None = None


InputItem = InputMessage | FunctionCallItem | FunctionCallOutputItem | ReasoningInputItem


class FunctionTool(FunctionDefinition):
    """The Responses API declares a function flat, beside its type."""

    type: Literal["function"]


class NamedFunction(BaseModel):
    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)


class TextFormatText(BaseModel):
    type: Literal["text"]


class TextFormatJSONObject(BaseModel):
    type: Literal["json_object"]


class TextFormatJSONSchema(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    type: Literal["json_schema"]
    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = Field(None, max_length=4096)
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, v):
        return check_schema(v)


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    format: Annotated[TextFormatText | TextFormatJSONObject | TextFormatJSONSchema, Field(discriminator="type")] | None = None
    verbosity: str | None = None


class ReasoningConfig(BaseModel):
    model_config = ConfigDict(extra="allow")

    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    summary: str | None = None


class ResponsesRequest(ModelRequest):
    model: str
    input: str | Annotated[list[InputItem], Field(max_length=_MAX_ITEMS)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[FunctionTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    previous_response_id: str | None = Field(None, max_length=256)
    store: StrictBool = True
    stream: StrictBool = False
    metadata: dict[str, str] | None = Field(None, max_length=16)
    user: str | None = Field(None, max_length=512)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    priority: int | None = Field(None, ge=-1000, le=1000, description="scheduling: lower runs first (vLLM's convention)")
    stop: str | list[str] | None = None  # an extension (the Responses API has none)

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("input must not be an empty list")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        self.tool_request()
        return self

    def tool_request(self) -> ToolRequest | None:
        choice = self.tool_choice
        name = choice.name if isinstance(choice, NamedFunction) else choice
        return tool_request([t.spec() for t in self.tools or []], name, self.parallel_tool_calls)

    def json_schema_text(self) -> str | None:
        fmt = self.text.format if self.text else None
        if isinstance(fmt, TextFormatJSONObject):
            return json.dumps({"type": "object"})
        if isinstance(fmt, TextFormatJSONSchema):
            return json.dumps(fmt.schema_)
        return None

    def input_messages(self) -> list[dict[str, Any]]:
        """The input items as chat-template messages: consecutive function calls join one
        assistant turn (after its text, if any), their outputs are tool turns."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        messages: list[dict[str, Any]] = []
        for item in self.input:
            if isinstance(item, InputMessage):
                role = "system" if item.role == "developer" else item.role
                messages.append({"role": role, "content": item.parts()})
            elif isinstance(item, FunctionCallItem):
                call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": template_arguments(item.arguments)}}
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)
                else:
                    messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            elif isinstance(item, FunctionCallOutputItem):
                messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
            # reasoning items: earlier turns' reasoning is not shown to the model again
        return messages


# ---- response ----


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[dict[str, Any]] | None = None


class OutputMessage(BaseModel):
    id: str = Field(default_factory=lambda: item_id("msg"))
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    content: list[OutputText] = []


class OutputFunctionCall(BaseModel):
    id: str = Field(default_factory=lambda: item_id("fc"))
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


class ReasoningContent(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class OutputReasoning(BaseModel):
    id: str = Field(default_factory=lambda: item_id("rs"))
    type: Literal["reasoning"] = "reasoning"
    summary: list[Any] = []
    content: list[ReasoningContent] = []
    status: Literal["in_progress", "completed", "incomplete"] | None = None


OutputItem = OutputReasoning | OutputMessage | OutputFunctionCall


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(OpenAIResponse):
    id: str = Field(default_factory=lambda: item_id("resp"))
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["completed", "failed", "in_progress", "incomplete"] = "completed"
    model: str
    output: list[OutputItem] = []
    instructions: str | None = None
    max_output_tokens: int | None = None
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = []
    text: dict[str, Any] | None = None
    store: bool = True
    metadata: dict[str, str] | None = None
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: ResponseError | None = None

    @property
    def output_text(self) -> str:
        return "".join(c.text for item in self.output if isinstance(item, OutputMessage) for c in item.content)


class ResponseDeleted(OpenAIResponse):
    id: str
    object: Literal["response"] = "response"
    deleted: bool = True
