"""The speech-to-text family: short clips from concurrent requests decode as one batch."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from mlx_whisper.audio import N_SAMPLES
from mlx_whisper.tokenizer import LANGUAGES
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.batching import LiveBatching
from deployments.mlx_thread import MLXThread
from deployments.multiplex import MultiplexedFamily
from mlx_orchard.audio import SAMPLE_RATE, AudioDecodeError, decode_audio
from mlx_orchard.config import BatchingOptions, WhisperEntry
from mlx_orchard.engines.whisper import ClipRequest, TranscriptionResult, WhisperEngine
from mlx_orchard.errors import InvalidRequestError
from mlx_orchard.families import PoolSpec
from mlx_orchard.models.registry import resolve_whisper
from mlx_orchard.protocol.audio import (
    TranscriptionSegment,
    TranscriptionVerbose,
    TranscriptionWord,
)
from mlx_orchard.runtime import release_mlx_memory


@serve.deployment(name="whisper", health_check_period_s=10)
class WhisperDeployment(MLXThread, LiveBatching, MultiplexedFamily):
    batch_method = "_run_batch"

    async def __init__(self, spec: PoolSpec, manager: DeploymentHandle | None = None):  # type: ignore[misc]  # Ray awaits it
        self._init_mlx_thread("whisper")
        self._init_batching()
        batching = spec.batching()
        self.max_batch_size = batching.max_batch_size if batching else 8
        await self._init_pool(spec, manager)

    def resolve(self, entry: WhisperEntry) -> Path:  # type: ignore[override]
        return resolve_whisper(entry.source, sha256=entry.sha256)

    async def load_model(self, entry: WhisperEntry, path: Path) -> _Whisper:  # type: ignore[override]
        engine = await self.on_mlx_thread(lambda: WhisperEngine(path, max_batch_size=self.max_batch_size))
        return _Whisper(entry.name, engine, entry.max_audio_seconds)

    async def release_memory(self) -> None:
        await self.on_mlx_thread(release_mlx_memory)

    async def transcribe(
        self,
        audio: bytes,
        *,
        task: Literal["transcribe", "translate"] = "transcribe",
        language: str | None = None,
        prompt: str | None = None,
        temperature: float = 0.0,
        word_timestamps: bool = False,
        keep_alive_s: float | None = None,
    ) -> TranscriptionVerbose:
        async with self.using(keep_alive_s=keep_alive_s) as model:
            engine = model.engine
            # Everything that can fail for this request alone fails here, before it joins a batch.
            try:
                samples = await asyncio.to_thread(decode_audio, audio, max_seconds=model.max_audio_seconds)
            except AudioDecodeError as e:
                raise InvalidRequestError(str(e), param="file", code="invalid_audio_format") from e
            result = await self._transcribe(engine, samples, task, language, prompt, temperature, word_timestamps)
            self.metrics.processed(model.name, "audio_seconds", len(samples) / SAMPLE_RATE)
            return _verbose(result, task)

    async def transcribe_pcm(self, samples: np.ndarray, *, language: str | None = None, prompt: str | None = None,
                             keep_alive_s: float | None = None) -> str:
        """The text of raw 16 kHz float32 audio (live transcription sends it: no container to
        decode), batched with every other request."""
        async with self.using(keep_alive_s=keep_alive_s) as model:
            if samples.ndim != 1 or samples.dtype != np.float32 or len(samples) > model.max_audio_seconds * SAMPLE_RATE:
                raise InvalidRequestError("live audio must be mono float32 within the model's length limit", param="audio")
            result = await self._transcribe(model.engine, samples, "transcribe", language, prompt, 0.0, False)
            self.metrics.processed(model.name, "audio_seconds", len(samples) / SAMPLE_RATE)
            return result.text

    async def _transcribe(self, engine: WhisperEngine, samples: np.ndarray, task: Literal["transcribe", "translate"],
                          language: str | None, prompt: str | None, temperature: float, word_timestamps: bool
                          ) -> TranscriptionResult:
        language = engine.normalize_language(language)
        clip = ClipRequest(samples, task, language, prompt or None, temperature, word_timestamps)
        if len(samples) <= N_SAMPLES:
            return await self._run_batch((engine, clip))
        # long audio: mlx-whisper's sliding window, on the same MLX thread
        return (await self.on_mlx_thread(engine.transcribe, [clip]))[0]

    @serve.batch  # its size and wait come from the pool's `batching` (reconfigure), nowhere else
    async def _run_batch(self, clips: list[tuple[WhisperEngine, ClipRequest]]) -> list[TranscriptionResult]:
        # Serve splits batches by model id; grouped by engine all the same.
        with self.running_batch(len(clips)):
            results: dict[int, TranscriptionResult] = {}
            for engine in {id(e): e for e, _ in clips}.values():
                group = [(i, c) for i, (e, c) in enumerate(clips) if e is engine]
                out = await self.on_mlx_thread(engine.transcribe, [c for _, c in group])
                results.update({i: r for (i, _), r in zip(group, out)})
            return [results[i] for i in range(len(clips))]

    def apply_batching(self, options: BatchingOptions) -> None:
        # The engines split what one @serve.batch call hands them at this size too.
        self.max_batch_size = options.max_batch_size
        pool = getattr(self, "pool", None)  # reconfigure runs before the pool exists
        for slot in pool.slots.values() if pool is not None else []:
            slot.model.engine.max_batch_size = options.max_batch_size

    async def check_health(self) -> None:
        self.check_mlx_thread()
        await self.check_pool_health()

    def stats(self) -> dict:
        return self.batch_stats()


@dataclass
class _Whisper:
    name: str
    engine: WhisperEngine
    max_audio_seconds: float


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
