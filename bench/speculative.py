"""Speculative decoding by prompt lookup (issue #11), side by side in one run:

    python -m bench.speculative [--rounds 3] [--tokens 160]

Two engines over the default LLM in this process (no Ray, no HTTP: the same for both),
one plain, one with ``speculative: {method: prompt_lookup}`` (adaptive, as configured by
default). The task: edit a text (rewrite a paragraph with one word replaced), greedy, the
kind of answer that copies most of its prompt. Single-stream tok/s (four prompts one after
another), then 16 streams at once (aggregate tok/s), plain and speculative alternating per round; acceptance (accepted /
drafted tokens) and tokens per step from the engine's stats; the answers must be equal.

Writes bench/results/speculative-<date>.md.
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
from mlx_orchard.engines.speculative import SpeculativeConfig
from mlx_orchard.runtime import mlx_uses_cpu_backend

SUBJECTS = ["lighthouse", "bakery", "library", "harbour", "orchard", "observatory", "market", "school",
            "garden", "railway station", "museum", "farm", "bridge", "castle", "mill", "theatre"]


def task(i: int) -> str:
    place = SUBJECTS[i % len(SUBJECTS)]
    text = (f"Every morning the {place} opened its doors at seven. The people who worked at the {place} "
            f"arrived early, made tea, and talked about the weather. Visitors came to the {place} from the "
            f"nearby villages, and by noon the {place} was full of noise and laughter. In the evening the "
            f"{place} grew quiet again, and the last person to leave switched off the lights.")
    # SmolLM2-135M summarizes a "rewrite" request; it copies (and edits) when asked to repeat.
    return f"Repeat this text exactly, but replace '{place}' with 'tower': {text}"


async def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, int, list[str]]:
    async def one(ids: list[int]) -> tuple[int, str]:
        tokens, parts = 0, []
        async for chunk in engine.generate(ids, params):
            tokens += len(chunk.token_ids)
            parts.append(chunk.text)
        return tokens, "".join(parts)

    t0 = time.perf_counter()
    done = await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - t0, sum(n for n, _ in done), [text for _, text in done]


async def bench(rounds: int, tokens: int, config: SpeculativeConfig) -> dict:
    path = model_dir(ROOT / "serve_config.yaml", dequantize=mlx_uses_cpu_backend())[1]
    common = dict(max_batch_size=16, prefill_batch_size=16, prefix_cache_size=0)
    engines = {"plain": LLMEngine(path, **common), "prompt lookup": LLMEngine(path, **common, speculative=config)}
    params = SamplingParams(max_tokens=tokens, temperature=0)
    prompts = [engines["plain"].encode_chat([{"role": "user", "content": task(i)}]) for i in range(16)]
    results: dict = {name: {"1 stream": [], "16 streams": []} for name in engines}
    answers: dict = {name: {} for name in engines}
    for engine in engines.values():  # warm-up (and the adaptive policy's first measurements)
        await run(engine, prompts[:2], params)
    steps = {name: [0, 0, 0, 0] for name in engines}  # steps, tokens, drafted, accepted
    for r in range(rounds):
        for name in (list(engines) if r % 2 == 0 else list(reversed(engines))):
            engine = engines[name]
            for label, batches in (("1 stream", [[p] for p in prompts[4 * r % 16 :][:4]]), ("16 streams", [prompts])):
                before, seconds, n, texts = engine.stats(), 0.0, 0, []
                for batch in batches:  # 1 stream: four prompts one after another
                    took, count, done = await run(engine, batch, params)
                    seconds, n, texts = seconds + took, n + count, texts + done
                after = engine.stats()
                results[name][label].append(n / seconds)
                answers[name][(label, r)] = texts
                s = steps[name]
                s[0] += after.steps - before.steps
                s[1] += after.generated_tokens - before.generated_tokens
                s[2] += after.draft_tokens - before.draft_tokens
                s[3] += after.accepted_tokens - before.accepted_tokens
        log(f"round {r} done")
    same = answers["plain"] == answers["prompt lookup"]
    for engine in engines.values():
        engine.shutdown()
    return {"results": results, "steps": steps, "same_answers": same}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--draft", type=int, default=SpeculativeConfig.num_draft_tokens, help="num_draft_tokens")
    args = ap.parse_args()
    out = asyncio.run(bench(args.rounds, args.tokens, SpeculativeConfig(num_draft_tokens=args.draft)))
    res, steps = out["results"], out["steps"]
    lines = [f"# Speculative decoding (prompt lookup) — {datetime.now():%Y-%m-%d %H:%M}", "",
             f"Commit {_git_commit()}; {args.rounds} rounds of an edit-this-text task, greedy, {args.tokens} tokens, "
             f"num_draft_tokens {args.draft}; "
             f"load average {os.getloadavg()[0]:.2f}. Answers equal to plain decoding: **{out['same_answers']}**.", "",
             "| engine | 1 stream tok/s | 16 streams tok/s | tokens per step | acceptance |", "|---|---:|---:|---:|---:|"]
    for name in res:
        one, many = statistics.median(res[name]["1 stream"]), statistics.median(res[name]["16 streams"])
        s = steps[name]
        acceptance = f"{s[3] / s[2]:.2f}" if s[2] else "—"
        lines.append(f"| {name} | {one:.1f} | {many:.1f} | {s[1] / max(s[0], 1):.2f} | {acceptance} |")
    ratio = {label: statistics.median(res["prompt lookup"][label]) / statistics.median(res["plain"][label])
             for label in ("1 stream", "16 streams")}
    lines += ["", f"Prompt lookup / plain: **{ratio['1 stream']:.2f}×** at 1 stream (target ≥ 1.5×), "
                  f"**{ratio['16 streams']:.2f}×** at 16 streams (target ≥ 1.2×)."]
    text = "\n".join(lines) + "\n"
    write_report("speculative", text, {**out, "ratio": ratio})
    print(text)


if __name__ == "__main__":
    main()
