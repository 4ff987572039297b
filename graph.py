"""The Orchard application graph: the only place that calls ``.bind()``.

``serve run serve_config.yaml`` imports ``graph:build_app`` and validates the YAML's
``args:`` block against ``OrchardArgs`` before anything starts.

Each family is one deployment (its pool) with its models multiplexed onto its replicas;
a model configured ``dedicated: true`` gets a deployment of its own. The model manager
holds the catalog every deployment shares.
"""

from __future__ import annotations

import re

from ray.serve import Application

from deployments.ingress import IngressDeployment
from deployments.model_manager import ModelManagerDeployment
from mlx_orchard.families import FAMILIES, OrchardArgs, PoolSpec
from mlx_orchard.models.manager import Configured, Route
from mlx_orchard.runtime import replica_env_vars


def _deployment_name(prefix: str, model: str) -> str:
    return f"{prefix}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', model)}"


def build_app(args: OrchardArgs) -> Application:
    if isinstance(args, dict):  # called directly rather than through `serve run`
        args = OrchardArgs.model_validate(args)
    env_vars = replica_env_vars(args.runtime.blas, args.runtime.env_vars)
    metrics_env = {} if args.runtime.metrics else {"ORCHARD_METRICS": "0"}  # read by deployments/metrics.py
    env_vars = {**metrics_env, **env_vars}
    # Replicas (and the manager, which downloads) reach the Hub mirror the config names.
    if args.models.hub_endpoint:
        env_vars = {"HF_ENDPOINT": args.models.hub_endpoint, **env_vars}
    configured: list[Configured] = []
    specs: list[tuple[PoolSpec, dict]] = []
    pools: dict[str, str] = {}  # family name -> pool deployment
    for family in FAMILIES:
        entries = args.configured(family)
        pooled = tuple(e for e in entries if not e.dedicated)
        pool = args.pool(family)
        # A family has a pool when it has models for it, or the config names its pool (to
        # serve models found on disk or fetched on demand): an unused pool would hold a replica.
        if pooled or family.key in args.pools:
            pools[family.name] = family.key
            spec = PoolSpec(family.key, family.key, pool, pooled, args.models)
            specs.append((spec, pool.ray_options(env_vars, spec.batching())))
        for entry in entries:
            deployment = family.key
            if entry.dedicated:
                deployment = _deployment_name(family.key, entry.name)
                own = entry.dedicated_pool()
                spec = PoolSpec(family.key, deployment, own, (entry,), args.models, dedicated=True)
                specs.append((spec, own.ray_options(env_vars, spec.batching())))
            configured.append(
                Configured(entry.name, tuple(entry.aliases), family.name, deployment, entry.source, entry.pinned or entry.dedicated)
            )
    manager = ModelManagerDeployment.options(  # type: ignore[attr-defined]  # a Deployment
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env_vars}}
    ).bind(configured, pools, args.models)
    handles: dict[str, Application] = {}
    for spec, options in specs:
        cls = spec.family_spec.deployment_class()
        handles[spec.deployment] = cls.options(name=spec.deployment, **options).bind(spec, manager)
    routes = {
        alias: Route(c.name, c.family, c.deployment) for c in configured for alias in (c.name, *c.aliases)
    }
    ingress = IngressDeployment.options(**args.ingress.ray_options(metrics_env))  # type: ignore[misc,operator]  # a Deployment
    return ingress.bind(routes, handles, args.ingress, manager, args.models.management_api)
