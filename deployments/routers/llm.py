"""``/v1/chat/completions`` and ``/v1/completions``: formatters over the LLM client."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from deployments import llm_client
from deployments.http import SSE_DONE, sse_errors_inline, sse_event
from deployments.llm_client import Generation, LLMClient
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
from mlx_orchard.protocol.completions import (
    Completion,
    CompletionChoice,
    CompletionRequest,
)

if TYPE_CHECKING:
    from deployments.ingress import Ingress

FAMILY = "llm"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def router(ingress: Ingress) -> APIRouter:
    api = APIRouter()
    clients: dict[tuple[str, str], LLMClient] = {}  # one per (deployment, model), built on first use

    async def client(model: str) -> LLMClient:
        route, handle = await ingress.route(model, FAMILY)
        key = (route.deployment, route.name)
        if key not in clients:
            clients[key] = LLMClient(handle)
        return clients[key]

    @api.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        return await ingress.bounded(chat(req, await client(req.model)))

    @api.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await ingress.bounded(text_completions(req, await client(req.model)))

    return api


async def chat(req: ChatCompletionRequest, client: LLMClient):
    generation = await client.start(
        req.sampling_params(), n=req.n, stream=req.stream, keep_alive_s=req.keep_alive_s(), messages=req.template_messages()
    )
    generations = [generation]
    if not req.stream:
        finals = await llm_client.finals(generations)
        body = ChatCompletion(
            model=req.model,
            choices=[
                ChatChoice(index=f.index, message=AssistantMessage(content=f.text), finish_reason=f.finish_reason)
                for f in finals
            ],
            usage=llm_client.usage(generations),
        )
        return _json(body, generations)

    rid, created = completion_id("chatcmpl"), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def event(index: int, delta: ChatDelta, finish: str | None = None) -> bytes:
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish)
        return sse_event(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[choice]))

    async def events() -> AsyncIterator[bytes]:
        for i in range(req.n):
            yield event(i, ChatDelta(role="assistant", content=""))
        async for chunk in llm_client.merged(generations):
            if chunk.text:
                yield event(chunk.index, ChatDelta(content=chunk.text))
            if chunk.finish_reason:
                yield event(chunk.index, ChatDelta(), chunk.finish_reason)
        if include_usage:
            usage = llm_client.usage(generations)
            yield sse_event(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[], usage=usage))
        yield SSE_DONE

    return _sse(events(), generations)


async def text_completions(req: CompletionRequest, client: LLMClient):
    prompts = [{"prompt": p, "echo": req.echo, "keep_alive_s": req.keep_alive_s()} for p in req.prompts()]
    generations = await llm_client.start_all(client, req.sampling_params(), prompts, n=req.n, stream=req.stream)
    if not req.stream:
        finals = await llm_client.finals(generations)
        body = Completion(
            model=req.model,
            choices=[CompletionChoice(index=f.index, text=f.text, finish_reason=f.finish_reason) for f in finals],
            usage=llm_client.usage(generations),
        )
        return _json(body, generations)

    rid, created = completion_id("cmpl"), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def event(index: int, text: str, finish: str | None = None) -> bytes:
        choice = CompletionChoice(index=index, text=text, finish_reason=finish)
        return sse_event(Completion(id=rid, created=created, model=req.model, choices=[choice]))

    async def events() -> AsyncIterator[bytes]:
        async for chunk in llm_client.merged(generations):
            if chunk.text or chunk.finish_reason:
                yield event(chunk.index, chunk.text, chunk.finish_reason)
        if include_usage:
            usage = llm_client.usage(generations)
            yield sse_event(Completion(id=rid, created=created, model=req.model, choices=[], usage=usage))
        yield SSE_DONE

    return _sse(events(), generations)


def _sse(events: AsyncIterator[bytes], generations: list[Generation]) -> StreamingResponse:
    headers = SSE_HEADERS | llm_client.served_by(generations)
    return StreamingResponse(sse_errors_inline(events), media_type="text/event-stream", headers=headers)


def _json(body: BaseModel, generations: list[Generation]) -> Response:
    return Response(body.model_dump_json(), media_type="application/json", headers=llm_client.served_by(generations))
