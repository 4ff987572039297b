"""``GET /v1/cluster``: the Ray nodes, what they declare, and which replicas run on each.

Nodes come from the GCS (``ray.nodes()``); replicas from Ray's state API, which needs the
dashboard (``serve run`` starts it). Without it the view still lists the nodes.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel

logger = logging.getLogger("orchard.cluster")

# Serve names replica actors "SERVE_REPLICA::<app>#<deployment>#<replica id>".
_REPLICA_PREFIX = "SERVE_REPLICA::"


class ReplicaPlacement(BaseModel):
    application: str
    deployment: str
    replica_id: str
    state: str


class NodeView(BaseModel):
    node_id: str
    address: str
    alive: bool
    is_head: bool
    resources: dict[str, float]
    labels: dict[str, str] = {}
    replicas: list[ReplicaPlacement] = []


class ClusterView(BaseModel):
    object: str = "cluster"
    nodes: list[NodeView]
    replicas_known: bool  # False when the state API (dashboard) is not reachable


def _replicas_by_node() -> dict[str, list[ReplicaPlacement]] | None:
    try:
        from ray.util.state import list_actors

        actors = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False)
    except Exception as e:  # noqa: BLE001 - no dashboard: degrade to nodes only
        logger.info("replica placement unavailable: %s", e)
        return None
    placed: dict[str, list[ReplicaPlacement]] = {}
    for actor in actors:
        name = actor.name or ""
        if not name.startswith(_REPLICA_PREFIX):
            continue
        app, _, rest = name.removeprefix(_REPLICA_PREFIX).partition("#")
        deployment, _, replica = rest.partition("#")
        placed.setdefault(actor.node_id or "", []).append(
            ReplicaPlacement(application=app, deployment=deployment, replica_id=replica, state=actor.state)
        )
    return placed


def cluster_view() -> ClusterView:
    """Blocking (GCS and state API calls): run it off the event loop."""
    import ray

    placed = _replicas_by_node()
    nodes = []
    for n in ray.nodes():
        resources = {k: v for k, v in n.get("Resources", {}).items() if not k.startswith("node:")}
        nodes.append(
            NodeView(
                node_id=n["NodeID"],
                address=n.get("NodeManagerAddress", ""),
                alive=bool(n.get("Alive")),
                is_head="node:__internal_head__" in n.get("Resources", {}),
                resources=resources,
                labels={k: str(v) for k, v in (n.get("Labels") or {}).items()},
                replicas=sorted((placed or {}).get(n["NodeID"], []), key=lambda r: (r.deployment, r.replica_id)),
            )
        )
    nodes.sort(key=lambda n: (not n.is_head, not n.alive, n.address, n.node_id))
    return ClusterView(nodes=nodes, replicas_known=placed is not None)
