"""Orchard's metrics, made in one place.

They go through Ray Serve's metrics API, so they show in the Ray dashboard's Metrics view
and on every node's Prometheus export as ``ray_orchard_*``, each with Serve's
``application``, ``deployment`` and ``replica`` tags (``docs/grafana-orchard.json`` charts
them). ``runtime.metrics: false`` in the config (``ORCHARD_METRICS=0`` on every replica)
makes each one a no-op.
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import metrics

# Seconds, from a fast embedding batch to a long generation or image.
LATENCY_S: list[float] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]
# Seconds between two tokens of one sequence.
TOKEN_GAP_S: list[float] = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5]
# Requests (or sequences) handled together.
BATCH_SIZES: list[float] = [1, 2, 4, 8, 16, 32, 64, 128]
# Seconds to load a model (read, convert, warm up).
LOAD_S: list[float] = [0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]


def enabled() -> bool:
    return os.environ.get("ORCHARD_METRICS", "1").lower() not in ("0", "false", "no", "off")


class _Off:
    """A metric that records nothing (metrics turned off)."""

    def inc(self, *_: Any, **__: Any) -> None:
        pass

    observe = set = set_default_tags = inc


def _made(kind: type, name: str, description: str, tags: dict[str, str], extra: tuple[str, ...], **options: Any) -> Any:
    if not enabled():
        return _Off()
    metric = kind(name, description, tag_keys=(*tags, *extra), **options)
    metric.set_default_tags(dict(tags))  # Serve adds its own tags to the dict it is given
    return metric


def counter(name: str, description: str, tags: dict[str, str], extra: tuple[str, ...] = ()) -> Any:
    """A counter whose ``tags`` are fixed for this owner (a model, a replica); ``extra`` tag
    keys are given at each ``inc``."""
    return _made(metrics.Counter, name, description, tags, extra)


def gauge(name: str, description: str, tags: dict[str, str], extra: tuple[str, ...] = ()) -> Any:
    return _made(metrics.Gauge, name, description, tags, extra)


def histogram(name: str, description: str, boundaries: list[float], tags: dict[str, str], extra: tuple[str, ...] = ()) -> Any:
    return _made(metrics.Histogram, name, description, tags, extra, boundaries=boundaries)


class PoolMetrics:
    """What every family replica measures about its model pool and the requests it serves
    (``MultiplexedFamily``); a family adds the units it produces with ``processed``."""

    def __init__(self, family: str):
        fixed = {"family": family}
        self.requests = counter("orchard_requests", "requests served by a family replica", fixed, ("model",))
        self.latency = histogram("orchard_request_latency_s", "seconds a request held its model on the replica",
                                 LATENCY_S, fixed, ("model",))
        self.in_flight = gauge("orchard_requests_in_flight", "requests on the replica, waiting or running", fixed, ("model",))
        self.queue_depth = gauge("orchard_queue_depth", "requests on the replica waiting for their turn", fixed, ("model",))
        self.batch_size = histogram("orchard_batch_size", "requests per executed batch (batched families)",
                                    BATCH_SIZES, fixed, ("model",))
        self.loaded = gauge("orchard_loaded_models", "models loaded on the replica", fixed)
        self.memory = gauge("orchard_pool_memory_bytes", "bytes the replica's loaded models are counted at", fixed)
        self.loads = counter("orchard_model_loads", "model loads started on the replica", fixed, ("model",))
        self.load_time = histogram("orchard_model_load_seconds", "seconds a model took to load", LOAD_S, fixed, ("model",))
        self.evictions = counter("orchard_model_evictions", "models unloaded (reason: idle, room, asked, keep_alive)",
                                 fixed, ("model", "reason"))
        self._processed = counter("orchard_processed", "what the family produced or consumed, by unit "
                                  "(audio_seconds, images, inputs, tokens, characters, steps)", fixed, ("model", "unit"))

    def processed(self, model: str, unit: str, amount: float = 1.0) -> None:
        if amount > 0:
            self._processed.inc(amount, tags={"model": model, "unit": unit})
