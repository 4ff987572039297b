"""What the ``@serve.batch`` families share: one MLX thread, live batching knobs, batch stats."""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from ray.util import metrics

from mlx_orchard.config import BatchingOptions

T = TypeVar("T")


class BatchedFamily:
    """Mixin: the subclass names its ``@serve.batch`` method in ``batch_method``."""

    batch_method = "_run_batch"

    def _init_batching(self, family: str, model: str) -> None:
        # All MLX work of a replica runs on this one thread, so the event loop stays free
        # to collect the next batch while the current one computes.
        self._mlx = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"orchard-{family}-mlx")
        self._mlx_closed = False
        self._recent_batches: deque[int] = deque(maxlen=256)
        self._batch_count = 0
        self._batch_size = metrics.Histogram(
            "orchard_batch_size",
            "requests per executed batch",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
            tag_keys=("family", "model"),
        )
        self._batch_size.set_default_tags({"family": family, "model": model})

    def on_mlx_thread(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._mlx, fn, *args)

    def construct_on_mlx_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._mlx.submit(lambda: fn(*args, **kwargs)).result()

    def record_batch(self, size: int) -> None:
        self._batch_count += 1
        self._recent_batches.append(size)
        self._batch_size.observe(size)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        options = BatchingOptions.model_validate(user_config)
        batch = getattr(self, self.batch_method)
        batch.set_max_batch_size(options.max_batch_size)
        batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)

    def check_health(self) -> None:
        # Serve restarts a replica whose MLX thread pool can no longer take work.
        if self._mlx_closed:
            raise RuntimeError("the MLX thread of this replica has shut down")

    def __del__(self):
        mlx = getattr(self, "_mlx", None)
        if mlx is not None:
            self._mlx_closed = True
            mlx.shutdown(wait=False, cancel_futures=True)

    def batch_stats(self) -> dict[str, Any]:
        recent = list(self._recent_batches)
        return {"batches": self._batch_count, "recent_sizes": recent, "largest": max(recent, default=0)}
