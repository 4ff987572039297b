"""``/v1/chat/completions`` and ``/v1/completions``: formatters over the LLM client."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel

from deployments import llm_client
from deployments.http import SSE_DONE, SSE_HEADERS, sse_errors_inline, sse_event
from deployments.llm_client import Generation, LLMClient
from deployments.routers import messages, responses
from mlx_orchard.protocol.chat import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatToolCall,
    DeltaFunction,
    DeltaToolCall,
    FunctionCall,
    choice_logprobs,
    completion_id,
)
from mlx_orchard.protocol.completions import (
    Completion,
    CompletionChoice,
    CompletionRequest,
    completion_logprobs,
)

if TYPE_CHECKING:
    from deployments.ingress import Ingress

FAMILIES = ("llm", "vlm")  # chat, Responses and Messages serve text and vision models alike


def router(ingress: Ingress) -> APIRouter:
    api = APIRouter()
    clients: dict[tuple[str, str], LLMClient] = {}  # one per (deployment, model), built on first use

    async def client(model: str) -> LLMClient:
        route, handle = await ingress.route(model, FAMILIES)
        key = (route.deployment, route.name)
        if key not in clients:
            clients[key] = LLMClient(handle, model=route.name, vision=route.family == "vlm",
                                     image_limits=ingress.options.images.limits())
        return clients[key]

    @api.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await ingress.bounded(chat(req, await client(req.model), ingress.priority(request, req.priority)))

    @api.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await ingress.bounded(text_completions(req, await client(req.model), ingress.priority(request, req.priority)))

    # The Responses API and Anthropic Messages: other shapes over the same LLM client.
    api.include_router(responses.router(ingress, client))
    api.include_router(messages.router(ingress, client))
    return api


async def chat(req: ChatCompletionRequest, client: LLMClient, priority: int = 0):
    generation = await client.start(
        req.sampling_params(),
        priority=priority,
        n=req.n,
        stream=req.stream,
        keep_alive_s=req.keep_alive_s(),
        messages=req.template_messages(),
        tools=req.tool_request(),
        template_kwargs=req.template_kwargs(),
    )
    generations = [generation]
    if not req.stream:
        finals = await llm_client.finals(generations)
        body = ChatCompletion(
            model=req.model,
            choices=[
                ChatChoice(
                    index=f.index,
                    message=AssistantMessage(
                        content=f.text if f.text or not f.tool_calls else None,
                        reasoning_content=f.reasoning or None,
                        tool_calls=[ChatToolCall(id=c.id or "", function=FunctionCall(name=c.name or "", arguments=c.arguments))
                                    for c in f.tool_calls] if f.tool_calls else None,
                    ),
                    finish_reason=f.finish_reason,
                    logprobs=choice_logprobs(f.logprobs),
                )
                for f in finals
            ],
            usage=llm_client.usage(generations),
        )
        return _json(body, generations)

    rid, created = completion_id("chatcmpl"), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def event(index: int, delta: ChatDelta, finish: str | None = None, logprobs=None) -> bytes:
        choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)
        return sse_event(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[choice]))

    async def events() -> AsyncIterator[bytes]:
        for i in range(req.n):
            yield event(i, ChatDelta(role="assistant", content=""))
        async for chunk in llm_client.merged(generations):
            i = chunk.index
            if chunk.reasoning:
                yield event(i, ChatDelta(reasoning_content=chunk.reasoning))
            if chunk.text or chunk.logprobs:
                yield event(i, ChatDelta(content=chunk.text), logprobs=choice_logprobs(chunk.logprobs))
            for call in chunk.tool_calls or []:
                # As OpenAI streams them: the id and name first, then argument fragments.
                if call.name is not None:
                    yield event(i, ChatDelta(tool_calls=[DeltaToolCall(
                        index=call.index, id=call.id, type="function", function=DeltaFunction(name=call.name, arguments=""))]))
                if call.arguments:
                    yield event(i, ChatDelta(tool_calls=[DeltaToolCall(index=call.index, function=DeltaFunction(arguments=call.arguments))]))
            if chunk.finish_reason:
                yield event(i, ChatDelta(), chunk.finish_reason)
        if include_usage:
            usage = llm_client.usage(generations)
            yield sse_event(ChatCompletionChunk(id=rid, created=created, model=req.model, choices=[], usage=usage))
        yield SSE_DONE

    return _sse(events(), generations)


async def text_completions(req: CompletionRequest, client: LLMClient, priority: int = 0):
    prompts = [{"prompt": p, "echo": req.echo, "keep_alive_s": req.keep_alive_s(), "priority": priority} for p in req.prompts()]
    generations = await llm_client.start_all(client, req.sampling_params(), prompts, n=req.n, stream=req.stream)
    if not req.stream:
        finals = await llm_client.finals(generations)
        body = Completion(
            model=req.model,
            choices=[
                CompletionChoice(index=f.index, text=f.text, finish_reason=f.finish_reason, logprobs=completion_logprobs(f.logprobs))
                for f in finals
            ],
            usage=llm_client.usage(generations),
        )
        return _json(body, generations)

    rid, created = completion_id("cmpl"), int(time.time())
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def event(index: int, text: str, finish: str | None = None, logprobs=None) -> bytes:
        choice = CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)
        return sse_event(Completion(id=rid, created=created, model=req.model, choices=[choice]))

    async def events() -> AsyncIterator[bytes]:
        async for chunk in llm_client.merged(generations):
            if chunk.text or chunk.finish_reason or chunk.logprobs:
                yield event(chunk.index, chunk.text, chunk.finish_reason, completion_logprobs(chunk.logprobs))
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
