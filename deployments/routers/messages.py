"""``/v1/messages``: Anthropic's Messages API as a formatter over the LLM client, so the
Anthropic SDK and Claude Code can use Orchard's models (thinking, text, tool_use blocks).

Refusals keep Orchard's one error body, ``{"error": {"message", "type", ...}}``: Anthropic's
SDK reads the status and the same ``error`` object. A failure after the stream began is
Anthropic's ``error`` event."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from deployments import llm_client
from deployments.http import SSE_HEADERS, error_payload
from deployments.llm_client import Generation, LLMClient
from mlx_orchard.protocol.messages import Message, MessagesRequest, Usage, message_id, stop_reason, tool_use_block
from mlx_orchard.wire import ChoiceChunk

if TYPE_CHECKING:
    from deployments.ingress import Ingress



def router(ingress: Ingress, client_for: Callable[[str], Awaitable[LLMClient]]) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/messages")
    async def messages(req: MessagesRequest, request: Request):
        return await ingress.bounded(respond(req, await client_for(req.model), ingress.priority(request, req.priority)))

    return api


async def respond(req: MessagesRequest, client: LLMClient, priority: int = 0):
    generation = await client.start(
        req.sampling_params(),
        priority=priority,
        stream=req.stream,
        keep_alive_s=req.keep_alive_s(),
        messages=req.template_messages(),
        tools=req.tool_request(),
        template_kwargs=req.template_kwargs(),
    )
    headers = llm_client.served_by([generation])
    if not req.stream:
        [final] = await llm_client.finals([generation])
        body = Message(
            model=req.model,
            content=_blocks(final),
            stop_reason=stop_reason(final.finish_reason, final.stop_sequence),  # type: ignore[arg-type]
            stop_sequence=final.stop_sequence,
            usage=_usage(generation, final.completion_tokens),
        )
        return Response(body.model_dump_json(), media_type="application/json", headers=headers)
    return StreamingResponse(_events(req, generation), media_type="text/event-stream", headers=SSE_HEADERS | headers)


def _blocks(final: ChoiceChunk) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if final.reasoning:
        blocks.append({"type": "thinking", "thinking": final.reasoning, "signature": ""})
    if final.text or not final.tool_calls:
        blocks.append({"type": "text", "text": final.text})
    blocks += [tool_use_block(c.id or "", c.name or "", c.arguments) for c in final.tool_calls or []]
    return blocks


def _usage(generation: Generation, output_tokens: int) -> Usage:
    return Usage(
        input_tokens=generation.accepted.prompt_tokens,
        output_tokens=output_tokens,
        cache_read_input_tokens=generation.accepted.cached_tokens,
    )


def _event(kind: str, **fields: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()


async def _events(req: MessagesRequest, generation: Generation) -> AsyncIterator[bytes]:
    start = Message(id=message_id(), model=req.model, content=[], usage=_usage(generation, 0))
    yield _event("message_start", message=start.model_dump(mode="json"))
    index, open_kind = -1, None  # the content block being streamed: "text" | "thinking" | None

    def close() -> list[bytes]:
        nonlocal open_kind
        if open_kind is None:
            return []
        open_kind = None
        return [_event("content_block_stop", index=index)]

    def begin(kind: str, block: dict[str, Any]) -> list[bytes]:
        nonlocal index, open_kind
        events = close()
        index += 1
        open_kind = kind
        return [*events, _event("content_block_start", index=index, content_block=block)]

    last = ChoiceChunk(0, "", 0)
    try:
        async for chunk in generation.chunks():
            last = chunk
            if chunk.reasoning:
                if open_kind != "thinking":
                    for e in begin("thinking", {"type": "thinking", "thinking": "", "signature": ""}):
                        yield e
                yield _event("content_block_delta", index=index, delta={"type": "thinking_delta", "thinking": chunk.reasoning})
            if chunk.text:
                if open_kind != "text":
                    for e in begin("text", {"type": "text", "text": ""}):
                        yield e
                yield _event("content_block_delta", index=index, delta={"type": "text_delta", "text": chunk.text})
            for call in chunk.tool_calls or []:
                if call.name is not None:  # a new call: its block opens, its arguments follow
                    for e in begin("tool_use", {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}):
                        yield e
                if call.arguments and open_kind == "tool_use":
                    yield _event("content_block_delta", index=index, delta={"type": "input_json_delta", "partial_json": call.arguments})
        if index < 0:  # an empty answer is still one text block
            for e in begin("text", {"type": "text", "text": ""}):
                yield e
        for e in close():
            yield e
    except Exception as exc:  # noqa: BLE001 - after the 200, a failure is an error event
        _, body = error_payload(exc)
        yield _event("error", error={"type": body["error"]["type"], "message": body["error"]["message"]})
        return
    reason = stop_reason(last.finish_reason, last.stop_sequence)
    yield _event("message_delta", delta={"stop_reason": reason, "stop_sequence": last.stop_sequence},
                 usage={"output_tokens": last.completion_tokens})
    yield _event("message_stop")
