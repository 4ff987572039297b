"""Engine depth (issue #11), side by side in one run:

    python -m bench.engine_depth [--rounds 3]

On the default LLM, served twice in one pool (``cached``: prefix cache on; ``nocache``:
off), ``max_batch_size`` 16:

- **agent loop**: a five-turn tool-using conversation (forced call, tool result, answer per
  turn), streamed; TTFT of each model call, turn 5's answer vs turn 1's, cache on and off.
- **vs mlx_lm.server** (``--mlx-lm-server``): one agent conversation is recorded, then its
  answer requests are replayed turn by turn on Orchard (prefix cache on) and on
  mlx_lm.server (its own prompt cache; given the same chat template), TTFT per turn.
- **priority**: 16 background streams (128 tokens) fill the batch; an interactive request
  (8 tokens) every 0.5 s; its TTFT p50 when everything has priority 0, when the background
  has priority 10, and on an idle server. An interactive request shed with 503 (it waited
  longer than ``max_queue_wait_s``) is counted, not timed.

Writes bench/results/engine-depth-<date>.md.
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
import yaml

from bench.compare_llm import ROOT, _git_commit, log
from bench.family_server import family_server, write_report
from bench.prompts import tagged
from bench.servers import free_port
from bench.tool_calls import TOOL

CITIES = ["Paris", "Oslo", "Rome", "Lima", "Cairo"]


async def ttft(client: httpx.AsyncClient, base: str, body: dict) -> tuple[float, dict]:
    """Seconds to the first delta with content or a tool call, and the assembled message."""
    t0, first = time.perf_counter(), None
    message: dict = {"role": "assistant", "content": ""}
    calls: dict[int, dict] = {}
    async with client.stream("POST", f"{base}/chat/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:])["choices"]
            delta = choices[0]["delta"] if choices else {}
            if first is None and (delta.get("content") or delta.get("tool_calls")):
                first = time.perf_counter() - t0
            message["content"] += delta.get("content") or ""
            for d in delta.get("tool_calls") or []:
                call = calls.setdefault(d["index"], {"id": d.get("id"), "type": "function", "function": {"name": "", "arguments": ""}})
                call["function"]["name"] += d.get("function", {}).get("name") or ""
                call["function"]["arguments"] += d.get("function", {}).get("arguments") or ""
    if calls:
        message["tool_calls"] = list(calls.values())
    return first if first is not None else time.perf_counter() - t0, message


async def agent_loop(base: str, model: str, tag: str, record: list | None = None) -> list[float]:
    messages: list[dict] = [{"role": "system", "content": f"{tag} You are a weather assistant. Use the tool."}]
    out = []
    async with httpx.AsyncClient(timeout=300) as client:
        for city in CITIES:
            messages.append({"role": "user", "content": f"What is the weather in {city}?"})
            t, message = await ttft(client, base, {"model": model, "messages": messages, "tools": [TOOL], "tool_choice": "required",
                                                   "parallel_tool_calls": False, "max_tokens": 40, "temperature": 0})
            messages.append(message)
            call_id = message["tool_calls"][0]["id"]
            messages.append({"role": "tool", "tool_call_id": call_id, "content": json.dumps({"temperature": 20})})
            if record is not None:  # the answer request of each turn, to replay on another server
                record.append(json.loads(json.dumps(messages)))
            t2, answer = await ttft(client, base, {"model": model, "messages": messages, "tools": [TOOL], "max_tokens": 12,
                                                   "temperature": 0})
            messages.append({"role": "assistant", "content": answer["content"]})
            out.append(t2)  # the answer turn: its prompt holds everything so far
            del t
    return out


async def replay(base: str, model: str, turns: list[list[dict]]) -> list[float]:
    """TTFT of each recorded answer request, in order (one conversation, as an agent sends it)."""
    async with httpx.AsyncClient(timeout=300) as client:
        return [(await ttft(client, base, {"model": model, "messages": messages, "tools": [TOOL], "max_tokens": 12,
                                           "temperature": 0}))[0] for messages in turns]


async def priority_run(base: str, model: str, background: int, background_priority: int, interactive: int) -> list[float | None]:
    """TTFT of ``interactive`` requests (priority 0) while ``background`` streams run (None: shed)."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        stop = asyncio.Event()

        async def stream() -> None:
            while not stop.is_set():
                try:
                    await ttft(client, base, {"model": model, "max_tokens": 128, "temperature": 0, "priority": background_priority,
                                              "messages": [{"role": "user", "content": tagged("Write a long story about the sea.")}]})
                except httpx.HTTPError:
                    await asyncio.sleep(0.2)  # shed or cut off: the load goes on

        tasks = [asyncio.create_task(stream()) for _ in range(background)]
        await asyncio.sleep(3.0 if tasks else 0)
        times: list[float | None] = []
        for _ in range(interactive):
            try:
                t, _ = await ttft(client, base, {"model": model, "max_tokens": 8, "temperature": 0, "priority": 0,
                                                 "messages": [{"role": "user", "content": tagged("Say hello.")}]})
            except httpx.HTTPStatusError as e:
                if e.response.status_code != 503:
                    raise
                t = None
            times.append(t)
            await asyncio.sleep(0.5)
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return times


def _retag(messages: list[dict], tag: str) -> list[dict]:
    """The conversation under a new system tag: each round starts cold in every cache."""
    return [{**messages[0], "content": f"{tag} {messages[0]['content']}"}, *messages[1:]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--interactive", type=int, default=8, help="interactive requests per priority scenario and round")
    ap.add_argument("--mlx-lm-server", action="store_true",
                    help="also replay the agent loop's answer requests on mlx_lm.server and on Orchard")
    args = ap.parse_args()
    config = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    llm = config["applications"][0]["args"]["llm"][0]
    base_entry = {**llm, "max_batch_size": 16, "prefill_batch_size": 8}
    config["applications"][0]["args"]["llm"] = [{**base_entry, "name": "cached"},
                                                {**base_entry, "name": "nocache", "prefix_cache_size": 0, "aliases": []}]
    agent: dict[str, list[list[float]]] = {"cached": [], "nocache": []}
    prio: dict[str, list[float | None]] = {"idle": [], "no priorities": [], "background priority 10": []}
    peers: dict[str, list[list[float]]] = {"orchard": [], "mlx_lm.server": []}
    with tempfile.TemporaryDirectory(prefix="orchard-depth-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        port = free_port()
        server = family_server(path, "llm", port, Path(tmp), tag="-depth", keep=2)
        base = f"http://127.0.0.1:{port}/v1"
        with server:
            log(f"ready in {server.wait_ready(base, 'cached'):.0f}s")
            asyncio.run(agent_loop(base, "cached", "warm-up"))
            if args.mlx_lm_server:
                recorded: list[list[dict]] = []
                asyncio.run(agent_loop(base, "nocache", "Replayed.", recorded))
                for i in range(args.rounds):
                    peers["orchard"].append(asyncio.run(replay(base, "cached", [_retag(m, f"Replay {i}.") for m in recorded])))
            for i in range(args.rounds):
                for model in (["cached", "nocache"] if i % 2 == 0 else ["nocache", "cached"]):
                    agent[model].append(asyncio.run(agent_loop(base, model, f"Session {i}.")))
                prio["idle"] += asyncio.run(priority_run(base, "cached", 0, 0, args.interactive))
                prio["no priorities"] += asyncio.run(priority_run(base, "cached", 16, 0, args.interactive))
                prio["background priority 10"] += asyncio.run(priority_run(base, "cached", 16, 10, args.interactive))
                log(f"round {i} done")
        if args.mlx_lm_server:
            from bench.compare_llm import mlx_lm_server, model_dir

            port = free_port()
            peer = mlx_lm_server(model_dir(ROOT / "serve_config.yaml")[1], port)
            # The template Orchard renders tools with (SmolLM2's own has none): the same prompts.
            peer.cmd += ["--chat-template", (ROOT / "mlx_orchard" / "templates" / "smollm2-tools.jinja").read_text()]
            with peer:
                peer_base = f"http://127.0.0.1:{port}/v1"
                peer.wait_ready(peer_base, "default_model")
                for i in range(args.rounds):
                    peers["mlx_lm.server"].append(
                        asyncio.run(replay(peer_base, "default_model", [_retag(m, f"Replay {i}.") for m in recorded])))
    lines = [f"# Engine depth — {datetime.now():%Y-%m-%d %H:%M}", "",
             f"Commit {_git_commit()}; {args.rounds} rounds; load average {os.getloadavg()[0]:.2f}.", "",
             "## Agent loop: TTFT of each turn's answer (ms, median over rounds)", "",
             "| prefix cache | " + " | ".join(f"turn {i + 1}" for i in range(len(CITIES))) + " | turn 5 / turn 1 |",
             "|---|" + "---:|" * (len(CITIES) + 1)]
    summary: dict = {}
    for model, runs in agent.items():
        per_turn = [statistics.median(run[t] for run in runs) for t in range(len(CITIES))]
        summary[model] = per_turn
        lines.append(f"| {model} | " + " | ".join(f"{x * 1e3:.0f}" for x in per_turn) + f" | {per_turn[-1] / per_turn[0]:.2f} |")
    lines += ["", "## Interactive TTFT under 16 background streams (batch of 16)", "",
              "| scenario | TTFT p50 ms | p90 ms | shed (503) |", "|---|---:|---:|---:|"]
    for name, results in prio.items():
        times = [t for t in results if t is not None]
        shed = len(results) - len(times)
        if not times:
            lines.append(f"| {name} | — | — | {shed} of {len(results)} |")
            continue
        q = statistics.quantiles(times, n=10) if len(times) > 1 else [times[0]] * 9
        summary[name] = {"p50": statistics.median(times), "p90": q[8], "shed": shed}
        lines.append(f"| {name} | {statistics.median(times) * 1e3:.0f} | {q[8] * 1e3:.0f} | {shed} of {len(results)} |")
    if args.mlx_lm_server:
        lines += ["", "## The same agent conversation replayed: TTFT of each turn's answer (ms, median over rounds)", "",
                  "| server | " + " | ".join(f"turn {i + 1}" for i in range(len(CITIES))) + " | turn 5 / turn 1 |",
                  "|---|" + "---:|" * (len(CITIES) + 1)]
        for name, runs in peers.items():
            per_turn = [statistics.median(run[t] for run in runs) for t in range(len(CITIES))]
            summary[name] = per_turn
            lines.append(f"| {name} | " + " | ".join(f"{x * 1e3:.0f}" for x in per_turn) + f" | {per_turn[-1] / per_turn[0]:.2f} |")
    text = "\n".join(lines) + "\n"
    write_report("engine-depth", text, {"agent": agent, "priority": prio, "peers": peers, "summary": summary})
    print(text)


if __name__ == "__main__":
    main()
