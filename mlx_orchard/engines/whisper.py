"""Speech to text with mlx-whisper, batching short clips from many requests.

Clips of at most 30 s (one Whisper window) that share decoding options go through the
encoder and the decoder together, as one batch of mel spectrograms. Longer clips take
mlx-whisper's sliding-window ``transcribe``. Decoding samples timestamp tokens in both
paths, so short clips get real segment boundaries, not one segment per clip.

English-only checkpoints (``*.en``, e.g. tiny.en) have no language or task tokens: they
only ever write English. ``task="translate"`` on them therefore returns the English
transcription, which is the right answer only for English speech; a ``language`` other
than English is refused. All MLX work runs in the calling thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from itertools import groupby
from pathlib import Path
from typing import Literal

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map
from mlx_whisper.audio import (
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    log_mel_spectrogram,
    pad_or_trim,
)
from mlx_whisper.decoding import DecodingOptions, DecodingResult, decode
from mlx_whisper.load_models import load_model
from mlx_whisper.timing import add_word_timestamps
from mlx_whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE, Tokenizer, get_tokenizer
from mlx_whisper.transcribe import ModelHolder
from mlx_whisper.transcribe import transcribe as sliding_transcribe

from mlx_orchard.errors import InvalidRequestError

Task = Literal["transcribe", "translate"]
_TIME_PRECISION = 0.02  # seconds per timestamp token
# transcribe()'s defaults for dropping a silent window, applied to the batched path too.
_NO_SPEECH_THRESHOLD = 0.6
_LOGPROB_THRESHOLD = -1.0
# mlx_whisper.transcribe() takes a path and keeps its model in a class attribute
# (ModelHolder); engines lend it their own model under this lock, one call at a time.
_HOLDER_LOCK = threading.Lock()


@dataclass
class ClipRequest:
    audio: np.ndarray  # float32 mono 16 kHz, as mlx_orchard.audio.decode_audio returns
    task: Task = "transcribe"
    language: str | None = None  # ISO code or English name; None detects it (multilingual models)
    prompt: str | None = None
    temperature: float = 0.0
    word_timestamps: bool = False


@dataclass
class Word:
    word: str
    start: float
    end: float
    probability: float


@dataclass
class Segment:
    id: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    seek: int = 0
    words: list[Word] | None = None


@dataclass
class TranscriptionResult:
    text: str
    language: str  # ISO 639-1 code
    duration: float  # seconds of audio
    segments: list[Segment] = field(default_factory=list)
    words: list[Word] | None = None  # set when word_timestamps was asked for


class WhisperEngine:
    def __init__(self, model_path: str | Path, *, dtype: mx.Dtype = mx.float32, max_batch_size: int = 16):
        """Load an mlx-whisper model directory (e.g. from ``ctranslate2.load_or_convert``).

        ``dtype`` float32 suits the CPU backend, whose float16 matmuls are several times
        slower; on Apple GPUs float16 halves memory traffic.
        """
        self.model_path = str(model_path)
        self.model = load_model(self.model_path, dtype=dtype)
        # Weights keep their stored dtype through load_model(); cast the floating ones only
        # (alignment_heads are integer indices).
        cast = lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p  # noqa: E731
        self.model.update(tree_map(cast, self.model.parameters()))
        mx.eval(self.model.parameters())
        self.dtype = dtype
        self.max_batch_size = max_batch_size

    @property
    def multilingual(self) -> bool:
        return self.model.is_multilingual

    def transcribe(self, clips: list[ClipRequest]) -> list[TranscriptionResult]:
        """Transcribe (or translate) each clip; results come back in the clips' order."""
        clips = [replace(c, language=self.normalize_language(c.language)) for c in clips]
        results: list[TranscriptionResult | None] = [None] * len(clips)
        short = [i for i, c in enumerate(clips) if len(c.audio) <= N_SAMPLES]
        # A batch shares one DecodingOptions, so group by the options that shape decoding.
        key = lambda i: (clips[i].task, clips[i].language or "", clips[i].prompt or "", clips[i].temperature)  # noqa: E731
        for _, same in groupby(sorted(short, key=key), key=key):
            group = list(same)
            for start in range(0, len(group), self.max_batch_size):
                chunk = group[start : start + self.max_batch_size]
                for i, result in zip(chunk, self._transcribe_batch([clips[i] for i in chunk])):
                    results[i] = result
        for i, clip in enumerate(clips):
            if results[i] is None:
                results[i] = self._transcribe_long(clip)
        return results  # type: ignore[return-value]

    def normalize_language(self, language: str | None) -> str | None:
        """The ISO code for ``language``, or InvalidRequestError if this model cannot handle it.

        ``transcribe`` raises for the whole call on a bad clip; a caller that batches
        requests (``@serve.batch``) should check each request with this first.
        """
        if language is None:
            return None if self.multilingual else "en"
        code = language.lower()
        code = TO_LANGUAGE_CODE.get(code, code)
        if code not in LANGUAGES:
            raise InvalidRequestError(f"unsupported language {language!r}", param="language")
        if not self.multilingual and code != "en":
            raise InvalidRequestError(
                f"this Whisper model is English-only and cannot transcribe {LANGUAGES[code]}", param="language"
            )
        return code

    def _options(self, clip: ClipRequest) -> DecodingOptions:
        return DecodingOptions(
            task=clip.task,
            language=clip.language,
            temperature=clip.temperature,
            prompt=clip.prompt,
            fp16=self.dtype == mx.float16,
        )

    def _transcribe_batch(self, clips: list[ClipRequest]) -> list[TranscriptionResult]:
        # Mel exactly as transcribe() builds its first window: the clip's frames, then zeros.
        mels, frames = [], []
        for clip in clips:
            mel = log_mel_spectrogram(clip.audio, n_mels=self.model.dims.n_mels, padding=N_SAMPLES)
            n = mel.shape[0] - N_FRAMES
            mels.append(pad_or_trim(mel[:n], N_FRAMES, axis=-2))
            frames.append(n)
        batch = mx.stack(mels).astype(self.dtype)
        decoded: list[DecodingResult] = decode(self.model, batch, self._options(clips[0]))

        results = []
        for clip, mel, n_frames, result in zip(clips, mels, frames, decoded):
            duration = len(clip.audio) / SAMPLE_RATE
            tokenizer = self._tokenizer(clip, result.language)
            silent = result.no_speech_prob > _NO_SPEECH_THRESHOLD and result.avg_logprob < _LOGPROB_THRESHOLD
            spans = [] if silent else _split_segments(result.tokens, tokenizer, duration)
            segments = [
                {
                    "id": i, "seek": 0, "start": start, "end": end,
                    "text": tokenizer.decode([t for t in tokens if t < tokenizer.eot]),
                    "tokens": tokens, "temperature": clip.temperature,
                    "avg_logprob": result.avg_logprob, "compression_ratio": result.compression_ratio,
                    "no_speech_prob": result.no_speech_prob,
                }  # fmt: skip
                for i, (start, end, tokens) in enumerate(spans)
            ]
            if clip.word_timestamps and segments:
                add_word_timestamps(
                    segments=segments,
                    model=self.model,
                    tokenizer=tokenizer,
                    mel=mel.astype(self.dtype),
                    num_frames=n_frames,
                    last_speech_timestamp=0.0,
                )
            results.append(_result(segments, result.language, duration, clip.word_timestamps))
        return results

    def _tokenizer(self, clip: ClipRequest, language: str) -> Tokenizer:
        return get_tokenizer(
            self.multilingual, num_languages=self.model.num_languages, language=language, task=clip.task
        )

    def _transcribe_long(self, clip: ClipRequest) -> TranscriptionResult:
        holder = ModelHolder
        with _HOLDER_LOCK:
            saved = holder.model, holder.model_path
            holder.model, holder.model_path = self.model, self.model_path
            try:
                out = sliding_transcribe(
                    clip.audio,
                    path_or_hf_repo=self.model_path,
                    verbose=None,
                    temperature=clip.temperature,  # one temperature: no fallback re-decodes
                    initial_prompt=clip.prompt,
                    word_timestamps=clip.word_timestamps,
                    task=clip.task,
                    language=clip.language,
                    fp16=self.dtype == mx.float16,
                )
            finally:
                holder.model, holder.model_path = saved
        return _result(out["segments"], out["language"], len(clip.audio) / SAMPLE_RATE, clip.word_timestamps)


def _split_segments(tokens: list[int], tokenizer: Tokenizer, duration: float) -> list[tuple[float, float, list[int]]]:
    """Cut sampled tokens at timestamp tokens: ``<|t0|> text <|t1|><|t1|> text <|t2|>``.

    Text after the last timestamp (the window ended mid-sentence) runs to the clip's end.
    Times are clamped to the clip, since Whisper may stamp into the zero padding.
    """
    begin = tokenizer.timestamp_begin
    spans: list[tuple[float, float, list[int]]] = []
    start: float | None = None
    text: list[int] = []
    segment_tokens: list[int] = []
    for token in tokens:
        if token >= begin:
            time = min((token - begin) * _TIME_PRECISION, duration)
            segment_tokens.append(token)
            if start is not None and text:
                spans.append((start, max(start, time), segment_tokens))
                start, text, segment_tokens = None, [], []
            else:
                start = time
                segment_tokens = [token]
        else:
            if start is None:
                start = spans[-1][1] if spans else 0.0
            text.append(token)
            segment_tokens.append(token)
    if text:
        spans.append((start or 0.0, duration, segment_tokens))
    return spans


def _result(segments: list[dict], language: str, duration: float, with_words: bool) -> TranscriptionResult:
    parsed = []
    for s in segments:
        words = [Word(w["word"], float(w["start"]), float(w["end"]), float(w["probability"])) for w in s.get("words", [])]
        parsed.append(
            Segment(
                id=s["id"], start=float(s["start"]), end=float(s["end"]), text=s["text"], tokens=list(s["tokens"]),
                temperature=float(s["temperature"]), avg_logprob=float(s["avg_logprob"]),
                compression_ratio=float(s["compression_ratio"]), no_speech_prob=float(s["no_speech_prob"]),
                seek=int(s["seek"]), words=words if with_words else None,
            )  # fmt: skip
        )
    all_words = [w for s in parsed for w in s.words or []] if with_words else None
    text = "".join(s.text for s in parsed).strip()
    return TranscriptionResult(text=text, language=language, duration=duration, segments=parsed, words=all_words)
