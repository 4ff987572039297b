"""Orchard's /v1/embeddings side by side with raw in-process ``EmbeddingEngine.embed``, one run.

    python -m bench.compare_embeddings            # full run (~2-3 min on 2 cores)
    python -m bench.compare_embeddings --quick    # smoke run: 2 repeats

1. raw: tokenize + ``embed`` of 32 texts in one batch of 32, in a process with the BLAS
   preload Orchard's replicas get (texts/s); also the same texts one call each.
2. Orchard, only the embeddings family of serve_config.yaml: 32 concurrent requests of one
   input each (texts/s = 32 / wall of the round).
3. the same server with ``batching.max_batch_size: 1`` (every request its own forward pass).
(info) the batched server also gets all 32 texts in one request, to separate per-request
overhead from model time.

Each is repeated; the ratios use the **best** round of each (least disturbed by other work
on a shared machine), the medians are reported next to them.
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
from bench.media_inputs import embedding_texts
from bench.servers import free_port

N = 32


def run_raw(path: Path, repeats: int) -> dict:
    cmd = [sys.executable, "-m", "bench.raw_media", "embeddings", "--model", str(path), "--n", str(N)]
    cmd += ["--batch", str(N), "--repeats", str(repeats)]
    out = subprocess.run(cmd, cwd=ROOT, env=preload_env(), capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"raw baseline failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


async def concurrent_round(client: httpx.AsyncClient, url: str, model: str, texts: list[str]) -> float:
    """All texts at once, one request each; texts/s over the round's wall time."""

    async def one(text: str) -> None:
        resp = await client.post(url, json={"model": model, "input": text})
        resp.raise_for_status()
        assert len(resp.json()["data"]) == 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(t) for t in texts))
    return len(texts) / (time.perf_counter() - t0)


async def one_request_round(client: httpx.AsyncClient, url: str, model: str, texts: list[str]) -> float:
    """All texts in one request (the client batches); texts/s."""
    t0 = time.perf_counter()
    resp = await client.post(url, json={"model": model, "input": texts})
    resp.raise_for_status()
    assert len(resp.json()["data"]) == len(texts)
    return len(texts) / (time.perf_counter() - t0)


async def bench_rounds(base: str, model: str, repeats: int, whole: bool) -> tuple[list[float], list[float]]:
    texts = embedding_texts(N)
    limits = httpx.Limits(max_connections=N, max_keepalive_connections=N)
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as client:
        url = f"{base}/embeddings"
        await concurrent_round(client, url, model, texts)  # warm-up: connections, first batches
        rounds = [await concurrent_round(client, url, model, texts) for _ in range(repeats)]
        single = [await one_request_round(client, url, model, texts) for _ in range(repeats if whole else 0)]
    return rounds, single


def bench_server(config: Path, model: str, workdir: Path, repeats: int, batching: dict | None, tag: str) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    server = family_server(config, "embeddings", port, workdir, batching=batching, tag=tag)

    def probe() -> bool:
        return httpx.post(f"{base}/embeddings", json={"model": model, "input": "ready?"}, timeout=30).status_code == 200

    server.start()
    try:
        ready = wait_ready(server, probe)
        log(f"{server.name} ready in {ready:.0f}s on port {port}")
        rounds, whole = asyncio.run(bench_rounds(base, model, repeats, whole=not batching))
        healthy = httpx.get(f"{base}/models", timeout=10).status_code == 200  # still answering after the load
    finally:
        server.stop(grace=STOP_GRACE_S)
    log(f"  texts/s per round: {', '.join(f'{x:.1f}' for x in rounds)}; one {N}-input request: {whole}")
    return {
        "ready_s": ready,
        "texts_per_s": rounds,
        "one_request_texts_per_s": whole,
        "healthy_after": healthy,
        "batching": batching,
    }


def _best(xs: list[float]) -> float:
    return max(xs) if xs else float("nan")


def render(res: dict) -> str:
    m, raw, on, off = res["meta"], res.get("raw"), res.get("batched"), res.get("unbatched")
    rows = []
    if raw:
        rows.append(("raw `EmbeddingEngine.embed`, 32 texts in one batch (in process)", raw["texts_per_s"]))
        rows.append(("raw, the same 32 texts one call each (in process)", raw["single_texts_per_s"]))
    if on:
        rows.append(("Orchard, 32 concurrent 1-input requests, batching on (max_batch_size 32)", on["texts_per_s"]))
    if on and on.get("one_request_texts_per_s"):
        rows.append(
            (f"Orchard, one request with all {N} inputs (info: the client batches)", on["one_request_texts_per_s"])
        )
    if off:
        rows.append(("Orchard, 32 concurrent 1-input requests, batching off (max_batch_size 1)", off["texts_per_s"]))
    lines = [
        f"# Embeddings benchmark, {m['date']}",
        "",
        f"- machine: {m['machine']}",
        f"- load average (1/5/15 min): before {m['load_before']}, after {m.get('load_after')}",
        f"- model: `{m['model']}`; BLAS preload `{m['blas']}`",
        f"- versions: {m['versions']}; Orchard commit {m['commit']}; wall time {m.get('wall_s', 0):.0f} s",
        "",
        "| system | texts/s best | texts/s median | rounds |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {what} | {_best(xs):.1f} | {median(xs):.1f} | {len(xs)} |" for what, xs in rows]
    lines += ["", "## Ratios (best round of each)", "", "| ratio | value | target | met |", "|---|---:|---|---|"]

    def add(what: str, a: list[float] | None, b: list[float] | None, target: float | None) -> None:
        if not a or not b:
            lines.append(f"| {what} | n/a | {'' if target is None else f'≥ {target}'} | |")
            return
        v = _best(a) / _best(b)
        met = "" if target is None else ("yes" if v >= target else "**no**")
        lines.append(
            f"| {what} | {v:.2f} (median {median(a) / median(b):.2f}) | {'(info)' if target is None else f'≥ {target}'} | {met} |"
        )

    add("Orchard batched at 32 concurrent / raw batched", on and on["texts_per_s"], raw and raw["texts_per_s"], 0.9)
    add("Orchard batched / Orchard unbatched", on and on["texts_per_s"], off and off["texts_per_s"], 3)
    add(
        "raw batch of 32 / raw one at a time (the most batching can give)",
        raw and raw["texts_per_s"],
        raw and raw["single_texts_per_s"],
        None,
    )
    add(
        "Orchard, one 32-input request / raw batched",
        on and on.get("one_request_texts_per_s"),
        raw and raw["texts_per_s"],
        None,
    )
    add("Orchard unbatched / raw one at a time", off and off["texts_per_s"], raw and raw["single_texts_per_s"], None)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 repeats per measurement")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip", default="", help="comma-separated, from raw, batched, unbatched")
    ap.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml")
    args = ap.parse_args(argv)
    repeats = 2 if args.quick else args.repeats
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so servers are stopped

    from mlx_orchard.models.registry import resolve_directory

    t0 = time.perf_counter()
    entry = first_entry(args.config, "embeddings")
    path = resolve_directory(entry["source"])
    res: dict = {"meta": meta(model=str(path), blas=preload_env().get("LD_PRELOAD"), repeats=repeats)}
    log(f"load average {res['meta']['load_before']}; model {path}")
    if "raw" not in skip:
        log("raw EmbeddingEngine in process ...")
        res["raw"] = run_raw(path, repeats)
        log(f"  batched texts/s {', '.join(f'{x:.1f}' for x in res['raw']['texts_per_s'])}")
    with tempfile.TemporaryDirectory(prefix="orchard-bench-") as tmp:
        if "batched" not in skip:
            log("Orchard, batching on ...")
            res["batched"] = bench_server(args.config, entry["name"], Path(tmp), repeats, None, "")
        if "unbatched" not in skip:
            log("Orchard, batching off ...")
            res["unbatched"] = bench_server(
                args.config, entry["name"], Path(tmp), repeats, {"max_batch_size": 1}, "-unbatched"
            )
    res["meta"]["load_after"] = load_average()
    res["meta"]["wall_s"] = time.perf_counter() - t0
    report = render(res)
    path_md = write_report("embeddings", report, res)
    print(report)
    log(f"wrote {path_md}")


if __name__ == "__main__":
    main()
