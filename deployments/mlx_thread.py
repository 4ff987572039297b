"""One MLX thread per replica: every MLX call of a replica runs on it, so the event loop
stays free (to collect the next batch, to stream) while a forward pass computes.

Families that batch per call (``@serve.batch``) add ``LiveBatching``; a family that runs
one job at a time (image generation, say) uses this alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class MLXThread:
    """Mixin: call ``_init_mlx_thread`` first in ``__init__``."""

    def _init_mlx_thread(self, family: str) -> None:
        self._mlx = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"orchard-{family}-mlx")
        self._mlx_closed = False

    def on_mlx_thread(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._mlx, fn, *args)

    def construct_on_mlx_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._mlx.submit(lambda: fn(*args, **kwargs)).result()

    def check_mlx_thread(self) -> None:
        # Serve restarts a replica whose MLX thread can no longer take work.
        if self._mlx_closed:
            raise RuntimeError("the MLX thread of this replica has shut down")

    def __del__(self):
        mlx = getattr(self, "_mlx", None)
        if mlx is not None:
            self._mlx_closed = True
            mlx.shutdown(wait=False, cancel_futures=True)
