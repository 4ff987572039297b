"""The continuous batch an engine loop drives, as a small protocol.

``LLMEngine`` owns the loop (admission, cancellation, stop strings, prefix cache, retries)
and talks to the batch only through ``BatchBackend``: insert sequences, step once, remove
sequences, copy one sequence's KV cache. mlx-lm's ``BatchGenerator`` sits behind it as
``MlxLmBatch``; a vision-language batch generator (mlx-vlm) can sit behind it the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from mlx_lm.models.cache import make_prompt_cache

from mlx_orchard.engines.quantized_kv import as_quantized
from mlx_orchard.engines.speculative import (
    DraftModelProposer,
    Proposer,
    SpeculativeConfig,
    SpeculativeGenerationBatch,
    SpeculativeStats,
)


@dataclass
class StepToken:
    """One sequence's new token from a step."""

    uid: int
    token: int
    finish_reason: str | None  # "stop" (a stop token) | "length" | None
    all_tokens: list[int] | None = None  # when finished: the tokens its KV cache holds
    prompt_cache: list | None = None  # when finished: that KV cache
    logprobs: Any = None  # the step's log probabilities over the vocabulary (an mx.array row)


class BatchBackend(Protocol):
    def insert(
        self,
        prompts: list[list[int]],
        *,
        caches: list[list | None],
        all_tokens: list[list[int]],
        max_tokens: list[int],
        samplers: list[Callable | None],
        logits_processors: list[list[Callable]],
        speculate: list[bool] | None = None,
    ) -> list[int]:
        """Queue sequences (each may start from a KV cache holding ``all_tokens``); their uids.
        ``speculate``: which of them draft tokens ahead (where the backend can)."""

    def step(self) -> list[StepToken]:
        """Advance every sequence by one step (prefilling newcomers a chunk at a time)."""

    def remove(self, uids: list[int]) -> None: ...

    def extract_cache(self, uid: int) -> tuple[list, list[int]]:
        """A copy of one running sequence's KV cache and the tokens it holds."""

    @property
    def speculation(self) -> SpeculativeStats | None:
        """Draft and acceptance counts, when the backend speculates."""


class MlxLmBatch:
    """mlx-lm's ``BatchGenerator`` as a ``BatchBackend``; with ``speculative``, its
    generation half verifies drafts (``speculative.py``); with
    ``kv_quantization``, sequences keep quantized KV (``quantized_kv.py``)."""

    def __init__(self, model: Any, *, stop_tokens: list[list[int]], completion_batch_size: int,
                 prefill_batch_size: int, prefill_step_size: int,
                 speculative: SpeculativeConfig | None = None,
                 kv_quantization: tuple[int, int] | None = None, draft_model: Any = None, vocab_size: int = 0):
        from mlx_lm.generate import BatchGenerator

        self._generator = BatchGenerator(
            model,
            stop_tokens=stop_tokens,
            completion_batch_size=completion_batch_size,
            prefill_batch_size=prefill_batch_size,
            prefill_step_size=prefill_step_size,
        )
        self._model = model
        self._kv_quantization = kv_quantization  # (group size, bits)
        self._drafters: Proposer | None = None
        self._stats: SpeculativeStats | None = None
        if speculative is not None:
            self._stats = SpeculativeStats()
            self._drafters = DraftModelProposer(speculative, draft_model, vocab_size) if draft_model is not None else Proposer(speculative)
            # The generator's (empty) generation batch, swapped for one that verifies drafts;
            # batches leaving prefill are merged into it, so it keeps its class.
            self._generator._generation_batch = SpeculativeGenerationBatch.empty_with(
                model, self._generator.sampler, self._drafters, self._stats, speculative.adaptive
            )

    @property
    def speculation(self) -> SpeculativeStats | None:
        return self._stats

    def insert(self, prompts, *, caches, all_tokens, max_tokens, samplers, logits_processors,
               speculate=None) -> list[int]:
        if self._kv_quantization is not None:
            # Every sequence's cache quantized, so the batch merges them into one
            # BatchQuantizedKVCache (fresh ones, prefix-cache hits, the disk tier's).
            group, bits = self._kv_quantization
            caches = [[as_quantized(c, group, bits) for c in (cache or make_prompt_cache(self._model))] for cache in caches]
        uids = self._generator.insert(
            prompts,
            caches=caches,
            all_tokens=all_tokens,
            max_tokens=max_tokens,
            samplers=samplers,
            logits_processors=logits_processors,
        )
        if self._drafters is not None:
            for uid, wanted in zip(uids, speculate or []):
                if wanted:
                    self._drafters.add(uid)
        return uids

    def step(self) -> list[StepToken]:
        _, responses = self._generator.next()
        if self._drafters:
            for r in responses:
                if r.finish_reason:
                    self._drafters.discard(r.uid)
        return [
            StepToken(
                r.uid,
                r.token,
                r.finish_reason,
                list(r.all_tokens) if r.finish_reason else None,
                r.prompt_cache if r.finish_reason else None,
                r.logprobs,
            )
            for r in responses
        ]

    def remove(self, uids: list[int]) -> None:
        self._generator.remove(uids)
        if self._drafters is not None:
            for uid in uids:
                self._drafters.discard(uid)

    def extract_cache(self, uid: int) -> tuple[list, list[int]]:
        cache, tokens = self._generator.extract_cache([uid])[uid]
        return cache, list(tokens)
