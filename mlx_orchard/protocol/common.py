"""Shapes shared by every OpenAI surface: the lenient request base, usage, errors, models."""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlx_orchard.errors import InvalidRequestError

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


_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")
MAX_KEEP_ALIVE_S = 30 * 24 * 3600.0


def parse_keep_alive(value: float | str | None) -> float | None:
    """Ollama's ``keep_alive``: how long the model stays loaded after this request. Seconds
    (``300``, ``"300"``) or a duration (``"5m"``, ``"1h30m"``); negative: until evicted
    (``inf``); ``0``: unloaded as soon as it is idle; None: the pool's idle timeout."""
    if value is None:
        return None
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            match = _DURATION.match(text)
            if text and match:
                h, m, s = (float(g) if g else 0.0 for g in match.groups())
                seconds = h * 3600 + m * 60 + s
    if seconds is None or math.isnan(seconds):
        raise InvalidRequestError(
            "keep_alive must be seconds or a duration such as \"5m\" or \"1h\" (negative: keep loaded)",
            param="keep_alive",
        )
    if seconds < 0:
        return math.inf
    if seconds > MAX_KEEP_ALIVE_S:
        raise InvalidRequestError(f"keep_alive is at most {MAX_KEEP_ALIVE_S:g} seconds (or negative)", param="keep_alive")
    return seconds


class ModelRequest(OpenAIRequest):
    """A request that names a model: it may also say how long that model stays loaded."""

    keep_alive: float | str | None = Field(None, description="Ollama-style: seconds or \"5m\"; negative keeps it loaded")

    def keep_alive_s(self) -> float | None:
        return parse_keep_alive(self.keep_alive)

    @model_validator(mode="after")
    def _valid_keep_alive(self):
        self.keep_alive_s()
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


class ModelReplica(OpenAIResponse):
    """One replica that has the model loaded."""

    replica: str  # "<deployment>#<replica id>@<node id prefix>"
    deployment: str
    node_id: str
    pinned: bool
    in_flight: int
    loaded_at: int
    last_used: int
    size_bytes: int  # estimated memory it holds there (weights + KV budget)
    unloading: bool = False  # evicted: finishing its in-flight requests, then gone


class DownloadProgress(OpenAIResponse):
    bytes_done: int = 0
    bytes_total: int | None = None


class Quantization(OpenAIResponse):
    bits: int | None = None
    group_size: int | None = None


class ModelCard(OpenAIResponse):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "orchard"
    # Orchard's additions: which family serves it, where it is, what it weighs.
    family: str | None = None
    status: Literal["available", "downloading", "loaded", "failed"] | None = None
    loaded_on: list[ModelReplica] = []
    size_bytes: int | None = None
    quantization: Quantization | None = None
    context_length: int | None = None
    source: str | None = None  # "config", "local" (a search dir), "hf-cache", "hub" (being fetched)
    repo_id: str | None = None
    revision: str | None = None
    pinned: bool | None = None
    download: DownloadProgress | None = None
    reason: str | None = None  # why it failed (status "failed"); not `error`, which reads as a failed request


class ModelList(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ModelDeleted(OpenAIResponse):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


def stop_list(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else list(stop)
    return tuple(s for s in items if s)
