"""Test speech: real audio spoken by espeak-ng at test time, and the word error rate."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

# Sentences whisper tiny.en hears reliably in espeak-ng's voice (not every sentence is).
SENTENCES = [
    "Machine learning models run on local hardware.",
    "Please send the weekly report to the finance team before noon.",
    "Open the door and turn on the lights in the kitchen.",
    "Thank you very much for your help yesterday.",
]


def speak_wav(text: str, directory: Path) -> bytes:
    out = directory / f"speech-{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", "-w", str(out), text], check=True, capture_output=True)
    return out.read_bytes()


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref, hyp = words(reference), words(hypothesis)
    # Levenshtein distance over words, one row at a time.
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / max(len(ref), 1)
