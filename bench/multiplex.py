"""Model multiplexing: what a model in the family pool costs against a dedicated deployment,
and what loading a model on demand costs. One ``serve run``, side by side:

    python -m bench.multiplex                      # 4 rounds, levels 1 and 16
    python -m bench.multiplex --rounds 2 --levels 1,16 --cold 3

The app serves the default LLM twice from the same weights: ``smollm2`` in the LLM pool
(multiplexed: requests carry Serve's multiplexed model id and are routed by it) and
``smollm2-dedicated`` (``dedicated: true``: a deployment of its own, as before pools).
Rounds alternate which goes first and drive each with the same streamed load
(``bench.loadgen``: unique prompts, greedy, 64 tokens). Then, ``--cold`` times: the
default model's converted directory under another name (``smollm2-cold``, found on disk,
not loaded) is loaded through ``POST /v1/models/{id}/load`` and unloaded again, and the
time to first token of the first request for it while unloaded is taken against a warm
request. Writes bench/results/multiplex-<date>.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import httpx
import yaml

from bench.compare_llm import RESULTS, ROOT, _git_commit, log
from bench.family_server import write_report
from bench.loadgen import run_levels
from bench.servers import Server, free_port

POOLED, DEDICATED, COLD = "smollm2", "smollm2-dedicated", "smollm2-cold"


def write_config(workdir: Path, port: int, search_dir: Path) -> Path:
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    args = config["applications"][0]["args"]
    pool = args["pools"]["llm"]
    (llm,) = [e for e in args["llm"] if e["name"] == POOLED]
    dedicated = {k: v for k, v in llm.items() if k != "aliases"} | {
        "name": DEDICATED,
        "dedicated": True,
        "deployment": pool["deployment"],  # the same replica options as the pool's
    }
    args["llm"] = [llm, dedicated]
    args["embeddings"], args["whisper"] = [], []
    args["pools"] = {"llm": pool}
    args["models"] = {**args.get("models", {}), "search_dirs": [str(search_dir)]}
    path = workdir / "serve_config-multiplex.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cold_copy(search_dir: Path) -> None:
    """The default model's converted directory, hard-linked under another name."""
    from mlx_orchard.models.registry import resolve_llm
    from mlx_orchard.runtime import mlx_uses_cpu_backend

    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    entry = config["applications"][0]["args"]["llm"][0]
    src = resolve_llm(entry["source"], dequantize=mlx_uses_cpu_backend(), sha256=entry.get("sha256"))
    dst = search_dir / COLD
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not (dst / f.name).exists():
            (dst / f.name).hardlink_to(f)


async def first_token_s(base: str, model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": f"Say hi. {time.time_ns()}"}],
            "max_tokens": 4, "temperature": 0, "stream": True}
    async with httpx.AsyncClient(timeout=300) as client:
        t0 = time.perf_counter()
        async with client.stream("POST", f"{base}/chat/completions", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                    return time.perf_counter() - t0
    raise RuntimeError("no token")


def cold_round(base: str) -> dict:
    with httpx.Client(timeout=300) as client:
        t0 = time.perf_counter()
        r = client.post(f"{base}/models/{COLD}/load", json={})
        r.raise_for_status()
        load_s = time.perf_counter() - t0
        warm_ttft = asyncio.run(first_token_s(base, COLD))
        client.post(f"{base}/models/{COLD}/unload").raise_for_status()
        cold_ttft = asyncio.run(first_token_s(base, COLD))
        client.post(f"{base}/models/{COLD}/unload").raise_for_status()
    return {"load_s": load_s, "warm_ttft_s": warm_ttft, "cold_ttft_s": cold_ttft}


METRICS = (("aggregate_tok_s", "aggregate tok/s"), ("stream_tok_s_p50", "per-stream tok/s p50"), ("ttft_p50_s", "TTFT p50 (s)"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--levels", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--cold", type=int, default=3, help="cold-load measurements")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    RESULTS.joinpath("logs").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="orchard-multiplex-") as tmp:
        workdir = Path(tmp)
        search_dir = Path(os.environ.get("ORCHARD_CACHE", Path.home() / ".cache" / "orchard")) / "bench-models"
        cold_copy(search_dir)
        port = free_port()
        path = write_config(workdir, port, search_dir)
        env = {**os.environ, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_worker_niceness": "0"}
        env.pop("RAY_ADDRESS", None)
        cmd = ["serve", "run", str(path), "--address", "local", "--app-dir", str(ROOT)]
        server = Server("orchard-multiplex", cmd, env=env, cwd=ROOT, log_path=RESULTS / "logs" / "multiplex.log")
        base = f"http://127.0.0.1:{port}/v1"
        rounds: dict[str, list[dict]] = {POOLED: [], DEDICATED: []}
        with server:
            log(f"ready in {server.wait_ready(base, POOLED):.0f}s")
            server.wait_ready(base, DEDICATED)
            for i in range(args.rounds):
                order = (POOLED, DEDICATED) if i % 2 == 0 else (DEDICATED, POOLED)
                for model in order:
                    results = asyncio.run(
                        run_levels(base, model, levels, max_tokens=args.max_tokens,
                                   requests_for=lambda c: max(8, 2 * c), log=log)
                    )
                    rounds[model].append({r.concurrency: asdict(r) for r in results})
            cold = [cold_round(base) for _ in range(args.cold)]
    lines = [
        f"# Multiplexed pool vs dedicated deployment — {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"Commit {_git_commit()}; {args.rounds} alternating rounds, medians; load average at the end "
        f"{os.getloadavg()[0]:.2f}. `{POOLED}`: the LLM pool (multiplexed); `{DEDICATED}`: `dedicated: true`.",
        "",
        "| level | metric | dedicated | pooled | pooled/dedicated |",
        "|---:|---|---:|---:|---:|",
    ]
    summary: dict = {}
    for level in levels:
        for key, title in METRICS:
            d = statistics.median(r[level][key] for r in rounds[DEDICATED])
            p = statistics.median(r[level][key] for r in rounds[POOLED])
            summary[f"{level}:{key}"] = {"dedicated": d, "pooled": p, "ratio": p / d if d else None}
            lines.append(f"| {level} | {title} | {d:.3f} | {p:.3f} | {p / d:.3f} |")
    med = {k: statistics.median(c[k] for c in cold) for k in ("load_s", "warm_ttft_s", "cold_ttft_s")}
    lines += [
        "",
        f"Cold load of the default model from its converted directory (`POST /v1/models/{COLD}/load`), "
        f"median of {len(cold)}: **{med['load_s']:.2f} s**. First request for it while unloaded: "
        f"TTFT **{med['cold_ttft_s']:.2f} s** (warm: {med['warm_ttft_s']:.3f} s).",
    ]
    text = "\n".join(lines) + "\n"
    write_report("multiplex", text, {"summary": summary, "rounds": rounds, "cold": cold, "cold_median": med})
    print(text)


if __name__ == "__main__":
    main()
