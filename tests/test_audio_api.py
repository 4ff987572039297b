"""/v1/audio/* end to end: espeak-ng speech, real whisper tiny.en, the OpenAI SDK as client."""

from __future__ import annotations

import asyncio
import io
import re

import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from tests.speech import SENTENCES, speak_wav, word_error_rate

MODEL = "whisper-tiny.en"
SENTENCE = SENTENCES[1]


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> bytes:
    return speak_wav(SENTENCE, tmp_path_factory.mktemp("speech"))


def test_transcription_hears_the_words(client, speech):
    r = client.audio.transcriptions.create(model=MODEL, file=("speech.wav", speech, "audio/wav"))
    assert word_error_rate(SENTENCE, r.text) <= 0.3, r.text


def test_flac_upload_is_decoded_too(client, speech):
    audio, rate = sf.read(io.BytesIO(speech))
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="FLAC")
    r = client.audio.transcriptions.create(model="whisper-1", file=("speech.flac", buf.getvalue()))
    assert word_error_rate(SENTENCE, r.text) <= 0.3, r.text


def test_verbose_json_segments_are_ordered_and_inside_the_clip(client, speech):
    duration = sf.info(io.BytesIO(speech)).duration
    r = client.audio.transcriptions.create(
        model=MODEL,
        file=("speech.wav", speech),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert r.language == "english"
    assert r.duration == pytest.approx(duration, abs=0.05)
    assert r.segments
    starts = [s.start for s in r.segments]
    assert starts == sorted(starts)
    assert all(0 <= s.start <= s.end <= duration + 0.01 for s in r.segments)
    assert r.words and all(0 <= w.start <= w.end <= duration + 0.01 for w in r.words)
    assert word_error_rate(SENTENCE, " ".join(w.word for w in r.words)) <= 0.3


TIME = r"\d\d:\d\d:\d\d[,.]\d\d\d"


def test_srt_and_vtt_are_well_formed(client, speech):
    srt = client.audio.transcriptions.create(model=MODEL, file=("s.wav", speech), response_format="srt")
    blocks = [b for b in srt.strip().split("\n\n") if b]
    for n, block in enumerate(blocks, start=1):
        lines = block.split("\n")
        assert lines[0] == str(n)
        assert re.fullmatch(f"{TIME} --> {TIME}", lines[1]) and "," in lines[1]
        assert lines[2].strip()
    vtt = client.audio.transcriptions.create(model=MODEL, file=("s.wav", speech), response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n")
    cues = [c for c in vtt.split("\n\n")[1:] if c.strip()]
    assert cues and all(re.fullmatch(f"{TIME} --> {TIME}", c.split("\n")[0]) and "." in c for c in cues)
    text = client.audio.transcriptions.create(model=MODEL, file=("s.wav", speech), response_format="text")
    assert word_error_rate(SENTENCE, text) <= 0.3


def test_translation_gives_english_text(client, speech):
    r = client.audio.translations.create(model=MODEL, file=("speech.wav", speech))
    assert word_error_rate(SENTENCE, r.text) <= 0.3, r.text


def test_streamed_transcript_events(orchard, speech):
    files = {"file": ("s.wav", speech, "audio/wav")}
    with httpx.stream(
        "POST", f"{orchard}/v1/audio/transcriptions", files=files, data={"model": MODEL, "stream": "true"}, timeout=60
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    import json

    parsed = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    assert [p["type"] for p in parsed[:-1]] == ["transcript.text.delta"] * (len(parsed) - 1)
    assert parsed[-1]["type"] == "transcript.text.done"
    assert "".join(p["delta"] for p in parsed[:-1]).strip() == parsed[-1]["text"]


@pytest.mark.parametrize("payload", [b"this is not audio at all" * 10, b"", bytes(range(256)) * 40])
def test_bad_audio_is_400_invalid_audio_format(orchard, payload):
    r = httpx.post(f"{orchard}/v1/audio/transcriptions", files={"file": ("x.wav", payload)}, data={"model": MODEL})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_audio_format"


def test_missing_file_and_bad_fields_are_400(orchard, speech):
    r = httpx.post(f"{orchard}/v1/audio/transcriptions", data={"model": MODEL})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = httpx.post(
        f"{orchard}/v1/audio/transcriptions",
        files={"file": ("s.wav", speech)},
        data={"model": MODEL, "response_format": "mp3"},
    )
    assert r.status_code == 400
    r = httpx.post(
        f"{orchard}/v1/audio/transcriptions", files={"file": ("s.wav", speech)}, data={"model": MODEL, "language": "fr"}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "language"


def test_an_oversized_upload_is_413(orchard):
    big = np.zeros(26 * 1024 * 1024, dtype=np.uint8).tobytes()
    r = httpx.post(
        f"{orchard}/v1/audio/transcriptions", files={"file": ("big.wav", big)}, data={"model": MODEL}, timeout=60
    )
    assert r.status_code == 413
    assert r.json()["error"]["message"]


def test_unknown_audio_model_is_404(client, speech):
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="nope", file=("s.wav", speech))


def test_eight_concurrent_short_clips_are_batched(orchard, handle_loop, tmp_path):
    from ray import serve

    async def stats():
        return await serve.get_deployment_handle("whisper", app_name="orchard").stats.remote()

    texts = SENTENCES * 2
    clips = [speak_wav(t, tmp_path) for t in texts]
    before = handle_loop(stats)["batches"]

    async def fire():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(
                *(
                    http.post(f"{orchard}/v1/audio/transcriptions", files={"file": ("c.wav", c)}, data={"model": MODEL})
                    for c in clips
                )
            )

    responses = asyncio.run(fire())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    for text, r in zip(texts, responses):
        assert word_error_rate(text, r.json()["text"]) <= 0.3, r.json()
    after = handle_loop(stats)
    batches = after["batches"] - before
    assert batches < 8 and max(after["recent_sizes"][-batches:]) >= 4, after
