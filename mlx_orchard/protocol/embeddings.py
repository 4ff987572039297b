"""``/v1/embeddings``: request and response."""

from __future__ import annotations

import base64
from typing import Literal, cast

import numpy as np
from pydantic import BaseModel, Field, field_validator

from mlx_orchard.protocol.common import ModelRequest, OpenAIResponse

EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(ModelRequest):
    model: str
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    # Extension: cut inputs over the model's limit instead of answering 400.
    truncate: bool = False

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v):
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("input must not be empty")
        if len(items) > 2048:
            raise ValueError("at most 2048 inputs per request")
        for item in items:
            if isinstance(item, (str, list)) and len(item) == 0:
                raise ValueError("input must not contain empty strings or empty token lists")
        return v

    def texts_or_ids(self) -> list[str] | list[list[int]]:
        v = self.input
        if isinstance(v, str):
            return [v]
        if all(isinstance(x, int) for x in v):
            return [cast(list[int], list(v))]  # one input given as token ids
        return cast(list[str] | list[list[int]], list(v))


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(OpenAIResponse):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage

    @classmethod
    def build(cls, model: str, vectors: np.ndarray, prompt_tokens: int, encoding_format: str) -> EmbeddingResponse:
        if encoding_format == "base64":
            # OpenAI sends little-endian float32 bytes, base64-encoded.
            rows = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            rows = vectors.astype(np.float32).tolist()
        # Built from values we made ourselves: skip re-validating every float of every vector.
        return cls.model_construct(
            object="list",
            data=[Embedding.model_construct(object="embedding", index=i, embedding=row) for i, row in enumerate(rows)],
            model=model,
            usage=EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
        )
