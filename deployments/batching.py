"""``@serve.batch`` families: the batching knobs live (``user_config``), and batch stats."""

from __future__ import annotations

from collections import deque
from typing import Any

from ray.util import metrics

from mlx_orchard.config import BatchingOptions


class LiveBatching:
    """Mixin: the subclass names its ``@serve.batch`` method in ``batch_method`` and calls
    ``_init_batching`` in ``__init__``. Serve calls ``reconfigure`` with the deployment's
    ``user_config`` at start and on every config update, so every knob here is live."""

    batch_method = "_run_batch"

    def _init_batching(self, family: str, model: str) -> None:
        self._recent_batches: deque[int] = deque(maxlen=256)
        self._batch_count = 0
        self._batch_size = metrics.Histogram(
            "orchard_batch_size",
            "requests per executed batch",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
            tag_keys=("family", "model"),
        )
        self._batch_size.set_default_tags({"family": family, "model": model})

    def record_batch(self, size: int) -> None:
        self._batch_count += 1
        self._recent_batches.append(size)
        self._batch_size.observe(size)

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
