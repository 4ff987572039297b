"""Continuous-batching text generation over mlx-lm's ``BatchGenerator``.

One dedicated thread owns the model and the batch: it admits new sequences and
drops cancelled ones between steps, so requests join and leave the running batch
at every step. Callers live on an asyncio loop and receive typed chunks through
``asyncio.Queue``s fed with ``call_soon_threadsafe``. No Ray here.
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections import deque
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlx_lm.models.cache import LRUPromptCache, trim_prompt_cache

from mlx_orchard.engines.detokenize import IncrementalDetokenizer
from mlx_orchard.engines.sampling import SamplingParams, build_logits_processors, build_sampler
from mlx_orchard.engines.stopping import StopStringFilter
from mlx_orchard.errors import ContextLengthExceededError, InvalidRequestError, ServiceUnavailableError

logger = logging.getLogger("orchard.llm")
_MODEL_KEY = 0  # the prefix cache is per engine, which serves one model


@dataclass
class GenerationChunk:
    """New text of one sequence since its previous chunk (several steps may be coalesced)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | None while running
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass
class EngineStats:
    running: int  # sequences in the batch (prefill or decode)
    waiting: int  # submitted, not yet admitted by the loop thread
    steps: int
    generated_tokens: int
    alive: bool


@dataclass
class _Sequence:
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    uid: int | None = None
    detokenizer: IncrementalDetokenizer | None = None
    stops: StopStringFilter | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    started: bool = False  # has produced its first token
    done: bool = False

    def emit(self, item: GenerationChunk | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class LLMEngine:
    def __init__(
        self,
        model_path: str | Path,
        *,
        max_batch_size: int = 32,
        prefill_batch_size: int = 8,
        prefill_step_size: int = 512,
        default_max_tokens: int = 2048,
        prefix_cache_size: int = 16,
    ):
        self.model_path = str(model_path)
        self.max_batch_size = max_batch_size
        self.prefill_batch_size = min(prefill_batch_size, max_batch_size)
        self.prefill_step_size = prefill_step_size
        self.default_max_tokens = default_max_tokens
        self.prefix_cache_size = prefix_cache_size
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._running: dict[int, _Sequence] = {}
        self._pending: deque[_Sequence] = deque()  # received, not yet in the BatchGenerator
        self._prefilling = 0  # admitted sequences still waiting for their first token
        self._waiting = 0
        self._steps = 0
        self._generated = 0
        self._fatal: BaseException | None = None
        self._stopping = False
        self._loaded = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orchard-llm-engine", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._fatal is not None:
            raise self._fatal

    # ---- loading (on the engine thread: all MLX work stays on it) ----

    def _load(self) -> None:
        from mlx_lm import load
        from mlx_lm.generate import BatchGenerator

        self.model, self.tokenizer, config = load(self.model_path, return_config=True)
        self.context_length = int(
            config.get("max_position_embeddings") or config.get("max_seq_len") or 4096
        )
        self.eos_token_ids = set(self.tokenizer.eos_token_ids)
        self._make_generator = lambda: BatchGenerator(
            self.model,
            stop_tokens=[[t] for t in self.eos_token_ids],
            completion_batch_size=self.max_batch_size,
            prefill_batch_size=self.prefill_batch_size,
            prefill_step_size=self.prefill_step_size,
        )
        self._generator = self._make_generator()
        # KV caches of finished sequences, found again by longest common token prefix: chat
        # requests share their system prompt, and a conversation's next turn extends the last.
        self._prefix_cache = LRUPromptCache(max_size=self.prefix_cache_size) if self.prefix_cache_size else None

    # ---- tokenization (callers' threads: the tokenizer is not MLX) ----

    def encode_chat(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                "this model has no chat template; use /v1/completions", param="messages"
            )
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, **template_kwargs
            )
        except Exception as e:  # a template that rejects the conversation (roles, order)
            raise InvalidRequestError(f"the chat template rejected the messages: {e}", param="messages") from e
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def check_prompt(self, prompt: Sequence[int], params: SamplingParams) -> int:
        """Validate lengths before queueing; returns the effective max_tokens."""
        n = len(prompt)
        if n == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        room = self.context_length - n
        if room <= 0:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.context_length} tokens, "
                f"but the prompt has {n} tokens.",
                param="messages",
            )
        if params.max_tokens is None:
            return min(room, self.default_max_tokens)
        if params.max_tokens > room:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.context_length} tokens. "
                f"The prompt has {n} tokens and max_tokens asks for {params.max_tokens} more.",
                param="max_tokens",
            )
        return params.max_tokens

    # ---- the asyncio side ----

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        """Check the request now (raising before anything is queued), then return its stream
        of chunks; closing the stream early removes the sequence from the batch."""
        if not self.is_alive():
            raise ServiceUnavailableError("the generation loop is not running")
        max_tokens = self.check_prompt(prompt, params)
        return self._stream(list(prompt), params, max_tokens)

    async def _stream(self, prompt: list[int], params: SamplingParams, max_tokens: int) -> AsyncIterator[GenerationChunk]:
        seq = _Sequence(
            prompt=prompt,
            params=params,
            max_tokens=max_tokens,
            loop=asyncio.get_running_loop(),
            out=asyncio.Queue(),
        )
        self._waiting += 1
        self._commands.put(("add", seq))
        try:
            while True:
                item = await seq.out.get()
                # Coalesce whatever else already arrived: fewer, larger messages downstream.
                while isinstance(item, GenerationChunk) and not item.finish_reason and not seq.out.empty():
                    nxt = seq.out.get_nowait()
                    if isinstance(nxt, BaseException):
                        item = nxt
                        break
                    item = GenerationChunk(
                        text=item.text + nxt.text,
                        token_ids=item.token_ids + nxt.token_ids,
                        prompt_tokens=nxt.prompt_tokens,
                        completion_tokens=nxt.completion_tokens,
                        finish_reason=nxt.finish_reason,
                        cached_tokens=nxt.cached_tokens,
                    )
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            if not seq.done:
                self._commands.put(("cancel", seq))

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self._running),
            waiting=self._waiting + len(self._pending),
            steps=self._steps,
            generated_tokens=self._generated,
            alive=self.is_alive(),
        )

    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._fatal is None and not self._stopping

    def shutdown(self) -> None:
        self._stopping = True
        self._commands.put(("stop", None))
        self._thread.join(timeout=10)

    # ---- the engine thread ----

    def _run(self) -> None:
        try:
            self._load()
        except BaseException as e:  # surfaced to the constructor
            self._fatal = e
            self._loaded.set()
            return
        self._loaded.set()
        while not self._stopping:
            self._take_commands(block=not self._running and not self._pending)
            self._admit_pending()
            if not self._running:
                continue
            try:
                _, responses = self._generator.next()
            except Exception as e:
                # One bad step must not take the replica down: fail this batch, start afresh.
                logger.exception("generation step failed")
                self._fail_all(e)
                self._generator = self._make_generator()
                continue
            self._steps += 1
            for r in responses:
                self._on_token(r.uid, r.token, r.finish_reason)
                if r.finish_reason and self._prefix_cache is not None:
                    self._prefix_cache.insert_cache(_MODEL_KEY, list(r.all_tokens), r.prompt_cache)

    def _take_commands(self, block: bool) -> None:
        while True:
            try:
                kind, seq = self._commands.get(block=block)
            except queue.Empty:
                break
            block = False
            if kind == "stop":
                self._stopping = True
                break
            if kind == "add":
                self._waiting -= 1
                self._pending.append(seq)
            elif kind == "cancel":
                if seq in self._pending:
                    self._pending.remove(seq)
                elif seq.uid is not None and self._running.pop(seq.uid, None) is not None:
                    self._generator.remove([seq.uid])
                    if not seq.started:
                        self._prefilling -= 1
                seq.done = True

    def _admit_pending(self) -> None:
        """Admit waiting sequences once the previous group has its first tokens.

        BatchGenerator returns a step's tokens only after that step's prefill work, so
        admitting more prompts before the previous group's first tokens are out would make
        every earlier request wait for every later request's prefill (TTFT p50 = p95).
        """
        if not self._pending or self._prefilling:
            return
        room = min(self.prefill_batch_size, self.max_batch_size - len(self._running))
        group = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
        if group:
            self._admit(group)

    def _cached_prefix(self, prompt: list[int]) -> tuple[list | None, list[int]]:
        """A copy of the longest cached KV prefix of ``prompt``, and the tokens still to prefill."""
        if self._prefix_cache is None:
            return None, prompt
        cache, rest = self._prefix_cache.fetch_nearest_cache(_MODEL_KEY, prompt)
        if cache is not None and not rest:  # exact hit: re-run the last token for its logits
            trim_prompt_cache(cache, 1)
            rest = prompt[-1:]
        return cache, rest

    def _admit(self, seqs: list[_Sequence]) -> None:
        caches, rests = zip(*(self._cached_prefix(s.prompt) for s in seqs))
        uids = self._generator.insert(
            list(rests),
            caches=list(caches),
            all_tokens=[s.prompt[: len(s.prompt) - len(rest)] for s, rest in zip(seqs, rests)],
            max_tokens=[s.max_tokens for s in seqs],
            samplers=[build_sampler(s.params) for s in seqs],
            logits_processors=[build_logits_processors(s.params) for s in seqs],
        )
        self._prefilling += len(seqs)
        for uid, seq, rest in zip(uids, seqs, rests):
            seq.uid = uid
            seq.cached_tokens = len(seq.prompt) - len(rest)
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer)
            seq.stops = StopStringFilter(seq.params.stop)
            self._running[uid] = seq

    def _on_token(self, uid: int, token: int, finish_reason: str | None) -> None:
        seq = self._running.get(uid)
        if seq is None:  # cancelled while this step ran
            return
        self._generated += 1
        if not seq.started:
            seq.started = True
            self._prefilling -= 1
        seq.completion_tokens += 1
        seq.token_ids.append(token)
        eos = finish_reason == "stop" and token in self.eos_token_ids
        text = "" if eos else seq.detokenizer.add(token)
        if finish_reason:
            text += seq.detokenizer.flush()
        text = seq.stops.feed(text)
        if seq.stops.stopped:
            finish_reason = "stop"
            self._generator.remove([uid])
        elif finish_reason:
            text += seq.stops.flush()
        if finish_reason:
            del self._running[uid]
            seq.done = True
        chunk = GenerationChunk(
            text=text,
            token_ids=[token],
            prompt_tokens=len(seq.prompt),
            completion_tokens=seq.completion_tokens,
            finish_reason=finish_reason,
            cached_tokens=seq.cached_tokens,
        )
        seq.emit(chunk)

    def _fail_all(self, error: BaseException) -> None:
        for seq in self._running.values():
            seq.done = True
            seq.emit(error)
        self._running.clear()
        self._prefilling = 0

