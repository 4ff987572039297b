"""Orchard's LLM path side by side with raw mlx-lm and mlx_lm.server, in one run.

    python -m bench.compare_llm            # full run (~6-10 min on 2 cores)
    python -m bench.compare_llm --quick    # smoke run: levels 1 and 16, fewer requests
    python -m bench.compare_llm --skip mlx_lm_server

Same model everywhere: the first ``llm`` entry of serve_config.yaml, as float32. The
in-process baselines and mlx_lm.server get the BLAS preload Orchard gives its replicas.
Servers run one at a time (the machine has few cores), each stopped before the next.
Writes bench/results/llm-<date>.md (and .json) and prints the report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import yaml

from bench import procinfo
from bench.loadgen import LevelResult, format_table, one_token_latency, run_levels
from bench.servers import Server, free_port
from mlx_orchard.families import FAMILIES

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SYSTEMS = ("raw", "orchard", "mlx_lm_server")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def model_dir(config_path: Path, *, dequantize: bool = True) -> tuple[str, Path]:
    """(served name, MLX directory: fp32 unless ``dequantize`` is off) of the first LLM in the Serve config."""
    from mlx_orchard.models.registry import resolve_llm

    config = yaml.safe_load(config_path.read_text())
    entry = config["applications"][0]["args"]["llm"][0]
    return entry["name"], resolve_llm(entry["source"], dequantize=dequantize, sha256=entry.get("sha256"))


def preload_env() -> dict[str, str]:
    from mlx_orchard.runtime import blas_library

    env = dict(os.environ)
    lib = blas_library("auto")
    if lib:
        env["LD_PRELOAD"] = lib
    return env


def run_raw(path: Path, quick: bool, max_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "bench.raw_mlx", "--model", str(path), "--max-tokens", str(max_tokens)]
    cmd += ["--streams", "2", "--latency", "10"] if quick else ["--streams", "4", "--latency", "30"]
    out = subprocess.run(cmd, cwd=ROOT, env=preload_env(), capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"raw baseline failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def orchard_server(config_path: Path, port: int, workdir: Path, full: bool = False) -> Server:
    config = yaml.safe_load(config_path.read_text())
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    if not full:
        # Only the benchmarked LLM: other families' replicas would load and idle on the same 2 cores.
        for app in config["applications"]:
            a = app["args"]
            for family in FAMILIES:
                if family.key in a:
                    a[family.key] = a[family.key][:1] if family.name == "llm" else []
    tmp = workdir / "serve_config.yaml"
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    # The environment `make serve` gives it: throughput-optimized Serve, workers at normal priority.
    env = {**os.environ, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_worker_niceness": "0"}
    env.pop("RAY_ADDRESS", None)
    # --address local: always a Ray node of our own, never a cluster someone else started.
    cmd = ["serve", "run", str(tmp), "--address", "local", "--app-dir", str(ROOT)]
    return Server("orchard", cmd, env=env, cwd=ROOT, log_path=RESULTS / "logs" / "orchard.log")


def mlx_lm_server(path: Path, port: int) -> Server:
    cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(path), "--host", "127.0.0.1", "--port", str(port)]
    return Server("mlx_lm.server", cmd, env=preload_env(), cwd=ROOT, log_path=RESULTS / "logs" / "mlx_lm_server.log")


def bench_server(server: Server, port: int, model: str, levels: list[int], quick: bool, max_tokens: int) -> dict:
    base = f"http://127.0.0.1:{port}/v1"
    with server:
        ready = server.wait_ready(base, model)
        log(f"{server.name} ready in {ready:.0f}s on port {port}")
        pids = server.pids()
        replica = procinfo.find(pids, "ServeReplica:orchard:llm")
        before = procinfo.snapshot(pids + [os.getpid()])
        requests_for = (lambda c: max(4, c)) if quick else (lambda c: max(8, 2 * c))
        levels_out = asyncio.run(
            run_levels(base, model, levels, max_tokens=max_tokens, requests_for=requests_for, log=log)
        )
        after = procinfo.snapshot(pids + [os.getpid()])
        latency = asyncio.run(one_token_latency(base, model, n=10 if quick else 30))
        log(f"  1-token latency p50 {latency['p50_ms']:.1f} ms")
        return {
            "ready_s": ready,
            "levels": [asdict(r) for r in levels_out],
            "one_token": latency,
            "cpu_s": procinfo.cpu_delta(before, after),
            "replica": procinfo.replica_setup(replica) if replica else None,
        }


# ---- the report ----


def _level(result: dict | None, c: int) -> LevelResult | None:
    for r in (result or {}).get("levels", []):
        if r["concurrency"] == c:
            return LevelResult(**r)
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(res: dict) -> list[tuple[str, float | None, str, bool | None]]:
    """(what, value, target, met) for each target of the issue."""
    raw, orch, peer = res.get("raw"), res.get("orchard"), res.get("mlx_lm_server")
    o1, o16, p16 = _level(orch, 1), _level(orch, 16), _level(peer, 16)
    rows = []

    def add(what: str, value: float | None, target: str, ok) -> None:
        rows.append((what, value, target, None if value is None else ok(value)))

    add(
        "single stream: Orchard per-stream tok/s / raw stream_generate end-to-end tok/s",
        _ratio(o1 and o1.stream_tok_s_p50, raw and raw["stream_generate"]["e2e_tok_s"]),
        "≥ 0.95",
        lambda v: v >= 0.95,
    )
    add(
        "single stream decode: Orchard decode tok/s / raw stream_generate decode tok/s",
        _ratio(o1 and o1.decode_tok_s_p50, raw and raw["stream_generate"]["decode_tok_s"]),
        "(info)",
        lambda v: None,
    )
    add(
        "16 streams: Orchard aggregate tok/s / mlx_lm.server aggregate tok/s",
        _ratio(o16 and o16.aggregate_tok_s, p16 and p16.aggregate_tok_s),
        "≥ 1.1",
        lambda v: v >= 1.1,
    )
    add(
        "16 streams: Orchard aggregate tok/s / raw BatchGenerator(16) tok/s",
        _ratio(o16 and o16.aggregate_tok_s, raw and raw["batch_generator"]["aggregate_tok_s"]),
        "(info)",
        lambda v: None,
    )
    add(
        "16 streams: Orchard TTFT p50 / mlx_lm.server TTFT p50",
        _ratio(o16 and o16.ttft_p50_s, p16 and p16.ttft_p50_s),
        "≤ 0.5",
        lambda v: v <= 0.5,
    )
    raw_1 = raw and raw["one_token"]["stream_generate_p50_ms"]
    add(
        "Ray overhead p50, 1 token (ms): Orchard 1-token p50 − raw stream_generate prefill+1",
        orch["one_token"]["p50_ms"] - raw_1 if orch and raw_1 else None,
        "≤ 5 ms",
        lambda v: v <= 5,
    )
    raw_b = raw and raw["one_token"]["batch_generator_p50_ms"]
    add(
        "  same, against raw BatchGenerator prefill+1 (the engine's own path) (ms)",
        orch["one_token"]["p50_ms"] - raw_b if orch and raw_b else None,
        "(info)",
        lambda v: None,
    )
    add(
        "mlx_lm.server overhead p50, 1 token (ms): its 1-token p50 − raw stream_generate prefill+1",
        peer["one_token"]["p50_ms"] - raw_1 if peer and raw_1 else None,
        "(info)",
        lambda v: None,
    )
    return rows


def render(res: dict) -> str:
    meta = res["meta"]
    lines = [
        f"# LLM benchmark, {meta['date']}",
        "",
        f"- machine: {meta['machine']}",
        f"- load average (1/5/15 min): before {meta['load_before']}, after {meta['load_after']} "
        "(the benchmark itself keeps about 2-3 threads runnable, so 'after' includes its own load)",
        f"- model: `{meta['model_dir']}` (float32), BLAS preload: `{meta['blas']}`",
        f"- versions: {meta['versions']}; Orchard commit {meta['commit']}",
        f"- mode: {'quick' if meta['quick'] else 'full'}; {meta['max_tokens']} tokens per answer, greedy; "
        f"wall time {meta['wall_s']:.0f} s",
        "",
    ]
    raw = res.get("raw")
    if raw:
        sg, b1, bg, ot = raw["stream_generate"], raw["batch_generator_1"], raw["batch_generator"], raw["one_token"]
        lines += [
            "## Raw mlx-lm, in process",
            "",
            "| measure | value |",
            "|---|---:|",
            f"| stream_generate, 1 stream: decode tok/s | {sg['decode_tok_s']:.1f} |",
            f"| stream_generate, 1 stream: end-to-end tok/s (prefill included) | {sg['e2e_tok_s']:.1f} |",
            f"| stream_generate, 1 stream: time to first token (ms) | {sg['ttft_ms']:.0f} |",
            f"| BatchGenerator, 1 sequence: tok/s | {b1['aggregate_tok_s']:.1f} |",
            f"| BatchGenerator, {bg['sequences']} sequences: aggregate tok/s | {bg['aggregate_tok_s']:.1f} |",
            f"| prefill + 1 token via stream_generate, p50 (ms) | {ot['stream_generate_p50_ms']:.1f} |",
            f"| prefill + 1 token via BatchGenerator, p50 (ms) | {ot['batch_generator_p50_ms']:.1f} |",
            "",
        ]
    titles = (
        ("orchard", "Orchard (serve run, RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_worker_niceness=0)"),
        ("mlx_lm_server", "mlx_lm.server"),
    )
    for key, title in titles:
        r = res.get(key)
        if not r:
            continue
        ot = r["one_token"]
        lines += [
            f"## {title}",
            "",
            format_table([LevelResult(**x) for x in r["levels"]]),
            "",
            f"1-token request (non-streamed, sequential): p50 {ot['p50_ms']:.1f} ms, p95 {ot['p95_ms']:.1f} ms "
            f"(n={ot['n']}, errors {ot['errors']}); ready {r['ready_s']:.0f} s after start.",
            "",
            "CPU seconds per process during the load levels: "
            + ", ".join(f"{n} {s:.1f}" for n, s in r["cpu_s"][:8]),
            "",
        ]
        if r.get("replica"):
            lines += [f"LLM replica setup: {r['replica']}", ""]
    lines += ["## Targets", "", "| ratio | value | target | met |", "|---|---:|---|---|"]
    for what, value, target, ok in ratios(res):
        shown = "n/a" if value is None else f"{value:.2f}"
        met = "" if ok is None else ("yes" if ok else "**no**")
        lines.append(f"| {what} | {shown} | {target} | {met} |")
    return "\n".join(lines) + "\n"


def _git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "?"


def _versions() -> str:
    from importlib.metadata import version

    return ", ".join(f"{p} {version(p)}" for p in ("mlx", "mlx-lm", "ray"))


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="levels 1 and 16, fewer requests")
    ap.add_argument("--skip", default="", help=f"comma-separated, from {', '.join(SYSTEMS)}")
    ap.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--full-config", action="store_true", help="serve every model of the config (default: the first LLM only)"
    )
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if unknown := skip - set(SYSTEMS):
        ap.error(f"unknown --skip {sorted(unknown)}; choose from {SYSTEMS}")
    levels = [1, 16] if args.quick else [1, 4, 8, 16]
    # SIGTERM unwinds like Ctrl-C, so every server started here is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    t0 = time.perf_counter()
    name, path = model_dir(args.config)
    res: dict = {
        "meta": {
            "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": f"{os.cpu_count()} cores, {_cpu_model()}, {platform.system()} {platform.machine()}",
            "load_before": _load(),
            "model_dir": str(path),
            "blas": preload_env().get("LD_PRELOAD"),
            "versions": _versions(),
            "commit": _git_commit(),
            "quick": args.quick,
            "max_tokens": args.max_tokens,
        }
    }
    log(f"load average {res['meta']['load_before']}; model {path}")
    if "raw" not in skip:
        log("raw mlx-lm in process ...")
        res["raw"] = run_raw(path, args.quick, args.max_tokens)
        log(f"  {json.dumps(res['raw'])}")
    with tempfile.TemporaryDirectory(prefix="orchard-bench-") as tmp:
        if "orchard" not in skip:
            log("Orchard (serve run) ...")
            port = free_port()
            server = orchard_server(args.config, port, Path(tmp), full=args.full_config)
            res["orchard"] = bench_server(server, port, name, levels, args.quick, args.max_tokens)
    if "mlx_lm_server" not in skip:
        log("mlx_lm.server ...")
        port = free_port()
        res["mlx_lm_server"] = bench_server(
            mlx_lm_server(path, port), port, "default_model", levels, args.quick, args.max_tokens
        )
    res["meta"]["load_after"] = _load()
    res["meta"]["wall_s"] = time.perf_counter() - t0

    report = render(res)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"llm-{datetime.now().strftime('%Y-%m-%d-%H%M')}"
    stem.with_suffix(".md").write_text(report)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
    print(report)
    log(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
