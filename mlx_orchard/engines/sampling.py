"""Per-request sampling parameters and the MLX samplers built from them."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors, make_sampler

Sampler = Callable[[mx.array], mx.array]


@dataclass(frozen=True)
class SamplingParams:
    """What a request asks of generation; plain values so any layer can build it."""

    max_tokens: int | None = None  # None: whatever the context leaves, capped by the engine's default
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def with_changes(self, **changes) -> SamplingParams:
        return replace(self, **changes)


def build_sampler(params: SamplingParams) -> Sampler | None:
    """None means greedy: the BatchGenerator then argmaxes the whole batch in one call."""
    if params.greedy:
        return None
    top_p = params.top_p if params.top_p < 1.0 else 0.0
    if params.seed is None:
        return make_sampler(params.temperature, top_p=top_p, min_p=params.min_p, top_k=params.top_k)
    return _seeded_sampler(params.temperature, top_p, params.min_p, params.top_k, params.seed)


def _seeded_sampler(temp: float, top_p: float, min_p: float, top_k: int, seed: int) -> Sampler:
    # A private key chain, so a seeded request draws the same tokens whatever else
    # shares the batch (the global RNG is shared by every sequence).
    key = [mx.random.key(seed)]

    def sample(logprobs: mx.array) -> mx.array:
        if top_p > 0.0:
            logprobs = apply_top_p(logprobs, top_p)
        if min_p > 0.0:
            logprobs = apply_min_p(logprobs, min_p)
        if top_k > 0:
            logprobs = apply_top_k(logprobs, top_k)
        key[0], draw = mx.random.split(key[0])
        return mx.random.categorical(logprobs * (1.0 / temp), key=draw)

    return sample


def build_logits_processors(params: SamplingParams) -> list:
    return make_logits_processors(
        logit_bias=dict(params.logit_bias) or None,
        repetition_penalty=params.repetition_penalty if params.repetition_penalty != 1.0 else None,
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
    )
