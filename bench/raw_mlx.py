"""In-process mlx-lm baselines, run as their own process and answered as JSON on stdout.

``compare_llm`` starts this module with ``LD_PRELOAD`` set to the BLAS that Orchard
preloads into its replicas (a preload only takes effect at process start), so the
baselines multiply matrices exactly as the servers do.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \
        python -m bench.raw_mlx --model <mlx dir> --streams 4 --batch 16 --latency 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench.loadgen import percentile
from bench.prompts import LATENCY_PROMPT, PROMPTS, chat_messages, tagged


def _chat_ids(tokenizer, prompt: str) -> list[int]:
    # Tagged like the load generator's requests, so prompts have the same length.
    ids = tokenizer.apply_chat_template(chat_messages(tagged(prompt)), add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def single_stream(model, tokenizer, n_prompts: int, max_tokens: int) -> dict[str, float]:
    """``stream_generate`` one prompt at a time: decode and end-to-end tok/s, medians over prompts."""
    from mlx_lm import stream_generate

    decode, e2e, prefill_ms = [], [], []
    list(stream_generate(model, tokenizer, _chat_ids(tokenizer, PROMPTS[0]), max_tokens=8))  # warm-up
    for prompt in PROMPTS[:n_prompts]:
        ids = _chat_ids(tokenizer, prompt)
        t0 = time.perf_counter()
        first = last = None
        for r in stream_generate(model, tokenizer, ids, max_tokens=max_tokens):
            first = first or time.perf_counter()
            last = r
        wall = time.perf_counter() - t0
        decode.append(last.generation_tps)
        e2e.append(last.generation_tokens / wall)
        prefill_ms.append(1000 * (first - t0))
    return {
        "decode_tok_s": percentile(decode, 50),
        "e2e_tok_s": percentile(e2e, 50),
        "ttft_ms": percentile(prefill_ms, 50),
        "prompts": n_prompts,
    }


def batch_generate(model, tokenizer, n: int, max_tokens: int) -> dict[str, float]:
    """``BatchGenerator`` with ``n`` sequences inserted at once: aggregate tok/s until all finish."""
    from mlx_lm.generate import BatchGenerator

    prompts = [_chat_ids(tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(n)]
    stop = [[t] for t in tokenizer.eos_token_ids]

    def run(batch: list[list[int]], tokens: int) -> tuple[int, float]:
        gen = BatchGenerator(model, stop_tokens=stop, completion_batch_size=max(n, 1), prefill_batch_size=n)
        t0 = time.perf_counter()
        gen.insert(batch, max_tokens=[tokens] * len(batch))
        pending, count = len(batch), 0
        while pending:
            _, responses = gen.next()
            for r in responses:
                count += 1
                pending -= r.finish_reason is not None
        wall = time.perf_counter() - t0
        gen.close()
        return count, wall

    run(prompts[:2], 4)  # warm-up
    count, wall = run(prompts, max_tokens)
    return {"sequences": n, "tokens": count, "wall_s": wall, "aggregate_tok_s": count / wall}


def one_token(model, tokenizer, n: int) -> dict[str, float]:
    """Prefill + 1 token of the latency prompt, template and detokenization included, in ms.

    Measured twice: through ``stream_generate`` and through a one-sequence
    ``BatchGenerator`` (the path Orchard's engine takes).
    """
    from mlx_lm import stream_generate
    from mlx_lm.generate import BatchGenerator

    stop = [[t] for t in tokenizer.eos_token_ids]

    def via_stream() -> None:
        ids = _chat_ids(tokenizer, LATENCY_PROMPT)
        for _ in stream_generate(model, tokenizer, ids, max_tokens=1):
            pass

    gen = BatchGenerator(model, stop_tokens=stop)

    def via_batch() -> None:
        ids = _chat_ids(tokenizer, LATENCY_PROMPT)
        gen.insert([ids], max_tokens=[1])
        while True:
            _, responses = gen.next()
            if any(r.finish_reason for r in responses):
                tokenizer.decode([r.token for r in responses])
                return

    out: dict[str, float] = {"n": n}
    for name, fn in (("stream_generate", via_stream), ("batch_generator", via_batch)):
        for _ in range(3):
            fn()
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
        out[f"{name}_p50_ms"] = percentile(times, 50)
    gen.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="an MLX model directory")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--streams", type=int, default=4, help="prompts for the single-stream median (0: skip)")
    ap.add_argument("--batch", type=int, default=16, help="sequences for BatchGenerator (0: skip)")
    ap.add_argument("--latency", type=int, default=30, help="1-token repetitions (0: skip)")
    args = ap.parse_args(argv)

    import mlx.core as mx
    from mlx_lm import load

    model, tokenizer = load(args.model)
    out: dict[str, object] = {
        "ld_preload": os.environ.get("LD_PRELOAD"),
        "device": str(mx.default_device()),
    }
    if args.streams:
        out["stream_generate"] = single_stream(model, tokenizer, args.streams, args.max_tokens)
        out["batch_generator_1"] = batch_generate(model, tokenizer, 1, args.max_tokens)
    if args.batch:
        out["batch_generator"] = batch_generate(model, tokenizer, args.batch, args.max_tokens)
    if args.latency:
        out["one_token"] = one_token(model, tokenizer, args.latency)
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
