"""Source separation through real Serve (issue #13): ``POST /v1/audio/separations`` with the
tiny random-weight SAM-Audio (tests/separation_model.py) on real audio (espeak-ng speech
over a tone, as WAV and FLAC). The answers are checked against the model run in this
process on the same decoded samples: the server must compute what the model computes."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import soundfile as sf

from mlx_orchard.audio import decode_audio
from tests.conftest import SESSION_DIR, default_args, module_app, replica_stats
from tests.separation_model import SAMPLE_RATE
from tests.speech import speak_wav

APP, MODEL = "separation", "tiny-sam-audio"
MAX_SECONDS = 30
STEPS = 2


@pytest.fixture(scope="module")
def app(serve_instance, tiny_sam_audio_dir):
    args = default_args()
    config = {
        "ingress": {**args["ingress"], "max_upload_mb": 2},
        "runtime": args["runtime"],
        "pools": {"separation": {"deployment": {"ray_actor_options": {"num_cpus": 0.1}}}},
        "separation": [{"name": MODEL, "source": str(tiny_sam_audio_dir), "max_audio_seconds": MAX_SECONDS}],
    }
    with module_app(serve_instance, APP, config) as url:
        yield url


@pytest.fixture(scope="module")
def engine(tiny_sam_audio_dir):
    from mlx_orchard.engines.separation import SeparationEngine

    return SeparationEngine(tiny_sam_audio_dir)


def mixture(seconds: float | None = None, fmt: str = "WAV") -> bytes:
    """espeak-ng's speech (22.05 kHz) with a 440 Hz tone under it; tiled to ``seconds``."""
    speech, rate = sf.read(io.BytesIO(speak_wav("Please call Stella.", SESSION_DIR)), dtype="float32")
    if seconds is not None:
        speech = np.resize(speech, int(seconds * rate))
    mix = 0.7 * speech + 0.1 * np.sin(2 * np.pi * 440 * np.arange(len(speech)) / rate).astype(np.float32)
    out = io.BytesIO()
    sf.write(out, mix, rate, format=fmt)
    return out.getvalue()


def post(app: str, audio: bytes | None, **fields) -> httpx.Response:
    files = {"file": ("mix.wav", audio, "audio/wav")} if audio is not None else None
    data = {"model": MODEL, "steps": str(STEPS), **{k: str(v) for k, v in fields.items()}}
    return httpx.post(f"{app}/v1/audio/separations", data=data, files=files, timeout=300)


def wav(b64: str) -> tuple[np.ndarray, int]:
    samples, rate = sf.read(io.BytesIO(base64.b64decode(b64)), dtype="float32")
    assert sf.info(io.BytesIO(base64.b64decode(b64))).format == "WAV"
    return samples, rate


def stats(handle_loop) -> dict:
    return replica_stats(handle_loop, APP, "separation", MODEL)


@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_the_server_separates_as_the_model_does(app, engine, fmt):
    audio = mixture(fmt=fmt)
    r = post(app, audio, description="speech")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"target", "residual", "sample_rate"} and body["sample_rate"] == SAMPLE_RATE
    target, rate = wav(body["target"])
    residual, _ = wav(body["residual"])
    samples = decode_audio(audio, max_seconds=MAX_SECONDS, rate=SAMPLE_RATE)  # 22.05 kHz resampled to the model's 8 kHz
    assert rate == SAMPLE_RATE and len(target) == len(residual) == len(samples)
    expected = engine.separate(samples, "speech", steps=STEPS)
    # the only difference allowed is the WAV's 16-bit rounding
    assert np.abs(target - expected.target).max() <= 1.5 / 32768
    assert np.abs(residual - expected.residual).max() <= 1.5 / 32768
    assert np.abs(target).max() > 1e-3 and np.abs(residual).max() > 1e-3  # sound, not silence


def test_the_description_and_the_seed_steer_the_answer_and_the_same_request_repeats(app):
    audio = mixture()
    first = post(app, audio, description="speech").json()
    assert post(app, audio, description="speech").json() == first
    other = post(app, audio, description="a dog barking").json()
    reseeded = post(app, audio, description="speech", seed=7).json()
    assert other["target"] != first["target"] and reseeded["target"] != first["target"]


def test_long_audio_is_separated_in_chunks_that_join_to_its_length(app, handle_loop):
    before = stats(handle_loop)
    r = post(app, mixture(seconds=12.0), description="speech")
    assert r.status_code == 200, r.text
    target, _ = wav(r.json()["target"])
    assert len(target) == 12 * SAMPLE_RATE
    assert stats(handle_loop)["chunks"] - before["chunks"] == 2  # 10 s windows overlapping by 3 s


def test_concurrent_requests_each_get_their_own_answer(app):
    texts = ["speech", "music", "a tone", "noise"]
    audio = mixture()
    alone = {t: post(app, audio, description=t).json()["target"] for t in texts}
    with ThreadPoolExecutor(4) as pool:
        together = dict(zip(texts, pool.map(lambda t: post(app, audio, description=t).json()["target"], texts)))
    assert together == alone


@pytest.mark.parametrize("case, status, param", [
    ("not audio", 400, "file"),
    ("no file", 400, "file"),
    ("empty file", 400, "file"),
    ("steps 3", 400, "steps"),
    ("method rk4", 400, "method"),
    ("blank description", 400, "description"),
    ("too long", 400, "file"),
    ("too large", 413, None),  # refused by the ingress's body limit while it is read
    ("unknown model", 404, "model"),
    ("negative seed", 400, "seed"),
])
def test_bad_requests_get_an_openai_error(app, case, status, param):
    audio, fields = mixture(), {}
    match case:
        case "not audio":
            audio = b"this is not audio at all" * 100
        case "no file":
            audio = None
        case "empty file":
            audio = b""
        case "steps 3":
            fields["steps"] = 3
        case "method rk4":
            fields["method"] = "rk4"
        case "blank description":
            fields["description"] = "   "
        case "too long":
            out = io.BytesIO()
            sf.write(out, np.zeros(8000 * (MAX_SECONDS + 5), np.float32), 8000, format="FLAC")
            audio = out.getvalue()
        case "too large":
            audio = b"\0" * 3_000_000
        case "unknown model":
            fields["model"] = "no-such-separator"
        case "negative seed":
            fields["seed"] = -1
    r = post(app, audio, **fields)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error.get("param") == param


def test_the_replica_still_answers_after_the_bad_requests(app, engine):
    audio = mixture()
    r = post(app, audio, description="speech")
    expected = engine.separate(decode_audio(audio, max_seconds=MAX_SECONDS, rate=SAMPLE_RATE), "speech", steps=STEPS)
    assert np.abs(wav(r.json()["target"])[0] - expected.target).max() <= 1.5 / 32768
