"""Orchard serving one ``@serve.batch`` family of serve_config.yaml (embeddings or whisper),
for the side-by-side benchmarks, plus the report metadata they share.

Reuses ``servers.Server`` (own session, stop everything it spawned) and the environment
``compare_llm`` gives Orchard; only the readiness probe differs, since these servers
have no chat model to ask.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import yaml

from bench.compare_llm import RESULTS, ROOT, _cpu_model, _git_commit, log  # noqa: F401 - re-exported
from bench.compare_llm import _load as load_average
from bench.servers import Server
from mlx_orchard.families import FAMILIES as _FAMILIES

# The config keys of every family's model list, from the registry.
FAMILIES = tuple(f.key for f in _FAMILIES)
# `serve run` spends ~30 s in Serve's graceful shutdown on Ctrl-C here; the session kill that
# follows stops everything anyway, so the benchmarks wait less.
STOP_GRACE_S = 8.0


def first_entry(config_path: Path, family: str) -> dict:
    return yaml.safe_load(config_path.read_text())["applications"][0]["args"][family][0]


def family_server(
    config_path: Path, family: str, port: int, workdir: Path, *, batching: dict | None = None, tag: str = "",
    keep: int = 1,
) -> Server:
    """``serve run`` of a copy of the config with only the first ``keep`` ``family`` models
    (other families' replicas would load and sit on the same cores), ``batching`` merged into it."""
    config = yaml.safe_load(config_path.read_text())
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    for app in config["applications"]:
        args = app["args"]
        for key in FAMILIES:
            if key in args:
                args[key] = args[key][:keep] if key == family else []
        args["pools"] = {k: v for k, v in (args.get("pools") or {}).items() if k == family}
        if batching:  # the family pool's live batching knobs
            pool = args["pools"].setdefault(family, {})
            pool["batching"] = {**pool.get("batching", {}), **batching}
    path = workdir / f"serve_config-{family}{tag}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_worker_niceness": "0"}
    env.pop("RAY_ADDRESS", None)
    cmd = ["serve", "run", str(path), "--address", "local", "--app-dir", str(ROOT)]
    return Server(
        f"orchard-{family}{tag}", cmd, env=env, cwd=ROOT, log_path=RESULTS / "logs" / f"orchard-{family}{tag}.log"
    )


def wait_ready(server: Server, probe: Callable[[], bool], timeout: float = 240.0) -> float:
    """Seconds until ``probe()`` (one real request) succeeds; fails early if the server exits."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if server.proc is None or server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited during start-up:\n{server.log_tail()}")
        try:
            if probe():
                return time.perf_counter() - t0
        except Exception:  # noqa: BLE001 - not up yet (connection refused, 404 while deploying, ...)
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{server.name} not ready after {timeout:.0f}s:\n{server.log_tail()}")


def meta(**extra) -> dict:
    return {
        "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} cores, {_cpu_model()}, {platform.system()} {platform.machine()}",
        "load_before": load_average(),
        "versions": ", ".join(f"{p} {version(p)}" for p in ("mlx", "ray", "mlx-embeddings", "mlx-whisper")),
        "commit": _git_commit(),
        **extra,
    }


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return (s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2) if s else float("nan")


def write_report(prefix: str, report: str, res: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{prefix}-{datetime.now().strftime('%Y-%m-%d-%H%M')}"
    stem.with_suffix(".md").write_text(report)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
    return stem.with_suffix(".md")
