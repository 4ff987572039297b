"""Shared fixtures: one real Ray Serve application for the whole session, driven over HTTP.

The application is the one `serve run serve_config.yaml` starts (same `args:` block),
so the tests exercise the default configuration users get.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

# What the README's `serve` command sets: Serve's throughput-optimized mode.
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_args() -> dict:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    return config["applications"][0]["args"]


@pytest.fixture(scope="session")
def serve_instance():
    import ray
    from ray import serve

    port = _free_port()
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield f"http://127.0.0.1:{port}"
    ray.shutdown()  # takes Serve down with it; serve.shutdown() waits 30 s on this box


@pytest.fixture(scope="session")
def orchard(serve_instance) -> str:
    """Base URL of the default Orchard application (all families of serve_config.yaml)."""
    from ray import serve

    from graph import build_app

    serve.run(build_app(default_args()), name="orchard", route_prefix="/")
    return serve_instance


@pytest.fixture(scope="session")
def client(orchard):
    from openai import OpenAI

    return OpenAI(base_url=f"{orchard}/v1", api_key="unused", _strict_response_validation=True, max_retries=0)



@pytest.fixture(scope="session")
def handle_loop():
    """One event loop, on its own thread, for calling Serve deployment handles from tests.

    Throughput-optimized Serve binds a handle's router to the loop that first uses it,
    so every handle call in the session goes through this one loop.
    """
    import asyncio
    import threading

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def call(make_coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(make_coro(), loop).result(timeout)

    yield call
    loop.call_soon_threadsafe(loop.stop)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The default LLM converted to an MLX directory, as a replica on this machine gets it."""
    from mlx_orchard.models.registry import resolve_llm
    from mlx_orchard.runtime import mlx_uses_cpu_backend

    entry = default_args()["llm"][0]
    return resolve_llm(entry["source"], dequantize=mlx_uses_cpu_backend(), sha256=entry["sha256"])


def pytest_ignore_collect(collection_path: Path, config) -> bool | None:
    """tests/cluster needs a Ray cluster of its own, so a process runs it alone:
    it is collected only when named on the command line (`pytest tests/cluster`)."""
    cluster_dir = ROOT / "tests" / "cluster"
    if collection_path == cluster_dir or cluster_dir in collection_path.parents:
        named = [Path(a.split("::")[0]).resolve() for a in config.args]
        if not any(p == cluster_dir or cluster_dir in p.parents for p in named):
            return True
    return None
