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
    EmbeddingsEntry,
    IngressOptions,
    LLMEntry,
    ModelEntry,
    RuntimeOptions,
    Strict,
    WhisperEntry,
)


@dataclass(frozen=True)
class Family:
    name: str  # the task, as ModelCard.family and routes name it
    entry: type[ModelEntry]  # the config schema of one model
    deployment: str  # "module:Class", imported only where replicas are built
    router: str  # "module:function", function(ingress) -> fastapi.APIRouter
    endpoints: tuple[str, ...]
    config_key: str = ""  # the key of its list in `args:` (and its deployments' name prefix)

    @property
    def key(self) -> str:
        return self.config_key or self.name

    def deployment_class(self) -> Any:
        return _import(self.deployment)

    def router_factory(self) -> Any:
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
        endpoints=("/v1/chat/completions", "/v1/completions"),
    ),
    Family(
        name="embeddings",
        entry=EmbeddingsEntry,
        deployment="deployments.embeddings:EmbeddingsDeployment",
        router="deployments.routers.embeddings:router",
        endpoints=("/v1/embeddings",),
    ),
    Family(
        name="transcription",
        entry=WhisperEntry,
        deployment="deployments.whisper:WhisperDeployment",
        router="deployments.routers.transcription:router",
        endpoints=("/v1/audio/transcriptions", "/v1/audio/translations"),
        config_key="whisper",  # the key configs have used since the first release
    ),
)


class _ArgsBase(Strict):
    ingress: IngressOptions = IngressOptions()
    runtime: RuntimeOptions = RuntimeOptions()

    @model_validator(mode="after")
    def _unique_names(self):
        seen: set[str] = set()
        for entry in self.entries():
            for name in entry.all_names():
                if name in seen:
                    raise ValueError(f"model name {name!r} is used twice")
                seen.add(name)
        return self

    def models(self, family: Family) -> list[ModelEntry]:
        return getattr(self, family.key)

    def entries(self) -> list[ModelEntry]:
        return [entry for f in FAMILIES for entry in self.models(f)]


# One list of model entries per family, under the family's config key.
_family_lists: dict[str, Any] = {f.key: (list[f.entry], []) for f in FAMILIES}  # type: ignore[name-defined]
OrchardArgs = create_model(
    "OrchardArgs",
    __base__=_ArgsBase,
    __doc__="The typed `args:` block of serve_config.yaml: what graph.build_app is built from.",
    **_family_lists,
)
