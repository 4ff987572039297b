"""Start one HTTP server at a time for a benchmark, wait until it answers, and stop
it and everything it spawned (Ray starts a whole node: GCS, raylet, workers)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_members(sid: int) -> list[int]:
    """PIDs whose session is ``sid``: our server and whatever it started, even in new groups."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        if int(fields[3]) == sid:  # state, ppid, pgrp, session
            pids.append(int(entry.name))
    return pids


class Server:
    """A server process in its own session, with its output in ``log_path``."""

    def __init__(self, name: str, cmd: list[str], *, env: dict[str, str], cwd: Path, log_path: Path):
        self.name = name
        self.cmd = cmd
        self.env = env
        self.cwd = cwd
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        # A new session: stop() can find and end the whole tree without touching our own process.
        self.proc = subprocess.Popen(
            self.cmd, cwd=self.cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def wait_ready(self, base_url: str, model: str, timeout: float = 240.0) -> float:
        """Poll ``/v1/models``, then one 1-token chat request (model replicas may still load
        behind a ready proxy). Returns seconds until ready."""
        t0 = time.perf_counter()
        deadline = t0 + timeout
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        with httpx.Client(timeout=10.0) as client:
            listed = False
            while time.perf_counter() < deadline:
                if self.proc is None or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited during start-up:\n{self.log_tail()}")
                try:
                    if not listed:
                        listed = client.get(f"{base_url}/models").status_code == 200
                    if listed:
                        resp = client.post(f"{base_url}/chat/completions", json=body, timeout=120.0)
                        if resp.status_code == 200:
                            return time.perf_counter() - t0
                except httpx.HTTPError:
                    pass
                time.sleep(1.0)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail()}")

    def pids(self) -> list[int]:
        return _session_members(self.proc.pid) if self.proc else []

    def stop(self, grace: float = 30.0) -> None:
        """Ctrl-C first (``serve run`` then shuts Serve and its Ray node down), then force."""
        if self.proc is None:
            return
        sid = self.proc.pid
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 10.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(sid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of the session (Ray workers in their own groups included) is killed.
        deadline = time.monotonic() + 10.0
        while (left := _session_members(sid)) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        if self.proc.poll() is None:
            self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
