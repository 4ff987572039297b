"""The prefix cache's disk tier: KV caches of finished sequences on an SSD, keyed by a hash
of their tokens, bounded in bytes (least recently used out), read back by longest token
prefix — so a conversation's next turn skips its prefill after the in-memory cache let it
go, or after the replica restarted.

Plain Python over mlx-lm's own ``save_prompt_cache`` / ``load_prompt_cache`` (safetensors);
called on the engine thread only. Files are written under a temporary name and renamed, so
a crash never leaves a half entry that looks whole.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("orchard.llm")


@dataclass
class _Entry:
    tokens: np.ndarray  # int32
    nbytes: int
    used: float


class DiskPrefixCache:
    def __init__(self, directory: Path, max_bytes: int, *, min_tokens: int = 64, max_entries: int = 4096):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens  # shorter prefixes are cheaper to prefill than to read
        self.max_entries = max_entries
        self._entries: dict[str, _Entry] = {}
        self._bytes = 0
        self.hits = 0
        for tokens_file in self.dir.glob("*.tokens.npy"):  # what an earlier run left
            key = tokens_file.name.removesuffix(".tokens.npy")
            kv = self.dir / f"{key}.safetensors"
            try:
                tokens = np.load(tokens_file)
                entry = _Entry(tokens.astype(np.int32), kv.stat().st_size + tokens_file.stat().st_size, kv.stat().st_mtime)
            except (OSError, ValueError):
                self._unlink(key)
                continue
            self._entries[key] = entry
            self._bytes += entry.nbytes
        self._evict()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: list[int], cache: list) -> None:
        if len(tokens) < self.min_tokens:
            return
        array = np.asarray(tokens, dtype=np.int32)
        key = hashlib.sha256(array.tobytes()).hexdigest()[:40]
        if key in self._entries:
            self._touch(key)
            return
        from mlx_lm.models.cache import save_prompt_cache

        kv, tok = self.dir / f"{key}.safetensors", self.dir / f"{key}.tokens.npy"
        tmp_kv, tmp_tok = self.dir / f".{key}.tmp.safetensors", self.dir / f".{key}.tmp.npy"
        try:
            save_prompt_cache(str(tmp_kv), [_as_mlx_lm_class(c) for c in cache])
            np.save(tmp_tok, array)
            os.replace(tmp_tok, tok)
            os.replace(tmp_kv, kv)  # last: an entry is whole once its KV file has its name
        except Exception:  # noqa: BLE001 - a full or failing disk: the memory tier goes on alone
            logger.exception("could not write a prefix to disk")
            for p in (tmp_kv, tmp_tok, tok):
                p.unlink(missing_ok=True)
            return
        entry = _Entry(array, kv.stat().st_size + tok.stat().st_size, time.time())
        self._entries[key] = entry
        self._bytes += entry.nbytes
        self._evict()

    def longest(self, tokens: list[int]) -> tuple[int, str | None]:
        """The stored sequence sharing the longest prefix with ``tokens``: (how many tokens
        they share, its key). A stored sequence may be longer (a finished answer holds its
        prompt and what it generated); ``load`` cuts it back."""
        best, best_key = 0, None
        query = np.asarray(tokens, dtype=np.int32)
        for key, entry in self._entries.items():
            m = min(len(entry.tokens), len(query))
            if m <= best:
                continue
            differ = np.flatnonzero(entry.tokens[:m] != query[:m])
            shared = int(differ[0]) if differ.size else m
            if shared > best:
                best, best_key = shared, key
        return best, best_key

    def load(self, key: str, keep: int) -> list | None:
        """The stored KV of ``key`` holding its first ``keep`` tokens; None if it cannot."""
        from mlx_lm.models.cache import can_trim_prompt_cache, load_prompt_cache, trim_prompt_cache

        try:
            cache = load_prompt_cache(str(self.dir / f"{key}.safetensors"))
        except Exception:  # noqa: BLE001 - a damaged entry is a miss, and goes
            logger.exception("could not read a prefix from disk")
            self._drop(key)
            return None
        extra = len(self._entries[key].tokens) - keep
        if extra > 0:
            if not can_trim_prompt_cache(cache):
                return None
            trim_prompt_cache(cache, extra)
        self.hits += 1
        self._touch(key)
        return cache

    def _touch(self, key: str) -> None:
        self._entries[key].used = time.time()
        try:
            os.utime(self.dir / f"{key}.safetensors")  # the order survives a restart
        except OSError:
            pass

    def _evict(self) -> None:
        while self._entries and (self._bytes > self.max_bytes or len(self._entries) > self.max_entries):
            self._drop(min(self._entries, key=lambda k: self._entries[k].used))

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.nbytes
        self._unlink(key)

    def _unlink(self, key: str) -> None:
        for suffix in (".safetensors", ".tokens.npy"):
            (self.dir / f"{key}{suffix}").unlink(missing_ok=True)


def _as_mlx_lm_class(cache: Any) -> Any:
    """``load_prompt_cache`` finds a layer's class by name among mlx-lm's own: a subclass
    (Orchard's mergeable quantized cache) is written as the mlx-lm class it extends."""
    import mlx_lm.models.cache as caches

    base = next(t for t in type(cache).__mro__ if getattr(caches, t.__name__, None) is t)
    if base is type(cache):
        return cache
    copy = base.__new__(base)
    copy.__dict__.update(cache.__dict__)
    return copy
