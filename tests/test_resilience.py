"""Hardening (#7): answers stay right and the server stays responsive under cancellation,
overload and the loss of a replica. Real Serve, the real SmolLM2 weights, real HTTP clients.

Besides the default application this module deploys a second one, ``resilience`` under
``/resilience``: the same SmolLM2 without a prefix cache and with a small Serve queue
(8 ongoing + 16 queued), so a flood sheds. The last test kills that app's replica.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections import Counter

import httpx
import openai
import pytest

from tests.conftest import default_args

MODEL = "smollm2"  # the default app's LLM: prefix cache on
NOCACHE = "smollm2-nocache"  # the resilience app's LLM: prefix_cache_size 0, small queue
APP = "resilience"
NOCACHE_DEPLOYMENT = f"llm-{NOCACHE}"
ERROR_KEYS = {"message", "type", "param", "code"}
STORY = "Write a very long story about a lighthouse keeper and the ships she saved."


def _resilience_args() -> dict:
    args = default_args()
    (llm,) = [e for e in args["llm"] if e["name"] == MODEL]
    entry = {k: v for k, v in llm.items() if k not in ("name", "aliases", "deployment")} | {
        "name": NOCACHE,
        "prefix_cache_size": 0,
        "dedicated": True,  # a deployment of its own: its own small queues
        "deployment": {
            "num_replicas": 1,
            "max_ongoing_requests": 8,
            "max_queued_requests": 16,
            "ray_actor_options": {"num_cpus": 0.5},
        },
    }
    return {"ingress": args["ingress"], "runtime": args["runtime"], "llm": [entry]}


@pytest.fixture(scope="module")
def resilience(orchard):
    """Base URL of the second application (model ``smollm2-nocache``)."""
    from ray import serve

    from graph import build_app

    serve.run(build_app(_resilience_args()), name=APP, route_prefix=f"/{APP}")
    yield f"{orchard}/{APP}"
    serve.delete(APP)


def _sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{base}/v1", api_key="unused", _strict_response_validation=True, max_retries=0, timeout=120
    )


def _stats(handle_loop, deployment: str = "llm", app: str = "orchard", timeout: float = 10):
    """The engine's stats through a Serve handle; None when the replica did not answer in time."""
    from ray import serve

    async def get():
        handle = serve.get_deployment_handle(deployment, app_name=app)
        try:
            return await asyncio.wait_for(handle.stats.remote(), timeout)
        except TimeoutError:
            return None

    return handle_loop(get, timeout=timeout + 30)


def _wait_idle(handle_loop, seconds: float) -> None:
    """Give earlier work a chance to drain (asserts nothing: tests that care check themselves)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        s = _stats(handle_loop, timeout=5)
        if s is not None and s.running == 0 and s.waiting == 0:
            return
        time.sleep(0.2)


def _assert_error_schema(body: dict) -> None:
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error


def _error_schema_problem(resp: httpx.Response) -> str | None:
    try:
        _assert_error_schema(resp.json())
    except (ValueError, AssertionError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def _valid_retry_after(value: str | None) -> bool:
    """RFC 9110: delay-seconds or an HTTP-date."""
    if value is None:
        return False
    value = value.strip()
    if value.isdigit():
        return True
    try:
        email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return False
    return True


# ---- 2. the prefix cache never changes an answer ----

TURNS = [
    "Let's plan a small vegetable garden. What should I plant first?",
    "Which of those grows the fastest?",
    "How often should I water it?",
    "What could go wrong, and how do I avoid it?",
    "Summarize our plan in two sentences.",
]


def _converse(client: openai.OpenAI, model: str) -> list[tuple[str, int]]:
    """A greedy multi-turn conversation: each turn sends every earlier question and answer.
    Returns (answer, cached prompt tokens) per turn."""
    messages: list[dict] = []
    turns = []
    for question in TURNS:
        messages.append({"role": "user", "content": question})
        r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=48)
        text = r.choices[0].message.content
        messages.append({"role": "assistant", "content": text})
        turns.append((text, r.usage.prompt_tokens_details.cached_tokens))
    return turns


def _assert_same_conversation(got: list[tuple[str, int]], reference: list[tuple[str, int]], label: str) -> None:
    for i, ((text, _), (ref, _)) in enumerate(zip(got, reference, strict=True), start=1):
        assert text == ref, f"{label}: turn {i} differs from the uncached answer:\n{text!r}\n!=\n{ref!r}"


async def _stream_then_disconnect(http: httpx.AsyncClient, url: str, body: dict, tokens: int = 3) -> int:
    """Read ``tokens`` content deltas of a stream, then drop the connection; returns how many were seen."""
    seen = 0
    async with http.stream("POST", url, json=body) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                seen += 1
            if seen >= tokens:
                break
    return seen


def test_the_prefix_cache_never_changes_an_answer(orchard, resilience, handle_loop):
    cached_client, plain_client = _sdk(orchard), _sdk(resilience)
    reference = _converse(plain_client, NOCACHE)
    assert all(cached == 0 for _, cached in reference), reference  # that app really has no cache
    assert len({text for text, _ in reference}) == len(TURNS)  # a real conversation, not one answer

    first = _converse(cached_client, MODEL)
    print(f"cached tokens per turn, first pass: {[c for _, c in first]}")
    _assert_same_conversation(first, reference, "cached app, first pass")
    assert all(cached > 0 for _, cached in first[1:]), [c for _, c in first]

    # Streams over the same conversation, dropped after a few tokens: the exact prompts of the
    # later turns, and a different follow-up question on the full conversation.
    history: list[dict] = []
    prompts = []
    for question, (answer, _) in zip(TURNS, reference):
        history.append({"role": "user", "content": question})
        prompts.append(list(history))
        history.append({"role": "assistant", "content": answer})
    prompts = prompts[1:] + [history + [{"role": "user", "content": "Now tell me a long story about this garden."}]]

    async def cancel_some() -> list[int]:
        url = f"{orchard}/v1/chat/completions"
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(
                *(
                    _stream_then_disconnect(
                        http, url, {"model": MODEL, "messages": m, "temperature": 0, "max_tokens": 300, "stream": True}
                    )
                    for m in prompts
                )
            )

    assert asyncio.run(cancel_some()) == [3] * len(prompts)
    _wait_idle(handle_loop, 30)

    again = _converse(cached_client, MODEL)
    print(f"cached tokens per turn, after the cancelled streams: {[c for _, c in again]}")
    _assert_same_conversation(again, reference, "cached app, after cancelled streams")
    assert all(cached > 0 for _, cached in again[1:]), [c for _, c in again]


# ---- 3. clients that give up free the engine ----


def test_a_hundred_impatient_clients_leave_the_engine_idle(orchard, handle_loop):
    url = f"{orchard}/v1/chat/completions"
    probe = {"model": MODEL, "messages": [{"role": "user", "content": "Name three rivers."}], "temperature": 0,
             "max_tokens": 24}
    before = httpx.post(url, json=probe, timeout=120)
    assert before.status_code == 200, before.text
    _wait_idle(handle_loop, 30)

    async def impatient(http: httpx.AsyncClient, i: int) -> str:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"{STORY} Chapter {i}."}],
            "temperature": 0,
            "max_tokens": 500,
            "stream": True,
        }
        try:
            async with asyncio.timeout(0.5):
                async with http.stream("POST", url, json=body) as resp:
                    if resp.status_code != 200:
                        return f"status {resp.status_code}"
                    async for _ in resp.aiter_raw():
                        pass
        except TimeoutError:
            return "gave up"
        return "finished"

    async def storm() -> list[str]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            return await asyncio.gather(*(impatient(http, i) for i in range(100)))

    outcomes = asyncio.run(storm())
    gave_up = time.monotonic()
    assert outcomes == ["gave up"] * 100, {o: outcomes.count(o) for o in set(outcomes)}

    history = []
    while True:
        s = _stats(handle_loop, timeout=max(0.5, gave_up + 5 - time.monotonic()))
        elapsed = time.monotonic() - gave_up
        history.append((round(elapsed, 2), None if s is None else (s.running, s.waiting)))
        if s is not None and s.running == 0 and s.waiting == 0:
            break
        if elapsed > 5:
            break
        time.sleep(0.1)
    print(f"engine idle check, (s after the last client left, (running, waiting)): {history}")
    assert elapsed <= 5 and s is not None and (s.running, s.waiting) == (0, 0), (
        f"engine not idle 5 s after the clients left; (elapsed s, (running, waiting)): {history[-5:]}"
    )

    after = httpx.post(url, json=probe, timeout=120)
    assert after.status_code == 200, after.text
    assert after.json()["choices"][0]["message"]["content"] == before.json()["choices"][0]["message"]["content"]


# ---- 4. a flood is shed, never hung ----


def test_a_flood_is_shed_with_retry_after_and_nothing_hangs(resilience):
    url = f"{resilience}/v1/chat/completions"
    body = {"model": NOCACHE, "messages": [{"role": "user", "content": "Name a planet."}], "temperature": 0,
            "max_tokens": 8}
    alone = httpx.post(url, json=body, timeout=120)
    assert alone.status_code == 200, alone.text
    expected = alone.json()["choices"][0]["message"]["content"]

    async def one(http: httpx.AsyncClient) -> httpx.Response | str:
        try:
            async with asyncio.timeout(120):
                return await http.post(url, json=body)
        except (TimeoutError, httpx.TimeoutException):
            return "hung"
        except httpx.TransportError as e:
            return f"transport error: {type(e).__name__}: {e}"

    async def flood() -> list[httpx.Response | str]:
        limits = httpx.Limits(max_connections=500, max_keepalive_connections=500)
        async with httpx.AsyncClient(timeout=httpx.Timeout(150), limits=limits) as http:
            return await asyncio.gather(*(one(http) for _ in range(400)))

    started = time.monotonic()
    results = asyncio.run(flood())
    took = time.monotonic() - started

    failures = [r for r in results if isinstance(r, str)]
    assert not failures, f"{len(failures)} of 400 got no answer (took {took:.0f} s): {sorted(set(failures))}"
    counts = {s: sum(r.status_code == s for r in results) for s in {r.status_code for r in results}}
    print(f"flood: {counts} in {took:.1f} s")
    assert set(counts) <= {200, 429, 503}, counts
    shed = [r for r in results if r.status_code in (429, 503)]
    served = [r for r in results if r.status_code == 200]

    # Every broken promise at once, so one run shows the whole picture.
    problems = []
    if not shed:
        problems.append("400 simultaneous requests against 8 ongoing + 16 queued: none was shed")
    if not served:
        problems.append("every request was shed")
    no_retry = [r for r in shed if not _valid_retry_after(r.headers.get("retry-after"))]
    bad_body = [r for r in shed if _error_schema_problem(r) is not None]
    for label, bad in (("a valid Retry-After header", no_retry), ("the OpenAI error body", bad_body)):
        if bad:
            seen = sorted({(r.status_code, r.headers.get("retry-after"), r.text) for r in bad}, key=str)
            problems.append(
                f"{len(bad)} of {len(shed)} shed responses lack {label}; (status, Retry-After, body): {seen[:4]}"
            )
    texts = [r.json()["choices"][0]["message"]["content"] for r in served]
    if texts != [expected] * len(served):
        problems.append(f"served texts differ from the greedy answer alone ({expected!r}): {dict(Counter(texts))}")
    assert not problems, "\n".join(problems)


# ---- 5. losing the replica mid-stream (last: it disturbs the app) ----


def _replica_actor_names() -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP}#{NOCACHE_DEPLOYMENT}#"
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(prefix)
    ]


def _classify(events: list[str]) -> str:
    """'error': an error event then [DONE]; 'closed': the connection ended without [DONE];
    anything else names what went wrong."""
    if events and events[-1] == "<timeout>":
        return "hung"
    if events and events[-1].startswith("<status"):
        return events[-1]
    errors = [i for i, e in enumerate(events) if e.startswith("{") and "error" in json.loads(e)]
    if errors:
        i = errors[0]
        _assert_error_schema(json.loads(events[i]))
        return "error" if events[i + 1 :] == ["[DONE]"] else f"error event followed by {events[i + 1 :]}"
    if events and events[-1] == "[DONE]":
        return "completed normally"
    return "closed"


def test_killing_the_replica_mid_stream_ends_streams_and_serve_recovers(resilience):
    import ray

    url = f"{resilience}/v1/chat/completions"
    question = [{"role": "user", "content": "What is the capital of France?"}]
    probe = {"model": NOCACHE, "messages": question, "temperature": 0, "max_tokens": 16}
    before = httpx.post(url, json=probe, timeout=120)
    assert before.status_code == 200, before.text
    expected = before.json()["choices"][0]["message"]["content"]
    old_replica = before.headers["x-orchard-replica"].split("@")[0]  # "<deployment>#<unique id>"

    (name,) = _replica_actor_names()
    assert name.endswith(old_replica), (name, old_replica)
    actor = ray.get_actor(name, namespace="serve")

    story = [{"role": "user", "content": STORY}]
    stream_body = {"model": NOCACHE, "messages": story, "temperature": 0, "max_tokens": 2000, "stream": True}

    async def read(http: httpx.AsyncClient, started: asyncio.Event, events: list[str]) -> None:
        try:
            async with http.stream("POST", url, json=stream_body) as resp:
                if resp.status_code != 200:
                    events.append(f"<status {resp.status_code}>")
                    return
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    events.append(data)
                    if data != "[DONE]" and '"content":"' in data and '"content":""' not in data:
                        started.set()
        except httpx.TimeoutException:  # only past the client timeout, far beyond the deadline
            events.append("<timeout>")
        except httpx.TransportError:
            events.append("<closed>")

    async def kill_mid_stream() -> tuple[list[list[str]], int, float]:
        # The client timeout is far past the deadline, so a hang cannot pass for a closed connection.
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=10)) as http:
            started = [asyncio.Event() for _ in range(4)]
            events: list[list[str]] = [[] for _ in range(4)]
            tasks = [asyncio.create_task(read(http, s, e)) for s, e in zip(started, events)]
            # Kill only once every stream has its first tokens (or give up if one ends first).
            limit = time.monotonic() + 120
            while not all(s.is_set() for s in started):
                assert not any(t.done() for t in tasks), f"a stream ended before the kill: {events}"
                assert time.monotonic() < limit, f"streams did not start within 120 s: {events}"
                await asyncio.sleep(0.05)
            await asyncio.to_thread(ray.kill, actor, no_restart=True)
            killed = time.monotonic()
            _, pending = await asyncio.wait(tasks, timeout=30)
            print(f"streams ended {time.monotonic() - killed:.1f} s after the kill")
            for t in pending:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return events, len(pending), killed

    events, hung, killed = asyncio.run(kill_mid_stream())
    assert hung == 0, f"{hung} of 4 streams still open 30 s after the replica was killed"
    outcomes = [_classify(e) for e in events]
    print(f"stream outcomes: {outcomes}; last events: {[e[-2:] for e in events]}")
    assert set(outcomes) <= {"error", "closed"}, outcomes

    # Serve replaces the replica; new requests then get the same greedy answer.
    deadline = killed + 90
    attempts = []
    while True:
        try:
            r = httpx.post(url, json=probe, timeout=max(1.0, deadline - time.monotonic()))
            attempts.append(r.status_code)
        except httpx.TransportError as e:
            r = None
            attempts.append(type(e).__name__)
        if (r is not None and r.status_code == 200) or time.monotonic() > deadline:
            break
        time.sleep(1)
    print(f"recovered {time.monotonic() - killed:.1f} s after the kill; attempts: {attempts}")
    assert r is not None and r.status_code == 200, f"no answer 90 s after the kill; attempts: {attempts[-10:]}"
    assert r.headers["x-orchard-replica"].split("@")[0] != old_replica
    assert r.json()["choices"][0]["message"]["content"] == expected
    for _ in range(3):
        again = httpx.post(url, json=probe, timeout=120)
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["message"]["content"] == expected
