"""Text-to-speech through Serve (issue #13):

    python -m bench.tts [--rounds 1]

Orchard serving only Kokoro-82M (converted from PyPI's int8 ONNX) through ``serve run``.
Two-sentence inputs, ``response_format: pcm`` streamed. Reported: time to the first audio
byte, real-time factor (wall seconds per second of audio; lower is faster) and audio seconds
produced per wall second — for 1 request, for 8 at once (they take turns sentence by
sentence on the replica), and for the same 8 one after another.

Writes bench/results/tts-<date>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx

from bench.family_server import ROOT, family_server, log, median, meta, wait_ready, write_report
from bench.servers import free_port

TEXTS = ["Good morning. The weather is fine.", "Open the door. Turn on the lights.", "Thank you. See you soon.",
         "The report is ready. Send it today.", "Call me later. I am busy now.", "It is late. Go to sleep.",
         "The train is here. Get on board.", "Read the book. Tell me about it."]
RATE = 24_000


async def speak(client: httpx.AsyncClient, url: str, text: str) -> tuple[float, float, float]:
    """(seconds to the first audio byte, total seconds, audio seconds)."""
    t0 = time.perf_counter()
    first, size = None, 0
    async with client.stream("POST", f"{url}/v1/audio/speech", json={
            "model": "kokoro", "voice": "af_heart", "input": text, "response_format": "pcm"}, timeout=600) as r:
        r.raise_for_status()
        async for chunk in r.aiter_bytes():
            if chunk:
                first = first if first is not None else time.perf_counter() - t0
                size += len(chunk)
    return first or 0.0, time.perf_counter() - t0, size / 2 / RATE


async def run(url: str, rounds: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    async with httpx.AsyncClient() as client:
        await speak(client, url, "Hello.")  # warm-up
        single = [await speak(client, url, TEXTS[r % len(TEXTS)]) for r in range(rounds)]
        out["1 request"] = _summary(single, sum(s[1] for s in single))
        together, alone = [], []
        wall_together = wall_alone = 0.0
        for _ in range(rounds):
            t0 = time.perf_counter()
            together += await asyncio.gather(*(speak(client, url, t) for t in TEXTS))
            wall_together += time.perf_counter() - t0
            t0 = time.perf_counter()
            for t in TEXTS:
                alone.append(await speak(client, url, t))
            wall_alone += time.perf_counter() - t0
        out["8 at once"] = _summary(together, wall_together)
        out["8 one by one"] = _summary(alone, wall_alone)
    return out


def _summary(results: list[tuple[float, float, float]], wall: float) -> dict[str, float]:
    audio = sum(a for _, _, a in results)
    return {"ttfb_median": median([f for f, _, _ in results]), "ttfb_max": max(f for f, _, _ in results),
            "rtf": wall / audio, "audio_s_per_s": audio / wall, "audio_s": audio}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="orchard-bench-tts-"))
    port = free_port()
    server = family_server(ROOT / "serve_config.yaml", "tts", port, workdir)
    with server:
        ready = wait_ready(server, lambda: httpx.get(f"http://127.0.0.1:{port}/v1/audio/voices",
                                                     params={"model": "kokoro"}, timeout=10).status_code == 200, 600)
        log(f"ready in {ready:.0f}s")
        rows = asyncio.run(run(f"http://127.0.0.1:{port}", args.rounds))
    info = meta()
    lines = [f"# Text-to-speech — {info['date']}", "",
             f"commit {info['commit']}; `python -m bench.tts --rounds {args.rounds}`; {info['machine']}; Kokoro-82M "
             "(fp32, from PyPI's int8 ONNX), voice af_heart, two-sentence inputs, pcm streamed.", "",
             "| setting | first audio byte (median) | (max) | real-time factor | audio s per wall s |",
             "|---|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['ttfb_median']:.1f} s | {r['ttfb_max']:.1f} s | {r['rtf']:.1f} | {r['audio_s_per_s']:.3f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    write_report("tts", report, {"rows": rows, "meta": info})


if __name__ == "__main__":
    main()
