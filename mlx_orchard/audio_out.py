"""Synthesized audio as the bytes a client asked for (``response_format``), whole or streamed.

libsndfile (through soundfile) writes WAV, FLAC, Ogg/Opus and MP3; AAC (ADTS) comes from an
``ffmpeg`` subprocess. Streams are encoded incrementally, each chunk's bytes sent as soon as
the encoder has them: WAV and Ogg/Opus by soundfile (Ogg is a streaming container; WAV's
header is written once with its sizes unknown), MP3 and AAC by ffmpeg, whose muxers write
for a pipe (libsndfile would rewrite the MP3 header at the end, after it was sent). FLAC's
header holds the stream's length, so FLAC is encoded whole when the last chunk is in.
``pcm`` is raw 16-bit little-endian samples, as OpenAI sends it.
"""

from __future__ import annotations

import io
import queue
import shutil
import subprocess
import threading

import numpy as np
import soundfile as sf

MEDIA_TYPES = {
    "mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm",
}
_SOUNDFILE = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "opus": ("OGG", "OPUS"), "mp3": ("MP3", "MPEG_LAYER_III")}
_FFMPEG = {"mp3": ["-f", "mp3", "-b:a", "64k"], "aac": ["-f", "adts", "-c:a", "aac", "-b:a", "64k"]}
# Opus runs at 48, 24, 16, 12 or 8 kHz; other rates are refused by libsndfile.
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


class AudioEncodeError(RuntimeError):
    """The server cannot produce this format (no ffmpeg for AAC, an odd sample rate for Opus)."""


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()


def encode(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    """A whole clip in ``fmt``."""
    if fmt == "pcm":
        return pcm16(samples)
    if fmt == "aac":
        encoder = StreamEncoder(rate, fmt)
        return encoder.feed(samples) + encoder.close()
    _check(rate, fmt)
    container, subtype = _SOUNDFILE[fmt]
    out = io.BytesIO()
    sf.write(out, np.clip(samples, -1.0, 1.0), rate, format=container, subtype=subtype)
    return out.getvalue()


def _check(rate: int, fmt: str) -> None:
    if fmt == "opus" and rate not in _OPUS_RATES:
        raise AudioEncodeError(f"opus cannot carry {rate} Hz audio")


class StreamEncoder:
    """Encode a clip chunk by chunk: ``feed`` returns the bytes ready so far, ``close`` the rest."""

    def __init__(self, rate: int, fmt: str):
        self.rate, self.fmt = rate, fmt
        self._file: sf.SoundFile | None = None
        self._process: subprocess.Popen | None = None
        if fmt in ("wav", "opus"):
            _check(rate, fmt)
            self._buffer = io.BytesIO()
            self._sent = 0
            container, subtype = _SOUNDFILE[fmt]
            self._file = sf.SoundFile(self._buffer, mode="w", samplerate=rate, channels=1, format=container, subtype=subtype)
        elif fmt == "flac":  # FLAC's header holds the length: a stream without it trips readers, so it is sent whole
            self._held: list[np.ndarray] = []
        elif fmt in _FFMPEG:
            ffmpeg = shutil.which("ffmpeg")
            if ffmpeg is None:
                raise AudioEncodeError(f"{fmt} needs ffmpeg on the server (install it, or ask for wav, opus or pcm)")
            self._process = subprocess.Popen(
                [ffmpeg, "-hide_banner", "-loglevel", "error", "-f", "s16le", "-ar", str(rate), "-ac", "1", "-i", "pipe:0",
                 *_FFMPEG[fmt], "pipe:1"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            )
            self._out: queue.SimpleQueue[bytes] = queue.SimpleQueue()
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        elif fmt != "pcm":
            raise AudioEncodeError(f"unknown audio format {fmt!r}")

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        while chunk := self._process.stdout.read1(1 << 16):  # type: ignore[attr-defined]
            self._out.put(chunk)
        self._out.put(b"")  # end of stream

    def _drain(self, until_end: bool) -> bytes:
        parts = []
        while True:
            try:
                chunk = self._out.get(block=until_end)
            except queue.Empty:
                break
            if not chunk:
                break
            parts.append(chunk)
        return b"".join(parts)

    def _new_bytes(self) -> bytes:
        data = self._buffer.getbuffer()
        new = bytes(data[self._sent :])
        self._sent = len(data)
        return new

    def feed(self, samples: np.ndarray) -> bytes:
        if self.fmt == "pcm":
            return pcm16(samples)
        if self.fmt == "flac":
            self._held.append(samples)
            return b""
        if self._file is not None:
            self._file.write(np.clip(samples, -1.0, 1.0))
            self._file.flush()
            return self._new_bytes()
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write(pcm16(samples))
        self._process.stdin.flush()
        return self._drain(until_end=False)

    def close(self) -> bytes:
        """The encoder's last bytes (a header rewritten at the end stays as first sent)."""
        if self.fmt == "flac":
            return encode(np.concatenate(self._held) if self._held else np.zeros(0, np.float32), self.rate, "flac")
        if self._file is not None:
            self._file.close()
            return self._new_bytes()
        if self._process is not None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            rest = self._drain(until_end=True)
            self._process.wait(timeout=30)
            return rest
        return b""

    def abort(self) -> None:
        """Stop without finishing (the client left)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(timeout=5)
        if self._file is not None and not self._file.closed:
            self._file.close()
