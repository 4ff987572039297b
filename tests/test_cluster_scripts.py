"""cluster/: what each Mac declares to Ray and the `ray start` lines built from it.

No Ray cluster is started here: commands are parsed by `ray start`'s own option parser.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster import orchard_node as node

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3

M2_PRO = node.parse_sysctl("Apple M2 Pro\n", "34359738368\n", "8\n")  # 32 GB

CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n"
MEMINFO = "MemTotal:       16303256 kB\nMemFree:         1234567 kB\n"


def test_parse_sysctl():
    assert M2_PRO == node.Machine("Apple M2 Pro", 32 * GIB, 8, True)
    # Intel Macs have no hw.perflevel0.physicalcpu.
    assert node.parse_sysctl("Intel(R) Core(TM) i9", str(16 * GIB), None).performance_cores is None


def test_parse_proc():
    machine = node.parse_proc(CPUINFO, MEMINFO)
    assert machine.chip == "Intel(R) Xeon(R) CPU @ 2.20GHz"
    assert machine.memory_bytes == 16303256 * 1024
    assert not machine.is_mac
    with pytest.raises(ValueError):
        node.parse_proc(CPUINFO, "nothing here")


def test_resources_apply_the_reserve_and_never_go_negative():
    assert node.node_resources(M2_PRO, 8) == {"unified_memory_gb": 24, "mac": 1}
    assert node.node_resources(M2_PRO, 40) == {"unified_memory_gb": 0, "mac": 1}
    linux = node.parse_proc(CPUINFO, MEMINFO)  # 15.5 GiB
    assert node.node_resources(linux, 2) == {"unified_memory_gb": 13}  # no "mac" off macOS


def test_default_reserve(monkeypatch):
    monkeypatch.delenv("ORCHARD_RESERVE_GB", raising=False)
    assert node.default_reserve_gb("Darwin") == 8
    assert node.default_reserve_gb("Linux") == 2
    monkeypatch.setenv("ORCHARD_RESERVE_GB", "12")
    assert node.default_reserve_gb("Darwin") == 12


def test_labels_are_slugged_and_valid_for_ray():
    from ray._private.label_utils import parse_node_labels_string

    labels = node.node_labels(M2_PRO, "head")
    assert labels == {
        "orchard/chip": "apple-m2-pro", "orchard/memory-gb": "32",
        "orchard/performance-cores": "8", "orchard/role": "head",
    }
    assert node.slug("Intel(R) Xeon(R) CPU @ 2.20GHz") == "intel-r-xeon-r-cpu-2-20ghz"
    assert node.slug("???") == "unknown"
    assert len(node.slug("x" * 100)) == 63
    # Ray's own parser (which validates the label syntax) reads back what we pass.
    odd = node.node_labels(node.Machine("  Weird/CPU™ " + "y" * 80 + "-", GIB, None, False))
    for value in (labels, odd):
        assert parse_node_labels_string(node.format_labels(value)) == value


def _parse_with_ray_start(cmd: list[str]) -> dict:
    """Run `ray start`'s click parser over our arguments without starting anything."""
    from ray.scripts.scripts import start

    return start.make_context("start", cmd[2:]).params


def test_head_command():
    resources = node.node_resources(M2_PRO, 8)
    cmd = node.ray_start_command("head", resources, node.node_labels(M2_PRO, "head"))
    assert cmd[:3] == ["ray", "start", "--head"]
    params = _parse_with_ray_start(cmd)
    assert params["head"] and params["port"] == 6379 and params["dashboard_host"] == "0.0.0.0"
    assert json.loads(params["resources"]) == {"unified_memory_gb": 24, "mac": 1}
    assert params["labels"] == "orchard/chip=apple-m2-pro,orchard/memory-gb=32,orchard/performance-cores=8,orchard/role=head"


def test_worker_command_pins_ports_and_passes_extra_flags():
    cmd = node.ray_start_command(
        "worker", {"unified_memory_gb": 8}, {"orchard/role": "worker"},
        address="192.168.1.10", pin_ports=True, extra=["--node-ip-address", "192.168.1.11"],
    )
    params = _parse_with_ray_start(cmd)
    assert params["address"] == "192.168.1.10:6379" and not params["head"]
    assert params["node_ip_address"] == "192.168.1.11"
    assert params["node_manager_port"] == 6380 and params["object_manager_port"] == 6381
    assert (params["min_worker_port"], params["max_worker_port"]) == (10002, 10199)
    assert params["dashboard_agent_listen_port"] == 52365 and params["metrics_export_port"] == 6384
    assert node.head_address("10.0.0.1:7000") == "10.0.0.1:7000"
    with pytest.raises(ValueError):
        node.ray_start_command("worker", {}, {})


def test_env_enables_multi_node_on_macos_and_sets_auth():
    env = node.ray_env("token", base={"PATH": "/bin"})
    assert env == {
        "PATH": "/bin",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
        "RAY_worker_niceness": "0",
        "RAY_AUTH_MODE": "token",
    }
    assert node.shell_line(["ray", "start", "--head"], "disabled") == (
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 RAY_worker_niceness=0 RAY_AUTH_MODE=disabled ray start --head"
    )


def test_token_lookup(tmp_path):
    assert not node.token_available({}, tmp_path)
    assert node.token_available({"RAY_AUTH_TOKEN": "abc"}, tmp_path)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("abc")
    assert node.token_available({}, tmp_path)
    assert not node.token_available({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, tmp_path)


def _cli(*args: str, home: Path | None = None) -> subprocess.CompletedProcess:
    env = None if home is None else {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, str(ROOT / "cluster" / "orchard_node.py"), *args],
        capture_output=True, text=True, timeout=30, env=env,
    )


def test_cli_resources_prints_json():
    out = _cli("resources")
    assert out.returncode == 0, out.stderr
    declared = json.loads(out.stdout)
    assert isinstance(declared["resources"]["unified_memory_gb"], int)
    assert declared["resources"]["unified_memory_gb"] >= 0
    assert declared["labels"]["orchard/chip"]


def test_cli_dry_run(tmp_path):
    out = _cli("worker", "--address", "10.0.0.1", "--dry-run", "--auth", "disabled", "--node-ip-address", "10.0.0.2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1 RAY_worker_niceness=0 RAY_AUTH_MODE=disabled ")
    assert "start --address 10.0.0.1:6379 --resources" in out.stdout and "--node-ip-address 10.0.0.2" in out.stdout
    # A worker without the head's token is stopped before `ray start` would be refused.
    out = _cli("worker", "--address", "10.0.0.1", "--dry-run", home=tmp_path)
    assert out.returncode == 2 and "auth_token" in out.stderr
    assert _cli("worker", "--dry-run").returncode == 2  # no --address


def test_wrappers_dry_run():
    out = subprocess.run(
        ["bash", str(ROOT / "cluster" / "join.sh"), "10.0.0.1", "--dry-run", "--auth", "disabled"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "--address 10.0.0.1:6379" in out.stdout
    out = subprocess.run(
        ["bash", str(ROOT / "cluster" / "start-head.sh"), "--dry-run", "--auth", "disabled"],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "start --head --port 6379 --dashboard-host 0.0.0.0" in out.stdout
    assert subprocess.run(["bash", str(ROOT / "cluster" / "join.sh")], capture_output=True).returncode == 2


def test_cluster_yaml_is_a_valid_local_launcher_config():
    config = yaml.safe_load((ROOT / "cluster" / "cluster.yaml").read_text())
    assert config["provider"]["type"] == "local"
    assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
    assert config["auth"]["ssh_user"]
    assert any("make install" in c for c in config["setup_commands"])
    assert any("orchard_node.py head" in c for c in config["head_start_ray_commands"])
    assert any("orchard_node.py worker" in c for c in config["worker_start_ray_commands"])
    # Ray's launcher fills in its defaults and checks the schema, as `ray up` would.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))
