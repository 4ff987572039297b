"""Speculative decoding inside the continuous batch (prompt lookup or a draft model).

mlx-lm speculates for one sequence at a time (``speculative_generate_step``) and its
``BatchGenerator`` steps every sequence by exactly one token. Here the batch's generation
half (``GenerationBatch``) gets a step that verifies drafts: each speculating sequence
feeds its pending token and up to k drafted tokens, the others feed their pending token
alone (their rows are padded), one forward pass scores every row, and each speculating
row keeps the longest prefix of its draft the model agrees with, plus the model's own
next token. Rows then hold different numbers of new positions: the rejected tail of each
row becomes right padding, which ``BatchKVCache.finalize`` rolls to the left (where the
attention mask already hides it), so no sequence ever attends to a rejected token.

Only greedy sequences without logits processors speculate: for them the accepted tokens
are by construction the ones plain decoding would produce (the argmax at each position),
so greedy output is unchanged. Sampled sequences, and those with penalties, biases or a
grammar, share the same steps without drafting.

Drafts come from prompt lookup (n-gram matching against the sequence's own context, as in
vLLM's ``ngram`` proposer): no draft model, and large gains where the answer copies from
the prompt (editing, extraction, code changes). Or from a smaller draft model of the same
vocabulary (``DraftModelProposer``), greedily, for all drafting sequences in one batch.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import GenerationBatch
from mlx_lm.models.cache import make_prompt_cache


@dataclass(frozen=True)
class SpeculativeConfig:
    num_draft_tokens: int = 4  # most tokens drafted per sequence per step
    ngram_max: int = 4  # longest suffix matched against the context
    ngram_min: int = 2  # shortest: 1-grams match everywhere and mostly miss
    adaptive: bool = True  # verify only where measured faster than plain steps (False: always)


@dataclass
class SpeculativeStats:
    drafted: int = 0  # tokens proposed
    accepted: int = 0  # of those, tokens the model agreed with


class DraftRecord:
    """A sequence's draft length, from its record: twice as long after a draft accepted
    whole, the accepted length + 1 after a miss. A sequence whose drafts keep missing (free
    text that only repeats short phrases) stops drafting and tries again now and then, since
    every row of a verifying step pays for the longest draft in it."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.length = config.num_draft_tokens
        self.rate = 0.5  # accepted / drafted, a moving average
        self._resting = 0  # steps left without drafting

    def record(self, drafted: int, accepted: int) -> None:
        self.rate = 0.7 * self.rate + 0.3 * accepted / drafted
        if accepted == drafted:
            self.length = min(self.length * 2, self.config.num_draft_tokens)
        else:
            self.length = accepted + 1
        if self.rate < 0.2:
            self._resting, self.rate = 8, 0.3  # back after a rest, on probation

    def wanted(self) -> int:
        """Tokens to draft this step (0 while resting)."""
        if self._resting:
            self._resting -= 1
            return 0
        return self.length


class PromptLookup(DraftRecord):
    """Drafts the tokens that followed the latest earlier occurrence of the context's last
    n tokens (longest n first). The index is built incrementally as the context grows."""

    def __init__(self, config: SpeculativeConfig):
        super().__init__(config)
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> position of its last token
        self._indexed = 0  # n-grams ending before this position are in the index

    def draft(self, context: list[int]) -> list[int]:
        length = self.wanted()
        if not length:
            return []
        cfg, end = self.config, len(context)
        # Index every n-gram that ends before the last token: the suffix itself must
        # match an earlier occurrence, never its own.
        for p in range(self._indexed, end - 1):
            for n in range(cfg.ngram_min, cfg.ngram_max + 1):
                if p - n + 1 >= 0:
                    self._index[tuple(context[p - n + 1 : p + 1])] = p
        self._indexed = max(self._indexed, end - 1)
        for n in range(min(cfg.ngram_max, end), cfg.ngram_min - 1, -1):
            at = self._index.get(tuple(context[end - n :]))
            if at is not None:
                return context[at + 1 : at + 1 + length]
        return []


class Proposer:
    """The sequences that draft (by uid) and their drafts, for the batch's verifying step."""

    def __init__(self, config: SpeculativeConfig):
        self.config = config
        self.sequences: dict[int, Any] = {}

    def __contains__(self, uid: int) -> bool:
        return uid in self.sequences

    def __bool__(self) -> bool:
        return bool(self.sequences)

    def add(self, uid: int) -> None:
        self.sequences[uid] = PromptLookup(self.config)

    def discard(self, uid: int) -> None:
        self.sequences.pop(uid, None)

    def propose(self, uids: list[int], contexts: list[list[int]]) -> list[list[int]]:
        return [self.sequences[uid].draft(c) if uid in self.sequences else [] for uid, c in zip(uids, contexts)]

    def record(self, uid: int, drafted: int, accepted: int) -> None:
        self.sequences[uid].record(drafted, accepted)


class _DraftModelSequence(DraftRecord):
    def __init__(self, config: SpeculativeConfig):
        super().__init__(config)
        self.cache: list | None = None  # the draft model's KV of this sequence ...
        self.held = 0  # ... holding this many context tokens (then ``fed`` drafts)
        self.fed = 0


class DraftModelProposer(Proposer):
    """Drafts with a smaller model of the same vocabulary, greedily, for every drafting row
    at once: each sequence's draft KV cache is merged into a batch, catches up on the tokens
    its sequence gained since its last draft (its whole prompt the first time, right-padded
    like a prefill), drafts k tokens, and goes back to the sequence, cut back to what the
    verifying step accepts."""

    def __init__(self, config: SpeculativeConfig, draft_model: Any, vocab_size: int):
        super().__init__(config)
        self.model = draft_model
        self.vocab_size = vocab_size  # the target model's: drafts become its input ids

    def add(self, uid: int) -> None:
        self.sequences[uid] = _DraftModelSequence(self.config)

    def propose(self, uids: list[int], contexts: list[list[int]]) -> list[list[int]]:
        wanted = [(i, self.sequences[uid]) for i, uid in enumerate(uids) if uid in self.sequences]
        rows = [(i, seq, want) for i, seq in wanted if (want := seq.wanted())]
        drafts: list[list[int]] = [[] for _ in uids]
        if not rows:
            return drafts
        k = max(want for _, _, want in rows)
        for i, seq, _ in rows:
            self._catch_up(seq, contexts[i])
        caches = [seq.cache for _, seq, _ in rows]
        batch = [type(layer[0]).merge(list(layer)) for layer in zip(*caches)]
        news = [contexts[i][seq.held :] for i, seq, _ in rows]
        lengths = [len(n) for n in news]
        longest = max(lengths)
        inputs = mx.array([n + [0] * (longest - len(n)) for n in news])
        for c in batch:  # right padding (none when all caught up alike) becomes masked left padding
            c.prepare(right_padding=[longest - n for n in lengths])
        logits = self.model(inputs, cache=batch)
        for c in batch:
            c.finalize()
        token = mx.argmax(logits[mx.arange(len(rows)), mx.array(lengths) - 1], axis=-1)
        out = [token]
        for _ in range(k - 1):
            token = mx.argmax(self.model(token[:, None], cache=batch)[:, -1], axis=-1)
            out.append(token)
        drafted: list[list[int]] = mx.stack(out, axis=1).tolist()  # type: ignore[assignment]
        for row, ((i, seq, want), tokens) in enumerate(zip(rows, drafted)):
            seq.cache = [c.extract(row) for c in batch]
            seq.held, seq.fed = len(contexts[i]), k - 1  # the last draft was never fed
            # A draft model's padded vocabulary rows are not the target's tokens: cut there.
            drafts[i] = list(itertools.takewhile(lambda t: t < self.vocab_size, tokens[:want]))
        return drafts

    CHUNK = 512  # a long catch-up (a prompt) runs alone, in prefill-sized chunks

    def _catch_up(self, seq: _DraftModelSequence, context: list[int]) -> None:
        """Drafts fed last time that no verification judged go; a long stretch of new
        context is prefilled alone, leaving a few tokens for the batched step."""
        if seq.cache is None:
            seq.cache = make_prompt_cache(self.model)
        if seq.fed:
            for c in seq.cache:
                c.trim(seq.fed)
            seq.fed = 0
        while len(context) - seq.held > self.CHUNK:
            chunk = context[seq.held : seq.held + self.CHUNK]
            self.model(mx.array([chunk]), cache=seq.cache)
            mx.eval([c.state for c in seq.cache])
            seq.held += len(chunk)

    def record(self, uid: int, drafted: int, accepted: int) -> None:
        seq = self.sequences[uid]
        seq.record(drafted, accepted)
        keep = min(accepted, seq.fed)  # drafts in the cache that the model accepted
        if seq.cache is not None and seq.fed > keep:
            for c in seq.cache:
                c.trim(seq.fed - keep)
        seq.held, seq.fed = seq.held + keep, 0


class StepPolicy:
    """Whether a step verifies drafts or decodes plainly, from what each has delivered
    (tokens per second, a moving average per batch-size bucket). A verifying step costs
    every row the longest draft's positions: nearly free on a GPU at small batches, up to
    (1 + k)x on a CPU with a full batch, so only measurement on this machine can tell.
    The mode that is behind is tried for a few steps now and then, as acceptance drifts."""

    EXPLORE_EVERY, EXPLORE_STEPS = 64, 3

    def __init__(self, adaptive: bool = True) -> None:
        self.adaptive = adaptive
        self.rate: dict[tuple[int, bool], float] = {}  # (bucket, speculating) -> tokens/s
        self._decisions = 0

    def speculate(self, batch_size: int) -> bool:
        bucket = batch_size.bit_length()
        spec, plain = self.rate.get((bucket, True)), self.rate.get((bucket, False))
        self._decisions += 1
        if spec is None or plain is None:
            return plain is not None  # measure speculating first, then plain decoding once
        exploring = self._decisions % self.EXPLORE_EVERY < self.EXPLORE_STEPS
        return (spec >= plain) != exploring

    def observe(self, batch_size: int, speculating: bool, tokens: int, seconds: float) -> None:
        key = (batch_size.bit_length(), speculating)
        rate = tokens / max(seconds, 1e-6)
        self.rate[key] = rate if key not in self.rate else 0.7 * self.rate[key] + 0.3 * rate


class SpeculativeGenerationBatch(GenerationBatch):
    """``GenerationBatch`` whose step verifies the drafts (prompt lookup or a draft model)
    of the sequences in ``drafters`` (by uid; the backend adds and removes them)."""

    drafters: Proposer
    stats: SpeculativeStats
    policy: StepPolicy
    _verified_last: bool  # the previous step verified drafts

    @classmethod
    def empty_with(cls, model: Any, fallback_sampler: Any, drafters: Proposer, stats: SpeculativeStats, adaptive: bool):
        batch = cls.empty(model, fallback_sampler)
        batch.drafters, batch.stats, batch._verified_last = drafters, stats, False
        batch.policy = StepPolicy(adaptive)
        return batch

    def next(self) -> list:
        batch_size = len(self.uids)
        if not batch_size or not any(uid in self.drafters for uid in self.uids):
            return self._plain()
        if self.policy.adaptive and not self.policy.speculate(batch_size):
            # Plain steps overlap the next forward pass with this one: a plain step right
            # after a verifying one finds nothing to wait for, so it is no fair sample.
            fair, started = not self._verified_last, time.perf_counter()
            responses = self._plain()
            if fair:
                self.policy.observe(batch_size, False, len(responses), time.perf_counter() - started)
            return responses
        mx.eval(self._next_tokens)  # after a plain step, its forward pass is still running
        started = time.perf_counter()
        pending: list[int] = self._next_tokens.tolist()  # type: ignore[assignment]
        drafts = self.drafters.propose(self.uids, [tokens + [y] for tokens, y in zip(self.tokens, pending)])
        if not any(drafts):
            return self._plain()
        responses = self._verify(pending, drafts)
        self._verified_last = True
        self.policy.observe(batch_size, True, len(responses), time.perf_counter() - started)
        return responses

    def _plain(self) -> list:
        self._verified_last = False
        return super().next()

    def _verify(self, pending: list[int], drafts: list[list[int]]) -> list:
        B, K = len(self.uids), max(len(d) for d in drafts)
        rows = [[y, *d, *([y] * (K - len(d)))] for y, d in zip(pending, drafts)]
        inputs = mx.array(rows)
        logits = self.model(inputs, cache=self.prompt_cache)  # (B, 1 + K, vocab)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        speculating = [uid in self.drafters for uid in self.uids]
        greedy = mx.argmax(logits, axis=-1)  # the speculating rows' verdict at every position
        # Rows that do not speculate sample their next token as a plain step would.
        plain_next: dict[int, mx.array] = {}
        plain_logprobs: dict[int, mx.array] = {}
        for e in range(B):
            if speculating[e]:
                continue
            row = logits[e : e + 1, 0]
            processors = self.logits_processors[e] if self.logits_processors else ()
            if processors:
                context = self._token_context[e].update_and_fetch(inputs[e : e + 1, 0])
                for processor in processors:
                    row = processor(context, row)
            row = row - mx.logsumexp(row, axis=-1, keepdims=True)
            sampler = self.samplers[e] if self.samplers and self.samplers[e] is not None else self.fallback_sampler
            plain_next[e], plain_logprobs[e] = sampler(row), row[0]
        mx.eval(greedy, list(plain_next.values()), self._next_logprobs)
        verdicts: list[list[int]] = greedy.tolist()  # type: ignore[assignment]

        emitted: list[list[int]] = []  # per row: the tokens this step adds to the sequence
        emitted_logprobs: list[list[mx.array]] = []
        next_tokens: list[int] = []
        next_logprobs: list[mx.array] = []
        padding = []
        for e in range(B):
            if speculating[e]:
                accepted = 0
                for j, token in enumerate(drafts[e]):
                    if verdicts[e][j] != token:
                        break
                    accepted += 1
                if drafts[e]:
                    self.drafters.record(self.uids[e], len(drafts[e]), accepted)
                self.stats.drafted += len(drafts[e])
                self.stats.accepted += accepted
                emitted.append([pending[e], *drafts[e][:accepted]])
                emitted_logprobs.append([self._next_logprobs[e], *(logprobs[e, j] for j in range(accepted))])
                next_tokens.append(verdicts[e][accepted])
                next_logprobs.append(logprobs[e, accepted])
                padding.append(K - accepted)
            else:
                emitted.append([pending[e]])
                emitted_logprobs.append([self._next_logprobs[e]])
                next_tokens.append(plain_next[e].item())  # type: ignore[arg-type]
                next_logprobs.append(plain_logprobs[e])
                padding.append(K)
        self._drop_rejected(padding)
        for tokens, new in zip(self.tokens, emitted):
            tokens.extend(new)
        self._current_tokens = mx.array(pending)  # type: ignore[assignment]  # mlx-lm types it None
        self._current_logprobs = []
        self._next_tokens = mx.array(next_tokens)
        self._next_logprobs = next_logprobs
        return self._responses(emitted, emitted_logprobs)

    def _drop_rejected(self, padding: list[int]) -> None:
        """Each row keeps 1 + accepted of its 1 + K new positions: cut what every row
        rejects, and turn the rest into left padding (rolled, masked)."""
        common = min(padding)
        for c in self.prompt_cache:
            if common:
                c.trim(common)
            c.prepare(right_padding=[p - common for p in padding])  # a no-op where none is left
            c.finalize()
        mx.eval([c.state for c in self.prompt_cache])

    def _responses(self, emitted: list[list[int]], emitted_logprobs: list[list[mx.array]]) -> list:
        keep, responses = [], []
        for i, (tokens, rows) in enumerate(zip(emitted, emitted_logprobs)):
            finish_reason = None
            for j, (token, row) in enumerate(zip(tokens, rows)):
                self._num_tokens[i] += 1
                if self._num_tokens[i] >= self.max_tokens[i]:
                    finish_reason = "length"
                if self._matchers[i].advance(token):
                    finish_reason = "stop"
                if finish_reason is None:
                    responses.append(self.Response(self.uids[i], token, row, None, None, None))
                    continue
                # Finished mid-draft: the cache holds tokens past this one; cut them off.
                extra = len(tokens) - 1 - j
                cache = self.extract_cache(i)
                if extra:
                    for c in cache:
                        c.trim(extra)
                held = self.tokens[i][: len(self.tokens[i]) - extra]
                responses.append(self.Response(self.uids[i], token, row, finish_reason, cache, held))
                break
            if finish_reason is None:
                keep.append(i)
        if len(keep) < len(self.uids):
            self.filter(keep)
        return responses
