import io
import shutil
import subprocess
import time

import numpy as np
import pytest
import soundfile as sf

from mlx_orchard.audio import SAMPLE_RATE, AudioDecodeError, AudioTooLongError, decode_audio


def tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def dominant_frequency(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(len(samples), 1 / SAMPLE_RATE)[spectrum.argmax()])


def test_rejects_empty_bytes():
    with pytest.raises(AudioDecodeError, match="empty"):
        decode_audio(b"", max_seconds=30)


def test_rejects_garbage_bytes():
    garbage = np.random.default_rng(0).bytes(4096)
    with pytest.raises(AudioDecodeError):
        decode_audio(garbage, max_seconds=30)
    with pytest.raises(AudioDecodeError):
        decode_audio(b"hello, this is plainly text and not a sound file", max_seconds=30)


def test_flac_round_trip_is_lossless_to_16_bit():
    original = tone(1.0, SAMPLE_RATE)
    decoded = decode_audio(encode(original, SAMPLE_RATE, "FLAC"), max_seconds=30)
    assert decoded.dtype == np.float32 and decoded.shape == original.shape
    assert np.abs(decoded - original).max() < 2 / 32768


def test_ogg_vorbis_round_trip_keeps_length_and_pitch():
    original = tone(1.0, SAMPLE_RATE)
    decoded = decode_audio(encode(original, SAMPLE_RATE, "OGG", "VORBIS"), max_seconds=30)
    assert abs(len(decoded) - len(original)) < 0.01 * SAMPLE_RATE
    assert dominant_frequency(decoded) == pytest.approx(440, abs=2)


def test_resamples_to_16k_and_mixes_stereo_to_mono():
    rate = 44_100
    left, right = tone(2.0, rate, 440.0), tone(2.0, rate, 440.0)
    decoded = decode_audio(encode(np.stack([left, right], axis=1), rate, "WAV"), max_seconds=30)
    assert len(decoded) == 2 * SAMPLE_RATE
    assert dominant_frequency(decoded) == pytest.approx(440, abs=1)
    assert np.abs(decoded).max() == pytest.approx(0.5, abs=0.02)


def test_silence_from_opposite_channels_mixes_to_zero():
    left = tone(0.5, SAMPLE_RATE)
    decoded = decode_audio(encode(np.stack([left, -left], axis=1), SAMPLE_RATE, "WAV"), max_seconds=30)
    assert np.abs(decoded).max() < 1e-4


def test_too_long_wav_is_refused():
    data = encode(tone(6.0, SAMPLE_RATE), SAMPLE_RATE, "WAV")
    with pytest.raises(AudioTooLongError):
        decode_audio(data, max_seconds=5)
    assert len(decode_audio(data, max_seconds=6)) == 6 * SAMPLE_RATE


def test_flac_bomb_is_refused_from_its_header():
    # One hour of silence compresses to ~180 KB of FLAC: 230 MB once decoded.
    bomb = encode(np.zeros(3600 * SAMPLE_RATE, np.int16), SAMPLE_RATE, "FLAC")
    assert len(bomb) < 400_000
    started = time.perf_counter()
    with pytest.raises(AudioTooLongError) as info:
        decode_audio(bomb, max_seconds=60)
    assert time.perf_counter() - started < 1.0
    assert info.value.seconds == pytest.approx(3600)
    # Cut to its first 4 KB the stream holds well under a second of audio, so only the
    # header's frame count can have decided this.
    with pytest.raises(AudioTooLongError):
        decode_audio(bomb[:4096], max_seconds=60)


needs_ffmpeg = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")


def ffmpeg_encode(samples: np.ndarray, suffix: str, codec: str, tmp_path) -> bytes:
    src, dst = tmp_path / "in.wav", tmp_path / f"out{suffix}"
    sf.write(src, samples, SAMPLE_RATE)
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(src), "-c:a", codec, str(dst)], check=True
    )
    return dst.read_bytes()


@needs_ffmpeg
@pytest.mark.parametrize(("suffix", "codec"), [(".m4a", "aac"), (".webm", "libopus")])
def test_container_formats_decode_through_ffmpeg(tmp_path, suffix, codec):
    data = ffmpeg_encode(tone(2.0, SAMPLE_RATE), suffix, codec, tmp_path)
    decoded = decode_audio(data, max_seconds=30)
    assert abs(len(decoded) - 2 * SAMPLE_RATE) < 0.1 * SAMPLE_RATE
    assert dominant_frequency(decoded) == pytest.approx(440, abs=2)
    with pytest.raises(AudioTooLongError):
        decode_audio(data, max_seconds=1)


@needs_ffmpeg
def test_ffmpeg_reports_corrupt_containers(tmp_path):
    data = ffmpeg_encode(tone(1.0, SAMPLE_RATE), ".m4a", "aac", tmp_path)
    with pytest.raises(AudioDecodeError, match="ffmpeg"):
        decode_audio(data[:64], max_seconds=30)


def test_m4a_without_ffmpeg_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "")
    m4a_header = b"\x00\x00\x00\x20ftypM4A \x00\x00\x02\x00M4A isommp42" + bytes(64)
    with pytest.raises(AudioDecodeError, match="ffmpeg"):
        decode_audio(m4a_header, max_seconds=30)
