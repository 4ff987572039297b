"""What the processes of a benchmarked server did: CPU seconds per process, and the
threading/BLAS setup of a model replica. Read from /proc, so Linux only."""

from __future__ import annotations

import os
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def name(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    parts = [p.decode(errors="replace") for p in raw.split(b"\0") if p]
    if not parts:
        return "?"
    # Ray renames its workers ("ray::ServeReplica:orchard:ingress"); keep that, else the program.
    if parts[0].startswith("ray::"):
        return parts[0].split()[0]
    prog = Path(parts[0]).name
    if "-c" in parts[1:]:
        return f"{prog} -c"
    mod = next((parts[i + 1] for i, p in enumerate(parts[:-1]) if p == "-m"), None)
    script = next((Path(p).name for p in parts[1:] if p.endswith(".py")), None)
    return " ".join(x for x in (prog, mod or script) if x)


def cpu_seconds(pid: int) -> float:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def snapshot(pids: list[int]) -> dict[int, float]:
    return {pid: cpu_seconds(pid) for pid in pids}


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> list[tuple[str, float]]:
    """CPU seconds spent between two snapshots, summed per process name, largest first."""
    out: dict[str, float] = {}
    for pid, t in after.items():
        out[name(pid)] = out.get(name(pid), 0.0) + t - before.get(pid, 0.0)
    return sorted(((n, s) for n, s in out.items() if s >= 0.05), key=lambda x: -x[1])


def find(pids: list[int], needle: str) -> int | None:
    return next((p for p in pids if needle in name(p)), None)


def replica_setup(pid: int) -> dict[str, object]:
    """Threads, thread-count variables and whether an OpenBLAS is mapped into ``pid``."""
    try:
        env = dict(
            kv.split("=", 1)
            for kv in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
            if "=" in kv
        )
        maps = Path(f"/proc/{pid}/maps").read_text()
        threads = len(os.listdir(f"/proc/{pid}/task"))
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError as e:
        return {"error": str(e)}
    return {
        "pid": pid,
        "threads": threads,
        "nice": int(stat[stat.rindex(")") + 2 :].split()[16]),  # Ray starts workers at 15 by default
        "openblas_mapped": "openblas" in maps,
        **{k: env.get(k) for k in ("LD_PRELOAD", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")},
    }
