"""The text-to-speech family: text in, encoded audio out, streamed sentence by sentence.

Kokoro synthesizes one chunk per forward pass, so requests queue (``max_ongoing_requests``
bounds them) and take turns chunk by chunk on the replica's MLX thread: a long text does
not hold a short one back for its whole length, and every request's first audio comes after
one chunk of work. Phonemizing runs off the MLX thread; encoding too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.mlx_thread import MLXThread
from deployments.multiplex import MultiplexedFamily
from mlx_orchard.audio_out import MEDIA_TYPES, AudioEncodeError, StreamEncoder
from mlx_orchard.config import TTSEntry
from mlx_orchard.engines.speech import SpeechEngine
from mlx_orchard.errors import InvalidRequestError
from mlx_orchard.families import PoolSpec
from mlx_orchard.models.registry import resolve_tts
from mlx_orchard.runtime import release_mlx_memory
from mlx_orchard.wire import SpeechEnd, SpeechStart


@dataclass
class _Speech:
    engine: SpeechEngine
    entry: TTSEntry


@serve.deployment(name="tts", health_check_period_s=10)
class SpeechDeployment(MLXThread, MultiplexedFamily):

    async def __init__(self, spec: PoolSpec, manager: DeploymentHandle | None = None):  # type: ignore[misc]  # Ray awaits it
        self._init_mlx_thread("tts")
        self._requests = 0
        self._chunks = 0
        await self._init_pool(spec, manager)

    def resolve(self, entry: TTSEntry) -> Path:  # type: ignore[override]
        return resolve_tts(entry.source, sha256=entry.sha256, extra_voices=entry.voices_dir)

    async def load_model(self, entry: TTSEntry, path: Path) -> _Speech:  # type: ignore[override]
        engine = await self.on_mlx_thread(lambda: SpeechEngine(path, lang_code=entry.lang_code))
        return _Speech(engine, entry)

    async def release_memory(self) -> None:
        await self.on_mlx_thread(release_mlx_memory)

    async def voices(self, keep_alive_s: float | None = None) -> list[str]:
        async with self.using(keep_alive_s=keep_alive_s) as model:
            return model.engine.voices

    async def speak(self, text: str, *, voice: str, response_format: str = "mp3", speed: float = 1.0,
                    lang_code: str | None = None, ref_audio: str | None = None,
                    keep_alive_s: float | None = None) -> AsyncIterator[SpeechStart | bytes | SpeechEnd]:
        """``SpeechStart`` once the request passed its checks, then the encoded audio's bytes
        as each chunk is synthesized, then ``SpeechEnd``. Leaving early stops the work."""
        async with self.using(keep_alive_s=keep_alive_s) as model:
            engine = model.engine
            engine.check(text, voice, speed)
            if ref_audio:
                raise InvalidRequestError("this model cannot clone voices (ref_audio); pick one of its voices",
                                          param="ref_audio")
            if lang_code is not None and lang_code != model.entry.lang_code:
                raise InvalidRequestError(f"this model speaks lang_code {model.entry.lang_code!r}", param="lang_code")
            chunks = await asyncio.to_thread(engine.phonemize, text)
            if not chunks:
                raise InvalidRequestError("input has nothing to say (no pronounceable words)", param="input")
            try:
                encoder = StreamEncoder(engine.sample_rate, response_format)
            except AudioEncodeError as e:
                raise InvalidRequestError(str(e), param="response_format") from e
            phonemes = sum(len(c.phonemes) for c in chunks)
            self._requests += 1
            yield SpeechStart(MEDIA_TYPES[response_format], engine.sample_rate, len(chunks), phonemes, self.served_by)
            samples = 0
            try:
                for chunk in chunks:
                    audio = await self.on_mlx_thread(engine.synthesize, chunk, voice, speed)
                    self._chunks += 1
                    samples += len(audio)
                    data = await asyncio.to_thread(encoder.feed, audio)
                    if data:
                        yield data
                rest = await asyncio.to_thread(encoder.close)
                if rest:
                    yield rest
            except BaseException:
                encoder.abort()
                raise
            finally:
                if samples:
                    self.metrics.processed(model.entry.name, "audio_seconds", samples / engine.sample_rate)
            yield SpeechEnd(phonemes, samples)

    async def check_health(self) -> None:
        self.check_mlx_thread()
        await self.check_pool_health()

    def stats(self) -> dict:
        return {"requests": self._requests, "chunks": self._chunks, "at": time.time()}
