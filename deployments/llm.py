"""The LLM family: a thin Ray Serve deployment over ``LLMEngine`` (continuous batching per loaded model)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.llm_client import merged_calls
from deployments.metrics import BATCH_SIZES, LATENCY_S, TOKEN_GAP_S, counter, gauge, histogram
from deployments.multiplex import MultiplexedFamily
from mlx_orchard.config import GenerativeEntry, LLMEntry
from mlx_orchard.engines.fair_lock import FairLock
from mlx_orchard.engines.llm import EngineStats, GenerationChunk, LLMEngine
from mlx_orchard.engines.speculative import SpeculativeConfig
from mlx_orchard.errors import InvalidRequestError
from mlx_orchard.families import PoolSpec
from mlx_orchard.models.cache import cache_root
from mlx_orchard.models.registry import resolve_llm
from mlx_orchard.parsers.model_output import ModelOutput
from mlx_orchard.parsers.output import HarmonyParser, OutputParser, Piece
from mlx_orchard.runtime import mlx_uses_cpu_backend, physical_memory_bytes, release_mlx_memory
from mlx_orchard.wire import Accepted, ChoiceChunk, SamplingParams, ToolCallDelta, ToolRequest

_GB = 1 << 30


class GenerativeFamily(MultiplexedFamily):
    """A pool of text-generating models (the LLM and vision-language families): each loaded
    model has its own engine and continuous batch; the engines of one replica take turns on
    MLX step by step. A family names its model class and how it finds a model's files."""

    model_class: type[LLMModel]

    async def __init__(self, spec: PoolSpec, manager: DeploymentHandle | None = None):  # type: ignore[misc]  # Ray awaits it
        self._mlx_lock = FairLock()
        await self._init_pool(spec, manager)

    def estimate_bytes(self, entry: GenerativeEntry, path: Path) -> int:  # type: ignore[override]
        return super().estimate_bytes(entry, path) + _kv_budget(entry)

    async def load_model(self, entry: GenerativeEntry, path: Path) -> LLMModel:  # type: ignore[override]
        return await asyncio.to_thread(self.model_class, entry, path, self._mlx_lock, self.served_by)

    async def release_memory(self) -> None:
        def release() -> None:
            with self._mlx_lock:  # between the other engines' steps
                release_mlx_memory()

        await asyncio.to_thread(release)

    async def generate(self, params: SamplingParams, *, keep_alive_s: float | None = None, **kwargs: Any
                       ) -> AsyncIterator[Accepted | ChoiceChunk]:
        """The request's model generates (see ``LLMModel.generate``); it stays loaded meanwhile."""
        async with self.using(keep_alive_s=keep_alive_s) as model:
            async for item in model.generate(params, **kwargs):
                yield item

    def sample_metrics(self) -> None:
        super().sample_metrics()
        for slot in list(self.pool.slots.values()):
            if not slot.closing:
                slot.model.sample_metrics()

    def queue_depth(self, slot: Any) -> int:
        return 0 if slot.closing else slot.model.engine.stats().waiting  # sequences not yet in the batch

    def stats(self) -> EngineStats:
        """The engine stats of the request's model (its multiplexed id)."""
        slot = self.pool.get(serve.get_multiplexed_model_id() or self._only_model())
        if slot is None:
            raise ValueError("that model is not loaded on this replica")
        return slot.model.engine.stats()

    async def check_health(self) -> None:
        await self.check_pool_health()

    def __del__(self):
        pool = getattr(self, "pool", None)
        for slot in list(pool.slots.values()) if pool is not None else []:
            slot.model.close()


_SHIPPED_TEMPLATES = Path(__file__).resolve().parent.parent / "mlx_orchard" / "templates"


def _template(value: str | None) -> str | None:
    """An inline Jinja template, the text of the .jinja file it names, or one Orchard ships."""
    if value and "\n" not in value and "{" not in value:
        shipped = _SHIPPED_TEMPLATES / f"{value.strip()}.jinja"
        if shipped.is_file():
            return shipped.read_text()
    if value and value.strip().endswith(".jinja") and "\n" not in value:
        return Path(value).expanduser().read_text()
    return value


def _draft_path(entry: LLMEntry) -> Path | None:
    spec = entry.speculative
    if spec is None or spec.draft_model is None:
        return None
    dequantize = mlx_uses_cpu_backend() if entry.dequantize == "auto" else entry.dequantize
    return resolve_llm(spec.draft_model, dequantize=dequantize, sha256=spec.draft_sha256)


def _kv_budget(entry: GenerativeEntry) -> int:
    return int((physical_memory_bytes() / 4) if entry.kv_cache_gb == "auto" else entry.kv_cache_gb * _GB)


def _parsed(chunk: GenerationChunk, parser: OutputParser | HarmonyParser | None) -> ChoiceChunk:
    """An engine chunk as the ingress gets it: answer text, reasoning and tool calls apart."""
    out = ChoiceChunk(chunk.index, "", chunk.completion_tokens, chunk.finish_reason, logprobs=chunk.logprobs,
                      stop_sequence=chunk.stop_sequence)
    if parser is None:
        out.text = chunk.text
        return out
    _add(out, parser.feed(chunk.text) + (parser.finish() if chunk.finish_reason else []))
    if chunk.finish_reason == "stop" and parser.calls:
        out.finish_reason = "tool_calls"
    return out


def _add(out: ChoiceChunk, pieces: list[Piece]) -> None:
    calls: list[ToolCallDelta] = []
    for piece in pieces:
        if piece.kind == "text":
            out.text += piece.text
        elif piece.kind == "reasoning":
            out.reasoning += piece.text
        elif piece.kind == "tool_call" and piece.call is not None:
            calls.append(ToolCallDelta(piece.index, piece.call.id, piece.call.name, piece.call.arguments))
        elif piece.kind == "call_begin" and piece.call is not None:  # its arguments follow as call_args
            calls.append(ToolCallDelta(piece.index, piece.call.id, piece.call.name, ""))
        elif piece.kind == "call_args":
            calls.append(ToolCallDelta(piece.index, arguments=piece.text))
    out.tool_calls = merged_calls(out.tool_calls or [], calls) or None


def _extend(into: ChoiceChunk, new: ChoiceChunk) -> None:
    into.text += new.text
    into.reasoning += new.reasoning
    if new.tool_calls:
        into.tool_calls = merged_calls(into.tool_calls or [], new.tool_calls)
    if new.logprobs is not None:
        into.logprobs = (into.logprobs or []) + new.logprobs
    into.completion_tokens = new.completion_tokens
    into.finish_reason = new.finish_reason
    into.stop_sequence = new.stop_sequence


def _engine_options(entry: GenerativeEntry, mlx_lock: AbstractContextManager) -> dict[str, Any]:
    """What every generative engine is built with, from its model's entry."""
    return dict(
        max_batch_size=entry.max_batch_size,
        prefill_batch_size=entry.prefill_batch_size,
        prefill_step_size=entry.prefill_step_size,
        default_max_tokens=entry.default_max_tokens,
        prefix_cache_size=entry.prefix_cache_size,
        prefix_cache_bytes=int(entry.prefix_cache_gb * _GB),
        max_waiting=entry.max_waiting,
        max_queue_wait_s=entry.max_queue_wait_s,
        kv_cache_bytes=_kv_budget(entry),
        mlx_lock=mlx_lock,
        context_length=entry.context_length,
        max_tokens_limit=entry.max_tokens_limit,
        chat_template=_template(entry.chat_template),
        prefix_cache_dir=entry.prefix_cache_dir or str(cache_root() / "prefix-cache" / entry.name),
        prefix_cache_disk_bytes=int(entry.prefix_cache_disk_gb * _GB),
    )


class LLMModel:
    """One loaded LLM: its engine, its sampling defaults, its tokenizer thread and metrics."""

    family = "llm"

    def __init__(self, entry: GenerativeEntry, path: Path, mlx_lock: AbstractContextManager, served_by: str):
        self.name = entry.name
        self.served_by = served_by
        self.sampling = entry.sampling.model_dump()  # the model's defaults, under each request's own
        self.engine = self.make_engine(entry, path, **_engine_options(entry, mlx_lock))
        engine = self.engine
        self.output = ModelOutput(
            engine.chat_template or getattr(engine.tokenizer, "chat_template", None),
            tool_parser=entry.tool_parser,
            reasoning_parser=entry.reasoning_parser,
        )
        engine.keep_special_tokens = self.output.keeps_special_tokens(engine.special_token)
        # Chat templating and tokenization of a large request run here, off the event loop
        # (which streams every other request's tokens) and off the MLX thread. One thread:
        # a fast tokenizer must not be used from two threads at once.
        self._text = ThreadPoolExecutor(max_workers=1, thread_name_prefix="orchard-llm-tokenize")
        self._init_metrics({"family": self.family, "model": entry.name})

    def _init_metrics(self, tags: dict[str, str]) -> None:
        # Per request or per token on the event loop; per step (gauges, batch sizes) in
        # ``sample_metrics``, from counts the engine thread keeps: none on the MLX thread.
        self._requests = counter("orchard_llm_requests", "requests admitted to the batch", tags)
        self._prompt_tokens = counter("orchard_llm_prompt_tokens", "prompt tokens of admitted requests", tags)
        self._cached_tokens = counter("orchard_llm_cached_tokens",
                                      "prompt tokens found in the prefix cache (hit rate: cached / prompt)", tags)
        self._tokens = counter("orchard_llm_completion_tokens", "tokens generated", tags)
        self._structured = counter("orchard_llm_structured_requests", "requests decoded under a grammar "
                                   "(kind: json_schema or tool_call)", tags, ("kind",))
        self._ttft = histogram("orchard_llm_time_to_first_token_s", "seconds from arrival at the ingress to the first token",
                               LATENCY_S, tags)
        self._itl = histogram("orchard_llm_inter_token_latency_s", "seconds between two tokens of one sequence",
                              TOKEN_GAP_S, tags)
        self._e2e = histogram("orchard_llm_request_latency_s", "seconds from arrival at the ingress to the last token",
                              LATENCY_S, tags)
        self._running = gauge("orchard_llm_running_sequences", "sequences in the batch", tags)
        self._waiting = gauge("orchard_llm_waiting_sequences", "sequences waiting to join the batch", tags)
        self._kv_used = gauge("orchard_llm_kv_cache_bytes", "KV-cache bytes the running sequences hold", tags)
        self._prefix_bytes = gauge("orchard_llm_prefix_cache_bytes", "bytes the prefix cache holds", tags)
        self._step_size = histogram("orchard_llm_batch_size", "sequences per decode step", BATCH_SIZES, tags)
        self._drafted = counter("orchard_llm_spec_draft_tokens", "speculative tokens drafted", tags)
        self._accepted = counter("orchard_llm_spec_accepted_tokens", "speculative tokens accepted (acceptance: accepted / draft)",
                                 tags)
        self._spec_reported = (0, 0)
        self._steps_reported = self.engine.step_sizes()

    def sample_metrics(self) -> None:
        """The engine's gauges now, and what it counted since the last call: the batch sizes of
        its steps and the speculative tokens it drafted and accepted."""
        stats = self.engine.stats()
        self._running.set(stats.running)
        self._waiting.set(stats.waiting)
        self._kv_used.set(stats.kv_used_bytes)
        self._prefix_bytes.set(stats.prefix_cache_bytes)
        drafted, accepted = self._spec_reported
        if stats.draft_tokens > drafted:
            self._drafted.inc(stats.draft_tokens - drafted)
        if stats.accepted_tokens > accepted:
            self._accepted.inc(stats.accepted_tokens - accepted)
        self._spec_reported = (stats.draft_tokens, stats.accepted_tokens)
        sizes = self.engine.step_sizes()
        for size, (now, before) in enumerate(zip(sizes, self._steps_reported)):
            for _ in range(now - before):
                self._step_size.observe(size)
        self._steps_reported = sizes

    def make_engine(self, entry: Any, path: Path, **options: Any) -> LLMEngine:
        """This family's engine for ``entry`` (an ``LLMEntry`` here)."""
        return LLMEngine(
            path,
            **options,
            kv_bits=entry.kv_bits,
            kv_group_size=entry.kv_group_size,
            speculative=None if entry.speculative is None else SpeculativeConfig(
                **entry.speculative.model_dump(exclude={"method", "draft_model", "draft_sha256"})
            ),
            draft_model=_draft_path(entry),
        )

    def encode_messages(self, messages: list[dict[str, Any]], images: list[Any], **template_kwargs: Any
                        ) -> tuple[list[int], Sequence[Any]]:
        """A conversation's prompt tokens and the spans of it that are images (none here)."""
        if images:
            raise InvalidRequestError(f"The model `{self.name}` is a text-only model; it does not accept images.",
                                      param="messages")
        return self.engine.encode_chat(messages, **template_kwargs), ()

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
        tools: ToolRequest | None = None,
        template_kwargs: dict[str, Any] | None = None,
        priority: int = 0,
        images: list[Any] | None = None,
    ) -> AsyncIterator[Accepted | ChoiceChunk]:
        """Yields ``Accepted`` once the prompt passed its checks and joined the batch (so
        callers can answer 4xx/503 before committing to a 200), then the chunks of its
        ``n`` choices; with stream=False one chunk per choice, holding all its text.
        The request's unset sampling fields take this model's defaults. ``arrived_at`` (epoch
        seconds, from the ingress): time spent in Serve's queues counts as waiting.
        ``images``: the ``LoadedImage``s of the messages' image parts, in order."""
        output = self.output
        opening = ""
        structured = "json_schema" if params.json_schema is not None else None  # decoded under a grammar
        media: Sequence[Any] = ()
        if images and messages is None:
            raise InvalidRequestError("images come in chat messages", param="prompt")
        if messages is not None:
            kwargs = dict(template_kwargs or {})
            if output.reasoning:  # a model with reasoning markers thinks unless the request says not
                kwargs.setdefault("enable_thinking", True)
            template_tools = output.template_tools(tools)
            if template_tools is not None:
                kwargs["tools"] = template_tools
            ids, media = await self._off_loop(lambda: self.encode_messages(messages, images or [], **kwargs))
            grammar = output.grammar(tools, params.json_schema, self.engine.special_token)
            if grammar is not None and structured is None:
                structured = "tool_call"
                # A forced call's opening is certain: it goes into the prompt (one prefill), and
                # the grammar reads it as already generated.
                opening = output.forced_prefix(tools)
                prefilled = await self._off_loop(self.engine.encode_continuation, opening) if opening else []
                ids += prefilled
                params = params.with_changes(grammar=grammar, json_schema=None, prefilled=len(prefilled))
        elif isinstance(prompt, str):
            ids = await self._off_loop(self.engine.encode, prompt)
        else:
            ids = list(prompt or [])
        arrived = time.time() if arrived_at is None else arrived_at  # epoch seconds: the ingress may be on another node
        waited = time.time() - arrived
        chunks = self.engine.generate(ids, params.with_defaults(**self.sampling), n=n, waited_s=waited, priority=priority,
                                      media=media)
        # Accepted once the sequences are in the batch: a request shed from the queue still
        # gets a 503 status rather than an error event inside a 200 stream.
        await chunks.admitted()
        self._requests.inc()
        self._prompt_tokens.inc(len(ids))
        if structured is not None:
            self._structured.inc(tags={"kind": structured})
        if chunks.cached_tokens:
            self._cached_tokens.inc(chunks.cached_tokens)
        yield Accepted(prompt_tokens=len(ids), served_by=self.served_by, cached_tokens=chunks.cached_tokens)

        prefix = ""
        if echo:
            prefix = prompt if isinstance(prompt, str) else await self._off_loop(self.engine.decode, ids)
        in_reasoning = messages is not None and output.starts_in_reasoning(await self._off_loop(self.engine.decode, ids[-16:]))
        parsers = [output.parser(tools if messages is not None else None, in_reasoning) for _ in range(n)]
        # stream: the echo still owed to each choice; else: everything so far, sent at its end
        outs = [ChoiceChunk(i, prefix, 0, logprobs=[] if params.logprobs is not None else None) for i in range(n)]
        for parser, out in zip(parsers, outs):
            if opening and parser is not None:
                _add(out, parser.feed(opening))  # a named call's id and name go out before its first token
        if stream and opening:
            for i, out in enumerate(outs):
                if out.tool_calls:
                    yield out
                    outs[i] = ChoiceChunk(i, "", 0, logprobs=out.logprobs and [])
        generated = 0
        # Token gaps are noted here and recorded once the request is done, off the token path.
        last_at: list[float | None] = [None] * n
        gaps: list[tuple[float, int]] = []
        try:
            async for chunk in chunks:
                now = time.perf_counter()
                if not generated:
                    self._ttft.observe(max(0.0, time.time() - arrived))
                before = last_at[chunk.index]
                if before is not None and chunk.token_ids:
                    gaps.append((now - before, len(chunk.token_ids)))  # a chunk may carry several tokens
                last_at[chunk.index] = now
                generated += len(chunk.token_ids)
                new = _parsed(chunk, parsers[chunk.index])
                if stream:
                    _extend(outs[chunk.index], new)
                    if new.text or new.reasoning or new.tool_calls or new.logprobs or new.finish_reason:
                        yield outs[chunk.index]
                        outs[chunk.index] = ChoiceChunk(chunk.index, "", 0, logprobs=outs[chunk.index].logprobs and [])
                else:
                    _extend(outs[chunk.index], new)
                    if chunk.finish_reason:
                        yield outs[chunk.index]
        finally:
            await chunks.aclose()
            # Counted once per request, not per chunk: the metrics stay off the token path.
            if generated:
                self._tokens.inc(generated)
                self._e2e.observe(max(0.0, time.time() - arrived))
                for gap, tokens in gaps:
                    for _ in range(tokens):
                        self._itl.observe(gap / tokens)

    def _off_loop(self, fn, *args):
        return asyncio.get_running_loop().run_in_executor(self._text, fn, *args)

    async def check(self) -> None:
        # The loop thread answers between steps: a thread that is alive but stuck fails too.
        try:
            await self.engine.ping(timeout=20.0)
        except Exception as e:
            raise RuntimeError(f"the generation loop of {self.name!r} is not answering") from e

    def close(self) -> None:
        self.engine.shutdown()
        self._text.shutdown(wait=False, cancel_futures=True)


@serve.deployment(name="llm", max_ongoing_requests=64, health_check_period_s=10)
class LLMDeployment(GenerativeFamily):
    """The LLM pool (mlx-lm models; GGUF files converted once)."""

    model_class = LLMModel

    def resolve(self, entry: LLMEntry) -> Path:  # type: ignore[override]
        dequantize = mlx_uses_cpu_backend() if entry.dequantize == "auto" else entry.dequantize
        return resolve_llm(entry.source, dequantize=dequantize, sha256=entry.sha256)
