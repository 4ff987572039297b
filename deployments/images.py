"""The image family: prompts (and images to edit) in, encoded images out.

Concurrent jobs of one shape (size, steps, guidance) are one ``@serve.batch`` call and go
through the denoiser together where the engine batches the preset (FLUX.2-klein); a request
for ``n`` images is ``n`` jobs, so they batch with each other and with other requests.
Progress goes to the replica's log (the Ray dashboard shows it) and to metrics; partial
images and the final ones stream back as they are ready; a caller that leaves drops its
jobs at the next step.
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.batching import LiveBatching
from deployments.mlx_thread import MLXThread
from deployments.multiplex import MultiplexedFamily
from mlx_orchard.config import ImagesEntry
from mlx_orchard.engines.images import ImageEngine, ImageJob
from mlx_orchard.errors import InvalidRequestError
from mlx_orchard.families import PoolSpec
from mlx_orchard.models.registry import resolve_directory
from mlx_orchard.runtime import release_mlx_memory
from mlx_orchard.wire import ImageOut, ImagesStart

logger = logging.getLogger("ray.serve")
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@dataclass
class _ImageModel:
    engine: ImageEngine
    entry: ImagesEntry


@serve.deployment(name="images", health_check_period_s=10)
class ImagesDeployment(MLXThread, LiveBatching, MultiplexedFamily):
    batch_method = "_run_batch"

    async def __init__(self, spec: PoolSpec, manager: DeploymentHandle | None = None):  # type: ignore[misc]  # Ray awaits it
        self._init_mlx_thread("images")
        self._init_batching()
        self._requests = 0
        self._images = 0
        await self._init_pool(spec, manager)

    def resolve(self, entry: ImagesEntry) -> Path:  # type: ignore[override]
        return resolve_directory(entry.source)

    def estimate_bytes(self, entry: ImagesEntry, path: Path) -> int:  # type: ignore[override]
        if entry.memory_gb is not None:
            return int(entry.memory_gb * (1 << 30))
        from mlx_orchard.models.catalog import model_facts

        return int(model_facts(path).size_bytes * 1.5)  # weights, activations at full size, the VAE's decode

    async def load_model(self, entry: ImagesEntry, path: Path) -> _ImageModel:  # type: ignore[override]
        engine = await self.on_mlx_thread(lambda: ImageEngine(path, entry.preset, quantize=entry.quantize,
                                                              max_pixels=entry.max_pixels, max_steps=entry.max_steps))
        return _ImageModel(engine, entry)

    async def release_memory(self) -> None:
        await self.on_mlx_thread(release_mlx_memory)

    async def generate(self, prompt: str, *, n: int = 1, size: tuple[int, int] | None = None, quality: str = "auto",
                       steps: int | None = None, guidance: float | None = None, seed: int | None = None,
                       negative_prompt: str | None = None, output_format: str = "png", output_compression: int | None = None,
                       background: str = "auto", partial_images: int = 0, references: tuple[bytes, ...] = (),
                       mask: bytes | None = None, keep_alive_s: float | None = None) -> AsyncIterator[ImagesStart | ImageOut]:
        """``ImagesStart`` once every check passed, then each image (and its partial previews)
        encoded as it is ready, in no particular order. Leaving early drops the jobs."""
        async with self.using(keep_alive_s=keep_alive_s) as model:
            engine = model.engine
            if background == "transparent":
                raise InvalidRequestError("this model makes opaque images only (background: transparent)", param="background")
            width, height = size or tuple(int(v) for v in model.entry.default_size.split("x"))
            seed = secrets.randbelow(2**31) if seed is None else seed
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[tuple[int, Image.Image | Exception | None, int | None]] = asyncio.Queue()
            gone = False

            def partial(i: int):
                return lambda k, image: loop.call_soon_threadsafe(events.put_nowait, (i, image, k))

            jobs = [ImageJob(prompt, (seed + i) % 2**32, width, height, steps or engine.default_steps(quality), guidance,
                             negative_prompt, references, partial_images, partial(i), lambda: gone) for i in range(n)]
            for job in jobs:
                engine.check(job)
            self._requests += 1
            yield ImagesStart(width, height, jobs[0].steps, seed, self.served_by)

            async def run(i: int, job: ImageJob) -> None:
                try:
                    events.put_nowait((i, await self._run_batch((model, job)), None))
                except Exception as e:  # noqa: BLE001 - handed to the request, which fails with it
                    events.put_nowait((i, e, None))

            tasks = [asyncio.create_task(run(i, job)) for i, job in enumerate(jobs)]
            try:
                done = 0
                while done < n:
                    i, image, k = await events.get()
                    if isinstance(image, Exception):  # the batch failed: so does the request
                        raise image
                    assert image is not None  # None only for jobs whose caller left
                    if k is None:
                        done += 1
                        image = composite(image, references, mask)
                        self._images += 1
                        self.metrics.processed(model.entry.name, "images")
                    data = await asyncio.to_thread(encode, image, output_format, output_compression)
                    yield ImageOut(i, data, k)
            finally:
                gone = True  # the batch loop drops these jobs at its next step
                for task in tasks:
                    task.cancel()

    @serve.batch  # its size and wait come from the pool's `batching` (reconfigure)
    async def _run_batch(self, items: list[tuple[_ImageModel, ImageJob]]) -> list[Image.Image | None]:
        with self.running_batch(len(items)):
            out: dict[int, Image.Image | None] = {}
            groups: dict[tuple, list[int]] = {}
            for i, (model, job) in enumerate(items):
                groups.setdefault((id(model), job.shape()), []).append(i)
            for indices in groups.values():
                model = items[indices[0]][0]
                jobs = [items[i][1] for i in indices]
                name, size = model.entry.name, f"{jobs[0].width}x{jobs[0].height}"
                started = time.perf_counter()

                def progress(step: int, total: int, name=name, size=size, count=len(jobs)) -> None:
                    self.metrics.processed(name, "steps")  # denoising steps, one per batch
                    logger.info("images %s: step %d/%d of %d x %s", name, step, total, count, size)

                images = await self.on_mlx_thread(model.engine.generate, jobs, progress)
                logger.info("images %s: %d x %s in %.1f s", name, len(jobs), size, time.perf_counter() - started)
                out.update(zip(indices, images))
            return [out[i] for i in range(len(items))]

    async def check_health(self) -> None:
        self.check_mlx_thread()
        await self.check_pool_health()

    def stats(self) -> dict:
        return {"requests": self._requests, "images": self._images, **self.batch_stats(), "at": time.time()}


def composite(image: Image.Image, references: tuple[bytes, ...], mask: bytes | None) -> Image.Image:
    """With a mask (OpenAI's: transparent where the image is to change), the first image's
    pixels stay wherever the mask is opaque."""
    if mask is None or not references:
        return image
    with Image.open(io.BytesIO(references[0])) as original, Image.open(io.BytesIO(mask)) as alpha:
        keep = original.convert("RGB").resize(image.size, Image.Resampling.LANCZOS)
        change = alpha.getchannel("A").resize(image.size, Image.Resampling.NEAREST).point(lambda a: 255 if a == 0 else 0)
        return Image.composite(image, keep, change)


def encode(image: Image.Image, output_format: str, compression: int | None) -> bytes:
    out = io.BytesIO()
    options = {"quality": 100 if compression is None else compression} if output_format in ("jpeg", "webp") else {}
    image.convert("RGB").save(out, PIL_FORMATS[output_format], **options)
    return out.getvalue()
