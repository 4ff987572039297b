"""Sampling fields shared by chat and text completions, and their conversion to engine arguments."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from mlx_orchard.protocol.common import ModelRequest, StreamOptions, stop_list
from mlx_orchard.protocol.tools import check_schema
from mlx_orchard.wire import SamplingParams

_MAX_STOP_CHARS = 1024


class TextFormat(BaseModel):
    type: Literal["text"]


class JSONObjectFormat(BaseModel):
    type: Literal["json_object"]


class JSONSchemaSpec(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = Field(None, max_length=4096)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _bounded(cls, v):
        return check_schema(v)


class JSONSchemaFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]


class SamplingRequest(ModelRequest):
    model: str
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    # Keys are token ids: the engine checks them against the model's vocabulary.
    logit_bias: dict[int, float] | None = Field(None, max_length=300)
    n: int = Field(1, ge=1, le=16)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # OpenAI's: a 64-bit integer
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    user: str | None = Field(None, max_length=512)
    # Common extensions (vLLM, mlx-lm): accepted because many clients send them.
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    priority: int | None = Field(None, ge=-1000, le=1000, description="scheduling: lower runs first (vLLM's convention)")
    # Structured output, enforced while decoding: text, json_object or json_schema.
    response_format: ResponseFormat | None = None

    def json_schema_text(self) -> str | None:
        """The JSON schema the answer must match (``json_object``: any JSON object), as text."""
        match self.response_format:
            case JSONObjectFormat():
                return json.dumps({"type": "object"})
            case JSONSchemaFormat(json_schema=spec):
                return json.dumps(spec.schema_ if spec.schema_ is not None else {"type": "object"})
        return None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v):
        items = [v] if isinstance(v, str) else v or []
        if len(items) > 16:
            raise ValueError("at most 16 stop sequences")
        if any(len(s) > _MAX_STOP_CHARS for s in items):
            raise ValueError(f"each stop sequence is at most {_MAX_STOP_CHARS} characters")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v):
        if v and any(not -100 <= b <= 100 for b in v.values()):
            raise ValueError("logit_bias values must be between -100 and 100")
        return v

    def requested_max_tokens(self) -> int | None:
        raise NotImplementedError

    def requested_logprobs(self) -> int | None:
        """None: no logprobs; k: the chosen token's and the k most likely ones."""
        raise NotImplementedError

    def sampling_params(self) -> SamplingParams:
        """Engine arguments. Fields the request leaves unset stay None: the replica fills in
        the model's defaults."""
        return SamplingParams(
            max_tokens=self.requested_max_tokens(),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            stop=stop_list(self.stop),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty or 1.0,
            logit_bias=tuple((self.logit_bias or {}).items()),
            json_schema=self.json_schema_text(),
            logprobs=self.requested_logprobs(),
        )
