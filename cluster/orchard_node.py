"""Start Ray on one Mac of an Orchard cluster, declaring what the Mac can hold.

    python cluster/orchard_node.py head                       # on the Mac that serves the endpoint
    python cluster/orchard_node.py worker --address HEAD_IP   # on every other Mac
    python cluster/orchard_node.py resources                  # print what would be declared

Ray sees an Apple Silicon Mac as CPUs plus one GPU and does not bound Metal memory,
so each node declares a custom resource ``unified_memory_gb`` (total memory minus a
reserve for macOS and other apps) and replicas ask for the GB their model needs. Labels
(``orchard/chip``, ``orchard/memory-gb``, ...) say which Mac is which, for the dashboard,
``GET /v1/cluster`` and label selectors.

Ray starts with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 (macOS refuses multi-node without
it) and an explicit RAY_AUTH_MODE (``--auth token`` by default: every Mac needs the
head's ~/.ray/auth_token). Flags this script does not know are passed to ``ray start`` unchanged
(``--node-ip-address``, ``--num-cpus``, ``--autoscaling-config=...``, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

GIB = 1024**3
RAY_PORT = 6379
# macOS itself, the window server and the user's apps live in the reserve; on a Linux
# test box or server little else runs.
DEFAULT_RESERVE_GB = {"Darwin": 8, "other": 2}
# Ray refuses multi-node on macOS without the first; the second keeps model replicas at
# normal priority (Ray starts workers at nice 15 otherwise).
CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_worker_niceness": "0"}
# Ray 2.60 turns token auth on for a head that finds ~/.ray/auth_token (a local
# `serve run` writes one) but never for a joining node, which is then refused. So we
# set the mode explicitly on every node; "token" needs the same token on every Mac.
AUTH_MODES = ("token", "disabled")

# Fixed ports for firewalls (--pin-ports); Ray picks random ones otherwise.
PINNED_PORTS = {
    "--node-manager-port": 6380,
    "--object-manager-port": 6381,
    "--runtime-env-agent-port": 6382,
    "--dashboard-agent-grpc-port": 6383,
    "--metrics-export-port": 6384,
    "--dashboard-agent-listen-port": 52365,
    "--min-worker-port": 10002,
    "--max-worker-port": 10199,
}


@dataclass(frozen=True)
class Machine:
    chip: str  # "Apple M2 Pro", or the CPU model name off macOS
    memory_bytes: int
    performance_cores: int | None  # Apple Silicon P-cores; None where unknown
    is_mac: bool


def parse_sysctl(brand: str, memsize: str, perf_cores: str | None = None) -> Machine:
    """macOS: the outputs of `sysctl -n machdep.cpu.brand_string / hw.memsize /
    hw.perflevel0.physicalcpu` (the last is absent on Intel Macs)."""
    cores = (perf_cores or "").strip()
    return Machine(
        chip=brand.strip() or "unknown",
        memory_bytes=int(memsize.strip()),
        performance_cores=int(cores) if cores.isdigit() else None,
        is_mac=True,
    )


def parse_proc(cpuinfo: str, meminfo: str) -> Machine:
    """Linux: /proc/cpuinfo and /proc/meminfo (MemTotal is in KiB)."""
    chip = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
         if line.split(":", 1)[0].strip() == "model name"),
        platform.machine() or "unknown",  # arm64 Linux has no "model name"
    )
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", meminfo, re.MULTILINE)
    if not match:
        raise ValueError("no MemTotal line in /proc/meminfo")
    return Machine(chip=chip, memory_bytes=int(match.group(1)) * 1024, performance_cores=None, is_mac=False)


def _sysctl(key: str) -> str | None:
    try:
        return subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def detect() -> Machine:
    if platform.system() == "Darwin":
        return parse_sysctl(
            _sysctl("machdep.cpu.brand_string") or "", _sysctl("hw.memsize") or "0",
            _sysctl("hw.perflevel0.physicalcpu"),
        )
    return parse_proc(Path("/proc/cpuinfo").read_text(), Path("/proc/meminfo").read_text())


def default_reserve_gb(system: str | None = None) -> float:
    if (env := os.environ.get("ORCHARD_RESERVE_GB")) is not None:
        return float(env)
    return DEFAULT_RESERVE_GB["Darwin" if (system or platform.system()) == "Darwin" else "other"]


def slug(text: str) -> str:
    """A Ray label value: lowercase alphanumerics and dashes, at most 63 characters."""
    value = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return value[:63].rstrip("-") or "unknown"


def usable_memory_gb(memory_bytes: int, reserve_gb: float) -> int:
    # Whole GB: Ray rejects fractional resource amounts above 1.
    return max(0, int(memory_bytes / GIB - reserve_gb))


def node_resources(machine: Machine, reserve_gb: float) -> dict[str, int]:
    resources = {"unified_memory_gb": usable_memory_gb(machine.memory_bytes, reserve_gb)}
    if machine.is_mac:
        resources["mac"] = 1
    return resources


def node_labels(machine: Machine, role: str | None = None) -> dict[str, str]:
    labels = {"orchard/chip": slug(machine.chip), "orchard/memory-gb": str(round(machine.memory_bytes / GIB))}
    if machine.performance_cores:
        labels["orchard/performance-cores"] = str(machine.performance_cores)
    if role:
        labels["orchard/role"] = role
    return labels


def format_labels(labels: dict[str, str]) -> str:
    # `ray start --labels` takes "k1=v1,k2=v2" (its JSON form is deprecated in 2.60).
    return ",".join(f"{key}={value}" for key, value in labels.items())


def head_address(address: str) -> str:
    return address if ":" in address else f"{address}:{RAY_PORT}"


def ray_executable() -> str:
    # The `ray` of the interpreter running us (.venv/bin/ray after `make install`), so
    # every Mac runs the same Ray as its Orchard install.
    local = Path(sys.executable).with_name("ray")
    return str(local) if local.exists() else (shutil.which("ray") or "ray")


def ray_start_command(
    role: str,
    resources: dict[str, int],
    labels: dict[str, str],
    *,
    address: str | None = None,
    port: int = RAY_PORT,
    pin_ports: bool = False,
    extra: list[str] | None = None,
    ray: str = "ray",
) -> list[str]:
    if role == "head":
        cmd = [ray, "start", "--head", "--port", str(port), "--dashboard-host", "0.0.0.0"]
    elif role == "worker":
        if not address:
            raise ValueError("a worker needs --address HEAD_IP[:6379]")
        cmd = [ray, "start", "--address", head_address(address)]
    else:
        raise ValueError(f"unknown role {role!r}")
    cmd += ["--resources", json.dumps(resources), "--labels", format_labels(labels)]
    if pin_ports:
        for flag, value in PINNED_PORTS.items():
            cmd += [flag, str(value)]
    return cmd + list(extra or [])


def cluster_env(auth: str = "token") -> dict[str, str]:
    if auth not in AUTH_MODES:
        raise ValueError(f"auth must be one of {AUTH_MODES}")
    return {**CLUSTER_ENV, "RAY_AUTH_MODE": auth}


def ray_env(auth: str = "token", base: dict[str, str] | None = None) -> dict[str, str]:
    return {**(os.environ if base is None else base), **cluster_env(auth)}


def token_available(env: dict[str, str], home: Path) -> bool:
    # Where Ray looks, in its order: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token.
    if env.get("RAY_AUTH_TOKEN"):
        return True
    path = Path(env["RAY_AUTH_TOKEN_PATH"]) if env.get("RAY_AUTH_TOKEN_PATH") else home / ".ray" / "auth_token"
    return path.is_file() and path.stat().st_size > 0


def shell_line(cmd: list[str], auth: str = "token") -> str:
    env = " ".join(f"{key}={value}" for key, value in cluster_env(auth).items())
    return f"{env} {shlex.join(cmd)}"


def ensure_token(role: str, ray: str, dry_run: bool) -> str | None:
    """Make sure a token exists for auth=token: the head creates one, a worker must be
    given the head's. Returns an error message, or None."""
    if token_available(dict(os.environ), Path.home()):
        return None
    if role == "worker":
        return (
            "no Ray auth token on this Mac. Copy the head's: scp HEAD:~/.ray/auth_token ~/.ray/auth_token "
            "(or export RAY_AUTH_TOKEN=<output of `ray get-auth-token` on the head>), "
            "or start every node with --auth disabled on a trusted network."
        )
    print(f"creating a Ray auth token: {ray} get-auth-token --generate", file=sys.stderr)
    if not dry_run:
        subprocess.run([ray, "get-auth-token", "--generate"], check=True, stdout=subprocess.DEVNULL)
    return None


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="orchard_node", description=__doc__.split("\n\n")[0],
        epilog="Unknown flags are passed to `ray start`.",
    )
    parser.add_argument("role", choices=["head", "worker", "resources"])
    parser.add_argument("--address", help="worker: the head's IP (port 6379 unless given)")
    parser.add_argument("--port", type=int, default=RAY_PORT, help="head: the GCS port (default 6379)")
    parser.add_argument(
        "--reserve-gb", type=float, default=None,
        help="memory kept out of unified_memory_gb (default $ORCHARD_RESERVE_GB, else 8 on macOS, 2 elsewhere)",
    )
    parser.add_argument(
        "--auth", choices=AUTH_MODES, default=os.environ.get("ORCHARD_RAY_AUTH", "token"),
        help="Ray token auth (default token: the head creates ~/.ray/auth_token, copy it to every worker)",
    )
    parser.add_argument("--pin-ports", action="store_true", help="use fixed Ray ports, for firewall rules")
    parser.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    machine = detect()
    reserve = default_reserve_gb() if args.reserve_gb is None else args.reserve_gb
    resources = node_resources(machine, reserve)
    role = None if args.role == "resources" else args.role
    labels = node_labels(machine, role)
    if args.role == "resources":
        print(json.dumps({"resources": resources, "labels": labels, "machine": asdict(machine)}, indent=2))
        return 0
    try:
        cmd = ray_start_command(
            args.role, resources, labels, address=args.address, port=args.port,
            pin_ports=args.pin_ports, extra=extra, ray=ray_executable(),
        )
    except ValueError as e:
        print(f"orchard_node: {e}", file=sys.stderr)
        return 2
    if args.auth == "token" and (error := ensure_token(args.role, cmd[0], args.dry_run)):
        print(f"orchard_node: {error}", file=sys.stderr)
        return 2
    print(shell_line(cmd, args.auth), flush=True)
    if args.dry_run:
        return 0
    return subprocess.run(cmd, env=ray_env(args.auth)).returncode


if __name__ == "__main__":
    sys.exit(main())
