"""The LLM family: a thin Ray Serve deployment over ``LLMEngine`` (continuous batching)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import ray
from ray import serve
from ray.util import metrics

from mlx_orchard.config import LLMEntry
from mlx_orchard.engines.llm import EngineStats, LLMEngine
from mlx_orchard.models.registry import resolve_llm
from mlx_orchard.runtime import mlx_uses_cpu_backend, physical_memory_bytes
from mlx_orchard.wire import Accepted, ChoiceChunk, SamplingParams

_GB = 1 << 30


@serve.deployment(name="llm", max_ongoing_requests=64, health_check_period_s=10)
class LLMDeployment:
    def __init__(self, entry: LLMEntry, engine_cls: type[LLMEngine] = LLMEngine):
        dequantize = mlx_uses_cpu_backend() if entry.dequantize == "auto" else entry.dequantize
        path = resolve_llm(entry.source, dequantize=dequantize, sha256=entry.sha256)
        self.name = entry.name
        self.sampling = entry.sampling.model_dump()  # the model's defaults, under each request's own
        self.engine = engine_cls(
            path,
            max_batch_size=entry.max_batch_size,
            prefill_batch_size=entry.prefill_batch_size,
            prefill_step_size=entry.prefill_step_size,
            default_max_tokens=entry.default_max_tokens,
            prefix_cache_size=entry.prefix_cache_size,
            prefix_cache_bytes=int(entry.prefix_cache_gb * _GB),
            max_waiting=entry.max_waiting,
            max_queue_wait_s=entry.max_queue_wait_s,
            kv_cache_bytes=int(
                (physical_memory_bytes() / 4) if entry.kv_cache_gb == "auto" else entry.kv_cache_gb * _GB
            ),
        )
        # Chat templating and tokenization of a large request run here, off the event loop
        # (which streams every other request's tokens) and off the MLX thread. One thread:
        # a fast tokenizer must not be used from two threads at once.
        self._text = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orchard-llm-tokenize")
        context = serve.get_replica_context()
        node = ray.get_runtime_context().get_node_id()
        self.served_by = f"{context.deployment}#{context.replica_id.unique_id}@{node[:12]}"
        tags = {"model": entry.name}
        self._requests = metrics.Counter("orchard_llm_requests", "LLM requests admitted", ("model",))
        self._tokens = metrics.Counter("orchard_llm_generated_tokens", "tokens generated", ("model",))
        self._ttft = metrics.Histogram(
            "orchard_llm_time_to_first_token_s",
            "seconds from admission to the first token",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10],
            tag_keys=("model",),
        )
        for m in (self._requests, self._tokens, self._ttft):
            m.set_default_tags(tags)

    async def generate(
        self,
        params: SamplingParams,
        *,
        n: int = 1,
        messages: list[dict[str, Any]] | None = None,
        prompt: str | list[int] | None = None,
        stream: bool = True,
        echo: bool = False,
        arrived_at: float | None = None,
    ) -> AsyncIterator[Accepted | ChoiceChunk]:
        """Yields ``Accepted`` once the prompt passed its checks and joined the batch (so
        callers can answer 4xx/503 before committing to a 200), then the chunks of its
        ``n`` choices; with stream=False one chunk per choice, holding all its text.
        The request's unset sampling fields take this model's defaults. ``arrived_at`` (epoch
        seconds, from the ingress): time spent in Serve's queues counts as waiting."""
        if messages is not None:
            ids = await self._off_loop(self.engine.encode_chat, messages)
        elif isinstance(prompt, str):
            ids = await self._off_loop(self.engine.encode, prompt)
        else:
            ids = list(prompt or [])
        waited = time.time() - arrived_at if arrived_at is not None else 0.0
        chunks = self.engine.generate(ids, params.with_defaults(**self.sampling), n=n, waited_s=waited)
        # Accepted once the sequences are in the batch: a request shed from the queue still
        # gets a 503 status rather than an error event inside a 200 stream.
        await chunks.admitted()
        self._requests.inc()
        yield Accepted(prompt_tokens=len(ids), served_by=self.served_by, cached_tokens=chunks.cached_tokens)

        prefix = ""
        if echo:
            prefix = prompt if isinstance(prompt, str) else await self._off_loop(self.engine.decode, ids)
        start = time.perf_counter()
        texts = [prefix] * n  # stream: the echo still owed to each choice; else: all text so far
        generated = 0
        try:
            async for chunk in chunks:
                if not generated:
                    self._ttft.observe(time.perf_counter() - start)
                generated += len(chunk.token_ids)
                i = chunk.index
                if stream:
                    yield ChoiceChunk(i, texts[i] + chunk.text, chunk.completion_tokens, chunk.finish_reason)
                    texts[i] = ""
                else:
                    texts[i] += chunk.text
                    if chunk.finish_reason:
                        yield ChoiceChunk(i, texts[i], chunk.completion_tokens, chunk.finish_reason)
        finally:
            await chunks.aclose()
            # Counted once per request, not per chunk: the metric stays off the token path.
            if generated:
                self._tokens.inc(generated)

    def _off_loop(self, fn, *args):
        return asyncio.get_running_loop().run_in_executor(self._text, fn, *args)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def check_health(self) -> None:
        # The loop thread answers between steps: a thread that is alive but stuck fails too.
        try:
            await self.engine.ping(timeout=20.0)
        except Exception as e:
            raise RuntimeError(f"the generation loop of {self.name!r} is not answering") from e

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
        text = getattr(self, "_text", None)
        if text is not None:
            text.shutdown(wait=False, cancel_futures=True)
