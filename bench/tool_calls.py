"""Time to the first tool-call delta vs time to the first text token (issue #10), side by
side in one run:

    python -m bench.tool_calls [--rounds 5] [--concurrency 1 8]

On the default LLM (SmolLM2 with Hermes-style tools), streamed chat requests alternate
between ``text`` (no tools: time to the first content delta) and ``tool`` (a forced call to
a two-argument function: time to the delta that carries the call's id and name, to its
first argument fragment, and to the whole call). Each prompt is tagged so the prefix cache
cannot serve one kind better. Reports medians per concurrency and the ratio first tool
delta / first text token. Writes bench/results/tool-calls-<date>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

from bench.compare_llm import ROOT, _git_commit, log
from bench.family_server import family_server, first_entry, write_report
from bench.prompts import tagged
from bench.servers import free_port

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
QUESTIONS = ["What is the weather in Paris?", "Is it raining in Oslo?", "How warm is Rome today?", "Weather in Lima, please."]


async def one(client: httpx.AsyncClient, base: str, model: str, kind: str, n: int) -> dict[str, float | None]:
    body: dict = {"model": model, "stream": True, "temperature": 0, "max_tokens": 48,
                  "messages": [{"role": "user", "content": tagged(QUESTIONS[n % len(QUESTIONS)])}]}
    if kind == "tool":
        body |= {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    marks: dict[str, float | None] = {"first": None, "first_args": None, "done": None}
    t0 = time.perf_counter()
    async with client.stream("POST", f"{base}/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            now = time.perf_counter() - t0
            if kind == "text" and delta.get("content") and marks["first"] is None:
                marks["first"] = now
            for call in delta.get("tool_calls") or []:
                if call.get("function", {}).get("name") and marks["first"] is None:
                    marks["first"] = now
                if call.get("function", {}).get("arguments") and marks["first_args"] is None:
                    marks["first_args"] = now
    marks["done"] = time.perf_counter() - t0
    return marks


async def round_of(base: str, model: str, kind: str, concurrency: int, start: int) -> list[dict]:
    async with httpx.AsyncClient(timeout=300) as client:
        return list(await asyncio.gather(*(one(client, base, model, kind, start + i) for i in range(concurrency))))


def med(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    config = ROOT / "serve_config.yaml"
    model = first_entry(config, "llm")["name"]
    results: dict[str, dict[str, list[dict]]] = {str(c): {"text": [], "tool": []} for c in args.concurrency}
    with tempfile.TemporaryDirectory(prefix="orchard-tools-") as tmp:
        port = free_port()
        server = family_server(config, "llm", port, Path(tmp), tag="-tools")
        base = f"http://127.0.0.1:{port}/v1"
        with server:
            log(f"ready in {server.wait_ready(base, model):.0f}s")
            asyncio.run(round_of(base, model, "tool", 2, 0))  # warm-up: grammar tokenizer
            n = 100
            for i in range(args.rounds):
                for c in args.concurrency:
                    for kind in (["text", "tool"] if i % 2 == 0 else ["tool", "text"]):
                        results[str(c)][kind] += asyncio.run(round_of(base, model, kind, c, n))
                        n += c
                log(f"round {i} done")
    lines = [
        f"# Time to the first tool-call delta — {datetime.now():%Y-%m-%d %H:%M}",
        "",
        f"Commit {_git_commit()}; {args.rounds} alternating rounds, medians in ms; greedy, streamed; "
        f"load average {os.getloadavg()[0]:.2f}.",
        "",
        "| concurrency | first text token | first tool-call delta (id, name) | first argument fragment | whole call | tool / text |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    summary = {}
    for c, rows in results.items():
        text_first, tool_first = med(rows["text"], "first"), med(rows["tool"], "first")
        summary[c] = {"text_first": text_first, "tool_first": tool_first, "tool_first_args": med(rows["tool"], "first_args"),
                      "tool_done": med(rows["tool"], "done"), "ratio": tool_first / text_first}
        s = summary[c]
        lines.append(f"| {c} | {text_first * 1e3:.0f} | {tool_first * 1e3:.0f} | {s['tool_first_args'] * 1e3:.0f} | "
                     f"{s['tool_done'] * 1e3:.0f} | {s['ratio']:.2f} |")
    text = "\n".join(lines) + "\n"
    write_report("tool-calls", text, {"rows": results, "summary": summary})
    print(text)


if __name__ == "__main__":
    main()
