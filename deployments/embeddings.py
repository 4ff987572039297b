"""The embeddings family: requests from many callers share one forward pass (``@serve.batch``)."""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve

from deployments.batching import LiveBatching
from deployments.mlx_thread import MLXThread
from mlx_orchard.config import EmbeddingsEntry
from mlx_orchard.engines.embeddings import EmbeddingEngine, shorten
from mlx_orchard.models.registry import resolve_directory


class _Job:
    """One request's inputs, already checked, waiting for a batch."""

    def __init__(self, ids: list[list[int]], dimensions: int | None):
        self.ids, self.dimensions = ids, dimensions
        self.abandoned = False  # its caller left: the rest of its work is skipped


@serve.deployment(name="embeddings", health_check_period_s=10)
class EmbeddingsDeployment(MLXThread, LiveBatching):
    batch_method = "_run_batch"

    def __init__(self, entry: EmbeddingsEntry):
        self.name = entry.name
        self._init_mlx_thread("embeddings")
        self._init_batching("embeddings", entry.name)
        path = resolve_directory(entry.source)
        self.engine = self.construct_on_mlx_thread(
            EmbeddingEngine,
            path,
            supports_dimensions=entry.supports_dimensions,
            max_batch_tokens=entry.max_batch_tokens,
        )

    async def embed(
        self, inputs: list[str] | list[list[int]], *, truncate: bool = False, dimensions: int | None = None
    ) -> tuple[np.ndarray, int]:
        """Vectors for one request's inputs, and the number of prompt tokens they used."""
        # Tokenizing a large request happens off the event loop (other callers keep batching).
        if inputs and isinstance(inputs[0], str):
            ids = await asyncio.to_thread(self.engine.tokenize, inputs)
        else:
            ids = [self.engine.add_special_tokens(list(x)) for x in inputs]  # type: ignore[arg-type]  # token ids
        # Checked alone (typed 4xx errors), so one bad request never fails the others in its batch.
        ids = self.engine.prepare(ids, truncate=truncate)
        self.engine.check_dimensions(dimensions)
        # A caller that leaves before its batch runs is dropped from it by Serve's batcher;
        # one that leaves while it runs has its remaining forward passes skipped.
        job = _Job(ids, dimensions)
        try:
            vectors = await self._run_batch(job)
        except asyncio.CancelledError:
            job.abandoned = True
            raise
        return vectors, sum(len(x) for x in ids)

    @serve.batch  # its size and wait come from the entry's `batching` (reconfigure), nowhere else
    async def _run_batch(self, jobs: list[_Job]) -> list[np.ndarray]:
        self.record_batch(len(jobs))
        flat = [ids for job in jobs for ids in job.ids]
        owner = [job for job in jobs for _ in job.ids]
        vectors = await self.on_mlx_thread(
            lambda: self.engine.embed_prepared(flat, wanted=lambda i: not owner[i].abandoned)
        )
        out, start = [], 0
        for job in jobs:
            out.append(shorten(vectors[start : start + len(job.ids)], job.dimensions))
            start += len(job.ids)
        return out

    def stats(self) -> dict:
        return self.batch_stats()
