"""The speech-to-text family: short clips from concurrent requests decode as one batch."""

from __future__ import annotations

import asyncio
from typing import Literal

from mlx_whisper.audio import N_SAMPLES
from mlx_whisper.tokenizer import LANGUAGES
from ray import serve

from deployments.batching import LiveBatching
from deployments.mlx_thread import MLXThread
from mlx_orchard.audio import AudioDecodeError, decode_audio
from mlx_orchard.config import BatchingOptions, WhisperEntry
from mlx_orchard.engines.whisper import ClipRequest, TranscriptionResult, WhisperEngine
from mlx_orchard.errors import InvalidRequestError
from mlx_orchard.models.registry import resolve_whisper
from mlx_orchard.protocol.audio import (
    TranscriptionSegment,
    TranscriptionVerbose,
    TranscriptionWord,
)


@serve.deployment(name="whisper", health_check_period_s=10)
class WhisperDeployment(MLXThread, LiveBatching):
    batch_method = "_run_batch"

    def __init__(self, entry: WhisperEntry):
        self.name = entry.name
        self.max_audio_seconds = entry.max_audio_seconds
        self._init_mlx_thread("whisper")
        self._init_batching("whisper", entry.name)
        path = resolve_whisper(entry.source, sha256=entry.sha256)
        self.engine = self.construct_on_mlx_thread(
            WhisperEngine, path, max_batch_size=entry.batching.max_batch_size
        )

    async def transcribe(
        self,
        audio: bytes,
        *,
        task: Literal["transcribe", "translate"] = "transcribe",
        language: str | None = None,
        prompt: str | None = None,
        temperature: float = 0.0,
        word_timestamps: bool = False,
    ) -> TranscriptionVerbose:
        # Everything that can fail for this request alone fails here, before it joins a batch.
        try:
            samples = await asyncio.to_thread(decode_audio, audio, max_seconds=self.max_audio_seconds)
        except AudioDecodeError as e:
            raise InvalidRequestError(str(e), param="file", code="invalid_audio_format") from e
        language = self.engine.normalize_language(language)
        clip = ClipRequest(samples, task, language, prompt or None, temperature, word_timestamps)
        if len(samples) <= N_SAMPLES:
            result = await self._run_batch(clip)
        else:  # long audio: mlx-whisper's sliding window, on the same MLX thread
            result = (await self.on_mlx_thread(self.engine.transcribe, [clip]))[0]
        return _verbose(result, task)

    @serve.batch  # its size and wait come from the entry's `batching` (reconfigure), nowhere else
    async def _run_batch(self, clips: list[ClipRequest]) -> list[TranscriptionResult]:
        self.record_batch(len(clips))
        return await self.on_mlx_thread(self.engine.transcribe, clips)

    def apply_batching(self, options: BatchingOptions) -> None:
        # The engine splits what one @serve.batch call hands it at this size too.
        self.engine.max_batch_size = options.max_batch_size

    def stats(self) -> dict:
        return self.batch_stats()


def _verbose(result: TranscriptionResult, task: Literal["transcribe", "translate"]) -> TranscriptionVerbose:
    segments = [
        TranscriptionSegment(
            id=s.id, seek=s.seek, start=s.start, end=s.end, text=s.text, tokens=s.tokens,
            temperature=s.temperature, avg_logprob=s.avg_logprob,
            compression_ratio=s.compression_ratio, no_speech_prob=s.no_speech_prob,
        )  # fmt: skip
        for s in result.segments
    ]
    words = None
    if result.words is not None:
        words = [TranscriptionWord(word=w.word, start=w.start, end=w.end) for w in result.words]
    return TranscriptionVerbose(
        task=task,
        language=LANGUAGES.get(result.language, result.language),
        duration=result.duration,
        text=result.text,
        segments=segments,
        words=words,
    )
