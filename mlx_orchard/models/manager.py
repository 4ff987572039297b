"""The model catalog the ingress and the family replicas share: configured models, models
on this machine's disk, downloads, and which replicas have which model loaded.

Plain Python (no Ray, no MLX); ``deployments/model_manager.py`` runs one of it as a Serve
deployment. Replicas report their loaded models every few seconds (``report``) and take
back the models they should unload; a replica that stops reporting is forgotten.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from mlx_orchard.errors import ConflictError, InvalidRequestError, ModelNotFoundError, RequestTimeoutError
from mlx_orchard.protocol.common import DownloadProgress, ModelCard, ModelReplica, Quantization
from mlx_orchard.wire import ReplicaReport

logger = logging.getLogger("orchard.models")

_SCAN_TTL_S = 2.0  # the disk is listed at most this often


@dataclass(frozen=True)
class Configured:
    name: str
    aliases: tuple[str, ...]
    family: str  # the family's name ("llm", "transcription", ...)
    deployment: str
    source: str
    pinned: bool


@dataclass(frozen=True)
class Route:
    """Where requests for one model id go: its canonical name (Serve's multiplexed model id),
    its family and the deployment that serves it."""

    name: str
    family: str
    deployment: str


class ModelManager:
    def __init__(
        self,
        configured: list[Configured],
        pools: dict[str, str],  # family name -> its pool deployment
        *,
        search_dirs: list[Path],
        hf_cache_dir: Path | None = None,
        hub_endpoint: str | None = None,
        on_demand: bool = False,
        family_overrides: dict[str, str] | None = None,
        report_ttl_s: float = 10.0,
        report_interval_s: float = 1.0,
    ):
        from mlx_orchard.models.download import Downloads

        self.configured = {c.name: c for c in configured}
        self.aliases = {a: c.name for c in configured for a in (c.name, *c.aliases)}
        self.pools = pools
        self.search_dirs = search_dirs
        self.hf_cache_dir = hf_cache_dir
        self.on_demand = on_demand
        self.family_overrides = family_overrides or {}
        self.report_ttl_s = report_ttl_s
        self.unload_grace_s = 2 * report_interval_s + 0.5  # every replica has reported since the ask
        self.downloads = Downloads(cache_dir=hf_cache_dir, endpoint=hub_endpoint)
        self._reports: dict[str, tuple[float, ReplicaReport]] = {}
        self._unload: dict[str, float] = {}  # model -> when an unload was asked (cleared once gone)
        self._scan: tuple[float, dict] = (0.0, {})
        self._scan_lock = threading.Lock()

    # ---- what is on disk ----

    def local(self, fresh: bool = False) -> dict:
        from mlx_orchard.models.catalog import scan_local

        with self._scan_lock:
            at, models = self._scan
            if fresh or time.monotonic() - at > _SCAN_TTL_S:
                models = scan_local(
                    self.search_dirs, self.hf_cache_dir, self.family_overrides, exclude_repos=self.downloads.active_repos()
                )
                self._scan = (time.monotonic(), models)
            return models

    # ---- routing ----

    def resolve_now(self, model: str) -> Route | None:
        """The route of a configured or local model; None when it is neither."""
        name = self.aliases.get(model)
        if name is not None:
            c = self.configured[name]
            return Route(c.name, c.family, c.deployment)
        from mlx_orchard.models.catalog import check_model_id

        check_model_id(model)
        found = self.local().get(model) or self.local(fresh=True).get(model)
        if found is None:
            return None
        return Route(model, found.family, self._pool_of(model, found.family))

    def _pool_of(self, model: str, family: str | None) -> str:
        deployment = self.pools.get(family or "")
        if deployment is None:
            raise InvalidRequestError(
                f"The model `{model}` is a {family or 'unrecognized'} model, which this server does not serve"
                + (f" (families: {', '.join(sorted(self.pools))})." if self.pools else "."),
                param="model",
                code="unsupported_model",
            )
        return deployment

    async def resolve(self, model: str, timeout_s: float = 600.0) -> Route:
        """Where ``model`` goes. An id that is neither configured nor on disk is downloaded
        first when on-demand models are allowed and it names a Hub repo; else 404."""
        route = await asyncio.to_thread(self.resolve_now, model)
        if route is not None:
            return route
        state = self.downloads.get(model)
        if state is None or state.status == "failed":
            if not self.on_demand:
                raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")
            from mlx_orchard.models.catalog import check_repo_id

            check_repo_id(model, param="model")
            state = self.downloads.start(model)
        if not await asyncio.to_thread(state.wait, timeout_s):
            raise RequestTimeoutError(f"The model `{model}` is still downloading; retry later.")
        if state.status == "failed":
            raise ModelNotFoundError(f"The model `{model}` could not be downloaded: {state.error}", param="model")
        route = await asyncio.to_thread(self.resolve_now, model)
        if route is None:
            raise ModelNotFoundError(f"The model `{model}` was downloaded but is not a model Orchard can read.", param="model")
        return route

    # ---- downloads and deletes ----

    def download(self, repo_id: str, revision: str | None = None) -> ModelCard:
        from mlx_orchard.models.catalog import check_repo_id, check_revision

        check_repo_id(repo_id)
        if revision is not None:
            check_revision(revision)
        self.downloads.start(repo_id, revision)
        return self.card(repo_id)

    def delete(self, model: str) -> None:
        from mlx_orchard.models.catalog import check_model_id, delete_local

        check_model_id(model)
        if model in self.aliases:
            raise ConflictError(f"The model `{model}` is configured in serve_config.yaml; remove it there.", param="model")
        if self._loaded_on(model):
            raise ConflictError(f"The model `{model}` is loaded; unload it first.", param="model")
        state = self.downloads.get(model)
        if state is not None and state.status == "downloading":
            raise ConflictError(f"The model `{model}` is downloading.", param="model")
        found = self.local(fresh=True).get(model)
        if found is None:
            if state is not None:  # a failed download: forget it
                self.downloads.forget(model)
                return
            raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")
        delete_local(found, self.search_dirs, self.hf_cache_dir)
        self.downloads.forget(model)
        self.local(fresh=True)

    # ---- loaded models, from the replicas' reports ----

    def report(self, report: ReplicaReport) -> list[str]:
        """A replica's loaded models; returns the ones it should unload."""
        now = time.monotonic()
        self._reports[report.replica_id] = (now, report)
        for name, asked in list(self._unload.items()):
            if now - asked > self.unload_grace_s and not self._loaded_on(name):
                del self._unload[name]
        return [m.name for m in report.models if m.name in self._unload]

    def request_unload(self, model: str) -> str:
        """Ask every replica that has ``model`` to unload it. The ask stands for a grace
        period: a replica that loaded it since its last report unloads it too."""
        name = self.aliases.get(model, model)
        if name in self.configured and self.configured[name].pinned:
            raise ConflictError(f"The model `{model}` is pinned in serve_config.yaml and is never unloaded.", param="model")
        self._unload[name] = time.monotonic()
        return name

    def unload_done(self, name: str) -> bool:
        asked = self._unload.get(name)
        settled = asked is None or time.monotonic() - asked > self.unload_grace_s
        return settled and not self._loaded_on(name)

    def is_loaded(self, model: str) -> bool:
        return bool(self._loaded_on(self.aliases.get(model, model)))

    def _live_reports(self) -> list[ReplicaReport]:
        now = time.monotonic()
        for rid, (at, _) in list(self._reports.items()):
            if now - at > self.report_ttl_s:
                del self._reports[rid]
        return [r for _, r in self._reports.values()]

    def _loaded_on(self, name: str) -> list[ModelReplica]:
        out = []
        for r in self._live_reports():
            for m in r.models:
                if m.name == name:
                    out.append(
                        ModelReplica(
                            replica=r.replica_id,
                            deployment=r.deployment,
                            node_id=r.node_id,
                            pinned=m.pinned,
                            in_flight=m.in_flight,
                            loaded_at=int(m.loaded_at),
                            last_used=int(m.last_used),
                            size_bytes=m.nbytes,
                            unloading=m.closing,
                        )
                    )
        return out

    def replicas(self) -> list[ReplicaReport]:
        return self._live_reports()

    # ---- /v1/models ----

    def cards(self) -> list[ModelCard]:
        cards: dict[str, ModelCard] = {}
        local = self.local()
        if any(d.status == "done" and d.repo_id not in local for d in self.downloads.all()):
            local = self.local(fresh=True)  # a download just finished: list it as what it is
        for c in self.configured.values():
            card = self._configured_card(c)
            for alias in (c.name, *c.aliases):
                cards[alias] = card.model_copy(update={"id": alias})
        for mid, found in local.items():
            if mid not in cards:
                cards[mid] = self._local_card(mid, found)
        for state in self.downloads.all():
            if state.repo_id not in cards or state.status != "done":
                cards[state.repo_id] = self._download_card(state)
        return list(cards.values())

    def card(self, model: str) -> ModelCard:
        from mlx_orchard.models.catalog import check_model_id

        if model not in self.aliases:
            check_model_id(model)
        for card in self.cards():
            if card.id == model:
                return card
        raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")

    def _status(self, name: str, card: ModelCard) -> ModelCard:
        loaded = self._loaded_on(name)
        return card.model_copy(update={"loaded_on": loaded, "status": "loaded" if loaded else card.status})

    def _configured_card(self, c: Configured) -> ModelCard:
        card = ModelCard(id=c.name, family=c.family, status="available", source="config", pinned=c.pinned)
        facts = _source_facts(c.source)
        if facts is not None:
            card = card.model_copy(update=facts)
        return self._status(c.name, card)

    def _local_card(self, mid: str, found) -> ModelCard:
        card = ModelCard(
            id=mid,
            created=found.created,
            family=found.family,
            status="available",
            source=found.source,
            repo_id=found.repo_id,
            revision=found.revision,
            size_bytes=found.size_bytes,
            quantization=_quantization(found.quantization),
            context_length=found.context_length,
            pinned=False,
        )
        return self._status(mid, card)

    def _download_card(self, state) -> ModelCard:
        return ModelCard(
            id=state.repo_id,
            created=int(state.started_at),
            status="failed" if state.status == "failed" else "downloading" if state.status == "downloading" else "available",
            source="hub",
            repo_id=state.repo_id,
            revision=state.revision,
            download=DownloadProgress(bytes_done=state.bytes_done, bytes_total=state.bytes_total),
            reason=state.error,
            pinned=False,
        )


def _source_facts(source: str) -> dict | None:
    """Size, quantization and context of a configured model, read from its files without
    converting anything."""
    from mlx_orchard.models.catalog import model_facts
    from mlx_orchard.models.registry import ModelSourceError, locate

    try:
        path = locate(source)
    except ModelSourceError:
        return None
    if path is None:
        return {"repo_id": source}
    if path.is_file():
        return {"size_bytes": path.stat().st_size, "created": int(path.stat().st_mtime)}
    facts = model_facts(path)
    return {
        "size_bytes": facts.size_bytes,
        "context_length": facts.context_length,
        "quantization": _quantization(facts.quantization),
        "created": int(path.stat().st_mtime),
    }


def _quantization(q: dict | None) -> Quantization | None:
    return Quantization(bits=q.get("bits"), group_size=q.get("group_size")) if q else None
