"""Orchard's /v1/audio/transcriptions side by side with raw in-process ``WhisperEngine.transcribe``.

    python -m bench.compare_whisper            # full run (~3-4 min on 2 cores)
    python -m bench.compare_whisper --quick    # smoke run: 4 clips, 1 repeat

Clips: tests/speech.py's sentences spoken by espeak-ng (2-4 s each), cycled to 8 clips.

1. raw (a process with the BLAS preload Orchard's replicas get): one clip; the 8 clips as one
   ``transcribe`` call (one batch) and one call per clip.
2. Orchard, only the whisper family of serve_config.yaml: one request; the 8 clips as 8
   concurrent requests (``@serve.batch`` may join them) and one after another.

Speed = audio seconds / wall seconds (× real time; the inverse of the real-time factor).
Ratios use the **median** of the repeats (these runs are long, medians resist one burst).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.compare_llm import preload_env
from bench.family_server import (
    ROOT,
    STOP_GRACE_S,
    family_server,
    first_entry,
    load_average,
    log,
    median,
    meta,
    wait_ready,
    write_report,
)
from bench.media_inputs import load_clips
from bench.servers import free_port


def run_raw(path: Path, wav_dir: Path, n: int, repeats: int) -> dict:
    cmd = [sys.executable, "-m", "bench.raw_media", "whisper", "--model", str(path), "--wav-dir", str(wav_dir)]
    cmd += ["--n", str(n), "--repeats", str(repeats)]
    out = subprocess.run(cmd, cwd=ROOT, env=preload_env(), capture_output=True, text=True, timeout=400)
    if out.returncode != 0:
        raise RuntimeError(f"raw baseline failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


async def _post(client: httpx.AsyncClient, url: str, model: str, wav: bytes) -> str:
    resp = await client.post(url, data={"model": model}, files={"file": ("clip.wav", wav, "audio/wav")})
    resp.raise_for_status()
    return resp.json()["text"]


async def _timed(coro) -> float:
    t0 = time.perf_counter()
    await coro
    return time.perf_counter() - t0


async def bench_requests(base: str, model: str, wavs: list[bytes], repeats: int) -> dict:
    url = f"{base}/audio/transcriptions"
    async with httpx.AsyncClient(timeout=300.0, limits=httpx.Limits(max_connections=len(wavs))) as client:
        post = lambda w: _post(client, url, model, w)  # noqa: E731
        await asyncio.gather(*(post(w) for w in wavs))  # warm-up, the batched path included

        async def sequential() -> None:
            for w in wavs:
                await post(w)

        one = [await _timed(post(wavs[0])) for _ in range(repeats)]
        concurrent = [await _timed(asyncio.gather(*(post(w) for w in wavs))) for _ in range(repeats)]
        seq = [await _timed(sequential()) for _ in range(repeats)]
        texts = await asyncio.gather(*(post(w) for w in wavs))
    return {"one_wall_s": one, "concurrent_wall_s": concurrent, "sequential_wall_s": seq, "texts": texts}


def bench_server(config: Path, model: str, wavs: list[bytes], workdir: Path, repeats: int) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    server = family_server(config, "whisper", port, workdir)

    def probe() -> bool:
        r = httpx.post(
            f"{base}/audio/transcriptions", data={"model": model}, files={"file": ("a.wav", wavs[0])}, timeout=60
        )
        return r.status_code == 200

    server.start()
    try:
        ready = wait_ready(server, probe)
        log(f"{server.name} ready in {ready:.0f}s on port {port}")
        out = asyncio.run(bench_requests(base, model, wavs, repeats))
    finally:
        server.stop(grace=STOP_GRACE_S)
    return {"ready_s": ready, **out}


def render(res: dict) -> str:
    m, raw, srv = res["meta"], res.get("raw"), res.get("orchard")
    one_s, batch_s = m["one_clip_audio_s"], m["batch_audio_s"]
    n = m["clips"]
    lines = [
        f"# Whisper benchmark, {m['date']}",
        "",
        f"- machine: {m['machine']}",
        f"- load average (1/5/15 min): before {m['load_before']}, after {m.get('load_after')}",
        f"- model: `{m['model']}` (float32); BLAS preload `{m['blas']}`",
        f"- versions: {m['versions']}; Orchard commit {m['commit']}; wall time {m.get('wall_s', 0):.0f} s",
        f"- clips: {n} espeak-ng clips, {batch_s:.1f} s of audio in all; the single clip lasts {one_s:.2f} s",
        "",
        "| system | measure | wall s (median) | wall s (all) | speed × real time (median) |",
        "|---|---|---:|---:|---:|",
    ]

    def row(system: str, what: str, walls: list[float], audio: float) -> None:
        lines.append(
            f"| {system} | {what} | {median(walls):.2f} | {', '.join(f'{w:.2f}' for w in walls)} | {audio / median(walls):.2f} |"
        )

    if raw:
        row("raw in process", "one clip", raw["one_wall_s"], one_s)
        row("raw in process", f"{n} clips, one `transcribe` call (batched)", raw["batched_wall_s"], batch_s)
        row("raw in process", f"{n} clips, one call each", raw["sequential_wall_s"], batch_s)
    if srv:
        row("Orchard", "one request", srv["one_wall_s"], one_s)
        row("Orchard", f"{n} concurrent requests", srv["concurrent_wall_s"], batch_s)
        row("Orchard", f"{n} requests one after another", srv["sequential_wall_s"], batch_s)
    lines += ["", "## Ratios (medians)", "", "| ratio | value | target | met |", "|---|---:|---|---|"]

    def add(what: str, value: float | None, target: float | None) -> None:
        shown = "n/a" if value is None else f"{value:.2f}"
        met = "" if value is None or target is None else ("yes" if value >= target else "**no**")
        lines.append(f"| {what} | {shown} | {'(info)' if target is None else f'≥ {target}'} | {met} |")

    med = lambda d, k: median(d[k]) if d else None  # noqa: E731
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    add(
        "one request: Orchard speed / raw speed (= raw wall / server wall)",
        ratio(med(raw, "one_wall_s"), med(srv, "one_wall_s")),
        0.9,
    )
    add(
        f"{n} clips: Orchard concurrent / Orchard sequential (= sequential wall / concurrent wall)",
        ratio(med(srv, "sequential_wall_s"), med(srv, "concurrent_wall_s")),
        2,
    )
    add(
        f"{n} clips: raw batched / raw one call each",
        ratio(med(raw, "sequential_wall_s"), med(raw, "batched_wall_s")),
        None,
    )
    add(
        f"{n} clips: Orchard concurrent speed / raw batched speed",
        ratio(med(raw, "batched_wall_s"), med(srv, "concurrent_wall_s")),
        None,
    )
    if raw and srv:
        same = sum(a.strip() == b.strip() for a, b in zip(raw["texts"], srv["texts"]))
        lines += [
            "",
            f"Transcripts identical between raw and Orchard: {same}/{n}. Raw: {raw['texts'][: len(set(raw['texts']))]}",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="4 clips, 1 repeat")
    ap.add_argument("--clips", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated, from raw, orchard")
    ap.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml")
    args = ap.parse_args(argv)
    n, repeats = (4, 1) if args.quick else (args.clips, args.repeats)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the server is stopped

    from mlx_orchard.models.registry import resolve_whisper

    t0 = time.perf_counter()
    entry = first_entry(args.config, "whisper")
    path = resolve_whisper(entry["source"], sha256=entry.get("sha256"))
    with tempfile.TemporaryDirectory(prefix="orchard-bench-") as tmp:
        wav_dir = Path(tmp) / "wavs"
        clips = load_clips(wav_dir, n)
        seconds = [len(a) / 16_000 for _, a in clips]
        res: dict = {
            "meta": meta(
                model=str(path), blas=preload_env().get("LD_PRELOAD"), repeats=repeats, clips=n,
                one_clip_audio_s=seconds[0], batch_audio_s=sum(seconds),
            )  # fmt: skip
        }
        log(f"load average {res['meta']['load_before']}; model {path}; {n} clips, {sum(seconds):.1f} s of audio")
        if "raw" not in skip:
            log("raw WhisperEngine in process ...")
            res["raw"] = run_raw(path, wav_dir, n, repeats)
            log(
                f"  one {res['raw']['one_wall_s']}, batched {res['raw']['batched_wall_s']}, sequential {res['raw']['sequential_wall_s']}"
            )
        if "orchard" not in skip:
            log("Orchard ...")
            res["orchard"] = bench_server(args.config, entry["name"], [w for w, _ in clips], Path(tmp), repeats)
            o = res["orchard"]
            log(f"  one {o['one_wall_s']}, concurrent {o['concurrent_wall_s']}, sequential {o['sequential_wall_s']}")
    res["meta"]["load_after"] = load_average()
    res["meta"]["wall_s"] = time.perf_counter() - t0
    report = render(res)
    path_md = write_report("whisper", report, res)
    print(report)
    log(f"wrote {path_md}")


if __name__ == "__main__":
    main()
