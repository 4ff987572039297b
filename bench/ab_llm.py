"""Orchard at two git revisions, side by side in one run: did a change cost LLM speed?

    python -m bench.ab_llm --base <rev>            # base (A) vs the working tree (B)
    python -m bench.ab_llm --base <rev> --rounds 3 --levels 1,16

Each round serves the LLM of A, then of B (a temporary ``git worktree`` of the base, run
with its own code and its own serve_config.yaml, only the first LLM), and drives both with
the same streamed load (``bench.loadgen.run_levels``: unique prompts, greedy, 64 tokens).
Rounds alternate so drift on the machine hits both. Reports per level: aggregate tok/s,
per-stream tok/s, TTFT p50 and the ingress replica's CPU seconds per generated token, as
medians over rounds, and B/A ratios. Writes bench/results/ab-llm-<date>.md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import yaml

from bench import procinfo
from bench.compare_llm import RESULTS, ROOT, _git_commit, log
from bench.family_server import write_report
from bench.loadgen import run_levels
from bench.servers import Server, free_port

Edit = Callable[[dict], None]  # changes an app's args before it is served


def serve_tree(tree: Path, port: int, workdir: Path, tag: str, edit: Edit | None = None) -> tuple[Server, str]:
    """``serve run`` of the tree's own config (first LLM only), importing the tree's code."""
    config = yaml.safe_load((tree / "serve_config.yaml").read_text())
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    for app in config["applications"]:
        args = app["args"]
        for key, value in list(args.items()):
            if isinstance(value, list) and value and isinstance(value[0], dict) and "source" in value[0]:
                args[key] = value[:1] if key == "llm" else []
        if edit is not None:
            edit(args)
    model = config["applications"][0]["args"]["llm"][0]["name"]
    path = workdir / f"serve_config-{tag}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_worker_niceness": "0"}
    env["PYTHONPATH"] = str(tree)  # ahead of the editable install: replicas import this tree
    env.pop("RAY_ADDRESS", None)
    cmd = ["serve", "run", str(path), "--address", "local", "--app-dir", str(tree)]
    return Server(f"orchard-{tag}", cmd, env=env, cwd=tree, log_path=RESULTS / "logs" / f"ab-{tag}.log"), model


def one_round(tree: Path, tag: str, levels: list[int], max_tokens: int, workdir: Path, edit: Edit | None = None) -> dict:
    port = free_port()
    server, model = serve_tree(tree, port, workdir, tag, edit)
    base = f"http://127.0.0.1:{port}/v1"
    with server:
        log(f"{tag}: ready in {server.wait_ready(base, model):.0f}s")
        ingress = procinfo.find(server.pids(), "ServeReplica:orchard:ingress")
        out = {}
        for level in levels:
            before = procinfo.cpu_seconds(ingress) if ingress else 0.0
            (result,) = asyncio.run(
                run_levels(base, model, [level], max_tokens=max_tokens, requests_for=lambda c: max(8, 2 * c), log=log)
            )
            ingress_cpu = (procinfo.cpu_seconds(ingress) - before) if ingress else None
            row = asdict(result)
            row["ingress_cpu_ms_per_token"] = (
                1000 * ingress_cpu / result.completion_tokens if ingress_cpu is not None and result.completion_tokens else None
            )
            out[level] = row
        return out


METRICS = (
    ("aggregate_tok_s", "aggregate tok/s", "higher"),
    ("stream_tok_s_p50", "per-stream tok/s p50", "higher"),
    ("ttft_p50_s", "TTFT p50 (s)", "lower"),
    ("ingress_cpu_ms_per_token", "ingress CPU ms / token", "lower"),
)


def report(rounds: dict[str, list[dict]], levels: list[int], base_rev: str, title: str = "Orchard A/B",
           sides: str | None = None) -> tuple[str, dict]:
    sides = sides or f"A = {base_rev}, B = working tree at {_git_commit()}"
    lines = [
        f"# {title} — {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"{sides}; {len(rounds['A'])} alternating rounds, medians.",
        f"Load average at the end: {os.getloadavg()[0]:.2f}.",
        "",
        "| level | metric | A | B | B/A |",
        "|---:|---|---:|---:|---:|",
    ]
    summary: dict = {}
    for level in levels:
        for key, title, _ in METRICS:
            vals = {
                side: [r[level][key] for r in rounds[side] if r[level].get(key) is not None] for side in ("A", "B")
            }
            if not vals["A"] or not vals["B"]:
                continue
            a, b = statistics.median(vals["A"]), statistics.median(vals["B"])
            ratio = b / a if a else None
            summary[f"{level}:{key}"] = {"A": a, "B": b, "ratio": ratio, "A_all": vals["A"], "B_all": vals["B"]}
            lines.append(f"| {level} | {title} | {a:.3f} | {b:.3f} | {ratio:.3f} |")
    return "\n".join(lines) + "\n", summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision for A")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--levels", default="1,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    RESULTS.joinpath("logs").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="orchard-ab-") as tmp:
        workdir = Path(tmp)
        base_tree = workdir / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base_tree), args.base], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            rounds: dict[str, list[dict]] = {"A": [], "B": []}
            for i in range(args.rounds):
                for side, tree in (("A", base_tree), ("B", ROOT)) if i % 2 == 0 else (("B", ROOT), ("A", base_tree)):
                    rounds[side].append(one_round(tree, f"{side}{i}", levels, args.max_tokens, workdir))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, capture_output=True)
    text, summary = report(rounds, levels, args.base)
    write_report("ab-llm", text, {"summary": summary, "rounds": rounds})
    print(text)


if __name__ == "__main__":
    main()
