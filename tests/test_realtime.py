"""Live transcription over WebSockets (issue #13): a real ``websockets`` client streams
espeak-ng speech in 100 ms PCM16 chunks to the default app; Whisper (tiny.en, on the
transcription family's replicas) answers with deltas while the audio still arrives and a
completed transcript after it."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from fractions import Fraction

import numpy as np
import pytest
import soundfile as sf
import websockets
from scipy.signal import resample_poly

from mlx_orchard.realtime import RATE, Segmenter, Utterance, pcm16_to_float
from tests.speech import SENTENCES, speak_wav, word_error_rate

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "whisper-tiny.en"


def speech(text: str, rate: int, tmp_path) -> bytes:
    """espeak-ng saying ``text``, as PCM16 at ``rate``, with half a second of silence after it."""
    samples, native = sf.read(io.BytesIO(speak_wav(text, tmp_path)), dtype="float32")
    ratio = Fraction(rate, native)
    samples = resample_poly(samples, ratio.numerator, ratio.denominator)
    samples = np.concatenate([samples, np.zeros(rate // 2)])
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def chunks(pcm: bytes, rate: int, ms: int = 100) -> list[bytes]:
    step = rate * ms // 1000 * 2
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


def ws_url(orchard: str, path: str) -> str:
    return orchard.replace("http://", "ws://") + path


async def events_until(ws, kind: str, timeout: float = 60) -> list[dict]:
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            seen.append(event)
            if event["type"] in (kind, "error"):
                return seen


async def speak_into(ws, pcm: bytes, rate: int, pace: float = 0.05) -> list[dict]:
    """Append the audio chunk by chunk (faster than real time), collecting what arrives meanwhile."""
    early = []
    for chunk in chunks(pcm, rate):
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk).decode()}))
        await asyncio.sleep(pace)
        try:
            while True:
                early.append(json.loads(await asyncio.wait_for(ws.recv(), 0.001)))
        except TimeoutError:
            pass
    return early


@pytest.mark.parametrize("rate", [16_000, 24_000])
async def test_a_spoken_sentence_streams_deltas_then_a_completed_transcript(orchard, tmp_path, rate):
    sentence = SENTENCES[1]
    async with websockets.connect(ws_url(orchard, f"/v1/realtime?model={MODEL}")) as ws:
        created = json.loads(await ws.recv())
        assert created["type"] == "session.created" and created["session"]["model"] == MODEL
        await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"rate": rate}}}}}))
        updated = await events_until(ws, "session.updated")
        assert updated[-1]["session"]["audio"]["input"]["format"]["rate"] == rate
        early = await speak_into(ws, speech(sentence, rate, tmp_path), rate, pace=0.1)  # as fast as one speaks
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        rest = await events_until(ws, "conversation.item.input_audio_transcription.completed")
    events = early + rest
    kinds = [e["type"] for e in events]
    assert kinds[0] == "conversation.item.added" and "input_audio_buffer.committed" in kinds
    deltas = [e for e in early if e["type"].endswith("transcription.delta")]
    assert deltas, f"no partial transcript while the audio was still arriving: {events}"
    completed = events[-1]
    assert completed["type"].endswith("completed") and word_error_rate(sentence, completed["transcript"]) <= 0.3
    assert completed["item_id"] == events[0]["item"]["id"] == deltas[0]["item_id"]


async def test_server_vad_commits_each_turn_itself(orchard, tmp_path):
    first, second = SENTENCES[2], SENTENCES[3]
    pcm = speech(first, RATE, tmp_path) + bytes(RATE) + speech(second, RATE, tmp_path) + bytes(2 * RATE)
    async with websockets.connect(ws_url(orchard, f"/v1/realtime?model={MODEL}")) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {
            "format": {"rate": RATE}, "turn_detection": {"type": "server_vad"}}}}}))
        await events_until(ws, "session.updated")
        events = await speak_into(ws, pcm, RATE, pace=0.02)
        done = [e for e in events if e["type"].endswith("transcription.completed")]
        while len(done) < 2:
            more = await events_until(ws, "conversation.item.input_audio_transcription.completed")
            events += more
            done = [e for e in events if e["type"].endswith("transcription.completed")]
    kinds = [e["type"] for e in events]
    assert kinds.count("input_audio_buffer.speech_started") == 2 and kinds.count("input_audio_buffer.speech_stopped") == 2
    assert word_error_rate(first, done[0]["transcript"]) <= 0.3
    assert word_error_rate(second, done[1]["transcript"]) <= 0.3


async def test_two_sockets_at_once_both_finish(orchard, tmp_path):
    async def one(sentence: str) -> str:
        async with websockets.connect(ws_url(orchard, f"/v1/realtime?model={MODEL}")) as ws:
            await ws.recv()
            await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"rate": RATE}}}}}))
            await events_until(ws, "session.updated")
            await speak_into(ws, speech(sentence, RATE, tmp_path), RATE)
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            return (await events_until(ws, "conversation.item.input_audio_transcription.completed"))[-1]["transcript"]

    heard = await asyncio.gather(one(SENTENCES[0]), one(SENTENCES[3]))
    assert word_error_rate(SENTENCES[0], heard[0]) <= 0.3 and word_error_rate(SENTENCES[3], heard[1]) <= 0.3


async def test_bad_events_get_error_events_and_the_socket_goes_on(orchard, tmp_path):
    async with websockets.connect(ws_url(orchard, f"/v1/realtime?model={MODEL}")) as ws:
        await ws.recv()
        for bad in ["not json", json.dumps({"type": "response.create"}), json.dumps([1, 2]),
                    json.dumps({"type": "input_audio_buffer.append", "audio": "@@@"}),
                    json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"odd").decode()}),
                    json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"rate": 12345}}}}}),
                    json.dumps({"type": "session.update", "session": {"model": "no-such-model"}}),
                    json.dumps({"type": "input_audio_buffer.commit"}),
                    "x" * (2 << 20)]:
            await ws.send(bad)
            [event] = await events_until(ws, "error")
            assert event["type"] == "error" and event["error"]["message"]
        # still serving: a real utterance after all that
        await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"rate": RATE}}}}}))
        await events_until(ws, "session.updated")
        await speak_into(ws, speech(SENTENCES[0], RATE, tmp_path), RATE)
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        done = (await events_until(ws, "conversation.item.input_audio_transcription.completed"))[-1]
    assert word_error_rate(SENTENCES[0], done["transcript"]) <= 0.3


async def test_a_socket_closed_mid_utterance_leaves_no_work(orchard, tmp_path, handle_loop):
    from ray import serve

    async def batches():
        return (await serve.get_deployment_handle("whisper", app_name="orchard").stats.remote())["batches"]

    async with websockets.connect(ws_url(orchard, f"/v1/realtime?model={MODEL}")) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"rate": RATE}}}}}))
        await events_until(ws, "session.updated")
        await speak_into(ws, speech(SENTENCES[1], RATE, tmp_path)[: RATE * 2 * 3], RATE, pace=0.01)
    await asyncio.sleep(3)  # whatever was in flight when it closed has finished or been cancelled
    settled = handle_loop(batches)
    await asyncio.sleep(3)
    assert handle_loop(batches) == settled  # nothing kept transcribing for the closed socket


async def test_binary_frames_are_cut_into_utterances_by_voice_activity(orchard, tmp_path):
    first, second = SENTENCES[0], SENTENCES[2]
    pcm = speech(first, RATE, tmp_path) + bytes(RATE) + speech(second, RATE, tmp_path) + bytes(2 * RATE)
    complete = []
    async with websockets.connect(ws_url(orchard, "/v1/audio/transcriptions/realtime")) as ws:
        await ws.send(json.dumps({"model": MODEL, "sample_rate": RATE}))
        assert json.loads(await ws.recv())["status"] == "ready"
        for chunk in chunks(pcm, RATE):
            await ws.send(chunk)
            await asyncio.sleep(0.02)
        await ws.send(json.dumps({"action": "stop"}))
        async for message in ws:
            event = json.loads(message)
            if event.get("type") == "complete":
                complete.append(event)
    assert len(complete) == 2
    assert word_error_rate(first, complete[0]["text"]) <= 0.3 and word_error_rate(second, complete[1]["text"]) <= 0.3
    assert 0 <= complete[0]["start"] < complete[0]["end"] <= complete[1]["start"] < complete[1]["end"]


# ---- the socket's state, without a server ----


async def test_deltas_send_only_words_two_hypotheses_agree_on():
    u = Utterance(30)
    assert u.agree("The") == ""
    assert u.agree("The quick") == "The"  # agreed (case and punctuation aside)
    assert u.agree("the quick, brown fox jumps") == " quick, brown"  # two words follow "brown"
    assert u.agree("the quack brown fox jumps over") == ""  # a revision of sent words: wait for completed
    assert u.sent == ["The", "quick,", "brown"]


async def test_voice_activity_finds_the_sentence_in_silence(tmp_path):
    pcm = bytes(RATE) + speech(SENTENCES[0], RATE, tmp_path) + bytes(RATE)
    samples = pcm16_to_float(pcm, RATE)
    events = Segmenter().feed(samples)
    assert [kind for kind, _ in events] == ["speech", "end"]
    spoken = len(events[0][1]) / RATE
    assert 1.0 < spoken < len(samples) / RATE - 1.0


async def test_no_model_anywhere_is_an_error_event_then_close():
    from starlette.testclient import TestClient

    from deployments.ingress import Ingress, build_api
    from mlx_orchard.config import IngressOptions

    with TestClient(build_api(Ingress({}, {}, IngressOptions()))) as client:
        with client.websocket_connect("/v1/realtime") as ws:
            event = ws.receive_json()
            assert event["type"] == "error" and "model" in event["error"]["message"]
            assert ws.receive()["type"] == "websocket.close"

