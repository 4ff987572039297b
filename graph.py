"""The Orchard application graph: the only place that calls ``.bind()``.

``serve run serve_config.yaml`` imports ``graph:build_app`` and validates the YAML's
``args:`` block against ``OrchardArgs`` before anything starts.
"""

from __future__ import annotations

import re
from typing import Any

from ray.serve import Application

from deployments.ingress import Ingress, ModelRoute
from deployments.embeddings import EmbeddingsDeployment
from deployments.llm import LLMDeployment
from deployments.whisper import WhisperDeployment
from mlx_orchard.config import DeploymentOptions, OrchardArgs
from mlx_orchard.engines.sampling import SamplingParams
from mlx_orchard.runtime import replica_env_vars


def _deployment_name(family: str, model: str) -> str:
    return f"{family}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', model)}"


def _model_options(options: DeploymentOptions, env_vars: dict[str, str]) -> dict[str, Any]:
    """Ray options for a model replica, with the process environment it must start with."""
    opts = options.ray_options()
    actor = dict(opts.get("ray_actor_options") or {})
    runtime_env = dict(actor.get("runtime_env") or {})
    runtime_env["env_vars"] = {**env_vars, **(runtime_env.get("env_vars") or {})}
    actor["runtime_env"] = runtime_env
    opts["ray_actor_options"] = actor
    return opts


def build_app(args: OrchardArgs) -> Application:
    if isinstance(args, dict):  # called directly rather than through `serve run`
        args = OrchardArgs.model_validate(args)
    env_vars = replica_env_vars(args.runtime.blas, args.runtime.env_vars)
    routes: dict[str, ModelRoute] = {}
    handles: dict[str, Application] = {}
    for entry in args.llm:
        name = _deployment_name("llm", entry.name)
        handles[name] = LLMDeployment.options(name=name, **_model_options(entry.deployment, env_vars)).bind(entry)
        route = ModelRoute(
            name=entry.name, family="llm", deployment=name, sampling=SamplingParams(**entry.sampling.model_dump())
        )
        routes.update({alias: route for alias in entry.all_names()})
    for family, entries, cls in (
        ("embeddings", args.embeddings, EmbeddingsDeployment),
        ("whisper", args.whisper, WhisperDeployment),
    ):
        for entry in entries:
            name = _deployment_name(family, entry.name)
            options = _model_options(entry.deployment, env_vars) | {"user_config": entry.batching.model_dump()}
            options.setdefault("max_ongoing_requests", 2 * entry.batching.max_batch_size)
            handles[name] = cls.options(name=name, **options).bind(entry)
            routes.update({alias: ModelRoute(name=entry.name, family=family, deployment=name) for alias in entry.all_names()})
    return Ingress.options(**args.ingress.deployment.ray_options()).bind(routes, handles, args.ingress)
