"""Turn uploaded audio bytes into float32 mono samples: at 16 kHz for Whisper, at the
model's own rate for others (SAM-Audio separates at 48 kHz).

libsndfile (through soundfile) reads WAV, FLAC, OGG/Vorbis/Opus and MP3 from memory.
MP4/M4A and WebM/Matroska go through an ``ffmpeg`` subprocess when one is on PATH.
Both paths refuse clips longer than ``max_seconds`` without decoding them whole, so a
small upload that declares hours of audio cannot exhaust memory.
"""

from __future__ import annotations

import io
import math
import shutil
import subprocess
from fractions import Fraction

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

SAMPLE_RATE = 16_000
_BLOCK_FRAMES = 1 << 16
_UNKNOWN_FRAMES = (1 << 63) - 1  # libsndfile's SF_COUNT_MAX: the length is not known
MIN_RATE, MAX_RATE = 1_000, 384_000
MAX_CHANNELS = 32


class AudioDecodeError(ValueError):
    """The bytes are not audio that Orchard can decode."""


class AudioTooLongError(AudioDecodeError):
    """The audio is longer than the caller allows."""

    def __init__(self, seconds: float | None, max_seconds: float):
        self.seconds = seconds
        self.max_seconds = max_seconds
        shown = f"{seconds:.1f} s" if seconds is not None else "more"
        super().__init__(f"audio lasts {shown}, longer than the {max_seconds:g} s allowed")


def decode_audio(data: bytes, *, max_seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode ``data`` to float32 mono samples at ``rate`` (Whisper's 16 kHz unless told).

    Raises ``AudioDecodeError`` for empty, non-audio or undecodable bytes (and for
    container formats that need ffmpeg when it is absent), ``AudioTooLongError`` when
    the audio lasts longer than ``max_seconds``.
    """
    if not data:
        raise AudioDecodeError("audio file is empty")
    if _needs_ffmpeg(data):
        samples = _decode_ffmpeg(data, max_seconds, rate)
    else:
        samples, found = _decode_soundfile(data, max_seconds)
        samples = _resample(samples, found, rate)
    if samples.size == 0:
        raise AudioDecodeError("audio file contains no samples")
    return np.ascontiguousarray(samples, dtype=np.float32)


def _needs_ffmpeg(data: bytes) -> bool:
    # libsndfile cannot read these containers; sniff their magic numbers.
    is_mp4 = data[4:8] == b"ftyp"
    is_matroska = data[:4] == b"\x1a\x45\xdf\xa3"  # EBML header: WebM / MKV
    return is_mp4 or is_matroska


def _decode_soundfile(data: bytes, max_seconds: float) -> tuple[np.ndarray, int]:
    try:
        f = sf.SoundFile(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioDecodeError(f"not a readable audio file ({exc})") from None
    with f:
        rate = f.samplerate
        # Header values size the decode (frames x channels) and the resampler: bound them.
        if not MIN_RATE <= rate <= MAX_RATE:
            raise AudioDecodeError(f"sample rate {rate} Hz is outside {MIN_RATE}-{MAX_RATE} Hz")
        if not 1 <= f.channels <= MAX_CHANNELS:
            raise AudioDecodeError(f"{f.channels} channels; at most {MAX_CHANNELS} are supported")
        limit = math.floor(max_seconds * rate)
        # The header's frame count comes before any decoding: the decompression-bomb guard.
        if limit < f.frames < _UNKNOWN_FRAMES:
            raise AudioTooLongError(f.frames / rate, max_seconds)
        # Headers can lie (or say nothing, as streamed MP3 may): read at most one frame
        # past the limit, block by block, so memory stays bounded either way.
        blocks: list[np.ndarray] = []
        read = 0
        try:
            while read <= limit:
                block = f.read(min(_BLOCK_FRAMES, limit + 1 - read), dtype="float32", always_2d=True)
                if len(block) == 0:
                    break
                blocks.append(block.mean(axis=1))  # mono per block: memory is frames, not x channels
                read += len(block)
        except (sf.LibsndfileError, RuntimeError) as exc:
            raise AudioDecodeError(f"audio data is corrupt ({exc})") from None
    if read > limit:
        raise AudioTooLongError(None, max_seconds)
    if not blocks:
        raise AudioDecodeError("audio file contains no samples")
    return np.concatenate(blocks), rate


def _decode_ffmpeg(data: bytes, max_seconds: float, rate: int) -> np.ndarray:
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise AudioDecodeError("MP4/M4A and WebM audio need ffmpeg, which is not installed on this server")
    # `-t` stops ffmpeg just past the limit, so an over-long stream is never decoded whole.
    command = [
        ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error",
        "-i", "pipe:0", "-t", f"{max_seconds + 0.5:.3f}", "-vn",
        "-f", "f32le", "-ac", "1", "-ar", str(rate), "pipe:1",
    ]  # fmt: skip
    try:
        done = subprocess.run(command, input=data, capture_output=True, timeout=max(60.0, max_seconds))
    except subprocess.TimeoutExpired:
        raise AudioDecodeError("ffmpeg timed out decoding the audio") from None
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no detail"]
        raise AudioDecodeError(f"ffmpeg could not decode the audio: {detail[0]}")
    samples = np.frombuffer(done.stdout, dtype="<f4")
    if samples.size > math.floor(max_seconds * rate):
        raise AudioTooLongError(None, max_seconds)
    return samples


def _resample(samples: np.ndarray, rate: int, to: int) -> np.ndarray:
    if rate == to:
        return samples
    ratio = Fraction(to, rate)  # reduced, e.g. 44100 -> 16000 is 160/441
    return resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)
