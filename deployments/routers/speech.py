"""``POST /v1/audio/speech`` (audio bytes as they are made, or SSE events) and
``GET /v1/audio/voices``."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse
from ray.serve.handle import DeploymentResponseGenerator

from deployments.http import SSE_HEADERS, sse_errors_inline, sse_event
from mlx_orchard.protocol.speech import SpeechAudioDelta, SpeechAudioDone, SpeechRequest, SpeechUsage, Voice, VoiceList
from mlx_orchard.wire import SpeechEnd, SpeechStart

if TYPE_CHECKING:
    from deployments.ingress import Ingress

FAMILY = "tts"
_SAMPLES_PER_TOKEN = 240  # usage counts audio in 10 ms frames at 24 kHz


def router(ingress: Ingress) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/audio/speech")
    async def speech(req: SpeechRequest):
        return await ingress.bounded(speak(req, ingress))

    @api.get("/v1/audio/voices")
    async def voices(model: str = Query(..., min_length=1, max_length=256)) -> VoiceList:
        _, handle = await ingress.route(model, FAMILY)
        names = await handle.voices.remote()
        return VoiceList(model=model, data=[Voice(id=n, name=n) for n in names])

    return api


async def speak(req: SpeechRequest, ingress: Ingress) -> StreamingResponse:
    _, handle = await ingress.route(req.model, FAMILY)
    stream = cast(DeploymentResponseGenerator, handle.options(stream=True).speak.remote(
        req.input, voice=req.voice, response_format=req.response_format, speed=req.speed,
        lang_code=req.lang_code, ref_audio=req.ref_audio, keep_alive_s=req.keep_alive_s()))
    try:  # the replica's checks: a bad voice or format is a 400, before any 200
        start: SpeechStart = await stream.__anext__()
    except BaseException:
        stream.cancel()
        raise
    headers = {"x-orchard-served-by": start.served_by}

    async def audio() -> AsyncIterator[bytes]:
        try:
            async for item in stream:
                if isinstance(item, bytes):
                    yield item
        finally:
            stream.cancel()

    if req.stream_format == "audio":
        return StreamingResponse(audio(), media_type=start.media_type, headers=headers)

    async def events() -> AsyncIterator[bytes]:
        try:
            async for item in stream:
                if isinstance(item, bytes):
                    yield sse_event(SpeechAudioDelta(audio=base64.b64encode(item).decode()))
                elif isinstance(item, SpeechEnd):
                    frames = item.samples // _SAMPLES_PER_TOKEN
                    usage = SpeechUsage(input_tokens=item.phonemes, output_tokens=frames, total_tokens=item.phonemes + frames)
                    yield sse_event(SpeechAudioDone(usage=usage))
        finally:
            stream.cancel()

    return StreamingResponse(sse_errors_inline(events()), media_type="text/event-stream", headers=SSE_HEADERS | headers)
