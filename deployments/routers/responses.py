"""``/v1/responses``: OpenAI's Responses API as a formatter over the LLM client.

The conversation behind ``previous_response_id`` lives in a bounded store on the ingress
replica (``ingress.responses_store_size`` / ``responses_store_mb``); ``store: false``
keeps nothing. Streaming sends OpenAI's typed events, each with its sequence number.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from deployments import llm_client
from deployments.http import SSE_HEADERS, error_payload
from deployments.llm_client import Generation, LLMClient, merged_calls
from mlx_orchard.errors import NotFoundError
from mlx_orchard.protocol.common import stop_list
from mlx_orchard.protocol.responses import (
    IncompleteDetails,
    InputTokensDetails,
    NamedFunction,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputReasoning,
    OutputText,
    OutputTokensDetails,
    ReasoningContent,
    ResponseDeleted,
    ResponseError,
    ResponseObject,
    ResponsesRequest,
    ResponseUsage,
)
from mlx_orchard.protocol.tools import template_arguments
from mlx_orchard.response_store import ResponseStore
from mlx_orchard.wire import ChoiceChunk, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from deployments.ingress import Ingress



def router(ingress: Ingress, client_for: Callable[[str], Awaitable[LLMClient]]) -> APIRouter:
    api = APIRouter()
    store = ResponseStore(ingress.options.responses_store_size, int(ingress.options.responses_store_mb * 1e6))

    @api.post("/v1/responses")
    async def create(req: ResponsesRequest, request: Request):
        return await ingress.bounded(respond(req, await client_for(req.model), store, ingress.priority(request, req.priority)))

    @api.get("/v1/responses/{response_id}")
    async def retrieve(response_id: str):
        stored = store.get(response_id)
        if stored is None:
            raise NotFoundError(f"No response with id {response_id!r} is stored here.", param="response_id")
        return Response(stored.body, media_type="application/json")

    @api.delete("/v1/responses/{response_id}")
    async def delete(response_id: str) -> ResponseDeleted:
        if not store.delete(response_id):
            raise NotFoundError(f"No response with id {response_id!r} is stored here.", param="response_id")
        return ResponseDeleted(id=response_id)

    return api


def _params(req: ResponsesRequest) -> SamplingParams:
    return SamplingParams(
        max_tokens=req.max_output_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        stop=stop_list(req.stop),
        json_schema=req.json_schema_text(),
        logprobs=req.top_logprobs,
    )


async def respond(req: ResponsesRequest, client: LLMClient, store: ResponseStore, priority: int = 0):
    history: list[dict[str, Any]] = []
    if req.previous_response_id:
        previous = store.get(req.previous_response_id)
        if previous is None:
            raise NotFoundError(
                f"Previous response with id {req.previous_response_id!r} not found (expired, deleted, "
                "stored with store: false, or kept by another ingress replica).",
                param="previous_response_id",
            )
        history = previous.conversation
    conversation = history + req.input_messages()
    system = [{"role": "system", "content": req.instructions}] if req.instructions else []
    template_kwargs = {"reasoning_effort": req.reasoning.effort} if req.reasoning and req.reasoning.effort else {}
    generation = await client.start(
        _params(req),
        priority=priority,
        stream=req.stream,
        keep_alive_s=req.keep_alive_s(),
        messages=system + conversation,
        tools=req.tool_request(),
        template_kwargs=template_kwargs,
    )
    shell = ResponseObject(
        model=req.model,
        status="in_progress",
        instructions=req.instructions,
        max_output_tokens=req.max_output_tokens,
        parallel_tool_calls=req.parallel_tool_calls is not False,
        previous_response_id=req.previous_response_id,
        temperature=req.temperature,
        top_p=req.top_p,
        tool_choice=req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedFunction) else (req.tool_choice or "auto"),
        tools=[t.model_dump(exclude_none=True) for t in req.tools or []],
        text=req.text.model_dump(exclude_none=True, by_alias=True) if req.text else {"format": {"type": "text"}},
        store=req.store,
        metadata=req.metadata,
    )

    def finish(body: ResponseObject, final: ChoiceChunk) -> ResponseObject:
        """Usage and status of a finished answer (its output already set), stored when asked."""
        body.usage = _usage(generation, final)
        body.status = "incomplete" if final.finish_reason == "length" else "completed"
        if final.finish_reason == "length":
            body.incomplete_details = IncompleteDetails(reason="max_output_tokens")
        if req.store:
            store.put(body.id, body.model_dump_json(), conversation + [_assistant_turn(final)])
        return body

    if not req.stream:
        [final] = await llm_client.finals([generation])
        shell.output = _items(final)
        body = finish(shell, final)
        return Response(body.model_dump_json(), media_type="application/json", headers=llm_client.served_by([generation]))
    return StreamingResponse(
        _events(shell, generation, finish),
        media_type="text/event-stream",
        headers=SSE_HEADERS | llm_client.served_by([generation]),
    )


def _items(final: ChoiceChunk) -> list[OutputItem]:
    items: list[OutputItem] = []
    if final.reasoning:
        items.append(OutputReasoning(content=[ReasoningContent(text=final.reasoning)]))
    if final.text or not final.tool_calls:
        status = "incomplete" if final.finish_reason == "length" else "completed"
        items.append(OutputMessage(status=status, content=[OutputText(text=final.text, logprobs=_logprobs(final.logprobs))]))
    for call in final.tool_calls or []:
        items.append(OutputFunctionCall(call_id=call.id or "", name=call.name or "", arguments=call.arguments))
    return items


def _assistant_turn(final: ChoiceChunk) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": "assistant", "content": final.text}
    if final.tool_calls:
        turn["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": template_arguments(c.arguments)}}
            for c in final.tool_calls
        ]
    return turn


def _logprobs(items: list[TokenLogprob] | None) -> list[dict[str, Any]] | None:
    if items is None:
        return None
    return [
        {"token": t.token, "bytes": t.bytes, "logprob": t.logprob,
         "top_logprobs": [{"token": a.token, "bytes": a.bytes, "logprob": a.logprob} for a in t.top_logprobs]}
        for t in items
    ]


def _usage(generation: Generation, final: ChoiceChunk) -> ResponseUsage:
    usage = llm_client.usage([generation])
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=generation.accepted.cached_tokens),
        output_tokens=usage.completion_tokens,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=0),
        total_tokens=usage.total_tokens,
    )


class _Stream:
    """OpenAI's Responses event sequence, built as chunks arrive: an output item opens when
    its first content arrives and closes when another kind starts or the answer ends."""

    def __init__(self, shell: ResponseObject):
        self.shell = shell
        self.seq = 0
        self.output: list[OutputItem] = []
        self.open: OutputMessage | OutputReasoning | OutputFunctionCall | None = None
        self.text = ""
        self.logprobs: list[TokenLogprob] | None = None

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()

    def _common(self) -> dict[str, Any]:
        assert self.open is not None
        return {"item_id": self.open.id, "output_index": len(self.output)}

    def start(self, item: OutputMessage | OutputReasoning) -> list[bytes]:
        self.open, self.text, self.logprobs = item, "", None
        events = [self.event("response.output_item.added", output_index=len(self.output), item=_dump(item))]
        part = {"type": "output_text", "text": "", "annotations": []} if isinstance(item, OutputMessage) else {"type": "reasoning_text", "text": ""}
        events.append(self.event("response.content_part.added", **self._common(), content_index=0, part=part))
        return events

    def close(self, status: str = "completed") -> list[bytes]:
        item = self.open
        if item is None:
            return []
        events = []
        if isinstance(item, OutputFunctionCall):
            item.status = "completed"
            events.append(self.event("response.function_call_arguments.done", **self._common(), arguments=item.arguments, name=item.name))
        elif isinstance(item, OutputMessage):
            logprobs = _logprobs(self.logprobs) or []
            events.append(self.event("response.output_text.done", **self._common(), content_index=0, text=self.text, logprobs=logprobs))
            part = OutputText(text=self.text, logprobs=_logprobs(self.logprobs))
            events.append(self.event("response.content_part.done", **self._common(), content_index=0, part=_dump(part)))
            item.content, item.status = [part], "incomplete" if status == "incomplete" else "completed"
        else:
            events.append(self.event("response.reasoning_text.done", **self._common(), content_index=0, text=self.text))
            events.append(self.event("response.content_part.done", **self._common(), content_index=0,
                                     part={"type": "reasoning_text", "text": self.text}))
            item.content = [ReasoningContent(text=self.text)]
        events.append(self.event("response.output_item.done", output_index=len(self.output), item=_dump(item)))
        self.output.append(item)
        self.open = None
        return events

    def feed(self, chunk: ChoiceChunk) -> list[bytes]:
        events: list[bytes] = []
        if chunk.reasoning:
            if not isinstance(self.open, OutputReasoning):
                events += self.close() + self.start(OutputReasoning(status=None))
            self.text += chunk.reasoning
            events.append(self.event("response.reasoning_text.delta", **self._common(), content_index=0, delta=chunk.reasoning))
        if chunk.text or chunk.logprobs:
            if not isinstance(self.open, OutputMessage):
                events += self.close() + self.start(OutputMessage(status="in_progress"))
            self.text += chunk.text
            if chunk.logprobs is not None:
                self.logprobs = (self.logprobs or []) + chunk.logprobs
            events.append(self.event("response.output_text.delta", **self._common(), content_index=0, delta=chunk.text,
                                     logprobs=_logprobs(chunk.logprobs) or []))
        for call in chunk.tool_calls or []:
            if call.name is not None:  # a new call: its item opens, its arguments follow
                events += self.close()
                self.open = OutputFunctionCall(call_id=call.id or "", name=call.name, arguments="", status="in_progress")
                events.append(self.event("response.output_item.added", output_index=len(self.output), item=_dump(self.open)))
            if call.arguments and isinstance(self.open, OutputFunctionCall):
                self.open.arguments += call.arguments
                events.append(self.event("response.function_call_arguments.delta", **self._common(), delta=call.arguments))
        return events


async def _events(shell: ResponseObject, generation: Generation,
                  finish: Callable[[ResponseObject, ChoiceChunk], ResponseObject]) -> AsyncIterator[bytes]:
    stream = _Stream(shell)
    yield stream.event("response.created", response=_dump(shell))
    yield stream.event("response.in_progress", response=_dump(shell))
    whole = ChoiceChunk(0, "", 0)
    try:
        async for chunk in generation.chunks():
            whole.text += chunk.text
            whole.reasoning += chunk.reasoning
            whole.tool_calls = merged_calls(whole.tool_calls or [], chunk.tool_calls or []) or None
            whole.completion_tokens, whole.finish_reason = chunk.completion_tokens, chunk.finish_reason
            for event in stream.feed(chunk):
                yield event
        if not stream.output and stream.open is None:  # an empty answer is still one message
            for event in stream.start(OutputMessage(status="in_progress")):
                yield event
        for event in stream.close("incomplete" if whole.finish_reason == "length" else "completed"):
            yield event
    except Exception as exc:  # noqa: BLE001 - a failure after the 200 is a response.failed event
        _, error = error_payload(exc)
        shell.status, shell.output = "failed", stream.output
        shell.error = ResponseError(code=error["error"].get("code") or error["error"]["type"], message=error["error"]["message"])
        yield stream.event("response.failed", response=_dump(shell))
        return
    shell.output = stream.output
    body = finish(shell, whole)
    kind = "response.incomplete" if body.status == "incomplete" else "response.completed"
    yield stream.event(kind, response=_dump(body))


def _dump(model: Any) -> dict[str, Any]:
    return model.model_dump(mode="json")
