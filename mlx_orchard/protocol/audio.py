"""``/v1/audio/transcriptions`` and ``/v1/audio/translations``: the form, the response shapes,
and the text formats (text, srt, vtt) a transcription can be returned in."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from mlx_orchard.protocol.common import ModelRequest, OpenAIResponse

ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]


class TranscriptionForm(ModelRequest):
    """The multipart fields besides ``file``."""

    model: str
    language: str | None = Field(None, max_length=64)
    prompt: str | None = Field(None, max_length=8192)  # Whisper keeps the last 223 tokens of it
    response_format: ResponseFormat = "json"
    temperature: float = Field(0.0, ge=0.0, le=1.0)
    timestamp_granularities: list[Literal["word", "segment"]] = ["segment"]
    stream: bool = False


class TranscriptionWord(BaseModel):
    word: str
    start: float
    end: float


class TranscriptionSegment(BaseModel):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class Transcription(OpenAIResponse):
    text: str


class TranscriptionVerbose(OpenAIResponse):
    task: Literal["transcribe", "translate"] = "transcribe"
    language: str  # the language's English name, as OpenAI writes it ("english")
    duration: float
    text: str
    segments: list[TranscriptionSegment]
    words: list[TranscriptionWord] | None = None


class TranscriptDelta(BaseModel):
    type: Literal["transcript.text.delta"] = "transcript.text.delta"
    delta: str


class TranscriptDone(BaseModel):
    type: Literal["transcript.text.done"] = "transcript.text.done"
    text: str


def _timestamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(t: TranscriptionVerbose) -> str:
    blocks = [
        f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(t.segments, start=1)
    ]
    return "\n".join(blocks)


def to_vtt(t: TranscriptionVerbose) -> str:
    cues = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}\n" for s in t.segments]
    return "WEBVTT\n\n" + "\n".join(cues)
