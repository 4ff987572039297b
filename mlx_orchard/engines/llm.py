"""Continuous-batching text generation over a ``BatchBackend`` (mlx-lm's ``BatchGenerator``).

One dedicated thread owns the model and the batch: it admits new sequences and
drops cancelled ones between steps, so requests join and leave the running batch
at every step. Callers live on an asyncio loop and receive typed chunks through
mailboxes fed with ``call_soon_threadsafe``. No Ray here.

Hardening, since MLX checks no bounds and one replica serves everyone:
- every client value that becomes an index or a size (token ids, ``logit_bias`` keys,
  ``top_k``, ``seed``, lengths) is checked here, against the model's own limits, before
  it reaches MLX (``check_request``);
- a sequence whose sampler or logits processor raises fails alone; a step that fails
  as a whole is retried for the sequences in it (each re-prefills its prompt and the
  tokens it already produced), and a sequence caught in two failed steps fails;
- the prefix cache only takes the KV of sequences that finished in a successful step;
- waiting sequences are bounded in count, running ones by the KV-cache bytes they may
  grow to; nothing on the engine thread can end it silently.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import (
    LRUPromptCache,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)

from mlx_orchard.engines.batch_backend import BatchBackend, MlxLmBatch, StepToken
from mlx_orchard.engines.constrained import Grammars
from mlx_orchard.engines.detokenize import IncrementalDetokenizer
from mlx_orchard.engines.prefix_disk import DiskPrefixCache
from mlx_orchard.engines.quantized_kv import as_quantized, plain_kv_cache
from mlx_orchard.engines.sampling import (
    SamplingParams,
    build_logits_processors,
    build_sampler,
)
from mlx_orchard.engines.speculative import SpeculativeConfig
from mlx_orchard.engines.stopping import StopStringFilter
from mlx_orchard.engines.token_bytes import TokenBytes
from mlx_orchard.errors import (
    ContextLengthExceededError,
    EngineError,
    InvalidRequestError,
    OverloadedError,
    ServiceUnavailableError,
)
from mlx_orchard.wire import TokenLogprob, TopLogprob

logger = logging.getLogger("orchard.llm")
_MODEL_KEY = 0  # the prefix cache is per engine, which serves one model
_MAX_LOGIT_BIAS = 1024  # entries per request; OpenAI allows 300
_ADMITTED = object()  # queued to a caller when its sequence joins the batch
_MAX_TOP_LOGPROBS = 20  # OpenAI's bound


@dataclass
class GenerationChunk:
    """New text of one sequence since its previous chunk (several steps may be coalesced)."""

    text: str
    token_ids: list[int]
    completion_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | None while running
    index: int = 0  # which of the request's n choices
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked
    stop_sequence: str | None = None  # the request's stop string that ended it


@dataclass
class EngineStats:
    running: int  # sequences in the batch (prefill or decode)
    waiting: int  # submitted, not yet admitted by the loop thread
    steps: int
    generated_tokens: int
    alive: bool
    failed_steps: int = 0
    kv_reserved_bytes: int = 0  # what the running sequences may grow to
    kv_used_bytes: int = 0  # what the running sequences' tokens hold now (after the last step)
    kv_bytes_per_token: int = 0  # KV-cache bytes one token of one sequence takes (after kv_bits)
    kv_budget_bytes: int | None = None
    prefix_cache_bytes: int = 0
    prefix_cache_disk_bytes: int = 0
    prefix_cache_disk_hits: int = 0
    prefilled_tokens: int = 0  # prompt tokens run through the model (cache hits excluded)
    preempted: int = 0  # sequences paused for a more urgent one (they resume later)
    draft_tokens: int = 0  # speculative decoding: tokens drafted ...
    accepted_tokens: int = 0  # ... and accepted by the model


class _Mailbox:
    """A caller's inbox: the engine thread posts into it through ``call_soon_threadsafe``,
    so ``put`` always runs on the caller's loop. Unlike ``asyncio.Queue`` it lets the
    reader look at what is waiting (to coalesce one choice's chunks)."""

    def __init__(self) -> None:
        self.items: deque = deque()
        self._waiter: asyncio.Future | None = None

    def put(self, item: object) -> None:
        self.items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> object:
        while not self.items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self.items.popleft()


# eq=False: sequences are found (in the pending deque, on cancel) by identity, never by value.
@dataclass(eq=False)
class _Sequence:
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    reserve: int  # KV-cache bytes this sequence may grow to
    loop: asyncio.AbstractEventLoop
    out: _Mailbox
    uid: int | None = None
    detokenizer: IncrementalDetokenizer | None = None
    stops: StopStringFilter | None = None
    sampler: Callable | None = None  # built once, so a seeded key chain survives a retried step
    processors: list | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    prefilling: bool = False  # admitted (or re-admitted), waiting for its next token
    failures: int = 0  # failed steps this sequence was part of
    error: BaseException | None = None  # raised by its own sampler or logits processor
    index: int = 0  # which of the request's n choices
    # Choices 1..n-1 of a request wait for choice 0's prefill and start from a copy of its KV.
    followers: list[_Sequence] = field(default_factory=list)
    preset: tuple[list, list[int]] | None = None  # (KV cache, the tokens it holds)
    media: tuple = ()  # spans of the prompt whose embeddings come from images (VLMEngine)
    prefilled_at_start: int = 0  # prompt tokens its start prefilled outside the batch (images)
    done: bool = False
    queued_at: float = 0.0
    admitted: bool = False  # has joined the batch once (told to the caller)
    priority: int = 0  # lower runs first (vLLM's convention)
    order: int = 0  # arrival, for first come first served within a priority

    def emit(self, item: object) -> bool:
        """Hand an item to the caller's loop; False when that loop is gone (caller left)."""
        try:
            self.loop.call_soon_threadsafe(self.out.put, item)
            return True
        except RuntimeError:  # the event loop is closed
            return False


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
        prefix_cache_bytes: int = 1 << 30,
        max_waiting: int = 256,
        max_queue_wait_s: float | None = None,
        kv_cache_bytes: int | None = None,
        mlx_lock: AbstractContextManager | None = None,
        context_length: int | None = None,
        max_tokens_limit: int | None = None,
        chat_template: str | None = None,
        keep_special_tokens: bool = False,
        prefix_cache_dir: str | Path | None = None,
        prefix_cache_disk_bytes: int = 0,
        speculative: SpeculativeConfig | None = None,
        draft_model: str | Path | None = None,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
    ):
        self.model_path = str(model_path)
        self._context_override = context_length  # the config's word over the model's own
        self.max_tokens_limit = max_tokens_limit  # requests asking for more are refused
        self.chat_template = chat_template  # replaces the tokenizer's template when set
        # Text keeps special tokens (not end-of-sequence ones) when the model's tool-call or
        # reasoning markers are special tokens (harmony, Mistral's [TOOL_CALLS]).
        self.keep_special_tokens = keep_special_tokens
        # Engines of several models in one replica take turns on MLX (one step each), so
        # the replica's MLX work stays serial, as if on one thread.
        self._mlx_lock = mlx_lock if mlx_lock is not None else nullcontext()
        self.max_batch_size = max_batch_size
        self.prefill_batch_size = min(prefill_batch_size, max_batch_size)
        self.prefill_step_size = prefill_step_size
        self.default_max_tokens = default_max_tokens
        self.prefix_cache_size = prefix_cache_size
        self.prefix_cache_bytes = prefix_cache_bytes
        self.prefix_cache_dir = prefix_cache_dir  # the disk tier (off without a dir and bytes)
        self.prefix_cache_disk_bytes = prefix_cache_disk_bytes
        self._disk: DiskPrefixCache | None = None
        self.max_waiting = max_waiting
        self.max_queue_wait_s = max_queue_wait_s
        self.kv_budget = kv_cache_bytes
        self.speculative = speculative  # drafts for greedy sequences (off: None) ...
        self.draft_model_path = str(draft_model) if draft_model else None  # ... by this model, else by prompt lookup
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size  # quantized KV cache (off: None)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._running: dict[int, _Sequence] = {}
        self._pending: deque[_Sequence] = deque()  # received, not yet in the BatchGenerator
        self._waiting = 0
        self._reserved = 0  # KV bytes reserved by running sequences
        self._steps = 0
        self._arrivals = itertools.count()
        self._preempted = 0  # sequences paused for a more urgent one
        self._failed_steps = 0
        self._prefilled = 0
        self._generated = 0
        self._kv_tokens = 0  # tokens the running sequences hold, after the last step
        # steps run at each batch size (index): a list, so other threads copy it whole under the GIL
        self._step_sizes = [0] * (max_batch_size + 1)
        self._fatal: BaseException | None = None
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[_Sequence, GenerationChunk]]] = {}
        self._grammars: Grammars | None = None
        self._grammars_lock = threading.Lock()
        self._stopping = False
        self._loaded = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orchard-llm-engine", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._fatal is not None:
            raise self._fatal

    # ---- loading (on the engine thread: all MLX work stays on it) ----

    def _load_model(self) -> tuple[Any, Any, dict[str, Any]]:
        """The model the batch steps, its mlx-lm tokenizer wrapper and its config."""
        from mlx_lm import load

        return load(self.model_path, return_config=True)  # type: ignore[return-value]

    def _load(self) -> None:
        self.model, self.tokenizer, config = self._load_model()
        self.context_length = self._context_override or int(
            config.get("max_position_embeddings") or config.get("max_seq_len") or 4096
        )
        # The rows of the embedding and of the logits: the bound for every token id.
        self.vocab_size = int(config.get("vocab_size") or len(self.tokenizer.vocab))
        self.eos_token_ids = set(self.tokenizer.eos_token_ids)
        hf = self.tokenizer._tokenizer
        self._added_tokens = {t: i for t, i in hf.get_added_vocab().items() if 0 <= i < self.vocab_size}
        self.token_bytes = TokenBytes(hf)
        plain_kv = plain_kv_cache(self.model)
        if self.speculative is not None and not plain_kv:
            logger.warning("%s: speculative decoding is off (its KV cache cannot roll back drafts)", self.model_path)
            self.speculative = None
        if self.kv_bits and not plain_kv:
            logger.warning("%s: kv_bits is ignored (its cache is not a plain KV cache)", self.model_path)
            self.kv_bits = None
        try:
            self.kv_bytes_per_token = self._measure_kv_bytes_per_token()
        except ValueError as e:  # mx.quantize: the head size is not a multiple of the group size
            if not self.kv_bits:
                raise
            raise ValueError(f"kv_group_size {self.kv_group_size} does not fit this model's KV heads: {e}") from e
        self._draft_model = self._load_draft(hf) if self.speculative is not None and self.draft_model_path else None
        self._make_generator = lambda: MlxLmBatch(
            self.model,
            stop_tokens=[[t] for t in self.eos_token_ids],
            completion_batch_size=self.max_batch_size,
            prefill_batch_size=self.prefill_batch_size,
            prefill_step_size=self.prefill_step_size,
            speculative=self.speculative,
            kv_quantization=(self.kv_group_size, self.kv_bits) if self.kv_bits else None,
            draft_model=self._draft_model,
            vocab_size=self.vocab_size,
        )
        self._generator: BatchBackend = self._make_generator()
        # KV caches of finished sequences, found again by longest common token prefix: chat
        # requests share their system prompt, and a conversation's next turn extends the last.
        self._prefix_cache = (
            LRUPromptCache(max_size=self.prefix_cache_size, max_bytes=self.prefix_cache_bytes)
            if self.prefix_cache_size
            else None
        )
        if self._prefix_cache is not None and self.prefix_cache_dir and self.prefix_cache_disk_bytes:
            try:
                self._disk = DiskPrefixCache(Path(self.prefix_cache_dir) / self._model_identity(), self.prefix_cache_disk_bytes)
            except OSError:
                logger.exception("the prefix cache's disk tier is off: its directory is not usable")

    def _load_draft(self, hf: Any) -> Any:
        """The draft model for speculation: it must speak the same vocabulary."""
        from mlx_lm import load

        assert self.draft_model_path is not None
        draft, tokenizer = load(self.draft_model_path)[:2]
        if tokenizer._tokenizer.get_vocab() != hf.get_vocab():
            raise ValueError(f"the draft model {self.draft_model_path} has another vocabulary than {self.model_path}")
        if not plain_kv_cache(draft):
            raise ValueError(f"the draft model {self.draft_model_path} keeps no plain KV cache; it cannot draft")
        return draft

    def _model_identity(self) -> str:
        """A key for this model's weights (path, config, weight file sizes and times), so a
        disk tier never hands one model's KV to another under the same name."""
        root = Path(self.model_path)
        h = hashlib.sha256(str(root.resolve()).encode())
        for f in sorted(root.glob("*.json")) + sorted(root.glob("*.safetensors")):
            stat = f.stat()
            h.update(f"{f.name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
        return h.hexdigest()[:16]

    def grammars(self) -> Grammars:
        """Structured output's view of this model's tokenizer, built on first use."""
        with self._grammars_lock:
            if self._grammars is None:
                self._grammars = Grammars(self.tokenizer._tokenizer, self.vocab_size, sorted(self.eos_token_ids))
            return self._grammars

    def _grammar_of(self, params: SamplingParams) -> str | None:
        if params.grammar is not None:
            return self.grammars().lark(params.grammar)
        if params.json_schema is not None:
            return self.grammars().grammar(params.json_schema)
        return None

    def special_token(self, text: str) -> int | None:
        """The id of ``text`` when it is one added (special or control) token of this model."""
        return self._added_tokens.get(text)

    def _measure_kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token adds, measured on a real cache (every architecture's own)."""
        cache = make_prompt_cache(self.model)
        if self.kv_bits:
            cache = [as_quantized(c, self.kv_group_size, self.kv_bits) for c in cache]
        self.model(mx.array([[0, 0]]), cache=cache)
        mx.eval([c.state for c in cache])
        per_token = 0
        for c in cache:
            keys = getattr(c, "keys", None)
            if isinstance(keys, tuple):  # quantized: (packed, scales, biases)
                keys = keys[0]
            if keys is not None and keys.ndim >= 3 and keys.shape[-2]:
                per_token += c.nbytes // keys.shape[-2]
        return max(per_token, 1)

    # ---- tokenization (a caller's thread: the tokenizer is not MLX) ----

    def encode_chat(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> list[int]:
        if not self.chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(
                "this model has no chat template; use /v1/completions", param="messages"
            )
        if self.chat_template:
            template_kwargs = {"chat_template": self.chat_template, **template_kwargs}
        try:
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, **template_kwargs
            )
        except Exception as e:  # a template that rejects the conversation (roles, order)
            raise InvalidRequestError(f"the chat template rejected the messages: {e}", param="messages") from e
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def encode_continuation(self, text: str) -> list[int]:
        """Tokens of text that continues a prompt (no BOS; special-token text is the token)."""
        return list(self.tokenizer._tokenizer.encode(text, add_special_tokens=False))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # ---- checks: every client value that becomes an index or a size inside MLX ----

    def check_request(self, prompt: Sequence[int], params: SamplingParams) -> tuple[int, SamplingParams]:
        """Validate a request against this model's limits before anything is queued.

        Returns the effective max_tokens and the params to run (unset fields at their
        built-in defaults, ``top_k`` past the vocabulary meaning no cut, ``seed`` folded
        into MLX's 64-bit key).
        """
        params = params.with_defaults()
        n = len(prompt)
        if n == 0:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise InvalidRequestError(
                f"the prompt has token ids outside this model's vocabulary [0, {self.vocab_size})",
                param="prompt",
            )
        if len(params.logit_bias) > _MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"logit_bias has more than {_MAX_LOGIT_BIAS} entries", param="logit_bias")
        bad = [t for t, _ in params.logit_bias if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"logit_bias names token ids outside this model's vocabulary [0, {self.vocab_size}): {bad[:5]}",
                param="logit_bias",
            )
        self._grammar_of(params)  # an unusable schema or grammar is a 400 now, not a failed stream
        if not 0 <= params.prefilled < n:
            raise InvalidRequestError("prefilled must be shorter than the prompt", param="prompt")
        if params.logprobs is not None and not 0 <= params.logprobs <= _MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs must be between 0 and {_MAX_TOP_LOGPROBS}", param="top_logprobs")
        if (params.top_k or 0) >= self.vocab_size:
            params = params.with_changes(top_k=0)  # keeping every token is no cut at all
        if params.seed is not None and not 0 <= params.seed < 1 << 64:
            params = params.with_changes(seed=params.seed % (1 << 64))
        room = self.context_length - n
        if room <= 0:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.context_length} tokens, "
                f"but the prompt has {n} tokens.",
                param="messages",
            )
        if self.max_tokens_limit is not None and (params.max_tokens or 0) > self.max_tokens_limit:
            raise InvalidRequestError(
                f"max_tokens is at most {self.max_tokens_limit} for this model", param="max_tokens"
            )
        if params.max_tokens is None:
            max_tokens = min(room, self.default_max_tokens, self.max_tokens_limit or room)
        elif params.max_tokens > room:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {self.context_length} tokens. "
                f"The prompt has {n} tokens and max_tokens asks for {params.max_tokens} more.",
                param="max_tokens",
            )
        elif params.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
        else:
            max_tokens = params.max_tokens
        if self.kv_budget is not None and (n + max_tokens) * self.kv_bytes_per_token > self.kv_budget:
            fits = self.kv_budget // self.kv_bytes_per_token
            raise ContextLengthExceededError(
                f"The prompt ({n} tokens) and max_tokens ({max_tokens}) need more KV-cache memory than "
                f"this replica has ({fits} tokens in all); lower max_tokens or shorten the prompt.",
                param="max_tokens",
            )
        return max_tokens, params

    # ---- the asyncio side ----

    def check_media(self, prompt: Sequence[int], media: Sequence[Any]) -> None:
        """Spans of the prompt that are not text (images): a text model takes none."""
        if media:
            raise InvalidRequestError("this model is a text-only model; it does not accept images", param="messages")

    def generate(
        self, prompt: Sequence[int], params: SamplingParams, n: int = 1, *, waited_s: float = 0.0, priority: int = 0,
        media: Sequence[Any] = (),
    ) -> GenerationStream:
        """Check the request now (raising before anything is queued) and queue it. The
        returned stream says when the request joins the batch (``admitted()``) and then
        yields the chunks of its ``n`` choices; closing it early removes them from the batch.

        The n choices share one prefill: choice 0 prefills the prompt, the others start
        from a copy of its KV cache. With a seed, choice i samples with seed + i.
        ``waited_s``: how long the request already queued before it reached the engine (in
        Serve's queues); it counts towards ``max_queue_wait_s``. ``priority``: lower is
        admitted first, and may pause a running sequence of a higher value when the batch
        is full (it resumes later from the prefix cache)."""
        if not self.is_alive():
            raise ServiceUnavailableError("the generation loop is not running")
        if not 1 <= n <= self.max_batch_size:
            raise InvalidRequestError(f"n must be between 1 and {self.max_batch_size}", param="n")
        max_tokens, params = self.check_request(prompt, params)
        self.check_media(prompt, media)
        if self._waiting + len(self._pending) >= self.max_waiting:
            raise OverloadedError("The model has too many requests waiting; retry shortly.")
        loop, out, now = asyncio.get_running_loop(), _Mailbox(), time.monotonic() - max(0.0, waited_s)
        seqs = [
            _Sequence(
                prompt=list(prompt),
                params=params if i == 0 or params.seed is None else params.with_changes(
                    seed=(params.seed + i) % (1 << 64)
                ),
                max_tokens=max_tokens,
                reserve=(len(prompt) + max_tokens) * self.kv_bytes_per_token,
                loop=loop,
                out=out,
                queued_at=now,
                index=i,
                admitted=i > 0,  # the request is admitted with its first choice
                priority=priority,
                order=next(self._arrivals),
                media=tuple(media),
            )
            for i in range(n)
        ]
        seqs[0].followers = seqs[1:]
        self._waiting += 1
        self._commands.put(("add", seqs[0]))
        return GenerationStream(self, seqs)

    async def ping(self, timeout: float) -> None:
        """Return once the engine thread has come round its loop; raise if it does not in time."""
        if not self.is_alive():
            raise RuntimeError("the generation loop has stopped")
        loop = asyncio.get_running_loop()
        answered = loop.create_future()
        self._commands.put(("ping", (loop, answered)))
        await asyncio.wait_for(answered, timeout)

    def stats(self) -> EngineStats:
        spec = self._generator.speculation if self._loaded.is_set() and self._fatal is None else None
        return EngineStats(
            running=len(self._running),
            waiting=self._waiting + len(self._pending),
            steps=self._steps,
            generated_tokens=self._generated,
            alive=self.is_alive(),
            failed_steps=self._failed_steps,
            kv_reserved_bytes=self._reserved,
            kv_used_bytes=self._kv_tokens * getattr(self, "kv_bytes_per_token", 0),
            kv_bytes_per_token=getattr(self, "kv_bytes_per_token", 0),
            kv_budget_bytes=self.kv_budget,
            prefix_cache_bytes=self._prefix_cache.nbytes if self._prefix_cache is not None else 0,
            prefix_cache_disk_bytes=self._disk.nbytes if self._disk is not None else 0,
            prefix_cache_disk_hits=self._disk.hits if self._disk is not None else 0,
            prefilled_tokens=self._prefilled,
            preempted=self._preempted,
            draft_tokens=spec.drafted if spec is not None else 0,
            accepted_tokens=spec.accepted if spec is not None else 0,
        )

    def step_sizes(self) -> list[int]:
        """How many steps ran at each batch size (the index) since the engine started."""
        return list(self._step_sizes)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._fatal is None and not self._stopping

    def shutdown(self) -> None:
        self._stopping = True
        self._commands.put(("stop", None))
        self._thread.join(timeout=10)

    # ---- the engine thread ----

    def _run(self) -> None:
        try:
            with self._mlx_lock:
                self._load()
        except BaseException as e:  # surfaced to the constructor
            self._fatal = e
            self._loaded.set()
            return
        self._loaded.set()
        try:
            while not self._stopping:
                try:
                    self._iterate()
                except Exception as e:  # noqa: BLE001 - admission, cache or hand-off: recover
                    with self._mlx_lock:
                        self._recover(e)
        except BaseException as e:  # the loop cannot go on: say so to everyone waiting
            logger.critical("the generation loop stopped", exc_info=e)
            self._fatal = e
            error = ServiceUnavailableError("the model replica stopped; retry shortly")
            for seq in [*self._running.values(), *self._pending]:
                seq.emit(error)
            raise

    def _iterate(self) -> None:
        self._take_commands(block=not self._running and not self._pending)
        with self._mlx_lock:
            try:
                self._work()
            finally:
                self._deliver()  # the tokens of a step that then failed still reach their callers

    def _work(self) -> None:
        self._admit_pending()
        self._expire_pending()  # what could not join the batch now, and has waited too long
        if not self._running:
            return
        self._step_sizes[min(len(self._running), self.max_batch_size)] += 1
        responses = self._generator.step()
        self._steps += 1
        for r in responses:
            seq = self._running.get(r.uid)
            if seq is None:  # cancelled while this step ran
                continue
            if seq.followers:  # choice 0 has prefilled: its siblings start from its KV
                self._spawn_followers(seq, r)
            self._on_token(seq, r.token, r.finish_reason, r.logprobs)
            if r.finish_reason and self._prefix_cache is not None:
                self._remember(self._cache_key(seq, r.all_tokens or []), r.prompt_cache or [])
        self._deliver()  # a sequence's tokens before its failure, if its sampler fails below
        self._fail_poisoned()
        self._kv_tokens = sum(len(s.prompt) + s.completion_tokens for s in self._running.values())

    def _spawn_followers(self, leader: _Sequence, response: StepToken) -> None:
        followers, leader.followers = [f for f in leader.followers if not f.done], []
        if not followers:
            return
        try:
            if response.finish_reason:
                cache, held = response.prompt_cache or [], response.all_tokens or []
            else:
                assert leader.uid is not None
                cache, held = self._generator.extract_cache(leader.uid)
            keep = len(leader.prompt) - 1  # the last prompt token is re-run for its logits
            trim = len(held) - keep
            if trim < 0 or not can_trim_prompt_cache(cache):
                raise ValueError("the leader's cache cannot be cut back to the prompt")
            for f in followers:
                copy = deepcopy(cache)
                trim_prompt_cache(copy, trim)
                f.preset = (copy, leader.prompt[:keep])
        except Exception:  # noqa: BLE001 - the followers then prefill on their own
            logger.exception("could not share the prompt's KV between choices")
            for f in followers:
                f.preset = None
        self._pending.extendleft(reversed(followers))  # ahead of newcomers: the request is admitted

    def _remember(self, tokens: list[int], cache: list) -> None:
        assert self._prefix_cache is not None
        try:
            self._prefix_cache.insert_cache(_MODEL_KEY, tokens, cache)
        except Exception:  # noqa: BLE001 - a cache that cannot take an entry serves without it
            logger.exception("prefix cache insert failed; clearing the cache")
            self._prefix_cache = LRUPromptCache(max_size=self.prefix_cache_size, max_bytes=self.prefix_cache_bytes)
        if self._disk is not None:
            self._disk.put(tokens, cache)

    def _recover(self, error: BaseException) -> None:
        """A step (or the bookkeeping around it) failed: start a fresh generator and re-admit
        the running sequences, each re-prefilling what it has so far. A sequence that was in
        two failed steps is failed, so one poisoned request cannot stall the others forever."""
        self._failed_steps += 1
        logger.error("generation step failed; retrying its %d sequences", len(self._running), exc_info=error)
        survivors = list(self._running.values())
        self._running.clear()
        self._reserved = 0
        self._generator = self._make_generator()
        retry = []
        for seq in survivors:
            seq.uid = None
            seq.failures += 1
            if seq.failures >= 2:
                self._finish_with_error(seq, EngineError("The model failed while generating this answer."))
            else:
                retry.append(seq)
        self._pending.extendleft(reversed(retry))  # ahead of the newcomers

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
                self._enqueue(seq)
            elif kind == "cancel":
                self._drop(seq)
            elif kind == "ping":
                loop, answered = seq
                try:
                    loop.call_soon_threadsafe(lambda f=answered: f.done() or f.set_result(None))
                except RuntimeError:  # the asker's loop is gone
                    pass

    def _drop(self, seq: _Sequence) -> None:
        """Forget a sequence wherever it is (its caller left or it failed)."""
        if seq in self._pending:
            self._pending.remove(seq)
        elif seq.uid is not None and self._running.pop(seq.uid, None) is not None:
            self._reserved -= seq.reserve
            self._generator.remove([seq.uid])
        seq.done = True

    def _expire_pending(self) -> None:
        """Shed sequences that waited longer than allowed: past capacity, working on requests
        whose callers are about to give up would make every answer late (goodput collapse)."""
        if self.max_queue_wait_s is None or not self._pending:
            return
        limit = time.monotonic() - self.max_queue_wait_s
        # Behind more urgent work a sequence may wait anywhere in the queue, not only at its head.
        for seq in [s for s in self._pending if not s.admitted and s.queued_at < limit]:
            self._finish_with_error(seq, OverloadedError("The model is at capacity; retry shortly."))

    def _admit_pending(self) -> None:
        """Admit waiting sequences once the previous group has its first tokens.

        BatchGenerator returns a step's tokens only after that step's prefill work, so
        admitting more prompts before the previous group's first tokens are out would make
        every earlier request wait for every later request's prefill (TTFT p50 = p95).
        A more urgent sequence does not wait for a less urgent group. A sequence also waits
        until the KV-cache bytes it may grow to fit the budget.
        """
        if not self._pending:
            return
        head = self._pending[0]
        if any(s.prefilling and s.priority <= head.priority for s in self._running.values()):
            return
        while (len(self._running) >= self.max_batch_size or not self._fits(head)) and self._preempt_for(head):
            pass
        room = min(self.prefill_batch_size, self.max_batch_size - len(self._running))
        group: list[_Sequence] = []
        reserved = self._reserved
        while self._pending and len(group) < room:
            seq = self._pending[0]
            if self.kv_budget is not None and reserved + seq.reserve > self.kv_budget and (group or self._running):
                break  # first come, first served: wait for memory rather than skip ahead
            group.append(self._pending.popleft())
            reserved += seq.reserve
        if group:
            self._admit(group)

    def _fits(self, seq: _Sequence) -> bool:
        return self.kv_budget is None or not self._running or self._reserved + seq.reserve <= self.kv_budget

    def _enqueue(self, seq: _Sequence) -> None:
        """Into the waiting queue by (priority, arrival)."""
        at = len(self._pending)
        for i, other in enumerate(self._pending):
            if (other.priority, other.order) > (seq.priority, seq.order):
                at = i
                break
        self._pending.insert(at, seq)

    def _preempt_for(self, seq: _Sequence) -> bool:
        """Pause the least urgent running sequence (latest arrival first) that is less urgent
        than ``seq``: its KV goes to the prefix cache and it waits in the queue, to resume
        where it stopped. False when none is less urgent."""
        victims = [s for s in self._running.values() if s.priority > seq.priority]
        if not victims:
            return False
        victim = max(victims, key=lambda s: (s.priority, s.order))
        assert victim.uid is not None
        if self._prefix_cache is not None:
            try:
                cache, held = self._generator.extract_cache(victim.uid)
                self._remember(self._cache_key(victim, held), cache)
            except Exception:  # noqa: BLE001 - it then re-prefills what it has when it resumes
                logger.exception("could not keep a paused sequence's KV")
        self._generator.remove([victim.uid])
        del self._running[victim.uid]
        self._reserved -= victim.reserve
        victim.uid, victim.prefilling = None, False
        self._preempted += 1
        self._enqueue(victim)
        return True

    def _cache_key(self, seq: _Sequence, tokens: list[int]) -> list[int]:
        """What the prefix cache files ``tokens`` of ``seq`` under: the tokens themselves (a
        vision engine writes its images' hashes over their placeholder tokens)."""
        return tokens

    def _cached_prefix(self, tokens: list[int]) -> tuple[list | None, list[int]]:
        """A copy of the longest cached KV prefix of ``tokens`` (a cache key), and the part
        of the key still to prefill."""
        if self._prefix_cache is None:
            return None, tokens
        try:
            cache, rest = self._prefix_cache.fetch_nearest_cache(_MODEL_KEY, tokens)
        except Exception:  # noqa: BLE001 - a lookup that fails is a miss
            logger.exception("prefix cache lookup failed")
            cache, rest = None, tokens
        if self._disk is not None:  # the disk tier, when it holds a longer prefix than memory
            held, key = self._disk.longest(tokens)
            if key is not None and held > len(tokens) - len(rest if cache is not None else tokens):
                loaded = self._disk.load(key, held)
                if loaded is not None:
                    cache, rest = loaded, tokens[held:]
        if cache is not None and not rest:  # exact hit: re-run the last token for its logits
            trim_prompt_cache(cache, 1)
            rest = tokens[-1:]
        return cache, rest

    def _start_of(self, seq: _Sequence, tokens: list[int]) -> tuple[list | None, list[int]]:
        """The KV cache a sequence starts from and the tokens it still has to prefill."""
        if seq.preset is not None and not seq.completion_tokens:
            cache, held = seq.preset
            seq.preset = None
            return cache, tokens[len(held) :]
        found, rest = self._cached_prefix(self._cache_key(seq, tokens))
        return found, tokens[len(tokens) - len(rest) :]

    def _prepare(self, seq: _Sequence) -> None:
        """Per-sequence state, built once (a retried sequence keeps its sampler's key chain)."""
        if seq.sampler is None and seq.processors is None:
            sampler = build_sampler(seq.params)
            seq.sampler = None if sampler is None else _guarded_sampler(seq, sampler)
            processors = build_logits_processors(seq.params)
            grammar = self._grammar_of(seq.params)
            if grammar is not None:  # last: nothing after it may revive a masked token
                processors.append(self.grammars().processor(grammar, len(seq.prompt) - seq.params.prefilled))
            seq.processors = [_guarded_processor(seq, p) for p in processors]
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=not self.keep_special_tokens)
            seq.stops = StopStringFilter(seq.params.stop)

    def _admit(self, seqs: list[_Sequence]) -> None:
        ready = []
        for seq in seqs:
            try:
                self._prepare(seq)
            except Exception as e:  # noqa: BLE001 - this request's own parameters failed
                logger.exception("could not prepare a sequence")
                self._finish_with_error(seq, EngineError(f"could not start generation: {type(e).__name__}"))
            else:
                ready.append(seq)
        # A re-admitted sequence continues from everything it has produced so far.
        started, tokens, caches, rests = [], [], [], []
        for seq in ready:
            held = seq.prompt + seq.token_ids
            try:
                cache, rest = self._start_of(seq, held)
            except Exception as e:  # noqa: BLE001 - its own start (an image prefill) failed: it fails alone
                logger.exception("could not start a sequence")
                self._finish_with_error(seq, EngineError(f"could not start generation: {type(e).__name__}"))
                continue
            started.append(seq)
            tokens.append(held)
            caches.append(cache)
            rests.append(rest)
        ready = started
        if not ready:
            return
        self._prefilled += sum(len(r) for r in rests)
        try:
            uids = self._generator.insert(
                list(rests),
                caches=list(caches),
                all_tokens=[t[: len(t) - len(rest)] for t, rest in zip(tokens, rests)],
                max_tokens=[s.max_tokens - s.completion_tokens for s in ready],
                samplers=[s.sampler for s in ready],  # type: ignore[misc]  # None: the batch's greedy sampler
                logits_processors=[s.processors for s in ready],  # type: ignore[misc]
                # Greedy sequences with no processors draft ahead: their output stays the same.
                speculate=[s.sampler is None and not s.processors for s in ready],
            )
        except Exception:  # noqa: BLE001 - insert checks before it changes any state
            logger.exception("could not insert %d sequences", len(ready))
            for seq in ready:
                self._finish_with_error(seq, EngineError("could not start generation"))
            return
        for uid, seq, rest in zip(uids, ready, rests):
            seq.uid = uid
            seq.prefilling = True
            if not seq.completion_tokens:
                seq.cached_tokens = len(seq.prompt) - len(rest) - seq.prefilled_at_start
            self._running[uid] = seq
            self._reserved += seq.reserve
            if not seq.admitted:
                seq.admitted = True
                seq.emit(_ADMITTED)

    def _on_token(self, seq: _Sequence, token: int, finish_reason: str | None, logprobs: Any = None) -> None:
        assert seq.detokenizer is not None and seq.stops is not None and seq.uid is not None  # admitted
        self._generated += 1
        seq.prefilling = False
        seq.completion_tokens += 1
        seq.token_ids.append(token)
        eos = finish_reason == "stop" and token in self.eos_token_ids
        text = "" if eos else seq.detokenizer.add(token)
        if finish_reason:
            text += seq.detokenizer.flush()
        text = seq.stops.feed(text)
        if seq.stops.stopped:
            finish_reason = "stop"
            self._generator.remove([seq.uid])
        elif finish_reason:
            text += seq.stops.flush()
        if finish_reason:
            del self._running[seq.uid]
            self._reserved -= seq.reserve
            seq.done = True
        chunk = GenerationChunk(
            text=text,
            token_ids=[token],
            completion_tokens=seq.completion_tokens,
            finish_reason=finish_reason,
            index=seq.index,
            logprobs=None if seq.params.logprobs is None or logprobs is None else [self._logprob(token, logprobs, seq.params.logprobs)],
            stop_sequence=seq.stops.matched,
        )
        self._outbox.setdefault(seq.loop, []).append((seq, chunk))

    def _deliver(self) -> None:
        """A step's chunks, handed to each caller loop in one call (not one per sequence:
        each hand-off costs the loop thread a wake-up and both threads the GIL)."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, [(seq.out, chunk) for seq, chunk in items])
            except RuntimeError:  # the callers' loop is gone: stop their work
                for seq, _ in items:
                    if not seq.done:
                        self._drop(seq)

    def _logprob(self, token: int, row: mx.array, top: int) -> TokenLogprob:
        """The chosen token's log probability (after the request's own logits processors:
        bias, penalties, grammar) and the ``top`` most likely tokens, most likely first."""
        alternatives: list[TopLogprob] = []
        if top:
            ids = mx.argpartition(-row, top - 1)[:top]
            values = row[ids]
            mx.eval(ids, values)
            found: list[tuple[float, int]] = list(zip(values.tolist(), ids.tolist()))  # type: ignore[arg-type]
            alternatives = [
                TopLogprob(*self.token_bytes(i), logprob=v) for v, i in sorted(found, reverse=True) if math.isfinite(v)
            ]
        text, raw = self.token_bytes(token)
        chosen: float = row[token].item()  # type: ignore[assignment]
        return TokenLogprob(text, raw, chosen, alternatives)

    def _fail_poisoned(self) -> None:
        """Sequences whose own sampler or processor raised this step leave the batch alone."""
        for seq in [s for s in self._running.values() if s.error is not None]:
            logger.error("a sequence failed in its sampler or logits processor", exc_info=seq.error)
            self._finish_with_error(seq, EngineError("The model failed while sampling this answer."))

    def _finish_with_error(self, seq: _Sequence, error: BaseException) -> None:
        self._drop(seq)
        seq.emit(error)


def _deliver_all(items: list[tuple[_Mailbox, GenerationChunk]]) -> None:
    for out, chunk in items:
        out.put(chunk)


def _guarded_sampler(seq: _Sequence, sampler: Callable) -> Callable:
    def sample(logprobs: mx.array) -> mx.array:
        try:
            return sampler(logprobs)
        except Exception as e:  # noqa: BLE001 - fail this sequence, not the batch
            seq.error = seq.error or e
            return mx.argmax(logprobs, axis=-1)

    return sample


def _guarded_processor(seq: _Sequence, processor: Callable) -> Callable:
    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        try:
            return processor(tokens, logits)
        except Exception as e:  # noqa: BLE001 - fail this sequence, not the batch
            seq.error = seq.error or e
            return logits

    return process


class GenerationStream:
    """The output of one request (its n choices), as the caller sees it."""

    def __init__(self, engine: LLMEngine, seqs: list[_Sequence]):
        self._engine = engine
        self._seqs = seqs
        self._out = seqs[0].out
        self._running = len(seqs)  # choices not finished yet
        self._closed = False

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens of choice 0 that came from the prefix cache (known once admitted)."""
        return self._seqs[0].cached_tokens

    async def admitted(self) -> None:
        """Wait until the request has joined the batch; raises what failed it before that
        (``OverloadedError`` when it waited longer than the engine allows)."""
        try:
            item = await self._out.get()
        except BaseException:
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            await self.aclose()
            raise item
        if item is not _ADMITTED:  # cannot happen: the marker comes first
            raise RuntimeError("a chunk arrived before the request was admitted")

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> GenerationChunk:
        if self._closed:
            raise StopAsyncIteration
        out = self._out
        try:
            item = await out.get()
            while item is _ADMITTED:  # a caller that did not wait for admission
                item = await out.get()
            item = _coalesce(item, out)
        except BaseException:  # cancelled while waiting: the caller is gone
            await self.aclose()
            raise
        if isinstance(item, BaseException):
            await self.aclose()
            raise item
        assert isinstance(item, GenerationChunk)
        if item.finish_reason:
            self._running -= 1
            if not self._running:
                self._closed = True
        return item

    async def aclose(self) -> None:
        """Leave: the request's sequences are dropped from the batch (or the queue)."""
        if not self._closed:
            self._closed = True
            self._cancel()

    def _cancel(self) -> None:
        for seq in self._seqs:
            if not seq.done:
                self._engine._commands.put(("cancel", seq))

    def __del__(self):
        # A stream dropped without closing (its caller's task died) still frees its slots.
        if not self._closed:
            self._cancel()


def _coalesce(item: object, out: _Mailbox) -> object:
    """Merge the chunks of the same choice that already arrived behind ``item``: fewer,
    larger messages downstream. Stops at another choice's chunk."""
    while isinstance(item, GenerationChunk) and not item.finish_reason and out.items:
        nxt = out.items[0]
        if isinstance(nxt, GenerationChunk) and nxt.index != item.index:
            break
        out.items.popleft()
        if isinstance(nxt, BaseException):
            return nxt
        item = GenerationChunk(
            text=item.text + nxt.text,
            token_ids=item.token_ids + nxt.token_ids,
            completion_tokens=nxt.completion_tokens,
            finish_reason=nxt.finish_reason,
            index=item.index,
            logprobs=None if item.logprobs is None else item.logprobs + (nxt.logprobs or []),
            stop_sequence=nxt.stop_sequence,
        )
    return item
