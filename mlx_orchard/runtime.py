"""Process-level settings for model replicas, decided where the app is built.

On Linux the ``mlx[cpu]`` wheel multiplies matrices with a reference BLAS at a few
GFLOP/s; Debian's OpenBLAS preloaded into the replica process serves the same
``cblas_*`` symbols at 150-180 GFLOP/s on two cores. ``LD_PRELOAD`` must be in the
environment before the process starts, so it travels in the replica's runtime_env.
"""

from __future__ import annotations

import platform
from pathlib import Path

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libblas.so.3",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)


def mlx_uses_cpu_backend() -> bool:
    import mlx.core as mx

    return mx.default_device() == mx.cpu


def blas_library(setting: str) -> str | None:
    """The BLAS library to preload into replicas, or None to leave the process as is."""
    if platform.system() != "Linux" or setting == "reference":
        return None
    if setting != "auto":
        return setting
    if not mlx_uses_cpu_backend():
        return None
    return next((p for p in OPENBLAS_CANDIDATES if Path(p).exists()), None)


def replica_env_vars(blas_setting: str, extra: dict[str, str]) -> dict[str, str]:
    env = dict(extra)
    lib = blas_library(blas_setting)
    if lib and "LD_PRELOAD" not in env:
        env["LD_PRELOAD"] = lib
    return env


def physical_memory_bytes() -> int:
    """The machine's memory (unified memory on a Mac): what a replica's budgets are cut from."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # not reported: assume a small machine
        return 8 << 30


def release_mlx_memory() -> None:
    """After a model is unloaded: collect it and hand MLX's cached buffers back to the system
    (on the thread that ran it)."""
    import gc

    import mlx.core as mx

    gc.collect()
    mx.clear_cache()
