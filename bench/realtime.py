"""Live transcription latency (issue #13):

    python -m bench.realtime [--rounds 3]

Orchard serving only its transcription family (whisper tiny.en) through ``serve run``.
1 and 4 WebSocket clients at once each stream an espeak-ng sentence to ``/v1/realtime`` in
100 ms PCM16 chunks at real-time pace, then commit. Reported per level: time from the end of
speech (the last chunk sent, then the commit) to ``...transcription.completed``, the time
to the first delta after speech began, and deltas per utterance; and the same for
``/v1/audio/transcriptions/realtime`` (voice activity ends the utterance: latency from the
last voiced chunk to ``complete``, which includes the VAD's 600 ms of silence).

Writes bench/results/realtime-<date>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile as sf
import websockets
from scipy.signal import resample_poly

from bench.family_server import ROOT, family_server, log, median, meta, wait_ready, write_report
from bench.servers import free_port
from tests.speech import SENTENCES, speak_wav, word_error_rate

RATE = 16_000
CHUNK = RATE // 10  # 100 ms


def sentence_pcm(text: str, workdir: Path) -> bytes:
    samples, native = sf.read(io.BytesIO(speak_wav(text, workdir)), dtype="float32")
    ratio = Fraction(RATE, native)
    samples = resample_poly(samples, ratio.numerator, ratio.denominator)
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


async def openai_socket(url: str, pcm: bytes, text: str) -> dict:
    async with websockets.connect(f"{url}/v1/realtime?model=whisper-tiny.en") as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"rate": RATE}}}}}))
        first_delta, deltas, begun = None, 0, time.perf_counter()

        async def reader() -> dict:
            nonlocal first_delta, deltas
            async for message in ws:
                event = json.loads(message)
                if event["type"].endswith("transcription.delta"):
                    deltas += 1
                    first_delta = first_delta or time.perf_counter() - begun
                if event["type"].endswith("transcription.completed") or event["type"] == "error":
                    return event
            raise RuntimeError("closed")

        reading = asyncio.ensure_future(reader())
        for i in range(0, len(pcm), CHUNK * 2):
            await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                      "audio": base64.b64encode(pcm[i : i + CHUNK * 2]).decode()}))
            await asyncio.sleep(0.1)
        ended = time.perf_counter()
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        done = await reading
        return {"latency": time.perf_counter() - ended, "first_delta": first_delta, "deltas": deltas,
                "wer": word_error_rate(text, done.get("transcript", ""))}


async def frame_socket(url: str, pcm: bytes, text: str) -> dict:
    async with websockets.connect(f"{url}/v1/audio/transcriptions/realtime") as ws:
        await ws.send(json.dumps({"model": "whisper-tiny.en", "sample_rate": RATE}))
        await ws.recv()
        ended = 0.0
        for i in range(0, len(pcm) + RATE * 2, CHUNK * 2):  # the sentence, then 1 s of silence
            piece = pcm[i : i + CHUNK * 2] or bytes(CHUNK * 2)
            await ws.send(piece)
            if i < len(pcm):
                ended = time.perf_counter()
            await asyncio.sleep(0.1)
            try:
                event = json.loads(await asyncio.wait_for(ws.recv(), 0.001))
                if event.get("type") == "complete":
                    return {"latency": time.perf_counter() - ended, "wer": word_error_rate(text, event["text"])}
            except TimeoutError:
                pass
        async for message in ws:
            event = json.loads(message)
            if event.get("type") == "complete":
                return {"latency": time.perf_counter() - ended, "wer": word_error_rate(text, event["text"])}
    raise RuntimeError("no complete event")


async def level(url: str, sockets: int, rounds: int, pcms: list[tuple[str, bytes]], kind) -> list[dict]:
    out = []
    for r in range(rounds):
        jobs = [pcms[(r + i) % len(pcms)] for i in range(sockets)]
        out += await asyncio.gather(*(kind(url, pcm, text) for text, pcm in jobs))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="orchard-bench-realtime-"))
    pcms = [(s, sentence_pcm(s, workdir)) for s in SENTENCES]
    port = free_port()
    server = family_server(ROOT / "serve_config.yaml", "whisper", port, workdir)
    url = f"ws://127.0.0.1:{port}"
    rows = []
    with server:
        import httpx

        ready = wait_ready(server, lambda: httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200)
        log(f"ready in {ready:.0f}s")
        asyncio.run(level(url, 1, 1, pcms, openai_socket))  # warm-up
        for name, kind in (("/v1/realtime (commit)", openai_socket), ("/v1/audio/transcriptions/realtime (VAD)", frame_socket)):
            for sockets in (1, 4):
                results = asyncio.run(level(url, sockets, args.rounds, pcms, kind))
                rows.append((name, sockets, median([x["latency"] for x in results]), max(x["latency"] for x in results),
                             median([x["first_delta"] for x in results if x.get("first_delta")] or [float("nan")]),
                             median([x.get("deltas", float("nan")) for x in results]), median([x["wer"] for x in results])))
                log(str(rows[-1]))
    info = meta()
    lines = [f"# Live transcription — {info['date']}", "",
             f"commit {info['commit']}; `python -m bench.realtime --rounds {args.rounds}`; {info['machine']}; "
             "whisper tiny.en; espeak-ng sentences (2.5–4 s) streamed in 100 ms chunks at real-time pace.", "",
             "| endpoint | sockets | end of speech → completed (median) | (max) | first delta after speech began | deltas per utterance | WER |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, sockets, lat, worst, first, deltas, wer in rows:
        lines.append(f"| {name} | {sockets} | {lat * 1000:.0f} ms | {worst * 1000:.0f} ms | "
                     f"{first * 1000:.0f} ms | {deltas:.1f} | {wer:.2f} |")
    report = "\n".join(lines) + "\n"
    print(report)
    write_report("realtime", report, {"rows": rows, "meta": info})


if __name__ == "__main__":
    main()
