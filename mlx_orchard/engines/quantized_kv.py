"""A quantized KV cache that joins the continuous batch (``kv_bits``, ``kv_group_size``).

mlx-lm has a quantized KV cache for one sequence (``QuantizedKVCache``) and a batched cache
for full-precision KV (``BatchKVCache``), but no batched quantized one: its
``BatchGenerator`` cannot merge quantized caches, so quantizing the KV switched batching
off. ``BatchQuantizedKVCache`` is ``BatchKVCache``'s layout (left padding, one shared write
index, per-sequence offsets) over mlx's packed (weights, scales, biases) triples, and
``SequenceQuantizedKV`` is the per-sequence cache it merges from and extracts to (what the
prefix cache holds). Quantization groups run along the head dimension, so every position
is quantized on its own: padding, rolling and slicing positions never touch another's.

The models need nothing new: mlx-lm's attention takes the quantized path for any cache
with ``bits`` (``quantized_scaled_dot_product_attention``), with this cache's padding mask.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.base import create_causal_mask
from mlx_lm.models.cache import KVCache, QuantizedKVCache, dynamic_roll, make_prompt_cache

Triple = tuple[mx.array, mx.array, mx.array]  # packed weights, scales, biases


def plain_kv_cache(model: Any) -> bool:
    """Whether every layer keeps a plain KV cache (not a rotating window, not the recurrent
    state of SSM layers): what quantizing the KV and rolling back rejected drafts need."""
    return all(type(c) is KVCache for c in make_prompt_cache(model))


class SequenceQuantizedKV(QuantizedKVCache):
    """One sequence's quantized KV cache, mergeable into a ``BatchQuantizedKVCache``."""

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchQuantizedKVCache:
        return BatchQuantizedKVCache.merge(caches)


def as_quantized(cache: Any, group_size: int, bits: int) -> SequenceQuantizedKV:
    """A layer's cache (empty, full precision, or quantized by mlx-lm, e.g. read back from
    disk) as a ``SequenceQuantizedKV`` of these bits."""
    if isinstance(cache, QuantizedKVCache) and (cache.bits, cache.group_size) == (bits, group_size):
        cache.__class__ = SequenceQuantizedKV
        return cache  # type: ignore[return-value]
    out = SequenceQuantizedKV(group_size=group_size, bits=bits)
    if isinstance(cache, QuantizedKVCache) and cache.keys is not None:  # other bits: through full precision
        keys, values = (mx.dequantize(*t[:3], group_size=cache.group_size, bits=cache.bits)[..., : cache.offset, :]
                        for t in (cache.keys, cache.values))
    elif isinstance(cache, KVCache) and cache.keys is not None:
        keys, values = cache.keys[..., : cache.offset, :], cache.values[..., : cache.offset, :]
    else:
        return out
    out.keys = mx.quantize(keys, group_size=group_size, bits=bits)  # type: ignore[assignment]
    out.values = mx.quantize(values, group_size=group_size, bits=bits)  # type: ignore[assignment]
    out.offset = keys.shape[2]
    return out


def _map(fn, *triples: Triple) -> Triple:
    return tuple(fn(*parts) for parts in zip(*triples))  # type: ignore[return-value]


class BatchQuantizedKVCache:
    """``BatchKVCache`` for quantized KV: sequences left-padded to one write index."""

    step = 256

    def __init__(self, left_padding: list[int], group_size: int = 64, bits: int = 8):
        self.keys: Triple | None = None
        self.values: Triple | None = None
        self.left_padding = mx.array(left_padding)
        self.offset = mx.array([-p for p in left_padding])
        self.group_size, self.bits = group_size, bits
        self._idx = 0
        self._right_padding: mx.array | None = None

    # ---- what the model calls ----

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[Triple, Triple]:
        prev, n = self._idx, keys.shape[2]
        if self.keys is None or prev + n > self.keys[0].shape[2]:
            self._grow(keys, values, prev + n)
        assert self.keys is not None and self.values is not None
        new_keys = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        new_values = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        for stored, new in ((self.keys, new_keys), (self.values, new_values)):
            for i in range(3):
                stored[i][..., prev : prev + n, :] = new[i]
        self.offset = self.offset + n
        self._idx += n
        return self.keys_and_values()

    def _grow(self, keys: mx.array, values: mx.array, need: int) -> None:
        length = (need + self.step - 1) // self.step * self.step
        per_int = 32 // self.bits

        def empty(like: mx.array) -> Triple:
            shape = (*like.shape[:2], length)
            dim = like.shape[-1]
            return (mx.zeros((*shape, dim // per_int), dtype=mx.uint32),
                    mx.zeros((*shape, dim // self.group_size), dtype=like.dtype),
                    mx.zeros((*shape, dim // self.group_size), dtype=like.dtype))

        def grown(old: Triple | None, like: mx.array) -> Triple:
            fresh = empty(like)
            if old is None:
                return fresh
            return _map(lambda o, f: mx.concatenate([o[..., : self._idx, :], f[..., self._idx :, :]], axis=2), old, fresh)

        self.keys, self.values = grown(self.keys, keys), grown(self.values, values)

    def keys_and_values(self) -> tuple[Triple, Triple]:
        assert self.keys is not None and self.values is not None
        return _map(lambda x: x[..., : self._idx, :], self.keys), _map(lambda x: x[..., : self._idx, :], self.values)

    def make_mask(self, N: int, return_array: bool = False, **kwargs: Any) -> mx.array:
        return create_causal_mask(N, offset=self._idx, left_padding=self.left_padding, **kwargs)

    # ---- what the batch calls (the same as BatchKVCache) ----

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None) -> None:
        if left_padding is not None:
            if self.keys is not None:
                raise ValueError("left padding can only be added to an empty cache")
            self.left_padding = self.left_padding + mx.array(left_padding)
            self.offset = self.offset - mx.array(left_padding)
        if right_padding is not None and max(right_padding) > 0:
            self._right_padding = mx.array(right_padding)

    def finalize(self) -> None:
        """Right padding (a batch prefilled together, rejected drafts) becomes left padding."""
        if self._right_padding is not None and self.keys is not None and self.values is not None:
            shift = self._right_padding[:, None]
            self.keys = _map(lambda x: dynamic_roll(x, shift, axis=2), self.keys)
            self.values = _map(lambda x: dynamic_roll(x, shift, axis=2), self.values)
            self.offset = self.offset - self._right_padding
            self.left_padding = self.left_padding + self._right_padding
        self._right_padding = None

    @property
    def state(self):
        return self.keys, self.values, self.offset, self.left_padding, self._idx

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.left_padding, self._idx = v

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self._idx, n)
        self._idx -= n
        self.offset = self.offset - n
        return n

    def size(self) -> int:
        return self._idx

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None or self.values is None:
            return 0
        return sum(x.nbytes for x in (*self.keys, *self.values))

    def filter(self, batch_indices) -> None:
        if self.keys is not None and self.values is not None:
            self.keys = _map(lambda x: x[batch_indices], self.keys)
            self.values = _map(lambda x: x[batch_indices], self.values)
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = int(mx.min(self.left_padding).item())  # type: ignore[arg-type]
        if shift > 0:  # positions every sequence pads: drop them
            if self.keys is not None and self.values is not None:
                self.keys = _map(lambda x: x[..., shift:, :], self.keys)
                self.values = _map(lambda x: x[..., shift:, :], self.values)
            self._idx -= shift
            self.left_padding = self.left_padding - shift

    def extend(self, other: BatchQuantizedKVCache) -> None:
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        idx = max(self._idx, other._idx)
        template = self.keys if self.keys is not None else other.keys
        vtemplate = self.values if self.values is not None else other.values
        assert template is not None and vtemplate is not None

        def aligned(c: BatchQuantizedKVCache) -> tuple[Triple, Triple, mx.array]:
            left = idx - c._idx  # right-justify at the shared write index
            batch = c.offset.shape[0]

            def pad(stored: Triple | None, like: Triple) -> Triple:
                if stored is None:
                    stored = _map(lambda t: mx.zeros((batch, t.shape[1], 0, t.shape[3]), dtype=t.dtype), like)
                return _map(lambda x: mx.pad(x[..., : c._idx, :], [(0, 0), (0, 0), (left, 0), (0, 0)]), stored)

            return pad(c.keys, template), pad(c.values, vtemplate), c.left_padding + left

        (k1, v1, p1), (k2, v2, p2) = aligned(self), aligned(other)
        self.keys = _map(lambda a, b: mx.concatenate([a, b]), k1, k2)
        self.values = _map(lambda a, b: mx.concatenate([a, b]), v1, v2)
        self.offset = mx.concatenate([self.offset, other.offset])
        self.left_padding = mx.concatenate([p1, p2])
        self._idx = idx

    def extract(self, idx: int) -> SequenceQuantizedKV:
        assert self.keys is not None and self.values is not None
        padding = int(self.left_padding[idx].item())  # type: ignore[arg-type]
        out = SequenceQuantizedKV(group_size=self.group_size, bits=self.bits)
        out.keys = _map(lambda x: mx.contiguous(x[idx : idx + 1, :, padding : self._idx]), self.keys)  # type: ignore[assignment]
        out.values = _map(lambda x: mx.contiguous(x[idx : idx + 1, :, padding : self._idx]), self.values)  # type: ignore[assignment]
        out.offset = self._idx - padding
        return out

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchQuantizedKVCache:
        first = caches[0]
        group_size, bits = first.group_size, first.bits
        lengths = [c.offset for c in caches]
        longest = max(lengths)
        cache = cls([longest - n for n in lengths], group_size=group_size, bits=bits)
        full = [c for c in caches if c.keys is not None and c.offset]
        if not longest or not full:
            return cache

        def stacked(part: str) -> Triple:
            like: Triple = getattr(full[0], part)
            out = _map(lambda t: mx.zeros((len(caches), t.shape[1], longest, t.shape[3]), dtype=t.dtype), like)
            for i, c in enumerate(caches):
                if c.keys is not None and c.offset:
                    for o, x in zip(out, getattr(c, part)):
                        o[i : i + 1, :, longest - c.offset :] = x[..., : c.offset, :]
            return out

        cache.keys, cache.values = stacked("keys"), stacked("values")
        cache.offset = cache.offset + longest
        cache._idx = longest
        return cache
