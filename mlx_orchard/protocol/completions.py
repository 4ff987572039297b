"""``/v1/completions`` (legacy text completions): request, response and stream chunk."""

from __future__ import annotations

import time
from typing import Literal, cast

from pydantic import BaseModel, Field, field_validator, model_validator

from mlx_orchard.protocol.chat import completion_id
from mlx_orchard.protocol.common import OpenAIResponse, Usage
from mlx_orchard.protocol.sampling import SamplingRequest
from mlx_orchard.wire import TokenLogprob

Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    echo: bool = False
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5, description="legacy: the k most likely tokens at each step")

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    @model_validator(mode="after")
    def _bounded_fan_out(self):
        # Every prompt x n is a sequence in the batch: keep one request from flooding it.
        if len(self.prompts()) * self.n > 128:
            raise ValueError("at most 128 sequences (prompts x n) per request")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts, each text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [cast(list[int], list(p))]
        return cast(list[str | list[int]], list(p))


class CompletionLogprobs(BaseModel):
    """The legacy shape: parallel lists, one entry per token."""

    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


def completion_logprobs(items: list[TokenLogprob] | None) -> CompletionLogprobs | None:
    if items is None:
        return None
    offsets, at = [], 0
    for t in items:
        offsets.append(at)
        at += len(t.token)
    return CompletionLogprobs(
        tokens=[t.token for t in items],
        token_logprobs=[t.logprob for t in items],
        top_logprobs=[{a.token: a.logprob for a in t.top_logprobs} for t in items],
        text_offset=offsets,
    )


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: CompletionLogprobs | None = None


class Completion(OpenAIResponse):
    id: str = Field(default_factory=lambda: completion_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
