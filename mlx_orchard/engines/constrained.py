"""Structured output: a JSON schema enforced while decoding, per sequence, with llguidance.

Why llguidance (``bench/grammar_mask.py``): computing a token mask costs microseconds with
any of the three maintained libraries measured (≤ 0.2% of a decode step at 16 streams);
llguidance is already in the dependency tree (mlx-vlm), needs no torch, compiles lazily and
also takes Lark grammars (tool calls). Applying the mask is what costs, so it is a
logits processor of the constrained sequence alone: free sequences sharing the batch pay
nothing.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from mlx_orchard.errors import InvalidRequestError

logger = logging.getLogger("orchard.llm")

_GRAMMAR_CACHE = 64  # compiled grammars kept per engine, by schema text
_PARAM = {"json": "response_format", "lark": "tools"}
_JSON_OPTIONS: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Grammars:
    """One model's tokenizer as llguidance sees it, and the grammars built for it."""

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]):
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self._cache: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()  # checked on the tokenizer thread, used on the engine thread

    def grammar(self, schema: str) -> str:
        """The llguidance grammar for a JSON schema (text), checked; 400 if it is not one."""
        return self._compiled(("json", schema))

    def lark(self, grammar: str) -> str:
        """The llguidance grammar for a Lark grammar (forced tool calls), checked."""
        return self._compiled(("lark", grammar))

    def _compiled(self, key: tuple[str, str]) -> str:
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        kind, text = key
        what = "response_format: the JSON schema" if kind == "json" else "tools: the tool-call grammar"
        try:
            if kind == "json":
                # Compact separators, no free whitespace: a small model otherwise pads its JSON
                # with newlines until max_tokens (measured on SmolLM2).
                grammar = self._ll.LLMatcher.grammar_from_json_schema(json.loads(text), defaults=_JSON_OPTIONS)
            else:
                grammar = self._ll.LLMatcher.grammar_from_lark(text)
        except Exception as e:  # noqa: BLE001 - llguidance's own message says what is wrong
            raise InvalidRequestError(f"{what} is not usable: {e}", param=_PARAM[kind]) from None
        error = self._ll.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error and not error.startswith("WARNING"):
            raise InvalidRequestError(f"{what} is not usable: {error}", param=_PARAM[kind])
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > _GRAMMAR_CACHE:
                self._cache.popitem(last=False)
        return grammar

    def processor(self, grammar: str, prompt_len: int) -> Callable[[mx.array, mx.array], mx.array]:
        """A logits processor that allows only tokens continuing a sentence of ``grammar``
        (from ``grammar()`` or ``lark()``). ``prompt_len``: where this sequence's generated tokens start in the
        context the batch hands processors (the prompt, then every token generated)."""
        from llguidance.numpy import fill_next_token_bitmask  # once per sequence, not per token

        matcher = self._ll.LLMatcher(self.tokenizer, grammar)
        words = (self.vocab_size + 31) // 32
        bitmask = np.zeros((1, words), dtype=np.int32)
        consumed = [0]  # generated tokens the matcher has seen
        stopped = [False]
        eos = np.zeros(self.vocab_size, dtype=bool)
        eos[[t for t in self.eos_token_ids if 0 <= t < self.vocab_size]] = True

        def constrain(context: mx.array, logits: mx.array) -> mx.array:
            generated: list[int] = context[prompt_len + consumed[0] :].tolist()  # type: ignore[assignment]  # waits for the last sampled token
            for token in generated:
                if not matcher.consume_token(token):
                    break
            consumed[0] += len(generated)
            if not matcher.is_error():
                fill_next_token_bitmask(matcher, bitmask, 0)
            if matcher.is_error():
                # One of llguidance's limits ran out (ParserTooComplex: lexer fuel, Earley items)
                # on an answer the grammar itself allowed: the answer ends here, as if cut at
                # max_tokens, rather than failing the request.
                if not stopped[0]:
                    stopped[0] = True
                    logger.warning("structured output stopped early: %s", matcher.get_error().splitlines()[-1:])
                width = logits.shape[-1]
                only_eos = mx.array(np.pad(eos, (0, max(0, width - eos.size)))[:width])
                return mx.where(only_eos, logits, -mx.inf)
            allowed = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little")[:, : logits.shape[-1]]
            if allowed.shape[-1] < logits.shape[-1]:  # logits padded past the vocabulary
                allowed = np.pad(allowed, ((0, 0), (0, logits.shape[-1] - allowed.shape[-1])))
            return mx.where(mx.array(allowed.astype(bool)), logits, -mx.inf)

        return constrain
