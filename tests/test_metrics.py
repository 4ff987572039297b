"""Issue 15: Orchard's metrics reach the node's Prometheus export, and every request has an id
that the ingress and the family replicas log.

Each test drives a family through real Serve (the default app: SmolLM2, MiniLM, Whisper,
Kokoro; this module's app: a tiny FLUX.2-klein and a tiny SmolVLM), then scrapes the
metrics export port of Ray's node (what Prometheus scrapes) until the series it drove have
moved by what the answers say happened.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
import uuid
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.conftest import default_args, module_app, sdk_client
from tests.prometheus import L, moved, scrape, series, total, wait_for
from tests.speech import SENTENCES, speak_wav

APP = "metrics"
IMAGES, VLM, BROKEN = "tiny-klein", "tiny-vlm", "broken-klein"
LLM = "smollm2"


@pytest.fixture(scope="module")
def app(serve_instance, tiny_image_dir, tiny_vlm_dir, tmp_path_factory):
    broken = tmp_path_factory.mktemp("broken-klein")
    for f in tiny_image_dir.rglob("*"):  # the same layout, every weight file garbage
        if f.is_file():
            target = broken / f.relative_to(tiny_image_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"not weights" if f.suffix == ".safetensors" else f.read_bytes())
    args = default_args()
    small = {"ray_actor_options": {"num_cpus": 0.1}}
    config = {
        "ingress": args["ingress"],
        "runtime": args["runtime"],
        "pools": {
            # one request at a time and one queued: a burst is shed (503) by the ingress
            "images": {"deployment": {**small, "max_ongoing_requests": 1, "max_queued_requests": 1},
                       "batching": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}},
            "vlm": {"deployment": small},
        },
        "images": [
            {"name": IMAGES, "source": str(tiny_image_dir), "preset": "flux2-klein", "default_size": "64x64", "max_steps": 4},
            {"name": BROKEN, "source": str(broken), "preset": "flux2-klein", "default_size": "64x64", "max_steps": 4,
             "pinned": False},  # loaded by its first request, which fails
        ],
        "vlm": [{"name": VLM, "source": str(tiny_vlm_dir), "kv_cache_gb": 0.1}],
    }
    with module_app(serve_instance, APP, config) as url:
        yield url


# ---- the families ----


def test_llm_requests_move_token_latency_and_batch_metrics(orchard):
    sdk = sdk_client(orchard)
    before = scrape()
    messages = [{"role": "user", "content": "Name three colours of the rainbow."}]
    stream = sdk.chat.completions.create(model=LLM, messages=messages, max_tokens=12, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage is not None][0]
    again = sdk.chat.completions.create(model=LLM, messages=messages, max_tokens=12, temperature=0)  # the prefix cache
    schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
    sdk.chat.completions.create(model=LLM, messages=messages, max_tokens=24, temperature=0,
                                response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached > 0  # the second request found the first's prompt
    tags = {"family": "llm", "model": LLM}
    expected = {
        L("llm_requests_total", **tags): 3,
        L("llm_prompt_tokens_total", **tags): 2 * usage.prompt_tokens,
        L("llm_cached_tokens_total", **tags): cached,
        L("llm_completion_tokens_total", **tags): usage.completion_tokens + again.usage.completion_tokens,
        L("llm_structured_requests_total", kind="json_schema", **tags): 1,
        L("llm_time_to_first_token_s_count", **tags): 3,
        L("llm_inter_token_latency_s_count", **tags): usage.completion_tokens - 1,
        L("llm_request_latency_s_count", **tags): 3,
        L("llm_batch_size_count", **tags): usage.completion_tokens,  # a step per token at least
        L("requests_total", **tags): 3,
        L("request_latency_s_count", **tags): 3,
        L("ingress_requests_total", route="/v1/chat/completions", model=LLM, status="200"): 3,
        L("ingress_request_bytes_total", route="/v1/chat/completions"): 3 * len(str(messages)),
    }
    samples = wait_for(moved(before, expected))
    # The engine's gauges are there for the model, with Serve's tags naming the replica.
    for gauge in ("llm_running_sequences", "llm_waiting_sequences", "llm_kv_cache_bytes", "requests_in_flight",
                  "queue_depth", "loaded_models"):
        found = series(samples, f"ray_orchard_{gauge}", family="llm", application="orchard")
        assert found, gauge
        assert all(lab.get("deployment") == "llm" and lab.get("replica") for lab in found), found
    assert total(samples, "ray_orchard_loaded_models", family="llm", application="orchard") >= 1


def test_embeddings_transcription_and_speech_count_what_they_processed(orchard, tmp_path):
    sdk = sdk_client(orchard)
    before = scrape()
    embedded = sdk.embeddings.create(model="all-minilm-l6-v2", input=["red", "green apples", "a blue sky"],
                                     encoding_format="float")
    wav = speak_wav(SENTENCES[0], tmp_path)
    heard = sdk.audio.transcriptions.create(model="whisper-tiny.en", file=("s.wav", wav, "audio/wav"))
    assert "learning" in heard.text.lower()
    import soundfile

    seconds = soundfile.info(io.BytesIO(wav)).duration
    speech = sdk.audio.speech.create(model="kokoro", voice="af_heart", input="Hello there.", response_format="wav")
    spoken = soundfile.info(io.BytesIO(speech.content)).duration
    expected = {
        L("processed_total", family="embeddings", model="all-minilm-l6-v2", unit="inputs"): 3,
        L("processed_total", family="embeddings", model="all-minilm-l6-v2", unit="tokens"): embedded.usage.prompt_tokens,
        L("batch_size_count", family="embeddings", model="all-minilm-l6-v2"): 1,
        L("processed_total", family="transcription", model="whisper-tiny.en", unit="audio_seconds"): seconds * 0.99,
        L("batch_size_count", family="transcription", model="whisper-tiny.en"): 1,
        L("processed_total", family="tts", model="kokoro", unit="audio_seconds"): spoken * 0.99,
        L("request_latency_s_count", family="tts", model="kokoro"): 1,
        L("requests_total", family="embeddings", model="all-minilm-l6-v2"): 1,
        L("ingress_requests_total", route="/v1/audio/transcriptions", model="whisper-tiny.en", status="200"): 1,
        L("ingress_request_bytes_total", route="/v1/audio/transcriptions"): len(wav),
    }
    samples = wait_for(moved(before, expected))
    assert series(samples, "ray_orchard_queue_depth", family="transcription", model="whisper-tiny.en")


def _png(color: tuple[int, int, int]) -> str:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def test_images_and_vision_models_count_images_loads_and_batches(app):
    sdk = sdk_client(app)
    before = scrape()
    made = sdk.images.generate(model=IMAGES, prompt="a red square", n=2, extra_body={"seed": 1, "steps": 2})
    assert len(made.data) == 2
    chat = sdk.chat.completions.create(model=VLM, max_tokens=4, temperature=0, messages=[{"role": "user", "content": [
        {"type": "text", "text": "What colour?"}, {"type": "image_url", "image_url": {"url": _png((255, 0, 0))}}]}])
    assert chat.usage.completion_tokens >= 1
    expected = {
        L("processed_total", family="images", model=IMAGES, unit="images"): 2,
        L("processed_total", family="images", model=IMAGES, unit="steps"): 2,
        L("batch_size_count", family="images", model=IMAGES): 1,
        L("llm_requests_total", family="vlm", model=VLM): 1,
        L("llm_completion_tokens_total", family="vlm", model=VLM): chat.usage.completion_tokens,
        L("ingress_requests_total", route="/v1/images/generations", model=IMAGES, status="200"): 1,
    }
    samples = wait_for(moved(before, expected))
    # Pinned: loaded once as this app's replica started, and timed (other test modules' apps
    # may have had a model of the same name: their series stay in the export).
    mine = {"family": "images", "model": IMAGES, "application": APP}
    assert total(samples, "ray_orchard_model_loads_total", **mine) == 1
    assert total(samples, "ray_orchard_model_load_seconds_count", **mine) == 1
    assert total(samples, "ray_orchard_model_load_seconds_sum", **mine) > 0
    assert total(samples, "ray_orchard_loaded_models", family="images", application=APP) >= 1
    assert total(samples, "ray_orchard_pool_memory_bytes", family="images", application=APP) > 0


# ---- the ingress: refusals, sheds, cancellations ----


def test_refused_shed_and_cancelled_requests_are_counted(orchard, app):
    before = scrape()
    with httpx.Client(timeout=120) as http:
        unknown = http.post(f"{orchard}/v1/chat/completions", json={"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}]})
        assert unknown.status_code == 404
        too_large = http.post(f"{orchard}/v1/embeddings", content=b"x" * 17_000_000,
                              headers={"content-type": "application/json"})
        assert too_large.status_code == 413

    async def burst() -> list[int]:
        # One image at a time, one queued: six at once must shed some with 503.
        async with httpx.AsyncClient(timeout=120) as http:
            body = {"model": IMAGES, "prompt": "a blue circle", "steps": 4, "seed": 3}
            replies = await asyncio.gather(*[http.post(f"{app}/v1/images/generations", json=body) for _ in range(6)])
            return [r.status_code for r in replies]

    statuses = asyncio.run(burst())
    shed = statuses.count(503)
    assert shed >= 1 and set(statuses) <= {200, 503}, statuses

    async def leave_mid_stream() -> None:
        async with httpx.AsyncClient(timeout=120) as http:
            body = {"model": LLM, "messages": [{"role": "user", "content": "Tell me a long story."}],
                    "max_tokens": 400, "stream": True}
            async with http.stream("POST", f"{orchard}/v1/chat/completions", json=body) as resp:
                assert resp.status_code == 200
                async for line in resp.aiter_lines():
                    if '"content":"' in line:
                        break  # leave after the first token

    asyncio.run(leave_mid_stream())
    expected = {
        L("ingress_requests_total", route="/v1/chat/completions", model="", status="404"): 1,
        L("ingress_requests_total", route="/v1/embeddings", status="413"): 1,
        L("ingress_requests_total", route="/v1/images/generations", model=IMAGES, status="503"): shed,
        L("ingress_shed_requests_total", route="/v1/images/generations", model=IMAGES, status="503"): shed,
        L("ingress_cancelled_requests_total", route="/v1/chat/completions", model=LLM): 1,
    }
    wait_for(moved(before, expected))


# ---- request ids ----


def _serve_logs() -> Path:
    import ray

    return Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"


def _logged(request_id: str, pattern: str, timeout: float = 30) -> list[str]:
    """The lines of the Serve log files named like ``pattern`` that mention ``request_id``."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for f in _serve_logs().glob(pattern) for line in f.read_text(errors="replace").splitlines()
                 if request_id in line]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.5)


def test_every_response_has_a_request_id_and_the_replicas_log_it(orchard):
    with httpx.Client(timeout=120) as http:
        mine = f"metrics-{uuid.uuid4().hex[:12]}"
        sent = http.post(f"{orchard}/v1/chat/completions", headers={"x-request-id": mine},
                         json={"model": LLM, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
        assert sent.status_code == 200 and sent.headers["x-request-id"] == mine
        # Generated when the client sends none: on answers, errors and the page alike, each its own.
        ids = [http.get(f"{orchard}{path}").headers.get("x-request-id") for path in ("/v1/models", "/v1/nope", "/health")]
        assert all(ids) and len(set(ids)) == 3, ids
        streamed_id = f"metrics-{uuid.uuid4().hex[:12]}"
        with http.stream("POST", f"{orchard}/v1/chat/completions", headers={"x-request-id": streamed_id},
                         json={"model": LLM, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                               "stream": True}) as resp:
            assert resp.headers["x-request-id"] == streamed_id
            resp.read()
    # The id went with the request to the LLM replica, whose log lines about it carry it.
    for request_id in (mine, streamed_id):
        assert _logged(request_id, "replica_orchard_llm_*.log"), f"{request_id} not in the LLM replica's log"
        assert _logged(request_id, "replica_orchard_ingress_*.log"), f"{request_id} not in the ingress's log"


def test_a_server_error_logs_its_traceback_under_the_id_the_client_gets(app):
    request_id = f"metrics-{uuid.uuid4().hex[:12]}"
    with httpx.Client(timeout=120) as http:
        reply = http.post(f"{app}/v1/images/generations", headers={"x-request-id": request_id},
                          json={"model": BROKEN, "prompt": "anything", "steps": 1})
    assert reply.status_code >= 500, reply.text
    error = reply.json()["error"]
    assert request_id in error["message"]
    assert "Traceback" not in reply.text and "safetensors" not in reply.text.lower()  # details stay in the log
    lines = _logged(request_id, f"replica_{APP}_ingress_*.log")
    assert any("failed" in line for line in lines), lines
    log = "\n".join(f.read_text(errors="replace") for f in _serve_logs().glob(f"replica_{APP}_ingress_*.log"))
    assert "Traceback" in log[log.index(request_id):]
    # The model replica logged the failed load with the same id.
    assert _logged(request_id, f"replica_{APP}_images_*.log")


# ---- metrics off ----


def test_metrics_off_records_nothing_and_reaches_every_replica(monkeypatch):
    from deployments import metrics

    monkeypatch.setenv("ORCHARD_METRICS", "0")
    off = metrics.counter("orchard_probe", "never recorded", {"model": "m"})
    off.inc(5)
    assert type(off).__name__ == "_Off"
    monkeypatch.setenv("ORCHARD_METRICS", "1")
    assert type(metrics.counter("orchard_probe", "recorded", {"model": "m"})).__name__ != "_Off"

    from ray.serve import Application

    from graph import build_app

    args = default_args()
    on = build_app(args)
    off_app = build_app({**args, "runtime": {**args["runtime"], "metrics": False}})

    def envs(application) -> dict[str, dict]:
        """Each deployment's env_vars, from the ingress down through its bound arguments."""
        found: dict[str, dict] = {}

        def walk(node) -> None:
            if isinstance(node, Application):
                node = node._bound_deployment
            if isinstance(node, dict):
                for item in node.values():
                    walk(item)
                return
            if not hasattr(node, "ray_actor_options") or not hasattr(node, "init_args"):
                return
            found[node.name] = ((node.ray_actor_options or {}).get("runtime_env") or {}).get("env_vars") or {}
            for child in [*node.init_args, *node.init_kwargs.values()]:
                walk(child)

        walk(application)
        return found

    assert all(env.get("ORCHARD_METRICS") == "0" for env in envs(off_app).values())
    assert set(envs(off_app)) >= {"ingress", "models", "llm", "embeddings", "tts", "whisper"}
    assert not any("ORCHARD_METRICS" in env for env in envs(on).values())


# ---- the Grafana dashboard ----


def test_the_grafana_dashboard_is_current_and_charts_every_orchard_metric():
    import json
    import re
    import runpy

    root = Path(__file__).resolve().parent.parent
    made = runpy.run_path(str(root / "docs" / "make_grafana.py"))
    committed = (root / "docs" / "grafana-orchard.json").read_text()
    assert committed == made["render"](), "docs/grafana-orchard.json is stale: run python docs/make_grafana.py"
    panels = [p for p in json.loads(committed)["panels"] if p["type"] == "timeseries"]
    charted = {re.sub(r"_(bucket|sum|count|total)$", "", name)
               for p in panels for t in p["targets"] for name in re.findall(r"ray_orchard_(\w+)", t["expr"])}
    source = "\n".join(f.read_text() for f in (root / "deployments").rglob("*.py"))
    recorded = set(re.findall(r'(?:counter|gauge|histogram)\(\s*"orchard_(\w+)"', source))
    assert len(recorded) >= 30, recorded
    assert charted == recorded, f"not charted: {recorded - charted}; not recorded: {charted - recorded}"
