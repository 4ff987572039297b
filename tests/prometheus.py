"""Reading Orchard's metrics the way Prometheus does: from the metrics export port of Ray's node."""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

Sample = tuple[str, dict[str, str], float]


def scrape() -> list[Sample]:
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    port = ray._private.worker.global_worker.node.metrics_export_port
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        if family.name.startswith("ray_orchard_")
        for s in family.samples
    ]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum over every series of ``name`` (all workers) whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == want for k, want in labels.items()))


def series(samples: list[Sample], name: str, **labels: str) -> list[dict[str, str]]:
    return [lab for n, lab, _ in samples if n == name and all(lab.get(k) == want for k, want in labels.items())]


def wait_for(check: Callable[[list[Sample]], list[str]], timeout: float = 60) -> list[Sample]:
    """Scrape until ``check`` finds nothing missing (Ray exports every second here)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape()
        missing = check(samples)
        if not missing:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError("metrics did not move: " + "; ".join(missing))
        time.sleep(1)


def moved(before: list[Sample], expected: dict[tuple, float]) -> Callable[[list[Sample]], list[str]]:
    """A check: each (name, labels...) grew by at least its amount since ``before``."""

    def check(now: list[Sample]) -> list[str]:
        missing = []
        for (name, *pairs), amount in expected.items():
            labels = dict(pairs)
            grew = total(now, name, **labels) - total(before, name, **labels)
            if grew < amount - 1e-9:
                seen = [lab for lab in series(now, name) if set(lab) >= set(labels)]
                missing.append(f"{name}{labels} grew {grew:g}, expected >= {amount:g} (series: {seen[:6]})")
        return missing

    return check


def L(name: str, **labels: str) -> tuple:
    return (f"ray_orchard_{name}", *sorted(labels.items()))
