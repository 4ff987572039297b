"""``@serve.batch`` families: the batching knobs live (``user_config``), and batch stats."""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterator
from typing import Any

from ray import serve

from deployments.metrics import PoolMetrics
from mlx_orchard.config import BatchingOptions


class LiveBatching:
    """Mixin: the subclass names its ``@serve.batch`` method in ``batch_method`` and calls
    ``_init_batching`` in ``__init__``. Serve calls ``reconfigure`` with the deployment's
    ``user_config`` at start and on every config update, so every knob here is live.
    The batch method runs its batch inside ``with self.running_batch(len(batch)):``."""

    batch_method = "_run_batch"

    executing: Any  # MultiplexedFamily's: requests being computed now, per model
    metrics: PoolMetrics  # MultiplexedFamily's

    def _init_batching(self) -> None:
        self._recent_batches: deque[int] = deque(maxlen=256)
        self._batch_count = 0

    @contextlib.contextmanager
    def running_batch(self, size: int) -> Iterator[None]:
        """Counts a batch while it runs: its size, and its requests as no longer queued. Serve
        forms each batch from one model's requests (their multiplexed model id)."""
        model = serve.get_multiplexed_model_id()
        self._batch_count += 1
        self._recent_batches.append(size)
        self.metrics.batch_size.observe(size, tags={"model": model})
        self.executing[model] += size
        try:
            yield
        finally:
            self.executing[model] -= size

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        options = BatchingOptions.model_validate(user_config)
        batch = getattr(self, self.batch_method)
        batch.set_max_batch_size(options.max_batch_size)
        batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
        self.apply_batching(options)

    def apply_batching(self, options: BatchingOptions) -> None:
        """Hook for knobs the engine itself holds (a family's own split of large batches)."""

    def batch_stats(self) -> dict[str, Any]:
        recent = list(self._recent_batches)
        return {"batches": self._batch_count, "recent_sizes": recent, "largest": max(recent, default=0)}
