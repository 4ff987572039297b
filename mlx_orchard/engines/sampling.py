"""The MLX samplers and logits processors built from a request's ``SamplingParams``."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_sampler,
)

from mlx_orchard.wire import SamplingParams

__all__ = ["SamplingParams", "build_logits_processors", "build_sampler"]

Sampler = Callable[[mx.array], mx.array]


def build_sampler(params: SamplingParams) -> Sampler | None:
    """None means greedy: the BatchGenerator then argmaxes the whole batch in one call.
    Unset fields take their built-in defaults."""
    params = params.with_defaults()
    assert params.temperature is not None and params.top_p is not None  # resolved above
    assert params.min_p is not None and params.top_k is not None
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
