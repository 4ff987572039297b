"""Quantized KV cache inside the continuous batch (issue #11), side by side in one run:

    python -m bench.kv_quant [--rounds 2] [--tokens 128]

Engines over the default LLM in this process (no Ray, no HTTP: the same for each), with the
same fixed KV-cache budget (``kv_cache_gb``: room for 4 full-precision sequences of this
prompt + max_tokens) and ``max_batch_size`` 32: full precision, ``kv_bits: 8`` and
``kv_bits: 4``. 32 requests arrive at once; the engine admits what its budget holds and
queues the rest. Reported: KV bytes per token (what admission counts), most sequences
running at once, aggregate tok/s over all 32, and whether the canary (greedy "capital of
France") still says Paris. Then the cost per token: 16 requests on engines with no budget
(all run at once whatever the bits), aggregate tok/s.

Writes bench/results/kv-quant-<date>.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from datetime import datetime

from bench.compare_llm import ROOT, _git_commit, log, model_dir
from bench.family_server import write_report
from mlx_orchard.engines.llm import LLMEngine
from mlx_orchard.engines.sampling import SamplingParams
from mlx_orchard.runtime import mlx_uses_cpu_backend

SETTINGS = {"full precision": None, "kv_bits 8": 8, "kv_bits 4": 4}


async def load(engine: LLMEngine, prompt: list[int], n: int, params: SamplingParams) -> tuple[float, int, int]:
    """Seconds for n requests at once, tokens generated, most sequences running at once."""
    peak = 0

    async def one() -> int:
        return sum([len(c.token_ids) async for c in engine.generate(prompt, params)])

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, engine.stats().running)
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    t0 = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one() for _ in range(n))))
    seconds = time.perf_counter() - t0
    watcher.cancel()
    return seconds, tokens, peak


async def bench(rounds: int, tokens: int) -> dict:
    path = model_dir(ROOT / "serve_config.yaml", dequantize=mlx_uses_cpu_backend())[1]
    params = SamplingParams(max_tokens=tokens, temperature=0)
    probe = LLMEngine(path, prefix_cache_size=0)
    prompt = probe.encode_chat([{"role": "user", "content": "Write a long story about a dragon who learns to sing."}])
    canary = probe.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    budget = 4 * (len(prompt) + tokens) * probe.kv_bytes_per_token
    probe.shutdown()
    out: dict = {"budget_bytes": budget, "settings": {}}
    engines = {name: LLMEngine(path, max_batch_size=32, prefill_batch_size=8, prefix_cache_size=0,
                               kv_cache_bytes=budget, max_queue_wait_s=None, kv_bits=bits)
               for name, bits in SETTINGS.items()}
    for name, engine in engines.items():
        answer = "".join([c.text async for c in engine.generate(canary, SamplingParams(max_tokens=12, temperature=0))])
        out["settings"][name] = {"bytes_per_token": engine.kv_bytes_per_token, "canary": answer, "tok_s": [], "peak": [],
                                 "unbounded_tok_s": []}
    unbounded = {name: LLMEngine(path, max_batch_size=32, prefill_batch_size=16, prefix_cache_size=0, kv_bits=bits)
                 for name, bits in SETTINGS.items()}
    for r in range(rounds):
        for name in (list(engines) if r % 2 == 0 else list(reversed(engines))):
            seconds, count, peak = await load(engines[name], prompt, 32, params)
            out["settings"][name]["tok_s"].append(count / seconds)
            out["settings"][name]["peak"].append(peak)
            seconds, count, _ = await load(unbounded[name], prompt, 16, params)
            out["settings"][name]["unbounded_tok_s"].append(count / seconds)
        log(f"round {r} done")
    for engine in [*engines.values(), *unbounded.values()]:
        engine.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args()
    out = asyncio.run(bench(args.rounds, args.tokens))
    base = out["settings"]["full precision"]
    lines = [f"# Quantized KV cache in the batch — {datetime.now():%Y-%m-%d %H:%M}", "",
             f"Commit {_git_commit()}; {args.rounds} rounds; 32 requests at once, {args.tokens} tokens each, greedy; "
             f"KV budget {out['budget_bytes'] / 2**20:.1f} MiB (4 full-precision sequences); load average "
             f"{os.getloadavg()[0]:.2f}.", "",
             "| KV cache | bytes / token | most running at once | vs full | aggregate tok/s | vs full | "
             "16 at once, no budget: tok/s | vs full | canary |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, s in out["settings"].items():
        peak, rate = max(s["peak"]), statistics.median(s["tok_s"])
        lines.append(f"| {name} | {s['bytes_per_token']} | {peak} | {peak / max(base['peak']):.2f}× | {rate:.1f} | "
                     f"{rate / statistics.median(base['tok_s']):.2f}× | {statistics.median(s['unbounded_tok_s']):.1f} | "
                     f"{statistics.median(s['unbounded_tok_s']) / statistics.median(base['unbounded_tok_s']):.2f}× | "
                     f"{s['canary'].strip()[:40]!r} |")
    text = "\n".join(lines) + "\n"
    write_report("kv-quant", text, out)
    print(text)


if __name__ == "__main__":
    main()
