"""The eviction rules of one replica's model pool (plain Python: no Ray, no MLX)."""

from __future__ import annotations

import asyncio

import pytest

from mlx_orchard.errors import InsufficientMemoryError
from mlx_orchard.models.pool import ModelPool, PoolLimits

GB = 1 << 30


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _pool(max_models=2, memory=10 * GB, idle=None):
    clock = Clock()
    return ModelPool(PoolLimits(max_models, memory, idle), clock=clock), clock


def test_least_recently_used_goes_first_and_pinned_never():
    pool, clock = _pool(max_models=3)
    pool.add("pinned", object(), GB, pinned=True)
    clock.now = 1
    a = pool.add("a", object(), GB, pinned=False)
    clock.now = 2
    pool.add("b", object(), GB, pinned=False)
    a.acquire(3)  # a used after b
    a.release(4)
    assert [s.name for s in pool.plan("c", GB)] == ["b"]


def test_idle_models_go_before_busy_ones():
    pool, clock = _pool(max_models=2)
    a = pool.add("a", object(), GB, pinned=False)
    clock.now = 5
    pool.add("b", object(), GB, pinned=False)
    a.acquire(10)  # a is older but serving a request
    assert [s.name for s in pool.plan("c", GB)] == ["b"]


def test_memory_budget_evicts_as_many_as_needed_or_refuses():
    pool, clock = _pool(max_models=10, memory=10 * GB)
    pool.add("pinned", object(), 4 * GB, pinned=True)
    clock.now = 1
    pool.add("a", object(), 2 * GB, pinned=False)
    clock.now = 2
    pool.add("b", object(), 3 * GB, pinned=False)
    assert [s.name for s in pool.plan("c", 4 * GB)] == ["a", "b"]
    with pytest.raises(InsufficientMemoryError) as e:
        pool.plan("huge", 7 * GB)  # the pinned 4 GB stays: 7 more never fit in 10
    assert e.value.status_code == 507 and "pinned" in e.value.message
    with pytest.raises(InsufficientMemoryError):
        pool.plan("bigger-than-budget", 11 * GB)


def test_all_pinned_refuses_with_too_many_models():
    pool, _ = _pool(max_models=1)
    pool.add("pinned", object(), GB, pinned=True)
    with pytest.raises(InsufficientMemoryError) as e:
        pool.plan("a", GB)
    assert e.value.code == "too_many_models"


def test_idle_timeout_and_keep_alive():
    pool, clock = _pool(max_models=5, idle=60)
    pool.add("pinned", object(), GB, pinned=True)
    a = pool.add("a", object(), GB, pinned=False)
    b = pool.add("b", object(), GB, pinned=False)
    b.keep_alive_s = 5  # a request asked for a short keep_alive
    busy = pool.add("busy", object(), GB, pinned=False)
    busy.acquire(0)
    clock.now = 10
    assert [s.name for s in pool.idle()] == ["b"]
    clock.now = 61
    assert sorted(s.name for s in pool.idle()) == ["a", "b"]
    a.keep_alive_s = float("inf")  # keep_alive: -1
    assert [s.name for s in pool.idle()] == ["b"]


def test_a_closing_model_takes_no_requests_and_drains():
    async def main():
        pool, _ = _pool()
        a = pool.add("a", object(), GB, pinned=False)
        a.acquire(0)
        pool.start_closing(a)
        assert pool.get("a") is None  # new requests load it again
        assert pool.used_bytes == GB  # its memory is not free until it has closed
        drained = asyncio.ensure_future(a.drained())
        await asyncio.sleep(0)
        assert not drained.done()
        a.release(1)
        await asyncio.wait_for(drained, 1)
        pool.remove(a)
        assert pool.used_bytes == 0

    asyncio.run(main())
