"""Shared fixtures: one real Ray Serve application for the whole session, driven over HTTP.

The application is the one `serve run serve_config.yaml` starts (same `args:` block),
so the tests exercise the default configuration users get.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _session_dir() -> tuple[Path, bool]:
    """One directory under the system temp dir for everything this test session writes.

    Kept in ORCHARD_TEST_TMP so Ray workers (and any second import of this module) reuse
    it rather than making their own. Set ORCHARD_TEST_TMP yourself to keep a directory,
    and its converted models, across sessions; a directory made here is removed at the end.
    """
    given = os.environ.get("ORCHARD_TEST_TMP")
    if given:
        return Path(given), False
    # A session killed before pytest_unconfigure leaves its directory (up to ~600 MB of
    # converted models): remove those whose pytest process is gone.
    for stale in Path(tempfile.gettempdir()).glob("orchard-tests-*-*"):
        pid = stale.name.split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=f"orchard-tests-{os.getpid()}-"))
    os.environ["ORCHARD_TEST_TMP"] = str(path)
    return path, True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


# Set before Ray, Hugging Face or Orchard's model code is imported; Ray's workers inherit
# os.environ, so replicas write here too. Without this the tests would write under $HOME:
# ~/.cache/orchard (converted models), ~/.cache/huggingface, ~/.config/pulse (libpulse,
# loaded by espeak-ng) and ~/.ray/auth_token (below). Ray's temp dir is /tmp/ray already.
SESSION_DIR, _SESSION_DIR_IS_OURS = _session_dir()
os.environ["ORCHARD_CACHE"] = str(SESSION_DIR / "orchard")  # GGUF/CT2 -> MLX, once per session
os.environ["HF_HOME"] = str(SESSION_DIR / "huggingface")
os.environ["XDG_CACHE_HOME"] = str(SESSION_DIR / "cache")
os.environ["XDG_CONFIG_HOME"] = str(SESSION_DIR / "config")  # espeak-ng's libpulse writes ~/.config/pulse

# Ray token auth. A new local cluster (ray.init() here, `serve run` in `make serve`) turns
# token auth on when RAY_AUTH_MODE is unset, and writes a token to ~/.ray/auth_token if it
# finds none (ray/_private/worker.py, ensure_token_if_auth_enabled). The session has its
# own token file instead: RAY_AUTH_TOKEN_PATH is where every Ray process of the session
# (driver, raylet, dashboard, workers, tests/cluster's nodes) looks for it.
os.environ.setdefault("RAY_AUTH_MODE", "token")
_TOKEN = SESSION_DIR / "ray" / "auth_token"
if not _TOKEN.exists():
    _TOKEN.parent.mkdir(parents=True, exist_ok=True)
    _TOKEN.touch(mode=0o600)
    _TOKEN.write_text(secrets.token_hex(32))
os.environ["RAY_AUTH_TOKEN_PATH"] = str(_TOKEN)
os.environ.pop("RAY_AUTH_TOKEN", None)  # it would win over RAY_AUTH_TOKEN_PATH

# What the README's `serve` command sets: Serve's throughput-optimized mode.
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
os.environ.setdefault("RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE", "1")  # log lines written as logged (Makefile)
os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_unconfigure(config) -> None:
    if _SESSION_DIR_IS_OURS:
        shutil.rmtree(SESSION_DIR, ignore_errors=True)


def _free_port() -> int:
    """A free port below the kernel's ephemeral range (32768+) and above Ray's worker ports
    (10002-19999): the processes a Ray cluster starts bind ephemeral ports of their own, and
    one took a port the kernel had just handed us for the dashboard (a CI run failed on it)."""
    for port in random.sample(range(20_000, 30_000), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-30000")


def default_args() -> dict:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    return config["applications"][0]["args"]


@pytest.fixture(scope="session")
def serve_instance():
    import ray
    from ray import serve

    port = _free_port()
    # Logical CPUs are scheduling tokens, not cores. The default app's model pools reserve a
    # share each and test modules run apps of their own beside it: with Ray's default (one per
    # core, 2 here) their replicas could run out of room and serve.run would wait forever (a CI
    # run timed out on exactly that, when the pools reserved 0.5 each).
    # Metrics reach the node's Prometheus export every second (Ray's default: 10 s), so the
    # metrics tests see what they drove soon.
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, _system_config={"metrics_report_interval_ms": 1000})
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



@contextlib.contextmanager
def module_app(serve_instance: str, name: str, args: dict) -> Iterator[str]:
    """A Serve app of a test module's own (its ``args:`` block) beside the default one, at ``/<name>``."""
    from ray import serve

    from graph import build_app

    serve.run(build_app(args), name=name, route_prefix=f"/{name}")
    yield f"{serve_instance}/{name}"
    serve.delete(name)


def sdk_client(base_url: str, timeout: float = 300):
    from openai import OpenAI

    return OpenAI(base_url=f"{base_url}/v1", api_key="unused", _strict_response_validation=True, max_retries=0, timeout=timeout)


def replica_stats(handle_loop, app: str, deployment: str, model: str):
    """``stats()`` of the family replica that serves ``model`` in ``app``, through a Serve handle."""
    from ray import serve

    async def get():
        handle = serve.get_deployment_handle(deployment, app_name=app).options(multiplexed_model_id=model)
        return await handle.stats.remote()

    return handle_loop(get)


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


@pytest.fixture(scope="session")
def tiny_vlm_dir(smollm2_dir) -> Path:
    """A tiny random-weight SmolVLM (tests/vlm_model.py) with SmolLM2's tokenizer."""
    from tests.vlm_model import build_tiny_smolvlm

    return build_tiny_smolvlm(SESSION_DIR / "tiny-smolvlm", smollm2_dir)


@pytest.fixture(scope="session")
def tiny_sam_audio_dir(smollm2_dir) -> Path:
    """A tiny random-weight SAM-Audio (tests/separation_model.py) with SmolLM2's tokenizer."""
    from tests.separation_model import build_tiny_sam_audio

    return build_tiny_sam_audio(SESSION_DIR / "tiny-sam-audio", smollm2_dir)


@pytest.fixture(scope="session")
def tiny_image_dir(smollm2_dir) -> Path:
    """A tiny random-weight FLUX.2-klein (tests/images_model.py) with SmolLM2's tokenizer."""
    from tests.images_model import build_tiny_image_model

    return build_tiny_image_model(SESSION_DIR / "tiny-flux2-klein", smollm2_dir)
