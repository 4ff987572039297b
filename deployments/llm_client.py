"""The ingress side of the LLM family: start a generation on a replica and read it back.

Chat, text completions — and next the Responses API, Anthropic Messages and vision chat —
are formatters over this: they say what to generate and shape what comes back. A
request's ``n`` choices are one call to one replica (one template, one tokenization, one
prefill shared by the n sequences). No MLX here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from mlx_orchard.images import ImageLimits, take_images
from mlx_orchard.protocol.common import PromptTokensDetails, Usage
from mlx_orchard.wire import Accepted, ChoiceChunk, SamplingParams, ToolCallDelta


class LLMClient:
    """Calls one model of a generative family (LLM or vision); the streaming handle is
    built once, not per request. Image parts of the messages are fetched and decoded
    here, on the ingress, within ``image_limits``; only a vision model takes them."""

    def __init__(self, handle: DeploymentHandle, *, model: str = "", vision: bool = False,
                 image_limits: ImageLimits | None = None):
        self._generate = handle.options(stream=True).generate
        self.model = model
        self.vision = vision
        self.image_limits = image_limits or ImageLimits()

    async def start(
        self, params: SamplingParams, *, n: int = 1, stream: bool = True, index_base: int = 0, **prompt: Any
    ) -> Generation:
        """Send the request and wait until the replica accepted it, so a bad or shed request
        fails here, before any 200 is sent. ``prompt`` is ``messages=`` or ``prompt=``
        (with ``echo=`` for text completions)."""
        # When it arrived, so the engine counts time queued in Serve towards its queue limit.
        arrived = time.time()
        if prompt.get("messages") is not None:
            messages, images = await take_images(prompt["messages"], self.image_limits, vision=self.vision, model=self.model)
            if images:
                prompt = {**prompt, "messages": messages, "images": images}
        response = cast(
            DeploymentResponseGenerator,
            self._generate.remote(params, n=n, stream=stream, arrived_at=arrived, **prompt),
        )
        try:
            accepted: Accepted = await response.__anext__()
        except BaseException:
            response.cancel()
            raise
        return Generation(response, accepted, n, index_base)


class Generation:
    """One accepted request on one replica: its choices' chunks, their totals and usage."""

    def __init__(self, response, accepted: Accepted, n: int, index_base: int = 0):
        self._response = response
        self.accepted = accepted
        self.n = n
        self.index_base = index_base  # where this prompt's choices start in the response
        self.completion_tokens = [0] * n

    async def chunks(self) -> AsyncIterator[ChoiceChunk]:
        """Chunks as they come, with ``index`` counted across the whole response; leaving
        early cancels the generation on the replica."""
        try:
            async for chunk in self._response:
                self.completion_tokens[chunk.index] = chunk.completion_tokens
                chunk.index += self.index_base
                yield chunk
        finally:
            self._response.cancel()

    async def finals(self) -> list[ChoiceChunk]:
        """The whole text of every choice (for ``stream=False``), in index order."""
        out = [chunk async for chunk in self.chunks()]
        return sorted(out, key=lambda c: c.index)

    def cancel(self) -> None:
        self._response.cancel()


async def start_all(client: LLMClient, params: SamplingParams, prompts: list[dict[str, Any]], *, n: int,
                    stream: bool) -> list[Generation]:
    """One generation per prompt (text completions take several), started together; if one
    fails, the others are cancelled."""
    tasks = [
        asyncio.ensure_future(client.start(params, n=n, stream=stream, index_base=i * n, **p))
        for i, p in enumerate(prompts)
    ]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is None:
                t.result().cancel()
            else:
                t.cancel()
        raise


async def merged(generations: list[Generation]) -> AsyncIterator[ChoiceChunk]:
    """The chunks of several generations as they arrive; leaving early cancels them all."""
    if len(generations) == 1:
        async for chunk in generations[0].chunks():
            yield chunk
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(g: Generation) -> None:
        try:
            async for chunk in g.chunks():
                await queue.put(chunk)
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put(e)
        await queue.put(None)

    tasks = [asyncio.create_task(pump(g)) for g in generations]
    try:
        open_streams = len(generations)
        while open_streams:
            item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        for g in generations:
            g.cancel()


async def finals(generations: list[Generation]) -> list[ChoiceChunk]:
    try:
        results = await asyncio.gather(*(g.finals() for g in generations))
    except BaseException:  # the client went away (cancellation) or a choice failed
        for g in generations:
            g.cancel()
        raise
    return [chunk for result in results for chunk in result]


def usage(generations: list[Generation]) -> Usage:
    """Completion tokens of every choice; each prompt (and its cache hits) counted once."""
    prompt = sum(g.accepted.prompt_tokens for g in generations)
    completion = sum(sum(g.completion_tokens) for g in generations)
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(g.accepted.cached_tokens for g in generations)),
    )


def served_by(generations: list[Generation]) -> dict[str, str]:
    """Which replica (and node) answered: handy when several Macs serve one endpoint."""
    return {"X-Orchard-Replica": ",".join(dict.fromkeys(g.accepted.served_by for g in generations))}


def merged_calls(into: list[ToolCallDelta], new: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Deltas of the same call joined (its id and name stay on its first delta)."""
    out = list(into)
    for delta in new:
        if out and out[-1].index == delta.index and delta.name is None:
            last = out[-1]
            out[-1] = ToolCallDelta(last.index, last.id, last.name, last.arguments + delta.arguments)
        else:
            out.append(delta)
    return out
