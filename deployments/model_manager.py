"""The model manager deployment: one replica holding the shared model catalog
(``mlx_orchard.models.manager``). The ingress asks it where a model id goes and what
``/v1/models`` shows; the family replicas report their loaded models to it."""

from __future__ import annotations

import asyncio

from ray import serve

from deployments.metrics import counter, gauge
from deployments.multiplex import hf_cache_dir, search_dirs
from deployments.request_logs import join_serve_logs
from mlx_orchard.config import ModelsOptions
from mlx_orchard.errors import ModelNotFoundError
from mlx_orchard.models.manager import Configured, ModelManager, Route
from mlx_orchard.protocol.common import ModelCard
from mlx_orchard.wire import ReplicaReport


# One replica: it is the single source of truth for downloads (one per repo) and reports.
@serve.deployment(name="models", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class ModelManagerDeployment:
    async def __init__(self, configured: list[Configured], pools: dict[str, str], options: ModelsOptions):  # type: ignore[misc]  # Ray awaits it
        join_serve_logs()
        # Directories are resolved here, on the replica's node: each machine has its own cache.
        self.manager = ModelManager(
            configured,
            pools,
            search_dirs=search_dirs(options),
            hf_cache_dir=hf_cache_dir(options),
            hub_endpoint=options.hub_endpoint,
            on_demand=options.on_demand,
            family_overrides=options.families,
            report_ttl_s=max(10.0, 5 * options.report_interval_s),
            report_interval_s=options.report_interval_s,
        )
        self._downloaded = gauge("orchard_download_bytes", "bytes a model download has fetched", {}, ("repo_id",))
        self._download_size = gauge("orchard_download_total_bytes", "bytes a model download fetches in all", {}, ("repo_id",))
        self._downloads = counter("orchard_downloads", "model downloads finished (status: done or failed)", {}, ("status",))
        self._counted: set[int] = set()  # downloads whose end was counted
        self._sampler = asyncio.create_task(self._sample_downloads(options.report_interval_s))

    async def _sample_downloads(self, interval_s: float) -> None:
        """Download progress as gauges, every report interval."""
        while True:
            await asyncio.sleep(interval_s)
            for state in self.manager.downloads.all():
                tags = {"repo_id": state.repo_id}
                self._downloaded.set(state.bytes_done, tags=tags)
                if state.bytes_total is not None:
                    self._download_size.set(state.bytes_total, tags=tags)
                if state.status != "downloading" and id(state) not in self._counted:
                    self._counted.add(id(state))
                    self._downloads.inc(tags={"status": state.status})

    async def resolve(self, model: str, timeout_s: float = 600.0) -> Route:
        return await self.manager.resolve(model, timeout_s)

    async def cards(self) -> list[ModelCard]:
        return await asyncio.to_thread(self.manager.cards)

    async def card(self, model: str) -> ModelCard:
        return await asyncio.to_thread(self.manager.card, model)

    async def download(self, repo_id: str, revision: str | None = None) -> ModelCard:
        return await asyncio.to_thread(self.manager.download, repo_id, revision)

    async def delete(self, model: str) -> None:
        await asyncio.to_thread(self.manager.delete, model)

    def report(self, report: ReplicaReport) -> list[str]:
        return self.manager.report(report)

    async def unload(self, model: str, timeout_s: float = 60.0) -> ModelCard:
        """Ask the replicas that have ``model`` to unload it; answer once none has it."""
        route = await self.resolve_known(model)
        name = self.manager.request_unload(route.name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self.manager.unload_done(name) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        return await self.card(model)

    async def resolve_known(self, model: str) -> Route:
        route = await asyncio.to_thread(self.manager.resolve_now, model)
        if route is None:
            raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")
        return route
