"""``/v1/audio/transcriptions`` and ``/v1/audio/translations``: read the multipart upload,
call the transcription deployment, answer as JSON, plain text, subtitles or server-sent
events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, StreamingResponse

from deployments.http import SSE_DONE, sse_event
from deployments.routers import realtime
from deployments.routers.uploads import read_upload
from mlx_orchard.protocol.audio import (
    TranscriptDelta,
    TranscriptDone,
    Transcription,
    TranscriptionForm,
    TranscriptionVerbose,
    to_srt,
    to_vtt,
)

if TYPE_CHECKING:
    from deployments.ingress import Ingress

FAMILY = "transcription"


def router(ingress: Ingress) -> APIRouter:
    api = APIRouter()
    api.include_router(realtime.router(ingress))  # live transcription sockets, on the same models

    @api.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        return await ingress.bounded(transcribe(request, ingress, "transcribe"))

    @api.post("/v1/audio/translations")
    async def translations(request: Request):
        return await ingress.bounded(transcribe(request, ingress, "translate"))

    return api


async def _read_upload(request: Request, limit: int) -> tuple[bytes, TranscriptionForm]:
    data, pairs = await read_upload(request, limit)
    fields: dict = {k: v for k, v in pairs if not k.startswith("timestamp_granularities")}
    granularities = [v for k, v in pairs if k in ("timestamp_granularities[]", "timestamp_granularities")]
    if granularities:
        fields["timestamp_granularities"] = granularities
    return data, TranscriptionForm.model_validate(fields)


async def transcribe(request: Request, ingress: Ingress, task: str):
    data, form = await _read_upload(request, int(ingress.options.max_upload_mb * 1e6))
    _, handle = await ingress.route(form.model, FAMILY)
    result: TranscriptionVerbose = await handle.transcribe.remote(
        data,
        task=task,
        language=form.language if task == "transcribe" else None,
        prompt=form.prompt,
        temperature=form.temperature,
        word_timestamps="word" in form.timestamp_granularities,
        keep_alive_s=form.keep_alive_s(),
    )
    if form.stream:
        return StreamingResponse(_transcript_events(result), media_type="text/event-stream")
    match form.response_format:
        case "text":
            return PlainTextResponse(result.text + "\n")
        case "srt":
            return PlainTextResponse(to_srt(result))
        case "vtt":
            return PlainTextResponse(to_vtt(result), media_type="text/vtt")
        case "verbose_json":
            return result
        case _:
            return Transcription(text=result.text)


async def _transcript_events(result: TranscriptionVerbose) -> AsyncIterator[bytes]:
    # Segments arrive together from a batched decode; each still goes out as its own delta.
    for i, segment in enumerate(result.segments):
        text = segment.text.lstrip() if i == 0 else segment.text
        if text:
            yield sse_event(TranscriptDelta(delta=text))
    yield sse_event(TranscriptDone(text=result.text))
    yield SSE_DONE
