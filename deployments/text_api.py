"""Chat and text completions on the ingress: fan a request out to the LLM deployment
(one sequence per choice), then answer as one JSON body or as server-sent events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from ray.serve.handle import DeploymentHandle

from deployments.http import SSE_DONE, sse_errors_inline, sse_event
from deployments.llm import Accepted
from mlx_orchard.engines.llm import GenerationChunk
from mlx_orchard.engines.sampling import SamplingParams
from mlx_orchard.protocol.chat import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    completion_id,
)
from mlx_orchard.protocol.common import PromptTokensDetails, Usage
from mlx_orchard.protocol.completions import Completion, CompletionChoice, CompletionRequest

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _served_by(choices: list[_Choice]) -> dict[str, str]:
    # Which replica (and node) answered: handy when several Macs serve one endpoint.
    return {"X-Orchard-Replica": ",".join(dict.fromkeys(c.served_by for c in choices))}


class _Choice:
    """One sequence of a request: its stream from the LLM deployment and its choice index."""

    def __init__(self, index: int, stream):
        self.index = index
        self.stream = stream
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.served_by = ""

    def update(self, chunk: GenerationChunk) -> None:
        self.completion_tokens = chunk.completion_tokens
        self.cached_tokens = chunk.cached_tokens

    async def accept(self) -> None:
        first: Accepted = await self.stream.__anext__()
        self.prompt_tokens = first.prompt_tokens
        self.served_by = first.served_by


def _per_choice_params(params: SamplingParams, i: int) -> SamplingParams:
    # n choices with one seed must still differ from each other, reproducibly.
    return params if params.seed is None or i == 0 else replace(params, seed=params.seed + i)


async def _start(choices: list[_Choice]) -> None:
    """Wait until every sequence is accepted, so a bad request fails before any 200 is sent."""
    try:
        await asyncio.gather(*(c.accept() for c in choices))
    except BaseException:
        _cancel(choices)
        raise


def _cancel(choices: list[_Choice]) -> None:
    for c in choices:
        c.stream.cancel()


async def _merged(choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, GenerationChunk]]:
    """Chunks of all choices as they arrive; leaving early cancels every sequence."""
    if len(choices) == 1:
        c = choices[0]
        try:
            async for chunk in c.stream:
                yield c, chunk
        finally:
            c.stream.cancel()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: _Choice) -> None:
        try:
            async for chunk in c.stream:
                await queue.put((c, chunk))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put((c, e))
        await queue.put((c, None))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        open_streams = len(choices)
        while open_streams:
            c, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield c, item
    finally:
        for t in tasks:
            t.cancel()
        _cancel(choices)


def _usage(choices: list[_Choice], prompt_tokens: int, n: int) -> Usage:
    """Completion tokens of every choice; the prompt (and its cache hits) once per prompt."""
    completion = sum(c.completion_tokens for c in choices)
    cached = sum(c.cached_tokens for c in choices[::n])
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
    )


def _streams(handle: DeploymentHandle, n: int, params: SamplingParams, stream: bool, **prompt: Any) -> list[_Choice]:
    gen = handle.options(stream=True).generate
    return [_Choice(i, gen.remote(_per_choice_params(params, i), stream=stream, **prompt)) for i in range(n)]


async def _finals(choices: list[_Choice]) -> list[GenerationChunk]:
    async def last(c: _Choice) -> GenerationChunk:
        final = None
        async for final in c.stream:
            pass
        c.update(final)
        return final

    try:
        return list(await asyncio.gather(*(last(c) for c in choices)))
    except BaseException:  # the client went away (cancellation) or a sequence failed
        _cancel(choices)
        raise


async def chat_completions(req: ChatCompletionRequest, handle: DeploymentHandle, defaults: SamplingParams):
    params = req.sampling_params(defaults)
    choices = _streams(handle, req.n, params, req.stream, messages=req.template_messages())
    await _start(choices)
    prompt_tokens = choices[0].prompt_tokens
    if not req.stream:
        finals = await _finals(choices)
        body = ChatCompletion(
            model=req.model,
            choices=[
                ChatChoice(index=c.index, message=AssistantMessage(content=f.text), finish_reason=f.finish_reason)
                for c, f in zip(choices, finals)
            ],
            usage=_usage(choices, prompt_tokens, req.n),
        )
        return _json(body, choices)

    rid, created = completion_id("chatcmpl"), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def event(index: int, delta: ChatDelta, finish: str | None = None) -> bytes:
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish)
        return sse_event(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[choice]))

    async def events() -> AsyncIterator[bytes]:
        for c in choices:
            yield event(c.index, ChatDelta(role="assistant", content=""))
        async for c, chunk in _merged(choices):
            c.update(chunk)
            if chunk.text:
                yield event(c.index, ChatDelta(content=chunk.text))
            if chunk.finish_reason:
                yield event(c.index, ChatDelta(), chunk.finish_reason)
        if include_usage:
            yield sse_event(
                ChatCompletionChunk(
                    id=rid, created=created, model=req.model, choices=[], usage=_usage(choices, prompt_tokens, req.n)
                )
            )
        yield SSE_DONE

    return _sse(events(), choices)


async def completions(req: CompletionRequest, handle: DeploymentHandle, defaults: SamplingParams):
    params = req.sampling_params(defaults)
    groups = [
        _streams(handle, req.n, params, req.stream, prompt=p, echo=req.echo) for p in req.prompts()
    ]
    for g, group in enumerate(groups):
        for c in group:
            c.index = g * req.n + c.index
    choices = [c for group in groups for c in group]
    await _start(choices)
    prompt_tokens = sum(group[0].prompt_tokens for group in groups)
    if not req.stream:
        finals = await _finals(choices)
        body = Completion(
            model=req.model,
            choices=[
                CompletionChoice(index=c.index, text=f.text, finish_reason=f.finish_reason)
                for c, f in zip(choices, finals)
            ],
            usage=_usage(choices, prompt_tokens, req.n),
        )
        return _json(body, choices)

    rid, created = completion_id("cmpl"), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def event(index: int, text: str, finish: str | None = None) -> bytes:
        choice = CompletionChoice(index=index, text=text, finish_reason=finish)
        return sse_event(Completion(id=rid, created=created, model=req.model, choices=[choice]))

    async def events() -> AsyncIterator[bytes]:
        async for c, chunk in _merged(choices):
            c.update(chunk)
            if chunk.text or chunk.finish_reason:
                yield event(c.index, chunk.text, chunk.finish_reason)
        if include_usage:
            yield sse_event(
                Completion(id=rid, created=created, model=req.model, choices=[], usage=_usage(choices, prompt_tokens, req.n))
            )
        yield SSE_DONE

    return _sse(events(), choices)


def _sse(events: AsyncIterator[bytes], choices: list[_Choice]) -> StreamingResponse:
    return StreamingResponse(
        sse_errors_inline(events), media_type="text/event-stream", headers=SSE_HEADERS | _served_by(choices)
    )


def _json(body: BaseModel, choices: list[_Choice]) -> Response:
    return Response(body.model_dump_json(), media_type="application/json", headers=_served_by(choices))

