"""The fast tier: the ingress's routers, middleware and error mapping in process, with
stand-in deployment handles (no Ray Serve, no model). The end-to-end tests against real
Serve and real models stay the reference; these pin down formatting and error paths that
are slow or impossible to provoke there."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
from ray.serve.exceptions import BackPressureError

from deployments.ingress import Ingress, build_api
from mlx_orchard.config import IngressOptions
from mlx_orchard.errors import InvalidRequestError, OverloadedError
from mlx_orchard.models.manager import Route
from mlx_orchard.wire import Accepted, ChoiceChunk


class _Stream:
    """What ``handle.options(stream=True).generate.remote(...)`` returns."""

    def __init__(self, items):
        self._items = items
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self._items:
            raise StopAsyncIteration
        item = self._items.pop(0)
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, float):  # a pause, then the next item
            await asyncio.sleep(item)
            return await self.__anext__()
        return item

    def cancel(self):
        self.cancelled = True


class _Method:
    def __init__(self, fn):
        self._fn = fn
        self.calls: list[tuple[tuple, dict]] = []

    def remote(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self._fn(*args, **kwargs)


class LLMHandle:
    """Answers every generate call with a scripted stream (or raises a scripted error)."""

    def __init__(self, script):
        self.script = script
        self.generate = _Method(lambda params, **kw: _Stream(list(self.script(params, **kw))))

    def options(self, **_):
        return self


class EmbeddingsHandle:
    def __init__(self, result):
        async def embed(inputs, **kw):
            if isinstance(result, BaseException):
                raise result
            return result

        self.embed = _Method(embed)

    def options(self, **_):
        return self


def two_choices(params, *, n, stream, **prompt):
    """Choice 0 says Hello, choice 1 (when asked for) Bonjour, interleaved."""
    yield Accepted(prompt_tokens=7, served_by="llm-x#r1@node", cached_tokens=3)
    if stream:
        chunks = [ChoiceChunk(0, "Hel", 1), ChoiceChunk(1, "Bon", 1), ChoiceChunk(0, "lo", 2, "stop")]
        chunks.append(ChoiceChunk(1, "jour", 2, "length"))
    else:
        chunks = [ChoiceChunk(1, "Bonjour", 2, "length"), ChoiceChunk(0, "Hello", 2, "stop")]
    yield from (c for c in chunks if c.index < n)


def app_with(handles: dict, **options) -> httpx.AsyncClient:
    routes = {
        "m": Route(name="m", family="llm", deployment="llm"),
        "e": Route(name="e", family="embeddings", deployment="emb"),
    }
    manager = options.pop("manager", None)
    management_api = options.pop("management_api", True)
    ingress = Ingress(routes, handles, IngressOptions(**options), manager, management_api)
    # As a server would: a 500 is answered (and logged), not raised into the client.
    transport = httpx.ASGITransport(app=build_api(ingress), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://orchard")


def chat_body(**kw):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}


@pytest.mark.asyncio
async def test_chat_is_one_call_for_n_choices_and_sums_usage():
    handle = LLMHandle(two_choices)
    async with app_with({"llm": handle}) as http:
        r = await http.post("/v1/chat/completions", json=chat_body(n=2))
    assert r.status_code == 200
    body = r.json()
    assert [c["message"]["content"] for c in body["choices"]] == ["Hello", "Bonjour"]
    assert [c["finish_reason"] for c in body["choices"]] == ["stop", "length"]
    assert body["usage"] == {
        "prompt_tokens": 7, "completion_tokens": 4, "total_tokens": 11, "prompt_tokens_details": {"cached_tokens": 3}
    }
    assert r.headers["x-orchard-replica"] == "llm-x#r1@node"
    (args, kwargs), = handle.generate.calls  # n choices: one call, one prefill
    assert kwargs["n"] == 2 and kwargs["messages"] == [{"role": "user", "content": "hi"}]
    assert args[0].temperature is None  # unset: the replica applies the model's default


@pytest.mark.asyncio
async def test_chat_stream_frames_every_choice_and_the_usage():
    async with app_with({"llm": LLMHandle(two_choices)}) as http:
        r = await http.post("/v1/chat/completions", json=chat_body(n=2, stream=True, stream_options={"include_usage": True}))
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = {0: "", 1: ""}
    finish = {}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        text[choice["index"]] += choice["delta"].get("content") or ""
        if choice["finish_reason"]:
            finish[choice["index"]] = choice["finish_reason"]
    assert text == {0: "Hello", 1: "Bonjour"} and finish == {0: "stop", 1: "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


@pytest.mark.asyncio
async def test_completions_number_choices_across_prompts():
    handle = LLMHandle(two_choices)
    async with app_with({"llm": handle}) as http:
        r = await http.post("/v1/completions", json={"model": "m", "prompt": ["a", "b"], "n": 2})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in r.json()["choices"]] == ["Hello", "Bonjour"] * 2
    assert r.json()["usage"]["prompt_tokens"] == 14
    assert len(handle.generate.calls) == 2


@pytest.mark.parametrize(
    "error, status, code",
    [
        (InvalidRequestError("bad prompt", param="prompt"), 400, None),
        (OverloadedError("busy"), 503, "overloaded"),
        (BackPressureError(num_queued_requests=3, max_queued_requests=2), 503, "overloaded"),
        (ValueError("an MLX shape error with internals"), 500, None),
    ],
)
@pytest.mark.asyncio
async def test_errors_before_the_answer_are_statuses_in_the_error_schema(error, status, code):
    def failing(params, **kw):
        raise error
        yield  # a generator

    async with app_with({"llm": LLMHandle(failing)}) as http:
        r = await http.post("/v1/chat/completions", json=chat_body(stream=True))
    assert r.status_code == status
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == code
    if status == 503:
        assert r.headers["retry-after"] == "1"
    if status == 500:
        assert "MLX" not in body["message"]  # details stay in the log


@pytest.mark.asyncio
async def test_an_error_after_the_stream_began_is_an_event_then_done():
    def breaks(params, **kw):
        yield Accepted(prompt_tokens=1, served_by="r")
        yield ChoiceChunk(0, "Hi", 1)
        yield RuntimeError("replica lost")

    async with app_with({"llm": LLMHandle(breaks)}) as http:
        r = await http.post("/v1/chat/completions", json=chat_body(stream=True))
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["type"] == "server_error"


@pytest.mark.asyncio
async def test_the_request_timeout_is_504_before_and_an_event_after_the_answer_starts():
    def slow_start(params, **kw):
        yield 5.0
        yield Accepted(prompt_tokens=1, served_by="r")

    def slow_middle(params, **kw):
        yield Accepted(prompt_tokens=1, served_by="r")
        yield ChoiceChunk(0, "Hi", 1)
        yield 5.0
        yield ChoiceChunk(0, "!", 2, "stop")

    async with app_with({"llm": LLMHandle(slow_start)}, request_timeout_s=0.3) as http:
        r = await http.post("/v1/chat/completions", json=chat_body())
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    async with app_with({"llm": LLMHandle(slow_middle)}, request_timeout_s=0.3) as http:
        r = await http.post("/v1/chat/completions", json=chat_body(stream=True))
    events = [e.removeprefix("data: ") for e in r.text.split("\n\n") if e]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "timeout"


@pytest.mark.asyncio
async def test_embeddings_route_checks_the_family_and_formats_vectors():
    vectors = np.array([[0.6, 0.8]], dtype=np.float32)
    async with app_with({"llm": LLMHandle(two_choices), "emb": EmbeddingsHandle((vectors, 3))}) as http:
        ok = await http.post("/v1/embeddings", json={"model": "e", "input": "x", "encoding_format": "float"})
        wrong = await http.post("/v1/embeddings", json={"model": "m", "input": "x"})
        missing = await http.post("/v1/embeddings", json={"model": "nope", "input": "x"})
    assert ok.json()["data"][0]["embedding"] == pytest.approx([0.6, 0.8])
    assert ok.json()["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert wrong.status_code == 400 and missing.status_code == 404


@pytest.mark.asyncio
async def test_body_limit_and_api_key():
    async with app_with({"llm": LLMHandle(two_choices)}, max_body_mb=0.001, api_key="k") as http:
        refused = await http.post("/v1/chat/completions", json=chat_body())
        big = await http.post("/v1/chat/completions", json=chat_body(user="x" * 2000), headers={"Authorization": "Bearer k"})
        ok = await http.post("/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer k"})
    assert refused.status_code == 401
    assert big.status_code == 413 and big.json()["error"]["code"] == "payload_too_large"
    assert ok.status_code == 200


def test_the_api_key_guards_websockets_and_lets_the_key_through():
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from deployments.http import APIKeyMiddleware

    async def echo(ws):
        await ws.accept(subprotocol=ws.scope["subprotocols"][0] if ws.scope["subprotocols"] else None)
        await ws.send_text("open")
        await ws.close()

    app = APIKeyMiddleware(Starlette(routes=[WebSocketRoute("/v1/realtime", echo)]), api_key="k")
    client = TestClient(app)
    for kwargs in ({}, {"headers": {"Authorization": "Bearer wrong"}}, {"subprotocols": ["openai-insecure-api-key.x"]}):
        with pytest.raises(WebSocketDisconnect) as refused:
            with client.websocket_connect("/v1/realtime", **kwargs) as ws:
                ws.receive_text()
        assert refused.value.code == 1008
    for kwargs in ({"headers": {"Authorization": "Bearer k"}}, {"subprotocols": ["openai-insecure-api-key.k"]}):
        with client.websocket_connect("/v1/realtime", **kwargs) as ws:
            assert ws.receive_text() == "open"


def test_every_family_serves_the_endpoints_the_registry_declares():
    from mlx_orchard.families import FAMILIES

    app = build_api(Ingress({}, {}, IngressOptions()))
    posts = {path for path, ops in app.openapi()["paths"].items() if "post" in ops}
    for family in FAMILIES:
        assert set(family.endpoints) <= posts, family.name
    management = {"/v1/models", "/v1/models/download", "/v1/models/{model}/load", "/v1/models/{model}/unload"}
    assert posts == {e for f in FAMILIES for e in f.endpoints} | management


def test_the_ingress_imports_no_mlx():
    # The ingress runs on any node (it reserves no CPU): it must not need MLX to start.
    code = (
        "import sys, graph, deployments.ingress\n"
        "from mlx_orchard.families import FAMILIES\n"
        "[f.router_factory() for f in FAMILIES if f.router]\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', 'mlx_vlm', 'mlx_whisper', 'mlx_embeddings')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class ManagerHandle:
    """Stands in for the model manager deployment: records calls, answers with cards."""

    def __init__(self):
        from mlx_orchard.protocol.common import ModelCard

        def card(model, **_):
            return ModelCard(id=model, family="llm", status="available")

        async def acard(model, *a, **kw):
            return card(model)

        async def resolve(model, timeout_s):
            if model == "found/on-disk":
                return Route(name=model, family="llm", deployment="llm")
            from mlx_orchard.errors import ModelNotFoundError

            raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")

        async def cards():
            return [card("m"), card("found/on-disk")]

        async def delete(model):
            return None

        self.resolve = _Method(resolve)
        self.card = _Method(acard)
        self.cards = _Method(cards)
        self.download = _Method(acard)
        self.unload = _Method(acard)
        self.delete = _Method(delete)


class PoolHandle(LLMHandle):
    def __init__(self):
        super().__init__(two_choices)
        self.ids: list[str] = []

        async def load(**kw):
            return None

        self.load = _Method(load)

    def options(self, multiplexed_model_id=None, **_):
        if multiplexed_model_id:
            self.ids.append(multiplexed_model_id)
        return self


@pytest.mark.asyncio
async def test_models_found_by_the_manager_are_routed_with_their_multiplexed_id():
    pool, manager = PoolHandle(), ManagerHandle()
    async with app_with({"llm": pool}, manager=manager) as http:
        r = await http.post("/v1/chat/completions", json=chat_body(model="found/on-disk"))
        assert r.status_code == 200
        missing = await http.post("/v1/chat/completions", json=chat_body(model="not/there"))
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        listed = await http.get("/v1/models")
    assert "found/on-disk" in pool.ids
    assert [m["id"] for m in listed.json()["data"]] == ["m", "found/on-disk"]


@pytest.mark.asyncio
async def test_management_endpoints_and_the_mlx_audio_form():
    pool, manager = PoolHandle(), ManagerHandle()
    async with app_with({"llm": pool}, manager=manager) as http:
        r = await http.post("/v1/models/download", json={"repo_id": "owner/name"})
        assert r.status_code == 202 and r.json()["id"] == "owner/name"
        r = await http.post("/v1/models/m/load", json={"keep_alive": "5m"})
        assert r.status_code == 200
        (_, kwargs), = pool.load.calls
        assert kwargs == {"keep_alive_s": 300.0}
        assert (await http.post("/v1/models/m/load", json={"keep_alive": "soon"})).status_code == 400
        assert (await http.post("/v1/models?model_name=m")).status_code == 200
        assert (await http.delete("/v1/models?model_name=m")).status_code == 200
        assert (await http.post("/v1/models/m/unload")).status_code == 200
        r = await http.delete("/v1/models/owner/name")
        assert r.status_code == 200 and r.json() == {"id": "owner/name", "object": "model", "deleted": True}
    assert [c[0][0] for c in manager.unload.calls] == ["m", "m"]


@pytest.mark.asyncio
async def test_management_can_be_turned_off():
    async with app_with({"llm": PoolHandle()}, manager=ManagerHandle(), management_api=False) as http:
        for method, path in [("POST", "/v1/models/download"), ("POST", "/v1/models/m/load"), ("DELETE", "/v1/models/m")]:
            r = await http.request(method, path, json={"repo_id": "a/b"})
            assert r.status_code == 403, (method, path)
            assert r.json()["error"]["code"] == "forbidden"
        assert (await http.get("/v1/models")).status_code == 200  # listing stays
