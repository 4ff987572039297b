"""Shapes shared by every OpenAI surface: the lenient request base, usage, errors, models."""

from __future__ import annotations

import logging
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

logger = logging.getLogger("orchard.protocol")


class OpenAIRequest(BaseModel):
    """Base for request bodies: unknown fields are accepted (clients send many) and logged."""

    # NaN and Infinity (which Python's JSON parser accepts) never pass as numbers.
    model_config = ConfigDict(extra="allow", protected_namespaces=(), allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        # JSON's \ud800 escapes (and CESU-8 bytes, which Python's decoder lets through) make
        # strings that no tokenizer or UTF-8 encoder accepts: refuse them with the request.
        stack = [data]
        while stack:
            value = stack.pop()
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("text must be valid Unicode (a lone surrogate was found)") from None
            elif isinstance(value, dict):
                stack.extend(value.keys())
                stack.extend(value.values())
            elif isinstance(value, list):
                stack.extend(value)
        return data

    @model_validator(mode="after")
    def _log_unknown_fields(self):
        if self.model_extra:
            logger.info("ignoring unsupported fields: %s", sorted(self.model_extra))
        return self


class OpenAIResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(OpenAIResponse):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelCard(OpenAIResponse):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "orchard"
    # Orchard's own addition: which family serves this model.
    family: str | None = None


class ModelList(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def stop_list(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else list(stop)
    return tuple(s for s in items if s)
