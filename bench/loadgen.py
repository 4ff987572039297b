"""Async load generator for any OpenAI-compatible base URL.

Per concurrency level it sends a bounded number of streamed chat completions (greedy,
fixed prompts) through ``concurrency`` workers and reports TTFT, inter-token latency,
aggregate and per-stream throughput, and errors. Token counts come from
``stream_options.include_usage``, so they are exact whatever the server's chunking.

    python -m bench.loadgen --base-url http://127.0.0.1:8000/v1 --model smollm2 --concurrency 1,4,8,16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx

from bench.prompts import LATENCY_PROMPT, PROMPTS, chat_messages, tagged

TIMEOUT = httpx.Timeout(300.0, connect=10.0)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class RequestResult:
    start: float
    end: float = 0.0
    ttft: float | None = None  # seconds to the first non-empty content
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens a server's prompt cache served (usage.prompt_tokens_details)
    content_times: list[float] = field(default_factory=list)  # arrival of each non-empty content chunk
    usage_seen: bool = False
    error: str | None = None

    def token_gaps(self) -> list[float]:
        """Gaps between content chunks, each divided by the tokens a chunk carries on average.

        Servers may coalesce several tokens into one chunk (or hold back partial UTF-8);
        spreading the exact token count over the chunks keeps the number per token.
        """
        t = self.content_times
        if len(t) < 2 or self.completion_tokens < 2:
            return []
        per_chunk = max((self.completion_tokens - 1) / (len(t) - 1), 1.0)
        return [(b - a) / per_chunk for a, b in zip(t, t[1:])]

    def stream_tok_s(self) -> float | None:
        """Tokens over the whole request time, prefill and HTTP included."""
        d = self.end - self.start
        return self.completion_tokens / d if d > 0 and self.completion_tokens else None

    def decode_tok_s(self) -> float | None:
        """Tokens after the first one over the time after the first one."""
        t = self.content_times
        if len(t) < 2 or self.completion_tokens < 2 or t[-1] <= t[0]:
            return None
        return (self.completion_tokens - 1) / (t[-1] - t[0])


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    wall_s: float
    completion_tokens: int
    ttft_p50_s: float
    ttft_p95_s: float
    itl_p50_ms: float
    aggregate_tok_s: float
    stream_tok_s_p50: float
    decode_tok_s_p50: float
    usage_missing: int  # successful requests whose stream had no usage chunk (tokens estimated)
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # served from the server's prompt cache, where it reports that
    first_error: str | None = None


def _summarise(concurrency: int, results: list[RequestResult], wall: float) -> LevelResult:
    ok = [r for r in results if r.error is None]
    errors = [r.error for r in results if r.error is not None]
    tokens = sum(r.completion_tokens for r in ok)

    def p50(xs: list[float | None]) -> float:
        return percentile([x for x in xs if x is not None], 50)

    ttfts = [r.ttft for r in ok if r.ttft is not None]
    return LevelResult(
        concurrency=concurrency,
        requests=len(results),
        errors=len(errors),
        wall_s=wall,
        completion_tokens=tokens,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        itl_p50_ms=1000 * percentile([g for r in ok for g in r.token_gaps()], 50),
        aggregate_tok_s=tokens / wall if wall > 0 else float("nan"),
        stream_tok_s_p50=p50([r.stream_tok_s() for r in ok]),
        decode_tok_s_p50=p50([r.decode_tok_s() for r in ok]),
        usage_missing=sum(not r.usage_seen for r in ok),
        prompt_tokens=sum(r.prompt_tokens for r in ok),
        cached_prompt_tokens=sum(r.cached_tokens for r in ok),
        first_error=errors[0] if errors else None,
    )


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def stream_chat(
    client: httpx.AsyncClient, base_url: str, model: str, prompt: str, max_tokens: int, extra: dict | None = None
) -> RequestResult:
    body = {
        "model": model,
        "messages": chat_messages(prompt),
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    res = RequestResult(start=time.perf_counter())
    chunks = 0
    try:
        async with client.stream("POST", f"{base_url}/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {text[:200]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise RuntimeError(f"stream error: {event['error']}")
                now = time.perf_counter()
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        chunks += 1
                        res.content_times.append(now)
                        if res.ttft is None:
                            res.ttft = now - res.start
                if usage := event.get("usage"):
                    res.usage_seen = True
                    res.completion_tokens = int(usage["completion_tokens"])
                    res.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    res.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    except Exception as e:  # noqa: BLE001 - every failure counts as an error of the level
        res.error = f"{type(e).__name__}: {e}"
    res.end = time.perf_counter()
    if res.error is None and not res.usage_seen:
        res.completion_tokens = chunks  # best effort: one token per chunk
    return res


async def run_level(
    base_url: str,
    model: str,
    concurrency: int,
    n_requests: int,
    *,
    max_tokens: int = 64,
    api_key: str | None = None,
    offset: int = 0,
    unique: bool = True,
) -> LevelResult:
    """``n_requests`` streamed requests through ``concurrency`` workers; prompts rotate from
    ``offset``, each made unique (see ``prompts.tagged``) unless ``unique`` is False."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits, headers=_headers(api_key)) as client:
        todo: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n_requests):
            todo.put_nowait(i)
        results: list[RequestResult] = []

        async def worker() -> None:
            while not todo.empty():
                i = todo.get_nowait()
                prompt = PROMPTS[(offset + i) % len(PROMPTS)]
                prompt = tagged(prompt) if unique else prompt
                results.append(await stream_chat(client, base_url, model, prompt, max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return _summarise(concurrency, results, wall)


def default_requests(concurrency: int) -> int:
    return max(8, 2 * concurrency)


async def run_levels(
    base_url: str,
    model: str,
    levels: list[int],
    *,
    max_tokens: int = 64,
    requests_for=default_requests,
    api_key: str | None = None,
    warmup: bool = True,
    unique: bool = True,
    log=print,
) -> list[LevelResult]:
    if warmup:  # first-request costs (compilation, caches, connections) stay out of the levels
        await run_level(base_url, model, 1, 1, max_tokens=8, api_key=api_key)
    out = []
    for c in levels:
        r = await run_level(
            base_url, model, c, requests_for(c), max_tokens=max_tokens, api_key=api_key, unique=unique
        )
        log(
            f"  c={c:<3} {r.requests} req  {r.aggregate_tok_s:7.1f} tok/s aggregate  "
            f"TTFT p50 {r.ttft_p50_s:.2f}s  ITL p50 {r.itl_p50_ms:.1f} ms  errors {r.errors}"
            + (f"  ({r.first_error})" if r.first_error else "")
        )
        out.append(r)
    return out


async def one_token_latency(
    base_url: str, model: str, *, n: int = 30, warmup: int = 3, api_key: str | None = None, unique: bool = True
) -> dict[str, float]:
    """Sequential non-streamed requests for 1 token: client-side latency in ms."""
    times: list[float] = []
    errors = 0
    async with httpx.AsyncClient(timeout=TIMEOUT, headers=_headers(api_key)) as client:
        for i in range(warmup + n):
            prompt = tagged(LATENCY_PROMPT) if unique else LATENCY_PROMPT
            body = {"model": model, "messages": chat_messages(prompt), "max_tokens": 1, "temperature": 0}
            t0 = time.perf_counter()
            try:
                resp = await client.post(f"{base_url}/chat/completions", json=body)
                resp.raise_for_status()
            except httpx.HTTPError:
                errors += 1
                continue
            if i >= warmup:
                times.append(1000 * (time.perf_counter() - t0))
    return {
        "p50_ms": percentile(times, 50),
        "p95_ms": percentile(times, 95),
        "mean_ms": statistics.fmean(times) if times else float("nan"),
        "n": len(times),
        "errors": errors,
    }


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "n/a"


def format_table(levels: list[LevelResult]) -> str:
    head = (
        "| streams | requests | errors | TTFT p50 (s) | TTFT p95 (s) | ITL p50 (ms/token) "
        "| aggregate tok/s | per-stream tok/s p50 | decode tok/s p50 | prompt tokens cached |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r.concurrency} | {r.requests} | {r.errors} | {r.ttft_p50_s:.2f} | {r.ttft_p95_s:.2f} "
        f"| {r.itl_p50_ms:.1f} | {r.aggregate_tok_s:.1f} | {r.stream_tok_s_p50:.1f} | {r.decode_tok_s_p50:.1f} "
        f"| {_share(r.cached_prompt_tokens, r.prompt_tokens)} |"
        for r in levels
    ]
    return head + "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", default="1,4,8,16", help="comma-separated levels")
    ap.add_argument("--requests", type=int, default=None, help="requests per level (default max(8, 2×c))")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--latency", type=int, default=0, help="also run N sequential 1-token requests")
    ap.add_argument("--json", action="store_true", help="print results as JSON")
    ap.add_argument(
        "--repeat-prompts", action="store_true", help="send the fixed prompts as they are (lets prompt caches hit)"
    )
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    requests_for = (lambda c: args.requests) if args.requests else default_requests
    base = args.base_url.rstrip("/")

    async def run() -> tuple[list[LevelResult], dict[str, float] | None]:
        unique = not args.repeat_prompts
        res = await run_levels(
            base,
            args.model,
            levels,
            max_tokens=args.max_tokens,
            requests_for=requests_for,
            api_key=args.api_key,
            unique=unique,
        )
        lat = None
        if args.latency:
            lat = await one_token_latency(base, args.model, n=args.latency, api_key=args.api_key, unique=unique)
        return res, lat

    results, latency = asyncio.run(run())
    if args.json:
        print(json.dumps({"levels": [asdict(r) for r in results], "one_token": latency}, indent=2))
    else:
        print(format_table(results))
        if latency:
            print(f"\n1-token latency: p50 {latency['p50_ms']:.1f} ms, p95 {latency['p95_ms']:.1f} ms (n={latency['n']})")


if __name__ == "__main__":
    main()
