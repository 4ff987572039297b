"""Live transcription over WebSockets, on the transcription family's replicas.

- ``/v1/realtime?model=…``: the transcription subset of OpenAI's Realtime protocol, as
  mlx-audio's server speaks it (``session.update``, ``input_audio_buffer.append`` with base64
  PCM16, ``input_audio_buffer.commit``; ``turn_detection: {"type": "server_vad"}`` commits
  each turn itself).
- ``/v1/audio/transcriptions/realtime``: a JSON config first (``model``, ``language``,
  ``sample_rate``), then binary PCM16 frames; voice activity cuts them into utterances, each
  answered with ``delta`` events while it is spoken and one ``complete`` event after it.

The socket's state (audio, segmentation, text sent) lives here on the ingress, in
``mlx_orchard.realtime``; transcripts are ordinary batched calls to the model's replicas
(``transcribe_pcm``). At most one partial transcription per socket is in flight; a socket
that closes cancels its calls.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from mlx_orchard.errors import OrchardError
from mlx_orchard.realtime import RATE, RATES, RealtimeError, Segmenter, Utterance, pcm16_to_float

if TYPE_CHECKING:
    from deployments.ingress import Ingress

logger = logging.getLogger("ray.serve")
FAMILY = "transcription"
MAX_MESSAGE_BYTES = 1 << 20  # one event or frame: ~21 s of 24 kHz PCM16 in base64
MAX_UTTERANCE_S = 30.0  # Whisper's window
MAX_SESSION_S = 3600.0
PARTIAL_EVERY_S = 1.0


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:16]}"


class _Live:
    """What both endpoints share: the model, the current utterance, partials, the final pass."""

    def __init__(self, ws: WebSocket, ingress: Ingress):
        self.ws, self.ingress = ws, ingress
        self.model: str | None = None
        self.handle: Any = None
        self.language: str | None = None
        self.rate = 24_000
        self.utterance = Utterance(MAX_UTTERANCE_S)
        self.partial: asyncio.Task | None = None
        self.partial_s = 0.0  # how long the last partial took
        self.started = time.monotonic()
        self.calls: set[asyncio.Task] = set()

    async def use_model(self, model: str) -> None:
        _, handle = await self.ingress.route(model, FAMILY)
        self.model, self.handle = model, handle

    def check_time(self) -> None:
        if time.monotonic() - self.started > MAX_SESSION_S:
            raise RealtimeError(f"a session lasts at most {MAX_SESSION_S:g} s")

    async def transcribe(self, samples: np.ndarray) -> str:
        call = asyncio.ensure_future(self.handle.transcribe_pcm.remote(samples, language=self.language))
        self.calls.add(call)
        try:
            return (await call).strip()
        finally:
            self.calls.discard(call)

    def maybe_partial(self, on_delta) -> None:
        """Start a partial transcription of the utterance when enough new audio arrived and none
        runs. The audio between partials grows with how long the last one took, so sockets do
        not queue more partials than the replicas can answer (each costs a whole Whisper window)."""
        if (self.partial is None or self.partial.done()) and self.utterance.due(max(PARTIAL_EVERY_S, 1.5 * self.partial_s)):
            utterance = self.utterance

            async def run() -> None:
                began = time.monotonic()
                try:
                    text = await self.transcribe(utterance.pcm())
                except Exception:  # noqa: BLE001 - a partial that fails is skipped; the final pass reports
                    logger.warning("a partial transcription failed", exc_info=True)
                    return
                self.partial_s = time.monotonic() - began
                if utterance is self.utterance:  # not committed meanwhile
                    delta = utterance.agree(text)
                    if delta:
                        await on_delta(delta)

            self.partial = asyncio.ensure_future(run())

    async def finish(self) -> str:
        """The utterance's final transcript; a partial still running is cancelled (its text would
        be superseded) and a fresh utterance follows."""
        utterance, self.utterance = self.utterance, Utterance(MAX_UTTERANCE_S)
        if self.partial is not None:
            self.partial.cancel()
            await asyncio.gather(self.partial, return_exceptions=True)
            self.partial = None
        return await self.transcribe(utterance.pcm()) if utterance.samples else ""

    def close(self) -> None:
        for task in [*self.calls, *([self.partial] if self.partial else [])]:
            task.cancel()


def router(ingress: Ingress) -> APIRouter:
    api = APIRouter()

    @api.websocket("/v1/realtime")
    async def realtime(ws: WebSocket):
        await ws.accept()
        live = _Live(ws, ingress)
        try:
            await _openai_session(live, ws.query_params.get("model"))
        except WebSocketDisconnect:
            pass
        finally:
            live.close()

    @api.websocket("/v1/audio/transcriptions/realtime")
    async def frames(ws: WebSocket):
        await ws.accept()
        live = _Live(ws, ingress)
        try:
            await _frame_session(live)
        except WebSocketDisconnect:
            pass
        finally:
            live.close()

    return api


def _message(error: Exception) -> str:
    return error.message if isinstance(error, OrchardError) else str(error)


async def _openai_session(live: _Live, model: str | None) -> None:
    ws = live.ws
    session_id, item_id = _id("sess"), None
    vad: Segmenter | None = None
    turn_detection: dict | None = None

    async def send(event: dict) -> None:
        await ws.send_json({"event_id": _id("event"), **event})

    async def error(message: str, code: str = "invalid_request_error") -> None:
        await send({"type": "error", "error": {"type": code, "message": message}})

    def snapshot() -> dict:
        return {"id": session_id, "object": "realtime.session", "type": "transcription", "model": live.model,
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": live.rate},
                                    "transcription": {"model": live.model, "language": live.language},
                                    "turn_detection": turn_detection}}}

    model = model or live.ingress.options.realtime_model
    if model is None:
        await error("no transcription model: pass ?model=<id> or configure ingress.realtime_model")
        await ws.close()
        return
    try:
        await live.use_model(model)
    except OrchardError as e:
        await error(e.message)
        await ws.close()
        return
    await send({"type": "session.created", "session": snapshot()})

    async def delta(text: str) -> None:
        await send({"type": "conversation.item.input_audio_transcription.delta", "item_id": item_id,
                    "content_index": 0, "delta": text})

    async def commit() -> None:
        nonlocal item_id
        if item_id is None:
            await error("the input audio buffer is empty", "input_audio_buffer_commit_empty")
            return
        done_id, item_id = item_id, None
        await send({"type": "input_audio_buffer.committed", "item_id": done_id, "previous_item_id": None})
        text = await live.finish()
        await send({"type": "conversation.item.input_audio_transcription.completed", "item_id": done_id,
                    "content_index": 0, "transcript": text})

    async def add_audio(samples: np.ndarray) -> None:
        nonlocal item_id
        if item_id is None:
            item_id = _id("item")
            await send({"type": "conversation.item.added", "item": {
                "id": item_id, "object": "realtime.item", "type": "message", "role": "user",
                "content": [{"type": "input_audio"}]}})
        live.utterance.add(samples)
        live.maybe_partial(delta)

    while True:
        raw = await ws.receive_text()
        try:
            live.check_time()
            if len(raw) > MAX_MESSAGE_BYTES:
                raise RealtimeError(f"events are at most {MAX_MESSAGE_BYTES} bytes")
            try:
                event = json.loads(raw)
            except json.JSONDecodeError:
                raise RealtimeError("events are JSON objects") from None
            kind = event.get("type") if isinstance(event, dict) else None
            if kind == "session.update":
                session = event.get("session") or {}
                audio_in = (session.get("audio") or {}).get("input") or {}
                transcription = audio_in.get("transcription") or {}
                wanted = session.get("model") or transcription.get("model")
                if wanted and wanted != live.model:
                    await live.use_model(str(wanted))
                if "language" in transcription:
                    live.language = transcription["language"] or None
                rate = (audio_in.get("format") or {}).get("rate")
                if rate is not None:
                    if rate not in RATES:
                        raise RealtimeError(f"input rate must be one of {RATES}")
                    live.rate = rate
                if "turn_detection" in audio_in:
                    turn_detection = audio_in["turn_detection"]
                    if turn_detection is not None and turn_detection.get("type") != "server_vad":
                        raise RealtimeError("turn_detection is null or {\"type\": \"server_vad\"}")
                    vad = Segmenter() if turn_detection is not None else None
                await send({"type": "session.updated", "session": snapshot()})
            elif kind == "input_audio_buffer.append":
                try:
                    data = base64.b64decode(event.get("audio") or "", validate=True)
                except (binascii.Error, ValueError):
                    raise RealtimeError("audio must be base64 PCM16") from None
                samples = pcm16_to_float(data, live.rate)
                if vad is None:
                    await add_audio(samples)
                    continue
                for what, part in vad.feed(samples):
                    if what == "speech":
                        if item_id is None:
                            await send({"type": "input_audio_buffer.speech_started", "audio_start_ms": 0})
                        await add_audio(part)
                    elif item_id is not None:
                        await send({"type": "input_audio_buffer.speech_stopped", "item_id": item_id})
                        await commit()
            elif kind == "input_audio_buffer.commit":
                await commit()
            elif kind == "input_audio_buffer.clear":
                await live.finish()
                item_id = None
            else:
                raise RealtimeError(f"unsupported event type {kind!r}")
        except (RealtimeError, OrchardError) as e:
            await error(_message(e))


async def _frame_session(live: _Live) -> None:
    ws = live.ws
    config = await ws.receive_text()
    try:
        if len(config) > MAX_MESSAGE_BYTES:
            raise RealtimeError("the config message is too long")
        settings = json.loads(config)
        if not isinstance(settings, dict):
            raise RealtimeError("the first message is a JSON object: model, language, sample_rate")
        rate = settings.get("sample_rate", RATE)
        if rate not in RATES:
            raise RealtimeError(f"sample_rate must be one of {RATES}")
        live.rate, live.language = rate, settings.get("language")
        model = settings.get("model") or live.ingress.options.realtime_model
        if not model:
            raise RealtimeError("name a transcription model (model)")
        await live.use_model(str(model))
    except (RealtimeError, OrchardError, json.JSONDecodeError) as e:
        await ws.send_json({"type": "error", "status": "error", "error": _message(e)})
        await ws.close()
        return
    await ws.send_json({"status": "ready", "message": "Ready to transcribe"})
    vad, heard = Segmenter(), 0  # samples received so far, for the utterances' times
    start = 0.0

    async def delta(text: str) -> None:
        await ws.send_json({"type": "delta", "delta": text})

    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        try:
            live.check_time()
            if message.get("text") is not None:
                if json.loads(message["text"]).get("action") == "stop":
                    break
                continue
            data = message.get("bytes") or b""
            if len(data) > MAX_MESSAGE_BYTES:
                raise RealtimeError(f"frames are at most {MAX_MESSAGE_BYTES} bytes")
            samples = pcm16_to_float(data, live.rate)
            for what, part in vad.feed(samples):
                if what == "speech":
                    if not live.utterance.samples:
                        start = heard / RATE
                    live.utterance.add(part)
                    live.maybe_partial(delta)
                    if live.utterance.full:  # a turn longer than Whisper's window: cut it here
                        what = "end"
                if what == "end" and live.utterance.samples:
                    length = live.utterance.samples / RATE
                    text = await live.finish()
                    await ws.send_json({"type": "complete", "text": text, "is_partial": False,
                                        "start": round(start, 2), "end": round(start + length, 2)})
            heard += len(samples)
        except (RealtimeError, OrchardError, json.JSONDecodeError, AttributeError) as e:
            await ws.send_json({"type": "error", "status": "error", "error": _message(e)})
    if live.utterance.samples:
        await ws.send_json({"type": "complete", "text": await live.finish(), "is_partial": False})
    await ws.close()
