"""Live transcription state, per socket: PCM16 in, utterances and partial transcripts out.

A Serve deployment handle cannot stream input, so a socket's state lives on the ingress that
holds the socket: its audio (resampled to Whisper's 16 kHz), its voice-activity segmentation
and the text it has sent. What needs a model — a partial or final transcript of the current
utterance — is an ordinary call to the transcription family, which batches it with every
other request and socket; no socket holds a model of its own, and a socket's state is a few
seconds of audio. Plain Python, no Ray, no MLX.

- ``Utterance``: the audio of one turn, bounded, and the words already sent as deltas.
  Partial transcripts are re-run on the whole utterance every ``partial_every_s`` of new
  audio; a word is sent once two consecutive hypotheses agree on it, or once two more words
  follow it (deltas are append-only, so only text unlikely to change goes out). The
  completed transcript is the final pass.
- ``Segmenter``: webrtcvad over 30 ms frames: speech starts after ``start_ms`` of voiced
  frames and ends after ``end_ms`` of unvoiced ones (or at ``max_utterance_s``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
from scipy.signal import resample_poly

RATE = 16_000  # what the transcription models take
FRAME = RATE * 30 // 1000  # webrtcvad's 30 ms frame, in samples
HOLD_BACK = 2  # words at the end of a partial hypothesis that are not sent yet
RATES = (8_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000)  # accepted input rates


class RealtimeError(ValueError):
    """A client event the session refuses (sent back as an ``error`` event)."""


def pcm16_to_float(data: bytes, rate: int) -> np.ndarray:
    """PCM16 little-endian mono at ``rate`` -> float32 at 16 kHz."""
    if len(data) % 2:
        raise RealtimeError("PCM16 audio has an even number of bytes")
    samples = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
    if rate != RATE:
        ratio = Fraction(RATE, rate)
        samples = resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)
    return samples


def _words(text: str) -> list[str]:
    return re.findall(r"\S+", text)


def _key(word: str) -> str:
    """A word as hypotheses are compared: case and punctuation aside."""
    return re.sub(r"[^\w']", "", word.lower())


@dataclass
class Utterance:
    """One turn's audio and what has been said of it so far."""

    max_seconds: float
    audio: list[np.ndarray] = field(default_factory=list)
    samples: int = 0
    transcribed_at: int = 0  # samples when the last partial started
    previous: list[str] = field(default_factory=list)  # the last hypothesis' words, as compared
    sent: list[str] = field(default_factory=list)  # words already sent as deltas

    def add(self, samples: np.ndarray) -> None:
        room = int(self.max_seconds * RATE) - self.samples
        if room <= 0:
            raise RealtimeError(f"the input audio buffer holds at most {self.max_seconds:g} s; commit it first")
        samples = samples[:room]
        self.audio.append(samples)
        self.samples += len(samples)

    @property
    def full(self) -> bool:
        return self.samples >= int(self.max_seconds * RATE)

    def pcm(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, np.float32)

    def due(self, every_s: float) -> bool:
        """Whether ``every_s`` of audio arrived since the last partial started; if so, one starts now."""
        if self.samples - self.transcribed_at < every_s * RATE:
            return False
        self.transcribed_at = self.samples
        return True

    def agree(self, hypothesis: str) -> str:
        """The delta to send for a new partial hypothesis: words beyond those sent that this
        and the previous hypothesis share."""
        words = _words(hypothesis)
        keys = [_key(w) for w in words]
        stable = 0
        while stable < min(len(words), len(self.previous)) and keys[stable] == self.previous[stable]:
            stable += 1
        self.previous = keys
        # Revisions happen at the end of a hypothesis (a word cut short, a guess at the next
        # one): all but its last HOLD_BACK words count as stable too.
        stable = max(stable, len(words) - HOLD_BACK)
        if stable <= len(self.sent) or keys[: len(self.sent)] != [_key(w) for w in self.sent]:
            return ""
        new = words[len(self.sent) : stable]
        self.sent += new
        return (" " if len(self.sent) > len(new) else "") + " ".join(new)


@dataclass
class Segmenter:
    """Voice activity over 16 kHz audio: which stretches are speech."""

    aggressiveness: int = 2
    start_ms: int = 90
    end_ms: int = 600
    _vad: object = None
    _rest: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    speaking: bool = False
    _voiced: int = 0
    _unvoiced: int = 0

    def __post_init__(self) -> None:
        import webrtcvad

        self._vad = webrtcvad.Vad(self.aggressiveness)

    def feed(self, samples: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """Events for this audio, in order: ("speech", samples) while speaking (the onset's
        frames included), ("end", empty) when a turn ends."""
        audio = np.concatenate([self._rest, samples])
        whole = len(audio) // FRAME * FRAME
        self._rest = audio[whole:]
        events: list[tuple[str, np.ndarray]] = []
        onset: list[np.ndarray] = []
        for start in range(0, whole, FRAME):
            frame = audio[start : start + FRAME]
            voiced = self._vad.is_speech((np.clip(frame, -1, 1) * 32767).astype("<i2").tobytes(), RATE)  # type: ignore[attr-defined]
            if not self.speaking:
                self._voiced = self._voiced + 1 if voiced else 0
                onset = (onset + [frame])[-(self.start_ms // 30) :]
                if self._voiced * 30 >= self.start_ms:
                    self.speaking, self._unvoiced = True, 0
                    events.append(("speech", np.concatenate(onset)))
                    onset = []
                continue
            events.append(("speech", frame))
            self._unvoiced = 0 if voiced else self._unvoiced + 1
            if self._unvoiced * 30 >= self.end_ms:
                self.speaking, self._voiced = False, 0
                events.append(("end", np.zeros(0, np.float32)))
        return _merged(events)


def _merged(events: list[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    out: list[tuple[str, np.ndarray]] = []
    for kind, samples in events:
        if out and kind == "speech" and out[-1][0] == "speech":
            out[-1] = ("speech", np.concatenate([out[-1][1], samples]))
        else:
            out.append((kind, samples))
    return out
