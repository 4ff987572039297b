"""A family deployment's models: Ray Serve model multiplexing with Orchard's pool rules.

Every family deployment holds a pool of models. Requests carry their model id as Serve's
``multiplexed_model_id``, so Serve routes them to a replica that has the model loaded and
loads it (once, however many ask) where none has. Serve never evicts
(``max_num_models_per_replica=-1``): ``ModelPool`` does, because only it knows what is
pinned, what each model weighs, which models sit idle and which still serve requests. A
model chosen for eviction takes no new requests, finishes the ones it has, then closes.

Each replica reports its loaded models to the model manager every few seconds (that is
what ``/v1/models`` shows as ``loaded_on``) and takes back the models to unload.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.metrics import PoolMetrics
from deployments.request_logs import join_serve_logs
from mlx_orchard.config import ModelEntry
from mlx_orchard.errors import InvalidRequestError, ModelNotFoundError
from mlx_orchard.families import PoolSpec
from mlx_orchard.models.pool import ModelPool, PoolLimits, Slot
from mlx_orchard.runtime import physical_memory_bytes
from mlx_orchard.wire import LoadedModel, ReplicaReport

logger = logging.getLogger("ray.serve")

# Where Serve's multiplexing keeps a replica's loaded models (ray/serve/multiplex.py). Orchard
# removes a model from it when it evicts one, so Serve stops routing that model here.
_SERVE_MULTIPLEX_ATTR = "__serve_multiplex_wrapper"


class MultiplexedFamily:
    """Mixin for a family deployment. The family supplies:

    - ``resolve(entry) -> Path``: the model's local directory (download/convert), blocking;
    - ``async load_model(entry, path)`` -> the loaded model (engine and settings);
    - ``async unload_model(model)``: free it (its requests have finished);
    - ``estimate_bytes(entry, path) -> int``: memory it will hold (weights + caches).
    """


    async def _init_pool(self, spec: PoolSpec, manager: DeploymentHandle | None) -> None:
        self.spec = spec
        self.manager = manager
        join_serve_logs()
        self.metrics = PoolMetrics(spec.family_spec.name)
        self.executing: Counter[str] = Counter()  # requests of each model being computed now (batched families)
        self._gauged: set[str] = set()  # models whose gauges were set (zeroed once they are gone)
        memory = physical_memory_bytes() * 3 // 4 if spec.pool.memory_gb == "auto" else int(spec.pool.memory_gb * (1 << 30))
        self.pool = ModelPool(
            PoolLimits(spec.pool.max_num_models_per_replica, memory, spec.pool.idle_timeout_s)
        )
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.node_id = ray.get_runtime_context().get_node_id()
        self.served_by = f"{context.deployment}#{self.replica_id}@{self.node_id[:12]}"
        self._unloading: set[str] = set()
        self.load_counts: Counter[str] = Counter()  # loads per model on this replica (tests, debugging)
        # Pinned models load before the replica takes requests; a failure fails the replica.
        for entry in spec.entries:
            if entry.pinned:
                await self.model_slot(entry.name)
        self._reporter = asyncio.create_task(self._report_loop())

    # ---- loading (Serve calls this under its per-replica load lock: one load at a time) ----

    @serve.multiplexed(max_num_models_per_replica=-1)  # evictions are the pool's (see module doc)
    async def model_slot(self, model_id: str) -> Slot:
        started = time.perf_counter()
        self.load_counts[model_id] += 1
        self.metrics.loads.inc(tags={"model": model_id})
        entry = await asyncio.to_thread(self._entry, model_id)
        path = await asyncio.to_thread(self.resolve, entry)
        nbytes = await asyncio.to_thread(self.estimate_bytes, entry, path)
        for victim in self.pool.plan(model_id, nbytes):
            await self._evict(victim, reason="room", detail="to make room for " + model_id)
        model = await self.load_model(entry, path)
        slot = self.pool.add(model_id, model, nbytes, pinned=entry.pinned or self.spec.dedicated)
        took = time.perf_counter() - started
        self.metrics.load_time.observe(took, tags={"model": model_id})
        logger.info("loaded model %r (%.2f GB) in %.1f s", model_id, nbytes / (1 << 30), took)
        self._report_soon()
        return slot

    def _entry(self, model_id: str) -> ModelEntry:
        """The configured entry, or one from the pool's defaults for a model found on this node
        (or on the Hub, when on-demand models are allowed)."""
        entry = self.spec.entry(model_id)
        if entry is not None:
            return entry
        if self.spec.dedicated:
            raise ModelNotFoundError(f"The model `{model_id}` is not served by this deployment.", param="model")
        from mlx_orchard.models.catalog import check_model_id, check_repo_id, scan_local

        check_model_id(model_id)
        options = self.spec.models
        local = scan_local(search_dirs(options), hf_cache_dir(options), options.families).get(model_id)
        family = self.spec.family_spec
        if local is not None:
            if local.family != family.name:
                raise InvalidRequestError(
                    f"The model `{model_id}` is a {local.family or 'unknown'} model, not a {family.name} model.",
                    param="model",
                )
            source = str(local.path)
        elif options.on_demand:
            source = check_repo_id(model_id, param="model")
        else:
            raise ModelNotFoundError(f"The model `{model_id}` does not exist.", param="model")
        return family.entry_for(model_id, source, self.spec.pool.defaults)

    # ---- using ----

    @contextlib.asynccontextmanager
    async def using(self, model_id: str | None = None, keep_alive_s: float | None = None) -> AsyncIterator[Any]:
        """The request's model, loaded if need be, kept loaded until the request is done."""
        model_id = model_id or serve.get_multiplexed_model_id() or self._only_model()
        while True:
            slot = self.pool.get(model_id) or await self.model_slot(model_id)
            if not slot.closing:  # else it was evicted between Serve's cache and here: load again
                break
        began = time.monotonic()
        slot.acquire(began)
        self.metrics.requests.inc(tags={"model": model_id})
        if keep_alive_s is not None and not slot.pinned:
            slot.keep_alive_s = keep_alive_s
        try:
            yield slot.model
        finally:
            ended = time.monotonic()
            slot.release(ended)
            self.metrics.latency.observe(ended - began, tags={"model": model_id})
            if keep_alive_s == 0 and not slot.in_flight and not slot.pinned:
                asyncio.get_running_loop().create_task(self._evict(slot, reason="keep_alive"))

    def _only_model(self) -> str:
        # A call without a model id (a test's handle, an old client): the deployment's model if it has one.
        names = [e.name for e in self.spec.entries]
        if len(names) == 1:
            return names[0]
        raise InvalidRequestError("no model was named for this request", param="model")

    async def load(self, keep_alive_s: float | None = None) -> LoadedModel:
        """``POST /v1/models/{id}/load``: load the request's model here (if it is not) and say so."""
        async with self.using(keep_alive_s=keep_alive_s):
            pass
        slot = self.pool.get(serve.get_multiplexed_model_id() or self._only_model())
        assert slot is not None
        return self._info(slot)

    # ---- unloading ----

    async def _evict(self, slot: Slot, *, reason: str, detail: str = "") -> None:
        """``reason`` (a metric tag): idle, room, asked or keep_alive."""
        if slot.closing:
            return
        self.pool.start_closing(slot)
        self._forget_in_serve(slot.name)
        self.metrics.evictions.inc(tags={"model": slot.name, "reason": reason})
        logger.info("unloading model %r (%s); waiting for its %d requests", slot.name, detail or reason, slot.in_flight)
        try:
            await slot.drained()
            model, slot.model = slot.model, None
            await self.unload_model(model)
            del model  # the last reference: its arrays are freed before MLX's cache is emptied
            await self.release_memory()
        finally:
            self.pool.remove(slot)
            self._report_soon()

    def _forget_in_serve(self, model_id: str) -> None:
        wrapper = getattr(self, _SERVE_MULTIPLEX_ATTR, None)
        if wrapper is not None and model_id in wrapper.models:
            del wrapper.models[model_id]
            wrapper._push_multiplexed_replica_info = True  # tell the routers at the next push

    async def _unload_asked(self, model_id: str) -> None:
        try:
            await self.unload(model_id)
        finally:
            self._unloading.discard(model_id)

    async def unload(self, model_id: str) -> bool:
        slot = self.pool.get(model_id)
        if slot is None or slot.pinned:
            return False
        await self._evict(slot, reason="asked")
        return True

    # ---- reporting and idle eviction ----

    def _info(self, slot: Slot) -> LoadedModel:
        offset = time.time() - time.monotonic()
        return LoadedModel(
            name=slot.name,
            pinned=slot.pinned,
            nbytes=slot.nbytes,
            in_flight=slot.in_flight,
            loaded_at=slot.loaded_at + offset,
            last_used=slot.last_used + offset,
            closing=slot.closing,
        )

    def loaded(self) -> ReplicaReport:
        return ReplicaReport(
            replica_id=self.served_by,
            deployment=self.spec.deployment,
            family=self.spec.family,
            node_id=self.node_id,
            # Closing models too: they still hold memory and serve their last requests.
            models=[self._info(s) for s in self.pool.slots.values()],
            memory_budget=self.pool.limits.memory_bytes,
            memory_used=self.pool.used_bytes,
        )

    def loads(self) -> dict[str, int]:
        """How often each model started loading on this replica."""
        return dict(self.load_counts)

    def _report_soon(self) -> None:
        self._report_now = True

    async def _report_loop(self) -> None:
        interval = self.spec.models.report_interval_s
        self._report_now = True
        while True:
            try:
                for slot in self.pool.idle():
                    asyncio.get_running_loop().create_task(self._evict(slot, reason="idle"))
                try:
                    self.sample_metrics()
                except Exception as e:  # noqa: BLE001 - a gauge never stops the reports
                    logger.warning("could not sample metrics: %s", e)
                if self.manager is not None:
                    to_unload = await self.manager.report.remote(self.loaded())
                    for name in to_unload:
                        if name not in self._unloading:
                            self._unloading.add(name)
                            asyncio.get_running_loop().create_task(self._unload_asked(name))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the manager restarting: report again next round
                logger.warning("could not report loaded models: %s", e)
            self._report_now = False
            deadline = time.monotonic() + interval
            while time.monotonic() < deadline and not self._report_now:
                await asyncio.sleep(min(0.1, interval))

    def sample_metrics(self) -> None:
        """The pool's gauges, set every report interval (never on a request's path)."""
        m = self.metrics
        m.loaded.set(len(self.pool.slots))
        m.memory.set(self.pool.used_bytes)
        names = set(self.pool.slots)
        for name in self._gauged - names:  # unloaded since: nothing waits on it any more
            m.in_flight.set(0, tags={"model": name})
            m.queue_depth.set(0, tags={"model": name})
        for name, slot in self.pool.slots.items():
            m.in_flight.set(slot.in_flight, tags={"model": name})
            m.queue_depth.set(self.queue_depth(slot), tags={"model": name})
        self._gauged = names

    def queue_depth(self, slot: Slot) -> int:
        """Requests of ``slot``'s model on this replica that wait for their turn: those not in the
        work being computed now (``executing``, kept by batched families)."""
        return max(0, slot.in_flight - self.executing[slot.name])

    async def check_pool_health(self) -> None:
        for slot in list(self.pool.slots.values()):
            check = getattr(slot.model, "check", None)
            if check is not None and not slot.closing:
                await check()

    # ---- the family's part (overridden) ----

    def resolve(self, entry: ModelEntry) -> Path:
        raise NotImplementedError

    async def load_model(self, entry: ModelEntry, path: Path) -> Any:
        raise NotImplementedError

    async def unload_model(self, model: Any) -> None:
        """Stop what the model runs (its requests have finished)."""
        close = getattr(model, "close", None)
        if close is not None:
            await asyncio.to_thread(close)

    async def release_memory(self) -> None:
        """After an unload: return freed memory to the system (on the right thread)."""

    def estimate_bytes(self, entry: ModelEntry, path: Path) -> int:
        from mlx_orchard.models.catalog import model_facts

        # Weights, plus room for activations and the framework's buffers.
        return int(model_facts(path).size_bytes * 1.2)


def search_dirs(options) -> list[Path]:
    from mlx_orchard.models.cache import cache_root

    return [Path(d).expanduser() for d in options.search_dirs] or [cache_root() / "models"]


def hf_cache_dir(options) -> Path | None:
    return Path(options.hf_cache_dir).expanduser() if options.hf_cache_dir else None
