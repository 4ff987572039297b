"""``/v1/audio/speech`` and ``/v1/audio/voices``: OpenAI's fields, mlx-audio server's extensions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from mlx_orchard.protocol.common import ModelRequest

SpeechFormat = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]


class SpeechRequest(ModelRequest):
    model: str
    input: str = Field(min_length=1, max_length=4096)
    voice: str = Field(min_length=1, max_length=128)
    instructions: str | None = Field(None, max_length=4096, description="style instructions (models that take them)")
    response_format: SpeechFormat = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = "audio"
    # mlx-audio server's extensions
    lang_code: Literal["a", "b"] | None = Field(None, description="a: American English, b: British English")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    ref_audio: str | None = Field(None, max_length=32_000_000, description="voice cloning: base64 audio (models that clone)")
    ref_text: str | None = Field(None, max_length=4096, description="what ref_audio says")
    streaming_interval: float | None = Field(None, gt=0, le=60, description="accepted; audio is sent per sentence")


class SpeechUsage(BaseModel):
    input_tokens: int  # phonemes
    output_tokens: int  # audio samples / 100 (10 ms frames)
    total_tokens: int


class SpeechAudioDelta(BaseModel):
    type: Literal["speech.audio.delta"] = "speech.audio.delta"
    audio: str  # base64 of this chunk, in response_format


class SpeechAudioDone(BaseModel):
    type: Literal["speech.audio.done"] = "speech.audio.done"
    usage: SpeechUsage


class Voice(BaseModel):
    id: str
    name: str


class VoiceList(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[Voice]
