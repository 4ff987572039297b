"""What Orchard's metrics cost on the token path: the LLM with metrics on vs off, side by side.

    python -m bench.metrics_cost                      # 16 streams, 3 rounds
    python -m bench.metrics_cost --rounds 4 --levels 1,16

The working tree's LLM served twice per round, ``runtime.metrics: false`` (A) then ``true``
(B), alternating which goes first, each driven by the same streamed load
(``bench.loadgen.run_levels``: unique prompts, greedy). Reports aggregate tok/s, per-stream
tok/s, TTFT and the ingress's CPU per token as medians over rounds, and on/off ratios.
Target: aggregate tok/s with metrics on >= 0.99x off. Writes bench/results/metrics-cost-<date>.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.ab_llm import one_round, report
from bench.compare_llm import RESULTS, ROOT, _git_commit
from bench.family_server import write_report


def metrics(on: bool):
    def edit(args: dict) -> None:
        args["runtime"] = {**args.get("runtime", {}), "metrics": on}

    return edit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--levels", default="16")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    RESULTS.joinpath("logs").mkdir(parents=True, exist_ok=True)
    rounds: dict[str, list[dict]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="orchard-metrics-cost-") as tmp:
        for i in range(args.rounds):
            order = (("A", False), ("B", True)) if i % 2 == 0 else (("B", True), ("A", False))
            for side, on in order:
                rounds[side].append(one_round(ROOT, f"metrics-{'on' if on else 'off'}{i}", levels, args.max_tokens,
                                              Path(tmp), metrics(on)))
    text, summary = report(rounds, levels, "", title="Orchard metrics cost",
                           sides=f"A = runtime.metrics false, B = true, working tree at {_git_commit()}")
    write_report("metrics-cost", text, {"summary": summary, "rounds": rounds})
    print(text)


if __name__ == "__main__":
    main()
