"""The source-separation family: an upload and a description in, the described sound and
the rest out (SAM-Audio).

A separation is a few seconds to minutes of work, so requests queue (``max_ongoing_requests``
bounds them) and take turns chunk by chunk (10 s of audio each) on the replica's MLX thread:
a long file does not hold a short one back for its whole length, and a caller that goes away
frees the thread at the next chunk. Decoding and WAV encoding run off the MLX thread.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.mlx_thread import MLXThread
from deployments.multiplex import MultiplexedFamily
from mlx_orchard.audio import AudioDecodeError, decode_audio
from mlx_orchard.config import SeparationEntry
from mlx_orchard.engines.separation import Crossfade, SeparationEngine
from mlx_orchard.errors import InvalidRequestError
from mlx_orchard.families import PoolSpec
from mlx_orchard.models.registry import resolve_directory, separation_text_encoder
from mlx_orchard.protocol.separation import SeparationResponse
from mlx_orchard.runtime import release_mlx_memory


@dataclass
class _Separator:
    engine: SeparationEngine
    entry: SeparationEntry


@serve.deployment(name="separation", health_check_period_s=10)
class SeparationDeployment(MLXThread, MultiplexedFamily):

    async def __init__(self, spec: PoolSpec, manager: DeploymentHandle | None = None):  # type: ignore[misc]  # Ray awaits it
        self._init_mlx_thread("separation")
        self._requests = 0
        self._chunks = 0
        await self._init_pool(spec, manager)

    def resolve(self, entry: SeparationEntry) -> Path:  # type: ignore[override]
        return resolve_directory(entry.source)

    async def load_model(self, entry: SeparationEntry, path: Path) -> _Separator:  # type: ignore[override]
        # T5 lives in the directory, or is fetched here by the name in its config (once per load)
        text_encoder = await asyncio.to_thread(separation_text_encoder, path)
        engine = await self.on_mlx_thread(lambda: SeparationEngine(path, text_encoder_dir=text_encoder))
        return _Separator(engine, entry)

    async def release_memory(self) -> None:
        await self.on_mlx_thread(release_mlx_memory)

    async def separate(self, audio: bytes, *, description: str, steps: int = 16, method: str = "midpoint",
                       seed: int = 42, keep_alive_s: float | None = None) -> SeparationResponse:
        async with self.using(keep_alive_s=keep_alive_s) as model:
            engine = model.engine
            engine.check(description, steps, method)
            try:
                samples = await asyncio.to_thread(decode_audio, audio, max_seconds=model.entry.max_audio_seconds,
                                                  rate=engine.sample_rate)
            except AudioDecodeError as e:
                raise InvalidRequestError(str(e), param="file", code="invalid_audio_format") from e
            self._requests += 1
            text = await self.on_mlx_thread(engine.encode_description, description)
            joined = Crossfade(engine.sample_rate)
            for i, (start, end) in enumerate(engine.chunks(len(samples))):
                # one MLX job per chunk: other requests' chunks run in between, a cancelled caller stops here
                chunk = await self.on_mlx_thread(lambda s=samples[start:end], i=i: engine.separate_chunk(
                    s, text, steps=steps, method=method, seed=seed + i))
                joined.add(chunk)
                self._chunks += 1
            result = joined.result()
            self.metrics.processed(model.entry.name, "audio_seconds", len(samples) / engine.sample_rate)
            target, residual = await asyncio.gather(asyncio.to_thread(_wav_base64, result.target, engine.sample_rate),
                                                    asyncio.to_thread(_wav_base64, result.residual, engine.sample_rate))
            return SeparationResponse(target=target, residual=residual, sample_rate=engine.sample_rate)

    async def check_health(self) -> None:
        self.check_mlx_thread()
        await self.check_pool_health()

    def stats(self) -> dict:
        return {"requests": self._requests, "chunks": self._chunks, "at": time.time()}


def _wav_base64(samples: np.ndarray, rate: int) -> str:
    out = io.BytesIO()
    sf.write(out, np.clip(samples, -1.0, 1.0), rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(out.getvalue()).decode()
