"""The model families: each declares, in one place, what the rest of Orchard needs of it.

A family is a task (``llm``, ``embeddings``, ``transcription``): its config entry schema,
the Ray Serve deployment that runs its models, the FastAPI router that serves its OpenAI
paths, and those paths. ``graph.build_app`` builds one deployment per configured model of
every family, the ingress includes every family's router, ``OrchardArgs`` (the typed
``args:`` block of ``serve_config.yaml``) has one list per family, and ``bench/`` reads the
endpoints from here. Adding a family is adding an entry to ``FAMILIES`` (see
``docs/architecture.md``).

Deployments and routers are named by import path, so this module imports neither Ray nor
MLX: the ingress reads it without loading any engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import Any

from pydantic import create_model, model_validator

from mlx_orchard.config import (
    BatchedEntry,
    BatchingOptions,
    EmbeddingsEntry,
    ImagesEntry,
    IngressOptions,
    LLMEntry,
    ModelEntry,
    ModelsOptions,
    PoolOptions,
    RuntimeOptions,
    SeparationEntry,
    Strict,
    TTSEntry,
    VLMEntry,
    WhisperEntry,
    check_batches_can_fill,
)


@dataclass(frozen=True)
class Family:
    name: str  # the task, as ModelCard.family and routes name it
    entry: type[ModelEntry]  # the config schema of one model
    deployment: str  # "module:Class", imported only where replicas are built
    router: str | None  # "module:function", function(ingress) -> fastapi.APIRouter; None: another family's routes serve it
    endpoints: tuple[str, ...]
    config_key: str = ""  # the key of its list in `args:` (and its deployments' name prefix)

    @property
    def key(self) -> str:
        return self.config_key or self.name

    def default_batching(self) -> BatchingOptions | None:
        """The ``@serve.batch`` knobs of a batched family's pool when the config sets none."""
        if not issubclass(self.entry, BatchedEntry):
            return None
        return self.entry.model_fields["batching"].default

    def entry_for(self, name: str, source: str, defaults: dict[str, Any]) -> ModelEntry:
        """The entry of a model that is not in the config: the pool's defaults, this name and source."""
        return self.entry.model_validate({**defaults, "name": name, "source": source, "pinned": False})

    def deployment_class(self) -> Any:
        return _import(self.deployment)

    def router_factory(self) -> Any:
        assert self.router is not None
        return _import(self.router)


def _import(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(import_module(module), attr)


FAMILIES: tuple[Family, ...] = (
    Family(
        name="llm",
        entry=LLMEntry,
        deployment="deployments.llm:LLMDeployment",
        router="deployments.routers.llm:router",
        endpoints=("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages"),
    ),
    Family(
        name="vlm",
        entry=VLMEntry,
        deployment="deployments.vlm:VLMDeployment",
        router=None,  # the LLM routes serve vision models too: one chat endpoint, routed by model id
        endpoints=("/v1/chat/completions", "/v1/responses", "/v1/messages"),
    ),
    Family(
        name="embeddings",
        entry=EmbeddingsEntry,
        deployment="deployments.embeddings:EmbeddingsDeployment",
        router="deployments.routers.embeddings:router",
        endpoints=("/v1/embeddings",),
    ),
    Family(
        name="tts",
        entry=TTSEntry,
        deployment="deployments.speech:SpeechDeployment",
        router="deployments.routers.speech:router",
        endpoints=("/v1/audio/speech",),
    ),
    Family(
        name="transcription",
        entry=WhisperEntry,
        deployment="deployments.whisper:WhisperDeployment",
        router="deployments.routers.transcription:router",
        endpoints=("/v1/audio/transcriptions", "/v1/audio/translations"),
        config_key="whisper",  # the key configs have used since the first release
    ),
    Family(
        name="images",
        entry=ImagesEntry,
        deployment="deployments.images:ImagesDeployment",
        router="deployments.routers.images:router",
        endpoints=("/v1/images/generations", "/v1/images/edits"),
    ),
    Family(
        name="separation",
        entry=SeparationEntry,
        deployment="deployments.separation:SeparationDeployment",
        router="deployments.routers.separation:router",
        endpoints=("/v1/audio/separations",),
    ),
)


def family(name: str) -> Family:
    """A family by its name or its config key."""
    for f in FAMILIES:
        if name in (f.name, f.key):
            return f
    raise KeyError(name)


class _ArgsBase(Strict):
    ingress: IngressOptions = IngressOptions()
    runtime: RuntimeOptions = RuntimeOptions()
    models: ModelsOptions = ModelsOptions()
    pools: dict[str, PoolOptions] = {}

    @model_validator(mode="after")
    def _valid_pools(self):
        keys = {f.key for f in FAMILIES}
        for key, pool in self.pools.items():
            if key not in keys:
                raise ValueError(f"pools.{key}: no such family (families: {', '.join(sorted(keys))})")
            f = family(key)
            try:
                f.entry_for("defaults-check", "defaults-check", pool.defaults)
            except ValueError as e:
                raise ValueError(f"pools.{key}.defaults: {e}") from None
            batching = pool.batching or f.default_batching()
            if batching is not None:
                check_batches_can_fill(f"pools.{key}", batching, pool.deployment)
        for f in FAMILIES:
            pinned = [e.name for e in self.configured(f) if e.pinned and not e.dedicated]
            limit = self.pool(f).max_num_models_per_replica
            if len(pinned) > limit:
                raise ValueError(
                    f"{f.key}: {len(pinned)} pinned models ({', '.join(pinned)}) do not fit "
                    f"pools.{f.key}.max_num_models_per_replica ({limit})"
                )
        for name, fam in self.models.families.items():
            try:
                family(fam)
            except KeyError:
                raise ValueError(f"models.families.{name}: no such family {fam!r}") from None
        return self

    def pool(self, f: Family) -> PoolOptions:
        return self.pools.get(f.key) or PoolOptions()

    @model_validator(mode="after")
    def _unique_names(self):
        seen: set[str] = set()
        for entry in self.entries():
            for name in entry.all_names():
                if name in seen:
                    raise ValueError(f"model name {name!r} is used twice")
                seen.add(name)
        return self

    def configured(self, family: Family) -> list[ModelEntry]:
        return getattr(self, family.key)

    def entries(self) -> list[ModelEntry]:
        return [entry for f in FAMILIES for entry in self.configured(f)]


# One list of model entries per family, under the family's config key.
_family_lists: dict[str, Any] = {f.key: (list[f.entry], []) for f in FAMILIES}  # type: ignore[name-defined]
OrchardArgs = create_model(
    "OrchardArgs",
    __base__=_ArgsBase,
    __doc__="The typed `args:` block of serve_config.yaml: what graph.build_app is built from.",
    **_family_lists,
)


@dataclass(frozen=True)
class PoolSpec:
    """What one family deployment's replicas are built from: the family, its pool options,
    the configured models it serves (pinned ones load at start) and where other models are found."""

    family: str  # the family's config key
    deployment: str  # its Serve deployment name
    pool: PoolOptions
    entries: tuple[ModelEntry, ...]
    models: ModelsOptions
    dedicated: bool = False  # one configured model with replicas of its own: nothing else loads there

    @property
    def family_spec(self) -> Family:
        return family(self.family)

    def entry(self, name: str) -> ModelEntry | None:
        for e in self.entries:
            if name in e.all_names():
                return e
        return None

    def batching(self) -> BatchingOptions | None:
        return self.pool.batching or self.family_spec.default_batching()
