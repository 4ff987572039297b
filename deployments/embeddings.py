"""The embeddings family: requests from many callers share one forward pass (``@serve.batch``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.batching import LiveBatching
from deployments.mlx_thread import MLXThread
from deployments.multiplex import MultiplexedFamily
from mlx_orchard.config import EmbeddingsEntry
from mlx_orchard.engines.embeddings import EmbeddingEngine, shorten
from mlx_orchard.families import PoolSpec
from mlx_orchard.models.registry import resolve_directory
from mlx_orchard.runtime import release_mlx_memory


class _Job:
    """One request's inputs, already checked, waiting for a batch."""

    def __init__(self, engine: EmbeddingEngine, ids: list[list[int]], dimensions: int | None):
        self.engine, self.ids, self.dimensions = engine, ids, dimensions
        self.abandoned = False  # its caller left: the rest of its work is skipped


@serve.deployment(name="embeddings", health_check_period_s=10)
class EmbeddingsDeployment(MLXThread, LiveBatching, MultiplexedFamily):
    batch_method = "_run_batch"

    async def __init__(self, spec: PoolSpec, manager: DeploymentHandle | None = None):  # type: ignore[misc]  # Ray awaits it
        self._init_mlx_thread("embeddings")
        self._init_batching()
        await self._init_pool(spec, manager)

    def resolve(self, entry: EmbeddingsEntry) -> Path:  # type: ignore[override]
        return resolve_directory(entry.source)

    async def load_model(self, entry: EmbeddingsEntry, path: Path) -> EmbeddingEngine:  # type: ignore[override]
        return await self.on_mlx_thread(
            lambda: EmbeddingEngine(path, supports_dimensions=entry.supports_dimensions, max_batch_tokens=entry.max_batch_tokens)
        )

    async def release_memory(self) -> None:
        await self.on_mlx_thread(release_mlx_memory)

    async def embed(
        self,
        inputs: list[str] | list[list[int]],
        *,
        truncate: bool = False,
        dimensions: int | None = None,
        keep_alive_s: float | None = None,
    ) -> tuple[np.ndarray, int]:
        """Vectors for one request's inputs, and the number of prompt tokens they used."""
        async with self.using(keep_alive_s=keep_alive_s) as engine:
            # Tokenizing a large request happens off the event loop (other callers keep batching).
            if inputs and isinstance(inputs[0], str):
                ids = await asyncio.to_thread(engine.tokenize, inputs)
            else:
                ids = [engine.add_special_tokens(list(x)) for x in inputs]  # type: ignore[arg-type]  # token ids
            # Checked alone (typed 4xx errors), so one bad request never fails the others in its batch.
            ids = engine.prepare(ids, truncate=truncate)
            engine.check_dimensions(dimensions)
            # A caller that leaves before its batch runs is dropped from it by Serve's batcher;
            # one that leaves while it runs has its remaining forward passes skipped.
            job = _Job(engine, ids, dimensions)
            try:
                vectors = await self._run_batch(job)
            except asyncio.CancelledError:
                job.abandoned = True
                raise
            tokens = sum(len(x) for x in ids)
            model = serve.get_multiplexed_model_id() or self._only_model()
            self.metrics.processed(model, "inputs", len(ids))
            self.metrics.processed(model, "tokens", tokens)
            return vectors, tokens

    @serve.batch  # its size and wait come from the pool's `batching` (reconfigure), nowhere else
    async def _run_batch(self, jobs: list[_Job]) -> list[np.ndarray]:
        # Serve splits batches by model id; one forward pass per engine all the same.
        with self.running_batch(len(jobs)):
            results: dict[int, np.ndarray] = {}
            for engine in {id(j.engine): j.engine for j in jobs}.values():
                group = [j for j in jobs if j.engine is engine]
                flat = [ids for job in group for ids in job.ids]
                owner = [job for job in group for _ in job.ids]
                vectors = await self.on_mlx_thread(
                    lambda e=engine, f=flat, o=owner: e.embed_prepared(f, wanted=lambda i: not o[i].abandoned)
                )
                start = 0
                for job in group:
                    results[id(job)] = shorten(vectors[start : start + len(job.ids)], job.dimensions)
                    start += len(job.ids)
            return [results[id(job)] for job in jobs]

    async def check_health(self) -> None:
        self.check_mlx_thread()
        await self.check_pool_health()

    def stats(self) -> dict:
        return self.batch_stats()
