"""``/v1/images/generations`` and ``/v1/images/edits``: OpenAI's fields, and the usual
extensions of local servers (``seed``, ``steps``, ``guidance``, ``negative_prompt``)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from mlx_orchard.protocol.common import ModelRequest

_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
Quality = Literal["auto", "low", "medium", "high", "standard", "hd"]
OutputFormat = Literal["png", "jpeg", "webp"]


class ImageRequest(ModelRequest):
    model: str
    prompt: str = Field(min_length=1, max_length=32000)
    n: int = Field(1, ge=1, le=10)
    size: str = Field("auto", description="WIDTHxHEIGHT in pixels, or auto (the model's default)")
    quality: Quality = "auto"
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: OutputFormat = "png"
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg and webp quality (default 100)")
    background: Literal["auto", "opaque", "transparent"] = "auto"
    stream: bool = False
    partial_images: int = Field(0, ge=0, le=3)
    # extensions
    seed: int | None = Field(None, ge=0, lt=2**32, description="image i uses seed + i; none: a random seed")
    steps: int | None = Field(None, ge=1, le=200, description="denoising steps (default from quality)")
    guidance: float | None = Field(None, ge=0.0, le=30.0)
    negative_prompt: str | None = Field(None, max_length=4000)

    @field_validator("size")
    @classmethod
    def _size(cls, v: str) -> str:
        if v != "auto" and not _SIZE.match(v):
            raise ValueError("size must be WIDTHxHEIGHT (e.g. 1024x1024) or auto")
        return v

    def dimensions(self, default: tuple[int, int] | None) -> tuple[int, int] | None:
        match = _SIZE.match(self.size)
        return (int(match[1]), int(match[2])) if match else default


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    background: Literal["transparent", "opaque"] | None = None
    output_format: OutputFormat | None = None
    quality: Literal["low", "medium", "high"] | None = None
    size: str | None = None


class _ImageEvent(BaseModel):
    b64_json: str
    background: Literal["transparent", "opaque", "auto"]
    created_at: int
    output_format: OutputFormat
    quality: Literal["low", "medium", "high", "auto"]
    size: str


class ImagePartial(_ImageEvent):
    """``image_generation.partial_image`` / ``image_edit.partial_image``."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"]
    partial_image_index: int


class ImageTokens(BaseModel):
    image_tokens: int
    text_tokens: int


class ImageUsage(BaseModel):
    input_tokens: int
    input_tokens_details: ImageTokens
    output_tokens: int
    total_tokens: int


class ImageCompleted(_ImageEvent):
    """``image_generation.completed`` / ``image_edit.completed``: one per image."""

    type: Literal["image_generation.completed", "image_edit.completed"]
    usage: ImageUsage
