"""The Orchard application graph: the only place that calls ``.bind()``.

``serve run serve_config.yaml`` imports ``graph:build_app`` and validates the YAML's
``args:`` block against ``OrchardArgs`` before anything starts.
"""

from __future__ import annotations

import re

from ray.serve import Application

from deployments.ingress import IngressDeployment, ModelRoute
from mlx_orchard.families import FAMILIES, OrchardArgs
from mlx_orchard.runtime import replica_env_vars


def _deployment_name(prefix: str, model: str) -> str:
    return f"{prefix}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', model)}"


def build_app(args: OrchardArgs) -> Application:
    if isinstance(args, dict):  # called directly rather than through `serve run`
        args = OrchardArgs.model_validate(args)
    env_vars = replica_env_vars(args.runtime.blas, args.runtime.env_vars)
    routes: dict[str, ModelRoute] = {}
    handles: dict[str, Application] = {}
    for family in FAMILIES:
        entries = args.models(family)
        if not entries:
            continue
        deployment = family.deployment_class()
        for entry in entries:
            name = _deployment_name(family.key, entry.name)
            handles[name] = deployment.options(name=name, **entry.ray_options(env_vars)).bind(entry)
            route = ModelRoute(name=entry.name, family=family.name, deployment=name)
            routes.update({alias: route for alias in entry.all_names()})
    ingress = IngressDeployment.options(**args.ingress.deployment.ray_options())  # type: ignore[misc,operator]  # a Deployment
    return ingress.bind(routes, handles, args.ingress)
