"""The models one replica holds: which to evict for a new one, and when an idle one goes.

Plain Python (no Ray, no MLX): the family deployments put it behind Ray Serve's model
multiplexing, which routes requests to a replica that has their model and loads one at a
time. Serve's own LRU cannot pin a model, weigh memory, unload an idle model or wait for a
model's in-flight requests, so Orchard decides evictions here and Serve never evicts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlx_orchard.errors import InsufficientMemoryError

_GB = 1 << 30


@dataclass(eq=False)
class Slot:
    """One loaded model, and what eviction needs to know about it."""

    name: str
    model: Any
    nbytes: int
    pinned: bool
    loaded_at: float
    last_used: float
    keep_alive_s: float | None = None  # a request's keep_alive: overrides the pool's idle timeout
    in_flight: int = 0
    closing: bool = False  # evicted: no new requests, closes once in_flight reaches 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()

    def acquire(self, now: float) -> None:
        self.in_flight += 1
        self.last_used = now
        self._idle.clear()

    def release(self, now: float) -> None:
        self.in_flight -= 1
        self.last_used = now
        if not self.in_flight:
            self._idle.set()

    async def drained(self) -> None:
        await self._idle.wait()


@dataclass(frozen=True)
class PoolLimits:
    max_models: int
    memory_bytes: int
    idle_timeout_s: float | None = None


class ModelPool:
    def __init__(self, limits: PoolLimits, clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.clock = clock
        self.slots: dict[str, Slot] = {}

    def get(self, name: str) -> Slot | None:
        slot = self.slots.get(name)
        return None if slot is None or slot.closing else slot

    @property
    def used_bytes(self) -> int:
        # Closing slots count until they are gone: their memory is not free yet.
        return sum(s.nbytes for s in self.slots.values())

    def add(self, name: str, model: Any, nbytes: int, *, pinned: bool) -> Slot:
        now = self.clock()
        slot = Slot(name, model, nbytes, pinned, loaded_at=now, last_used=now)
        self.slots[name] = slot
        return slot

    def plan(self, name: str, nbytes: int) -> list[Slot]:
        """The slots to evict so that ``name`` (``nbytes``) fits: least recently used first,
        idle ones before busy ones, pinned never. Raises 507 when it cannot fit at all."""
        limit = self.limits.memory_bytes
        if nbytes > limit:
            raise InsufficientMemoryError(
                f"The model `{name}` needs about {nbytes / _GB:.2f} GB; this replica's budget is {limit / _GB:.2f} GB.",
                param="model",
            )
        live = [s for s in self.slots.values() if not s.closing]
        candidates = sorted((s for s in live if not s.pinned), key=lambda s: (s.in_flight > 0, s.last_used))
        victims: list[Slot] = []
        count, used = len(live), self.used_bytes
        while count >= self.limits.max_models or used + nbytes > limit:
            if not candidates:
                held = [s.name for s in live if s not in victims]
                if count >= self.limits.max_models:
                    raise InsufficientMemoryError(
                        f"The model `{name}` cannot be loaded: this replica holds {count} models, its limit, "
                        f"and none can be unloaded ({', '.join(held)} are pinned).",
                        param="model",
                        code="too_many_models",
                    )
                raise InsufficientMemoryError(
                    f"The model `{name}` needs about {nbytes / _GB:.2f} GB; {used / _GB:.2f} of this replica's "
                    f"{limit / _GB:.2f} GB stay in use by models that cannot be unloaded ({', '.join(held)}).",
                    param="model",
                )
            victim = candidates.pop(0)
            victims.append(victim)
            count -= 1
            used -= victim.nbytes
        return victims

    def idle(self) -> list[Slot]:
        """Unpinned models nobody is using whose idle time ran out."""
        now = self.clock()
        out = []
        for s in self.slots.values():
            timeout = s.keep_alive_s if s.keep_alive_s is not None else self.limits.idle_timeout_s
            if s.pinned or s.closing or s.in_flight or timeout is None:
                continue
            if now - s.last_used >= timeout:
                out.append(s)
        return out

    def start_closing(self, slot: Slot) -> None:
        slot.closing = True

    def remove(self, slot: Slot) -> None:
        if self.slots.get(slot.name) is slot:
            del self.slots[slot.name]
