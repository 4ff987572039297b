"""Structured output's cost inside the continuous batch (issue #10), side by side in one run:

    python -m bench.structured [--rounds 3]

Three loads on the default LLM, 16 concurrent streams each, alternating per round:
``free`` (16 unconstrained streams), ``constrained`` (16 streams with a JSON schema whose
answer is longer than ``max_tokens``, so every stream decodes the same number of tokens
under the grammar), and ``mixed`` (8 + 8 sharing the batch). Reports aggregate tok/s and
per-stream decode tok/s p50, and the ratios the issue sets: constrained / free (target
≥ 0.9) and free-in-mixed / free (target ≥ 0.97). Writes bench/results/structured-<date>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

from bench.compare_llm import ROOT, _git_commit, log
from bench.family_server import family_server, first_entry, write_report
from bench.loadgen import PROMPTS, RequestResult, percentile, stream_chat
from bench.prompts import tagged
from bench.servers import free_port

SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "story",
        "schema": {
            "type": "object",
            "properties": {"title": {"type": "string", "maxLength": 40}, "story": {"type": "string", "minLength": 400}},
            "required": ["title", "story"],
        },
    },
}


async def load(base: str, model: str, kinds: list[str], per_stream: int, max_tokens: int) -> dict[str, list[RequestResult]]:
    limits = httpx.Limits(max_connections=len(kinds), max_keepalive_connections=len(kinds))
    out: dict[str, list[RequestResult]] = {"free": [], "constrained": []}
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:

        async def stream(i: int, kind: str) -> None:
            for j in range(per_stream):
                prompt = tagged(PROMPTS[(i + j) % len(PROMPTS)])
                extra = {"response_format": SCHEMA} if kind == "constrained" else None
                out[kind].append(await stream_chat(client, base, model, prompt, max_tokens, extra))

        t0 = time.perf_counter()
        await asyncio.gather(*(stream(i, k) for i, k in enumerate(kinds)))
        out["wall"] = time.perf_counter() - t0  # type: ignore[assignment]
    return out


def summary(results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.error is None]
    return {
        "errors": len(results) - len(ok),
        "tokens": sum(r.completion_tokens for r in ok),
        "aggregate_tok_s": sum(r.completion_tokens for r in ok) / wall,
        "decode_tok_s_p50": percentile([d for r in ok if (d := r.decode_tok_s()) is not None], 50),
        "first_error": next((r.error for r in results if r.error), None),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--per-stream", type=int, default=2, help="requests each of the 16 streams sends in turn")
    args = ap.parse_args()
    config = ROOT / "serve_config.yaml"
    model = first_entry(config, "llm")["name"]
    scenarios = {"free": ["free"] * 16, "constrained": ["constrained"] * 16, "mixed": ["free", "constrained"] * 8}
    rows: dict[str, list[dict]] = {"free": [], "constrained": [], "mixed-free": [], "mixed-constrained": []}
    with tempfile.TemporaryDirectory(prefix="orchard-structured-") as tmp:
        port = free_port()
        server = family_server(config, "llm", port, Path(tmp), tag="-structured")
        base = f"http://127.0.0.1:{port}/v1"
        with server:
            log(f"ready in {server.wait_ready(base, model):.0f}s")
            asyncio.run(load(base, model, ["constrained", "free"], 1, 8))  # warm-up: grammar tokenizer, caches
            for i in range(args.rounds):
                order = list(scenarios) if i % 2 == 0 else list(reversed(scenarios))
                for name in order:
                    res = asyncio.run(load(base, model, scenarios[name], args.per_stream, args.max_tokens))
                    wall = res.pop("wall")  # type: ignore[arg-type]
                    if name == "mixed":
                        rows["mixed-free"].append(summary(res["free"], wall))
                        rows["mixed-constrained"].append(summary(res["constrained"], wall))
                    else:
                        rows[name].append(summary(res[name], wall))
                    log(f"round {i} {name}: " + ", ".join(f"{k} {len(v)}" for k, v in res.items()))
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("aggregate_tok_s", "decode_tok_s_p50", "errors")} for k, v in rows.items()}
    lines = [
        f"# Structured output in the continuous batch — {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"Commit {_git_commit()}; {args.rounds} alternating rounds, medians; 16 streams, {args.max_tokens} tokens each "
        f"(the schema's answer is longer), greedy; load average {os.getloadavg()[0]:.2f}.",
        "",
        "| load | aggregate tok/s | per-stream decode tok/s p50 | errors |",
        "|---|---:|---:|---:|",
    ]
    for k, v in med.items():
        lines.append(f"| {k} | {v['aggregate_tok_s']:.1f} | {v['decode_tok_s_p50']:.2f} | {v['errors']:.0f} |")
    c_ratio = med["constrained"]["decode_tok_s_p50"] / med["free"]["decode_tok_s_p50"]
    m_ratio = med["mixed-free"]["decode_tok_s_p50"] / med["free"]["decode_tok_s_p50"]
    lines += [
        "",
        f"Constrained / free, per-stream decode tok/s: **{c_ratio:.3f}** (target ≥ 0.9). "
        f"Free streams sharing the batch with constrained ones / free alone: **{m_ratio:.3f}** (target ≥ 0.97).",
    ]
    text = "\n".join(lines) + "\n"
    write_report("structured", text, {"rows": rows, "median": med, "constrained_ratio": c_ratio, "mixed_ratio": m_ratio})
    print(text)


if __name__ == "__main__":
    main()
