"""Any model, on demand: models found on disk or fetched from a (local) Hugging Face Hub,
loaded on first use into the LLM pool, evicted by LRU, idle time and memory; the
management endpoints. One Serve application for the module, beside the default one."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import SESSION_DIR, default_args
from tests.hub_server import hub_server
from tests.prometheus import L, moved, scrape, total, wait_for
from tests.tiny_models import greedy_reference, link_copy, write_tiny_llama

APP = "models"
HELLO = [{"role": "user", "content": "Say hello."}]
TINY = ("tiny-a", "tiny-b", "tiny-c", "tiny-d", "tiny-e")


@pytest.fixture(scope="module")
def model_dirs(smollm2_dir) -> dict[str, Path]:
    """Local models: tiny random llamas (one 4-bit), and the default model's converted
    directory under another name; plus two repos for the local Hub."""
    root = SESSION_DIR / "models-api"
    local = root / "models"
    dirs = {name: write_tiny_llama(local / name, smollm2_dir, seed=i) for i, name in enumerate(TINY)}
    dirs["tiny-q"] = write_tiny_llama(local / "tiny-q", smollm2_dir, seed=9, quantize={"group_size": 32, "bits": 4})
    dirs["smollm2-copy"] = link_copy(smollm2_dir, local / "smollm2-copy")
    dirs["hub/tiny-hub"] = write_tiny_llama(root / "hub" / "tiny-hub", smollm2_dir, seed=20)
    dirs["hub/tiny-ondemand"] = write_tiny_llama(root / "hub" / "tiny-ondemand", smollm2_dir, seed=21)
    return dirs


@pytest.fixture(scope="module")
def hub(model_dirs):
    with hub_server({"hub/tiny-hub": model_dirs["hub/tiny-hub"], "hub/tiny-ondemand": model_dirs["hub/tiny-ondemand"]}) as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def app(serve_instance, model_dirs, hub):
    from ray import serve

    from graph import build_app

    args = default_args()
    config = {
        "ingress": args["ingress"],
        # conftest turns the Hub off for the session; this app's Hub is the local one.
        "runtime": {**args["runtime"], "env_vars": {"HF_HUB_OFFLINE": "0"}},
        "models": {
            "search_dirs": [str(model_dirs["tiny-a"].parent)],
            "hub_endpoint": hub,
            "on_demand": True,
            "report_interval_s": 0.25,
        },
        "pools": {
            "llm": {
                "max_num_models_per_replica": 2,
                "memory_gb": 1.0,
                "defaults": {"kv_cache_gb": 0.01, "max_batch_size": 8, "prefix_cache_size": 0},
                "deployment": {"ray_actor_options": {"num_cpus": 0.1}},
            }
        },
        # Configured but not pinned: loads on first use. Its KV budget alone exceeds the pool's memory.
        "llm": [{"name": "big-kv", "source": str(model_dirs["smollm2-copy"]), "pinned": False, "kv_cache_gb": 5}],
    }
    serve.run(build_app(config), name=APP, route_prefix=f"/{APP}")
    yield f"{serve_instance}/{APP}"
    serve.delete(APP)


@pytest.fixture(scope="module")
def sdk(app) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app}/v1", api_key="unused", _strict_response_validation=True, max_retries=0, timeout=180)


def _pool(handle_loop, method: str):
    from ray import serve

    async def call():
        return await getattr(serve.get_deployment_handle("llm", app_name=APP), method).remote()

    return handle_loop(call)


def _loaded(handle_loop) -> set[str]:
    return {m.name for m in _pool(handle_loop, "loaded").models if not m.closing}


def _until(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _chat(sdk, model: str, **kw) -> str:
    r = sdk.chat.completions.create(model=model, messages=HELLO, max_tokens=8, temperature=0, **kw)
    return r.choices[0].message.content


def _card(app: str, model: str) -> dict:
    r = httpx.get(f"{app}/v1/models/{model}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def test_first_request_loads_a_local_model_and_answers_with_its_own_weights(sdk, app, model_dirs, handle_loop):
    assert "tiny-a" not in _loaded(handle_loop)
    assert _card(app, "tiny-a")["status"] == "available"
    a, b = _chat(sdk, "tiny-a"), _chat(sdk, "tiny-b")
    # Real inference on each model's own random weights: exactly what mlx-lm generates.
    assert a == greedy_reference(model_dirs["tiny-a"], HELLO, 8)
    assert b == greedy_reference(model_dirs["tiny-b"], HELLO, 8)
    assert a != b
    card = _until(lambda: (c := _card(app, "tiny-a"))["status"] == "loaded" and c, what="tiny-a reported loaded")
    (where,) = card["loaded_on"]
    assert where["deployment"] == "llm" and where["node_id"] and not where["pinned"]
    assert card["family"] == "llm" and card["source"] == "local" and card["context_length"] == 2048


def test_the_default_models_directory_under_another_name_answers(sdk):
    assert "Paris" in sdk.chat.completions.create(
        model="smollm2-copy", messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=20, temperature=0
    ).choices[0].message.content


def test_a_third_model_evicts_the_least_recently_used(sdk, handle_loop):
    _chat(sdk, "tiny-a")
    _chat(sdk, "tiny-b")
    _chat(sdk, "tiny-a")  # b is now the least recently used
    _chat(sdk, "tiny-c")
    assert _loaded(handle_loop) == {"tiny-a", "tiny-c"}


def test_keep_alive_unloads_an_idle_model(sdk, handle_loop):
    _chat(sdk, "tiny-b", extra_body={"keep_alive": 1})
    assert "tiny-b" in _loaded(handle_loop)
    _until(lambda: "tiny-b" not in _loaded(handle_loop), timeout=15, what="tiny-b to be unloaded when idle")


def test_concurrent_requests_for_an_unloaded_model_load_it_once(sdk, handle_loop):
    assert "tiny-d" not in _loaded(handle_loop)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _chat(sdk, "tiny-d"), range(4)))
    assert len(set(answers)) == 1
    assert _pool(handle_loop, "loads")["tiny-d"] == 1


def test_a_load_beyond_the_memory_budget_is_refused_and_the_replica_keeps_serving(sdk, handle_loop):
    loaded = _loaded(handle_loop)
    with pytest.raises(openai.APIStatusError) as e:
        _chat(sdk, "big-kv")
    assert e.value.status_code == 507
    assert e.value.body["code"] == "insufficient_memory"
    assert "budget" in e.value.body["message"]
    assert _loaded(handle_loop) == loaded  # nothing was evicted for a load that cannot fit
    assert _chat(sdk, "tiny-a")


def test_load_and_unload_endpoints_and_the_mlx_audio_form(app, handle_loop):
    r = httpx.post(f"{app}/v1/models/tiny-q/load", json={}, timeout=60)
    assert r.status_code == 200, r.text
    assert "tiny-q" in _loaded(handle_loop)
    card = _until(lambda: (c := _card(app, "tiny-q"))["status"] == "loaded" and c, what="tiny-q reported loaded")
    assert card["quantization"] == {"bits": 4, "group_size": 32}
    r = httpx.post(f"{app}/v1/models/tiny-q/unload", timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "available"
    assert "tiny-q" not in _loaded(handle_loop)
    assert httpx.post(f"{app}/v1/models", params={"model_name": "tiny-q"}, timeout=60).status_code == 200
    assert "tiny-q" in _loaded(handle_loop)
    assert httpx.delete(f"{app}/v1/models", params={"model_name": "tiny-q"}, timeout=60).json()["status"] == "available"
    assert "tiny-q" not in _loaded(handle_loop)


def test_delete_refuses_loaded_unknown_and_escaping_ids_and_removes_the_rest(app, sdk, model_dirs, handle_loop):
    _chat(sdk, "tiny-a")
    _until(lambda: _card(app, "tiny-a")["status"] == "loaded", what="tiny-a reported loaded")
    loaded = httpx.delete(f"{app}/v1/models/tiny-a", timeout=30)
    assert loaded.status_code == 409 and loaded.json()["error"]["code"] == "conflict"
    unknown = httpx.delete(f"{app}/v1/models/no-such-model", timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    for escaping in ("..%2F..%2Fetc", "%2Fetc%2Fpasswd", "a%2F..%2F..%2Fb", "~root"):
        r = httpx.delete(f"{app}/v1/models/{escaping}", timeout=30)
        assert r.status_code == 400, (escaping, r.text)
        assert r.json()["error"]["code"] == "invalid_model_id"
        r = httpx.post(f"{app}/v1/chat/completions", json={"model": escaping.replace("%2F", "/"), "messages": HELLO}, timeout=30)
        assert r.status_code == 400, (escaping, r.text)
    assert model_dirs["tiny-a"].exists()
    gone = httpx.delete(f"{app}/v1/models/tiny-e", timeout=30)
    assert gone.status_code == 200 and gone.json() == {"id": "tiny-e", "object": "model", "deleted": True}
    assert not model_dirs["tiny-e"].exists()
    assert httpx.get(f"{app}/v1/models/tiny-e", timeout=30).status_code == 404


def test_download_from_the_hub_then_serve_it(app, sdk, model_dirs):
    r = httpx.post(f"{app}/v1/models/download", json={"repo_id": "hub/tiny-hub"}, timeout=30)
    assert r.status_code == 202, r.text
    assert r.json()["status"] in ("downloading", "available")
    card = _until(lambda: (c := _card(app, "hub/tiny-hub"))["status"] == "available" and c, timeout=60, what="download")
    assert card["family"] == "llm" and card["source"] == "hf-cache" and card["revision"]
    assert card["size_bytes"] > 0
    assert _chat(sdk, "hub/tiny-hub") == greedy_reference(model_dirs["hub/tiny-hub"], HELLO, 8)
    # The download's progress reached the metrics: every byte of it, and that it finished.
    samples = wait_for(lambda s: [] if total(s, "ray_orchard_downloads_total", status="done") >= 1 else ["no done download"])
    fetched = total(samples, "ray_orchard_download_bytes", repo_id="hub/tiny-hub")
    assert fetched > 0 and fetched == total(samples, "ray_orchard_download_total_bytes", repo_id="hub/tiny-hub")


def test_on_demand_downloads_and_loads_on_first_use(sdk, model_dirs):
    assert _chat(sdk, "hub/tiny-ondemand") == greedy_reference(model_dirs["hub/tiny-ondemand"], HELLO, 8)


def test_a_download_that_fails_shows_failed_and_leaves_nothing_ready(app, sdk):
    r = httpx.post(f"{app}/v1/models/download", json={"repo_id": "hub/missing"}, timeout=30)
    assert r.status_code == 202
    card = _until(lambda: (c := _card(app, "hub/missing"))["status"] == "failed" and c, timeout=60, what="failure")
    assert "not found" in card["reason"]
    wait_for(lambda s: [] if total(s, "ray_orchard_downloads_total", status="failed") >= 1 else ["no failed download"])
    with pytest.raises(openai.NotFoundError):
        _chat(sdk, "hub/missing")
    for bad in ({"repo_id": "../etc"}, {"repo_id": "/abs/path"}, {"repo_id": "a/b/c"}, {"repo_id": "a/b", "revision": "../x"}):
        r = httpx.post(f"{app}/v1/models/download", json=bad, timeout=30)
        assert r.status_code == 400, (bad, r.text)


def test_an_unloaded_model_finishes_its_requests_first(app, sdk, model_dirs, handle_loop):
    # Unloading tiny-b while it streams a long answer: the stream runs to its end (no new
    # request reaches tiny-b meanwhile), then the model goes.
    stream = sdk.chat.completions.create(model="tiny-b", messages=HELLO, max_tokens=1500, temperature=0, stream=True)
    text = [next(stream).choices[0].delta.content or ""]
    before = scrape()

    def unload() -> tuple[dict, float]:
        r = httpx.post(f"{app}/v1/models/tiny-b/unload", timeout=300)
        return r.json(), time.monotonic()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        unloading = pool.submit(unload)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
        streamed_until = time.monotonic()
        card, unloaded_at = unloading.result()
    assert "".join(text) == greedy_reference(model_dirs["tiny-b"], HELLO, 1500)  # not cut short
    assert card["status"] == "available" and not card["loaded_on"]
    assert unloaded_at >= streamed_until
    assert "tiny-b" not in _loaded(handle_loop)
    wait_for(moved(before, {L("model_evictions_total", family="llm", model="tiny-b", reason="asked"): 1}))
