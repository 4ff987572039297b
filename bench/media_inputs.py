"""The fixed inputs of the embeddings and whisper benchmarks, shared by the in-process
baselines and the HTTP clients so both see the same work."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.prompts import PROMPTS


def embedding_texts(n: int) -> list[str]:
    """``n`` distinct sentences of 15-25 words (the fixed prompts, numbered past the first round)."""
    out = []
    for i in range(n):
        p = PROMPTS[i % len(PROMPTS)]
        out.append(p if i < len(PROMPTS) else f"{p} (variant {i // len(PROMPTS)})")
    return out


def speak_clips(directory: Path, n: int) -> list[Path]:
    """``n`` WAV files spoken by espeak-ng from tests/speech.py's sentences (cycled)."""
    from tests.speech import SENTENCES, speak_wav

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = directory / f"clip-{i}.wav"
        if not path.exists():
            path.write_bytes(speak_wav(SENTENCES[i % len(SENTENCES)], directory))
        paths.append(path)
    return paths


def load_clips(directory: Path, n: int) -> list[tuple[bytes, np.ndarray]]:
    """(WAV bytes, float32 16 kHz samples) for the first ``n`` clips of ``directory``."""
    from mlx_orchard.audio import decode_audio

    out = []
    for path in speak_clips(directory, n):
        data = path.read_bytes()
        out.append((data, decode_audio(data, max_seconds=30)))
    return out
