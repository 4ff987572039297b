"""``/v1/audio/separations``: mlx-audio server's form fields and answer."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from mlx_orchard.engines.separation import STEPS
from mlx_orchard.protocol.common import ModelRequest


class SeparationForm(ModelRequest):
    """The multipart fields beside ``file``."""

    model: str
    description: str = Field("speech", min_length=1, max_length=1000, description="what to extract: 'speech', 'drums', ...")
    method: Literal["midpoint", "euler"] = Field("midpoint", description="ODE solver (euler: faster, rougher)")
    steps: int = Field(16, description="ODE steps (2, 4, 8, 16 or 32): more is slower and cleaner")
    seed: int = Field(42, ge=0, lt=2**32, description="the starting noise: the same seed gives the same answer")

    @field_validator("steps")
    @classmethod
    def _documented_steps(cls, v: int) -> int:
        if v not in STEPS:
            raise ValueError(f"steps must be one of {', '.join(map(str, STEPS))}")
        return v


class SeparationResponse(BaseModel):
    target: str  # base64 WAV (16-bit PCM) of what the description names
    residual: str  # base64 WAV of everything else
    sample_rate: int
