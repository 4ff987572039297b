"""Goodput under overload: does Orchard shed load (503 + Retry-After) past its capacity,
or queue without bound until every answer comes too late?

    python -m bench.overload                     # ~8-10 min on 2 cores
    python -m bench.overload --quick             # smoke run, ~4-5 min: 10 s per load
    python -m bench.overload --max-queued 32     # a smaller Serve queue for the LLM
    python -m bench.overload --config my.yaml --loads 0.5,1,2,4 --window 45 --timeout 30

Starts Orchard (``serve run`` of a copy of the config with only its first LLM, as
``compare_llm`` does; ``--max-queued`` / ``--max-ongoing`` rewrite that LLM's
``pools.llm.deployment`` options in the copy), then:

1. **References**: a fixed pool of short chat prompts (``bench.prompts.PROMPTS``, each with
   its own fixed ``Request NNNNN.`` tag), each sent alone, greedy, non-streamed; its answer
   is the reference. The pool is larger than the prefix cache and is used round-robin, so
   no request finds its whole prompt cached.
2. **Capacity**: closed loop, ``--capacity-concurrency`` workers (default: the LLM's
   ``max_batch_size``), a bounded number of requests; capacity = 200 answers / wall s.
3. **Open loop** at each multiple of capacity (``--loads``): Poisson arrivals for
   ``--window`` seconds, each request abandoned by the client after ``--timeout`` s
   (latency counted from its scheduled arrival, so a slow client never hides queueing).
   After the window the level waits for its last answer (at most ``--timeout``), then
   for the server to be idle again (a 1-token probe back near its idle latency).

Per load: offered req/s, goodput (correct answers / seconds from the level's first
arrival to its last answer; correct = HTTP 200 whose text equals the reference of its
prompt), shed (429/503 with Retry-After), errors (other statuses, connection failures,
client timeouts), p50/p99 latency of the 200s, goodput / capacity. Writes
bench/results/overload-<date>.md and .json and prints the report.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import httpx
import yaml

from bench.compare_llm import RESULTS, ROOT, _cpu_model, _git_commit, _load, _versions, log, orchard_server
from bench.family_server import write_report
from bench.loadgen import percentile
from bench.prompts import LATENCY_PROMPT, PROMPTS, chat_messages, tagged
from bench.servers import free_port

STOP_GRACE_S = 8.0  # Serve's graceful shutdown is slow here; the session kill that follows ends it anyway
TAG_BASE = 70_000  # fixed tags of the reference pool (the warm-up/probe prompts get random ones)


# ---- one request ----


@dataclass
class Outcome:
    index: int  # prompt of the pool
    scheduled: float  # seconds from the phase start: the (Poisson) arrival time
    latency: float  # scheduled arrival -> answer (or timeout / failure)
    status: int | None = None  # HTTP status; None for a client timeout or connection failure
    kind: str = "error"  # ok (200) | shed (429/503 with Retry-After) | timeout | error
    text: str | None = None
    finish_reason: str | None = None
    correct: bool = False  # 200 and text == the prompt's reference answer
    valid: bool = False  # 200, non-empty text, finish_reason set
    error: str | None = None

    @property
    def end(self) -> float:
        return self.scheduled + self.latency


def chat_body(model: str, prompt: str, max_tokens: int) -> dict:
    return {"model": model, "messages": chat_messages(prompt), "max_tokens": max_tokens, "temperature": 0}


async def send(
    client: httpx.AsyncClient,
    base: str,
    body: dict,
    *,
    index: int,
    scheduled: float,
    t0: float,
    timeout: float,
    references: dict[int, str] | None = None,
) -> Outcome:
    """One non-streamed chat request; everything that can go wrong becomes the outcome's kind.

    ``t0 + scheduled`` is when the request should have left; the client gives up ``timeout``
    seconds after that (closing the connection, which Serve sees as a disconnect)."""
    start = t0 + scheduled
    out = Outcome(index=index, scheduled=scheduled, latency=0.0)
    try:
        left = max(start + timeout - time.perf_counter(), 0.001)
        resp = await asyncio.wait_for(client.post(f"{base}/chat/completions", json=body), left)
        out.status = resp.status_code
        if resp.status_code == 200:
            choice = resp.json()["choices"][0]
            out.kind = "ok"
            out.text = (choice.get("message") or {}).get("content") or ""
            out.finish_reason = choice.get("finish_reason")
            out.valid = bool(out.text) and out.finish_reason is not None
            out.correct = references is not None and out.text == references.get(index)
        elif resp.status_code in (429, 503) and resp.headers.get("retry-after") is not None:
            out.kind = "shed"
        else:
            out.error = f"HTTP {resp.status_code}: {resp.text[:200]}"
            if resp.status_code in (429, 503):
                out.error = "no Retry-After: " + out.error
    except TimeoutError:
        out.kind, out.error = "timeout", f"no answer within {timeout:g} s"
    except Exception as e:  # noqa: BLE001 - connection failures, bad JSON: errors of the level
        out.error = f"{type(e).__name__}: {e}"
    out.latency = time.perf_counter() - start
    return out


def client(max_connections: int, api_key: str | None) -> httpx.AsyncClient:
    # Open loop: the pool must never make a request wait for a connection (that would hide
    # queueing from the latency); the total per-request bound is asyncio.wait_for's.
    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=64)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=limits, headers=headers)


# ---- the prompts and their greedy answers ----


class Pool:
    """The fixed prompts, used round-robin across all phases (so a prompt comes back only
    after more others than the prefix cache holds)."""

    def __init__(self, size: int, model: str, max_tokens: int):
        self.prompts = [tagged(PROMPTS[i % len(PROMPTS)], TAG_BASE + i) for i in range(size)]
        self.model = model
        self.max_tokens = max_tokens
        self.references: dict[int, str] = {}
        self.finish: dict[int, str | None] = {}
        self._next = 0

    def take(self) -> tuple[int, dict]:
        i = self._next % len(self.prompts)
        self._next += 1
        return i, chat_body(self.model, self.prompts[i], self.max_tokens)


async def record_references(base: str, pool: Pool, api_key: str | None) -> float:
    """Each pool prompt alone, one after another: its greedy answer. Returns the mean seconds."""
    times = []
    async with client(4, api_key) as c:
        for i, prompt in enumerate(pool.prompts):
            t0 = time.perf_counter()
            o = await send(c, base, chat_body(pool.model, prompt, pool.max_tokens), index=i, scheduled=0, t0=t0, timeout=180)
            if o.kind != "ok" or not o.valid:
                raise RuntimeError(f"reference {i} failed: {o.kind} {o.status} {o.error or (o.text, o.finish_reason)}")
            pool.references[i], pool.finish[i] = o.text, o.finish_reason
            times.append(o.latency)
    return sum(times) / len(times)


async def one_token(c: httpx.AsyncClient, base: str, model: str, timeout: float = 30.0) -> Outcome:
    t0 = time.perf_counter()
    return await send(c, base, chat_body(model, tagged(LATENCY_PROMPT), 1), index=-1, scheduled=0, t0=t0, timeout=timeout)


async def flush_prefix_cache(base: str, model: str, n: int, api_key: str | None) -> float:
    """``n`` unique 1-token requests (pushes the pool's prompts out of the prefix cache), then
    the idle 1-token latency: p50 of 3 sequential requests."""
    async with client(max(n, 4), api_key) as c:
        await asyncio.gather(*(one_token(c, base, model) for _ in range(n)))
        lat = [(await one_token(c, base, model)).latency for _ in range(3)]
    return percentile(lat, 50)


async def settle(base: str, model: str, idle_s: float, limit_s: float, api_key: str | None) -> float:
    """Seconds until a 1-token request answers (200) within max(3 × idle, idle + 0.5 s):
    abandoned requests the server still works on would otherwise slow the next level."""
    t0 = time.perf_counter()
    async with client(4, api_key) as c:
        while time.perf_counter() - t0 < limit_s:
            o = await one_token(c, base, model, timeout=max(limit_s - (time.perf_counter() - t0), 1.0))
            if o.kind == "ok" and o.latency <= max(3 * idle_s, idle_s + 0.5):
                break
            await asyncio.sleep(1.0)
    return time.perf_counter() - t0


# ---- the phases ----


async def closed_loop(base: str, pool: Pool, concurrency: int, n: int, timeout: float, api_key: str | None):
    """``n`` requests through ``concurrency`` workers. Returns (outcomes, wall s)."""
    outcomes: list[Outcome] = []
    left = [n]
    async with client(concurrency + 4, api_key) as c:
        t0 = time.perf_counter()

        async def worker() -> None:
            while left[0] > 0:
                left[0] -= 1
                i, body = pool.take()
                sched = time.perf_counter() - t0
                outcomes.append(
                    await send(c, base, body, index=i, scheduled=sched, t0=t0, timeout=timeout, references=pool.references)
                )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return outcomes, wall


def poisson_arrivals(rate: float, window: float, rng: random.Random, cap: int) -> list[float]:
    times, t = [], 0.0
    while len(times) < cap:
        t += rng.expovariate(rate)
        if t >= window:
            break
        times.append(t)
    return times


async def open_loop(base: str, pool: Pool, arrivals: list[float], window: float, timeout: float, api_key: str | None):
    """One request at each arrival time, whatever is still in flight. Returns (outcomes, the
    most requests in flight at once, seconds from the start to the last answer, at least ``window``)."""
    in_flight = [0, 0]  # now, peak

    async with client(len(arrivals) + 4, api_key) as c:
        t0 = time.perf_counter()

        async def one(sched: float, i: int, body: dict) -> Outcome:
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
            try:
                return await send(c, base, body, index=i, scheduled=sched, t0=t0, timeout=timeout, references=pool.references)
            finally:
                in_flight[0] -= 1

        tasks = []
        for sched in arrivals:
            delay = t0 + sched - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            i, body = pool.take()
            tasks.append(asyncio.create_task(one(sched, i, body)))
        outcomes = list(await asyncio.gather(*tasks))
    span = max(window, max((o.end for o in outcomes), default=0.0))
    return outcomes, in_flight[1], span


@dataclass
class LevelSummary:
    load: float  # multiple of capacity
    target_rps: float
    offered_rps: float  # requests sent / window
    window_s: float
    span_s: float  # first arrival (level start) -> last answer
    sent: int
    ok: int  # HTTP 200
    correct: int  # 200 with the reference text
    valid: int  # 200, non-empty, finish_reason set
    shed: int
    timeouts: int
    errors: int  # other statuses, connection failures (timeouts not included)
    goodput_rps: float
    goodput_ratio: float  # goodput / capacity
    p50_s: float  # latency of the 200s
    p99_s: float
    peak_in_flight: int
    settle_s: float = 0.0
    first_error: str | None = None


def summarise(load: float, target: float, window: float, span: float, outcomes: list[Outcome], capacity: float, peak: int) -> LevelSummary:
    ok = [o for o in outcomes if o.kind == "ok"]
    correct = sum(o.correct for o in ok)
    lat = [o.latency for o in ok]
    errors = [o for o in outcomes if o.kind == "error"]
    firsts = [o.error for o in outcomes if o.error and o.kind != "timeout"]
    goodput = correct / span if span > 0 else float("nan")
    return LevelSummary(
        load=load,
        target_rps=target,
        offered_rps=len(outcomes) / window,
        window_s=window,
        span_s=span,
        sent=len(outcomes),
        ok=len(ok),
        correct=correct,
        valid=sum(o.valid for o in ok),
        shed=sum(o.kind == "shed" for o in outcomes),
        timeouts=sum(o.kind == "timeout" for o in outcomes),
        errors=len(errors),
        goodput_rps=goodput,
        goodput_ratio=goodput / capacity if capacity else float("nan"),
        p50_s=percentile(lat, 50),
        p99_s=percentile(lat, 99),
        peak_in_flight=peak,
        first_error=firsts[0] if firsts else None,
    )


def _outcome_rows(outcomes: list[Outcome]) -> list[dict]:
    """Per request, for the JSON (no text: the references hold it)."""
    return [
        {
            "i": o.index,
            "t": round(o.scheduled, 3),
            "latency": round(o.latency, 3),
            "status": o.status,
            "kind": o.kind,
            "correct": o.correct,
            **({"finish_reason": o.finish_reason} if o.kind == "ok" else {}),
            **({"error": o.error} if o.error and o.kind == "error" else {}),
        }
        for o in sorted(outcomes, key=lambda o: o.scheduled)
    ]


# ---- the server ----


def llm_entry(config_path: Path) -> dict:
    return yaml.safe_load(config_path.read_text())["applications"][0]["args"]["llm"][0]


def write_config(src: Path, dst: Path, max_queued: int | None, max_ongoing: int | None) -> dict:
    """A copy of ``src`` with the LLM pool's Serve queue limits replaced; returns its deployment options."""
    config = yaml.safe_load(src.read_text())
    pools = config["applications"][0]["args"].setdefault("pools", {})
    dep = pools.setdefault("llm", {}).setdefault("deployment", {})
    if max_queued is not None:
        dep["max_queued_requests"] = max_queued
    if max_ongoing is not None:
        dep["max_ongoing_requests"] = max_ongoing
    dst.write_text(yaml.safe_dump(config, sort_keys=False))
    return dep


# ---- the report ----


def format_table(levels: list[LevelSummary]) -> str:
    head = (
        "| load | offered req/s | sent | 200 | correct | goodput req/s | goodput / capacity | shed (503/429) "
        "| errors | timeouts | p50 200 (s) | p99 200 (s) | peak in flight | level s |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r.load:g}× | {r.offered_rps:.2f} | {r.sent} | {r.ok} | {r.correct} | {r.goodput_rps:.2f} "
        f"| {r.goodput_ratio:.2f} | {r.shed} | {r.errors} | {r.timeouts} | {r.p50_s:.2f} | {r.p99_s:.2f} "
        f"| {r.peak_in_flight} | {r.span_s:.0f} |"
        for r in levels
    ]
    return head + "\n".join(rows)


def render(res: dict) -> str:
    m, cap = res["meta"], res["capacity"]
    levels = [LevelSummary(**x) for x in res["levels"]]
    dep = m["llm_deployment"]
    lines = [
        f"# Overload benchmark, {m['date']}",
        "",
        f"- machine: {m['machine']}",
        f"- load average (1/5/15 min): before {m['load_before']}, after {m['load_after']}",
        f"- versions: {m['versions']}; Orchard commit {m['commit']}",
        f"- config: `{m['config']}`, first LLM `{m['model']}`: max_batch_size {m['max_batch_size']}, "
        f"max_ongoing_requests {dep.get('max_ongoing_requests', 'default')}, "
        f"max_queued_requests {dep.get('max_queued_requests', 'default (-1: unbounded)')}"
        + (f" (overridden: {m['overrides']})" if m["overrides"] else ""),
        f"- mode: {'quick' if m['quick'] else 'full'}; request: non-streamed chat, temperature 0, "
        f"max_tokens {m['max_tokens']}, {m['pool']} fixed prompts round-robin; window {m['window_s']:g} s per load, "
        f"client timeout {m['timeout_s']:g} s; wall time {m['wall_s']:.0f} s",
        "",
        f"References (each prompt alone): {m['pool']} answers, mean {res['reference_s']:.2f} s each, "
        f"finish reasons {res['reference_finish']}. Idle 1-token latency {1000 * res['idle_1tok_s']:.0f} ms.",
        "",
        f"**Capacity** (closed loop, {cap['concurrency']} concurrent, {cap['sent']} requests): "
        f"**{cap['capacity_rps']:.2f} req/s** ({cap['ok']} × 200 in {cap['wall_s']:.1f} s; "
        f"{cap['correct']} equal to their reference; latency p50 {cap['p50_s']:.2f} s, p99 {cap['p99_s']:.2f} s; "
        f"{cap['shed']} shed, {cap['errors']} errors, {cap['timeouts']} timeouts).",
        "",
        format_table(levels),
        "",
        "goodput = answers equal to their prompt's reference / level s (first arrival → last answer, "
        "≥ the window); latency is from the scheduled arrival.",
    ]
    errs = [f"{r.load:g}×: {r.first_error}" for r in levels if r.first_error]
    if errs:
        lines += ["", "First error per load: " + "; ".join(errs)]
    lines += ["", "Settle after each load (s until a 1-token probe is back near idle): "
              + ", ".join(f"{r.load:g}× {r.settle_s:.1f}" for r in levels)]
    over = [r for r in levels if r.load > 1]
    if over:
        worst = min(over, key=lambda r: r.goodput_ratio)
        shed = sum(r.shed for r in over)
        lines += [
            "",
            f"Past capacity: lowest goodput / capacity {worst.goodput_ratio:.2f} (at {worst.load:g}×); "
            f"{shed} requests shed, {sum(r.timeouts for r in over)} client timeouts.",
        ]
    return "\n".join(lines) + "\n"


# ---- main ----


def _commit() -> str:
    """The commit, and whether the tree the server runs from differs from it."""
    import subprocess

    out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True)
    changed = len(out.stdout.splitlines())
    return _git_commit() + (f" + uncommitted changes in {changed} files" if changed else "")


async def run_phases(args, base: str, model: str, pool: Pool, res: dict) -> None:
    log(f"references: {len(pool.prompts)} prompts, one at a time ...")
    res["reference_s"] = await record_references(base, pool, args.api_key)
    res["reference_finish"] = {
        k: sum(1 for f in pool.finish.values() if f == k) for k in sorted({str(f) for f in pool.finish.values()})
    }
    log(f"  mean {res['reference_s']:.2f} s per answer; finish reasons {res['reference_finish']}")
    idle = await flush_prefix_cache(base, model, args.prefix_cache_size + 4, args.api_key)
    res["idle_1tok_s"] = idle
    log(f"  idle 1-token latency {1000 * idle:.0f} ms")

    c = args.capacity_concurrency
    n = args.capacity_requests or (2 if args.quick else 3) * c
    log(f"capacity: closed loop, {c} concurrent, {n} requests ...")
    outs, wall = await closed_loop(base, pool, c, n, args.timeout_capacity, args.api_key)
    ok = [o for o in outs if o.kind == "ok"]
    capacity = len(ok) / wall
    lat = [o.latency for o in ok]
    res["capacity"] = {
        "concurrency": c,
        "sent": len(outs),
        "ok": len(ok),
        "correct": sum(o.correct for o in ok),
        "shed": sum(o.kind == "shed" for o in outs),
        "errors": sum(o.kind == "error" for o in outs),
        "timeouts": sum(o.kind == "timeout" for o in outs),
        "wall_s": wall,
        "capacity_rps": capacity,
        "p50_s": percentile(lat, 50),
        "p99_s": percentile(lat, 99),
        "requests": _outcome_rows(outs),
    }
    log(f"  {capacity:.2f} req/s ({len(ok)} × 200 in {wall:.1f} s, {res['capacity']['correct']} equal to reference)")
    if capacity <= 0:
        raise RuntimeError("no request succeeded in the capacity phase")
    res["capacity"]["settle_s"] = await settle(base, model, idle, args.settle, args.api_key)

    res["levels"], res["requests"] = [], {}
    for k, load in enumerate(args.loads):
        rate = load * capacity
        arrivals = poisson_arrivals(rate, args.window, random.Random(args.seed + k), args.max_requests)
        log(f"load {load:g}×: {rate:.2f} req/s for {args.window:g} s ({len(arrivals)} arrivals) ...")
        outs, peak, span = await open_loop(base, pool, arrivals, args.window, args.timeout, args.api_key)
        s = summarise(load, rate, args.window, span, outs, capacity, peak)
        s.settle_s = await settle(base, model, idle, args.settle, args.api_key)
        log(
            f"  goodput {s.goodput_rps:.2f} req/s ({s.goodput_ratio:.2f}× capacity), 200 {s.ok} (correct {s.correct}), "
            f"shed {s.shed}, errors {s.errors}, timeouts {s.timeouts}, p50 {s.p50_s:.2f} s p99 {s.p99_s:.2f} s, "
            f"peak in flight {peak}, settled in {s.settle_s:.1f} s"
            + (f"  ({s.first_error})" if s.first_error else "")
        )
        res["levels"].append(asdict(s))
        res["requests"][f"{load:g}"] = _outcome_rows(outs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml")
    ap.add_argument("--quick", action="store_true", help="short windows and timeouts, fewer capacity requests")
    ap.add_argument("--max-queued", type=int, default=None, help="LLM deployment.max_queued_requests in the run's config copy")
    ap.add_argument("--max-ongoing", type=int, default=None, help="LLM deployment.max_ongoing_requests in the copy")
    ap.add_argument("--loads", default="0.5,1,2,3,4", help="multiples of the measured capacity")
    ap.add_argument("--window", type=float, default=None, help="seconds of arrivals per load (default 40, quick 10)")
    ap.add_argument("--timeout", type=float, default=None, help="client timeout per request, s (default 30, quick 15)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--pool", type=int, default=None, help="fixed prompts (default: prefix_cache_size + 8)")
    ap.add_argument("--capacity-concurrency", type=int, default=None, help="default: the LLM's max_batch_size")
    ap.add_argument("--capacity-requests", type=int, default=None, help="default 3 × concurrency (quick 2 ×)")
    ap.add_argument("--max-requests", type=int, default=2000, help="cap on arrivals per load")
    ap.add_argument("--settle", type=float, default=None, help="longest wait for an idle server between loads, s")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--api-key", default=os.environ.get("ORCHARD_API_KEY"))
    args = ap.parse_args(argv)
    args.loads = [float(x) for x in args.loads.split(",") if x.strip()]
    args.window = args.window or (10.0 if args.quick else 40.0)
    args.timeout = args.timeout or (15.0 if args.quick else 30.0)
    args.settle = args.settle or (20.0 if args.quick else 60.0)
    args.timeout_capacity = max(args.timeout, 120.0)  # the closed loop never overloads: no timeouts wanted
    entry = llm_entry(args.config)
    model = entry["name"]
    args.prefix_cache_size = int(entry.get("prefix_cache_size", 16))
    args.pool = args.pool or args.prefix_cache_size + 8
    args.capacity_concurrency = args.capacity_concurrency or int(entry.get("max_batch_size", 32))
    if min(args.loads, default=1) <= 0 or args.window <= 0 or args.timeout <= 0:
        ap.error("loads, --window and --timeout must be positive")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the server is stopped on the way out

    t0 = time.perf_counter()
    overrides = {k: v for k, v in (("max_queued_requests", args.max_queued), ("max_ongoing_requests", args.max_ongoing)) if v is not None}
    res: dict = {
        "meta": {
            "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": f"{os.cpu_count()} cores, {_cpu_model()}, {platform.system()} {platform.machine()}",
            "load_before": _load(),
            "versions": _versions(),
            "commit": _commit(),
            "config": str(args.config),
            "model": model,
            "max_batch_size": entry.get("max_batch_size"),
            "overrides": overrides,
            "quick": args.quick,
            "max_tokens": args.max_tokens,
            "pool": args.pool,
            "window_s": args.window,
            "timeout_s": args.timeout,
            "loads": args.loads,
            "seed": args.seed,
        }
    }
    log(f"load average {res['meta']['load_before']}")
    with tempfile.TemporaryDirectory(prefix="orchard-overload-") as tmp:
        cfg = Path(tmp) / "overload-source.yaml"
        res["meta"]["llm_deployment"] = write_config(args.config, cfg, args.max_queued, args.max_ongoing)
        port = free_port()
        server = orchard_server(cfg, port, Path(tmp))  # only the first LLM, throughput-optimized Serve
        server.log_path = RESULTS / "logs" / "orchard-overload.log"
        venv_serve = Path(sys.executable).with_name("serve")  # works without an activated venv too
        if venv_serve.exists():
            server.cmd[0] = str(venv_serve)
            server.env["PATH"] = f"{venv_serve.parent}{os.pathsep}{server.env.get('PATH', '')}"
        base = f"http://127.0.0.1:{port}/v1"
        server.start()
        try:
            ready = server.wait_ready(base, model)
            log(f"Orchard ready in {ready:.0f} s on port {port} ({res['meta']['llm_deployment']})")
            pool = Pool(args.pool, model, args.max_tokens)
            asyncio.run(run_phases(args, base, model, pool, res))
            res["references"] = [
                {"prompt": p, "answer": pool.references[i], "finish_reason": pool.finish[i]}
                for i, p in enumerate(pool.prompts)
            ]
        finally:
            server.stop(grace=STOP_GRACE_S)
    res["meta"]["load_after"] = _load()
    res["meta"]["wall_s"] = time.perf_counter() - t0

    report = render(res)
    path = write_report("overload", report, res)
    print(report)
    log(f"wrote {path} and .json")


if __name__ == "__main__":
    main()
