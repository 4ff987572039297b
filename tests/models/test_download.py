"""Background downloads through huggingface_hub, against a local server speaking the Hub's
HTTP API (tests/hub_server.py) and against an address where nothing listens."""

from __future__ import annotations

import errno
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mlx_orchard.errors import InvalidRequestError
from mlx_orchard.models.catalog import delete_local, scan_local
from mlx_orchard.models.download import ALLOW_PATTERNS, Downloads
from tests.hub_server import HubServer, hub_server
from tests.models.test_catalog import LLAMA_4BIT, write_model

NOTHING_LISTENS = "http://127.0.0.1:9"  # the discard port: connections are refused at once
FETCHED = ["chat_template.jinja", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


@pytest.fixture
def online(monkeypatch):
    """Let huggingface_hub make requests. conftest sets HF_HUB_OFFLINE=1 before huggingface_hub
    is imported, and huggingface_hub reads it once, into constants: patch both."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


def llm_repo(root: Path, weights: bytes = b"w" * 4096) -> Path:
    """An mlx-community style repo, plus files a download must leave behind."""
    return write_model(
        root,
        {
            "config.json": LLAMA_4BIT,
            "model.safetensors": weights,
            "tokenizer.json": {"model": {"type": "BPE"}},
            "tokenizer_config.json": {"eos_token": "<|im_end|>"},
            "chat_template.jinja": "{{ messages }}",
            "README.md": "# tiny",
            "evil.py": "import os; os.system('echo pwned')",
            "big.bin": b"b" * 2048,
            "onnx/model.onnx": b"o" * 100,
            "model.Q4_0.gguf": b"GGUF",
        },
    )


@pytest.fixture
def hub(tmp_path, online) -> Iterator[HubServer]:
    repo = llm_repo(tmp_path / "repos" / "tiny-llm")
    readme_only = write_model(tmp_path / "repos" / "readme-only", {"README.md": "no model", "notes.txt": "hello"})
    repos = {"acme/tiny-llm": repo, "acme/gated": repo, "acme/readme-only": readme_only}
    with HubServer(repos, gated={"acme/gated"}) as server:
        yield server


def fetched(hub: HubServer, name: str) -> int:
    return sum(1 for method, path in hub.requests if method == "GET" and path.endswith("/" + name))


def listed(cache: Path, downloads: Downloads) -> list[str]:
    return sorted(scan_local([], hf_cache_dir=cache, exclude_repos=downloads.active_repos()))


def test_allow_patterns_fetch_no_code_and_no_duplicate_weights():
    assert "*.py" not in ALLOW_PATTERNS
    assert not {"*.bin", "*.pth", "*.onnx", "*.gguf", "*"} & set(ALLOW_PATTERNS)
    assert {"*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja", "*.npz"} == set(ALLOW_PATTERNS)


def test_ids_are_checked_before_anything_starts(tmp_path):
    downloads = Downloads(cache_dir=tmp_path, endpoint=NOTHING_LISTENS)
    for repo_id in ("../x", "a/b/c", "/etc/passwd", "a--b/c"):
        with pytest.raises(InvalidRequestError) as info:
            downloads.start(repo_id)
        assert info.value.code == "invalid_repo_id"
    with pytest.raises(InvalidRequestError) as info:
        downloads.start("acme/m", "../../main")
    assert info.value.code == "invalid_revision"
    assert downloads.all() == []


def test_an_unreachable_hub_fails_within_seconds_and_leaves_nothing(tmp_path, online):
    cache = tmp_path / "hub"
    downloads = Downloads(cache_dir=cache, endpoint=NOTHING_LISTENS)
    started = time.monotonic()
    state = downloads.start("acme/m")
    assert state.wait(10)
    assert time.monotonic() - started < 5
    assert state.status == "failed"
    assert "could not be reached" in state.error and "ConnectError" in state.error and NOTHING_LISTENS in state.error
    assert state.path is None and state.finished_at is not None
    assert listed(cache, downloads) == [] and scan_local([], hf_cache_dir=cache) == {}
    assert not (cache / "models--acme--m").exists()
    assert downloads.get("acme/m") is state and downloads.all() == [state]


def test_offline_mode_says_so(tmp_path, online, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    state = Downloads(cache_dir=tmp_path, endpoint=NOTHING_LISTENS).start("acme/m")
    assert state.wait(10)
    assert state.status == "failed" and "offline" in state.error


def test_download_end_to_end(tmp_path, hub):
    cache = tmp_path / "hub"
    downloads = Downloads(cache_dir=cache, endpoint=hub.endpoint)
    state = downloads.start("acme/tiny-llm")
    assert state.wait(30)
    assert state.status == "done", state.error

    repo = tmp_path / "repos" / "tiny-llm"
    expected = sum((repo / name).stat().st_size for name in FETCHED)
    assert state.bytes_done == state.bytes_total == expected > 0
    assert sorted(p.name for p in state.path.iterdir()) == FETCHED
    assert state.path == cache / "models--acme--tiny-llm" / "snapshots" / state.commit
    assert (state.path / "model.safetensors").read_bytes() == (repo / "model.safetensors").read_bytes()
    for name in ("evil.py", "big.bin", "model.onnx", "model.Q4_0.gguf", "README.md"):
        assert fetched(hub, name) == 0, name
    json.dumps(state.to_dict())

    assert downloads.active_repos() == set()
    model = scan_local([], hf_cache_dir=cache, exclude_repos=downloads.active_repos())["acme/tiny-llm"]
    assert (model.family, model.source, model.revision, model.path) == ("llm", "hf-cache", state.commit, state.path)
    assert model.quantization == {"bits": 4, "group_size": 64}
    assert model.size_bytes == 4096

    # Done and still on disk: asking again fetches nothing.
    requests = len(hub.requests)
    assert downloads.start("acme/tiny-llm") is state
    assert len(hub.requests) == requests

    # Deleted: asking again downloads it again.
    delete_local(model, [], hf_cache_dir=cache)
    assert listed(cache, downloads) == []
    again = downloads.start("acme/tiny-llm")
    assert again is not state and again.wait(30) and again.status == "done"
    assert listed(cache, downloads) == ["acme/tiny-llm"]


def test_one_download_per_repo_with_progress_while_it_runs(tmp_path, online):
    cache = tmp_path / "hub"
    repo = llm_repo(tmp_path / "repos" / "big", weights=b"\0" * (24 << 20))  # > 2 x huggingface_hub's 10 MiB read chunk
    with HubServer({"acme/big": repo}) as hub:
        hub.gate.clear()  # every file body stops halfway
        downloads = Downloads(cache_dir=cache, endpoint=hub.endpoint)
        with ThreadPoolExecutor(8) as pool:
            states = list(pool.map(lambda _: downloads.start("acme/big"), range(8)))
        state = states[0]
        assert all(s is state for s in states)

        deadline = time.monotonic() + 20
        while state.bytes_done == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        expected = sum((repo / name).stat().st_size for name in FETCHED)
        assert state.status == "downloading"
        assert state.bytes_total == expected
        assert 0 < state.bytes_done < expected
        assert downloads.start("acme/big") is state
        assert downloads.active_repos() == {"acme/big"}
        assert listed(cache, downloads) == []

        hub.gate.set()
        assert state.wait(30)
        assert state.status == "done", state.error
        assert state.bytes_done == state.bytes_total == expected
        assert fetched(hub, "model.safetensors") == 1
        assert listed(cache, downloads) == ["acme/big"]


@pytest.mark.parametrize(
    ("repo_id", "revision", "reason"),
    [
        ("acme/missing", None, "repository not found"),
        ("acme/tiny-llm", "nope", "revision 'nope' not found"),
        ("acme/gated", None, "gated repository"),
        ("acme/readme-only", None, "not a model: no config.json / weights"),
    ],
)
def test_failures_have_a_reason_and_leave_nothing_listed(tmp_path, hub, repo_id, revision, reason):
    from huggingface_hub import scan_cache_dir

    cache = tmp_path / "hub"
    downloads = Downloads(cache_dir=cache, endpoint=hub.endpoint)
    state = downloads.start(repo_id, revision)
    assert state.wait(30)
    assert state.status == "failed"
    assert reason in state.error
    assert state.path is None
    assert scan_local([], hf_cache_dir=cache) == {}
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    assert not [p for p in storage.glob("snapshots/*/*")], "no partial snapshot"
    if cache.exists():
        assert scan_cache_dir(cache).warnings == []  # the cache stays valid for huggingface_hub


def test_a_404_repo_from_the_context_manager(tmp_path, online):
    with hub_server({}) as endpoint:
        state = Downloads(cache_dir=tmp_path, endpoint=endpoint).start("acme/nothing-here")
        assert state.wait(30)
    assert state.status == "failed" and "repository not found" in state.error


def test_a_full_disk_fails_keeps_finished_blobs_and_a_retry_completes(tmp_path, hub, monkeypatch):
    from huggingface_hub import file_download, scan_cache_dir

    real_http_get = file_download.http_get

    def disk_full_for_weights(url, *args, **kwargs):
        if url.endswith("/model.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_http_get(url, *args, **kwargs)

    monkeypatch.setattr(file_download, "http_get", disk_full_for_weights)
    cache = tmp_path / "hub"
    downloads = Downloads(cache_dir=cache, endpoint=hub.endpoint)
    state = downloads.start("acme/tiny-llm")
    assert state.wait(30)
    assert (state.status, state.error) == ("failed", "no space left on device")

    storage = cache / "models--acme--tiny-llm"
    assert list(storage.glob("snapshots/*")) == []  # the partial snapshot is gone...
    assert not (storage / "refs" / "main").exists()
    assert len(list(storage.glob("blobs/*"))) == len(FETCHED) - 1  # ...the finished files are not
    assert scan_cache_dir(cache).warnings == []
    assert listed(cache, downloads) == [] and scan_local([], hf_cache_dir=cache) == {}
    assert downloads.active_repos() == set()  # nothing of it left to hide

    monkeypatch.setattr(file_download, "http_get", real_http_get)
    again = downloads.start("acme/tiny-llm")
    assert again is not state  # a failed download is restarted
    assert again.wait(30) and again.status == "done", again.error
    assert fetched(hub, "config.json") == 1 and fetched(hub, "model.safetensors") == 1
    assert listed(cache, downloads) == ["acme/tiny-llm"]


def test_a_failed_update_leaves_the_complete_model_listed(tmp_path, hub):
    cache = tmp_path / "hub"
    downloads = Downloads(cache_dir=cache, endpoint=hub.endpoint)
    done = downloads.start("acme/tiny-llm")
    assert done.wait(30) and done.status == "done"
    main = (cache / "models--acme--tiny-llm" / "refs" / "main").read_text()

    failed = downloads.start("acme/tiny-llm", "v2-typo")
    assert failed.wait(30) and failed.status == "failed"
    assert downloads.get("acme/tiny-llm") is failed
    assert listed(cache, downloads) == ["acme/tiny-llm"]
    assert (cache / "models--acme--tiny-llm" / "refs" / "main").read_text() == main


def test_downloads_are_daemon_threads(tmp_path, hub):
    state = Downloads(cache_dir=tmp_path, endpoint=hub.endpoint).start("acme/tiny-llm")
    threads = [t for t in threading.enumerate() if t.name == "download acme/tiny-llm"]
    assert all(t.daemon for t in threads)
    assert state.wait(30)
