"""Exact incremental detokenization: the concatenated deltas equal ``decode(all tokens)``.

Each step decodes a short window twice (the text already sent, and the same window plus
the new tokens) and emits the difference. The window keeps a little left context, so
tokenizers that drop a leading space at the start of a decode (SentencePiece) still
produce it mid-text, and a delta that ends in an incomplete UTF-8 sequence (U+FFFD) is
held back until the next token completes the character.

Why not mlx-lm's streaming detokenizers: measured on SmolLM2's tokenizer, mlx-lm's
``BPEStreamingDetokenizer`` drops the space before a completion's first word (" Paris"
streams as "Paris"), so streamed text differed from ``decode()``; OpenAI clients
concatenate deltas and expect exactly the text a non-streamed answer has
(tests/engines/test_detokenize.py checks that equality on the real tokenizer).
"""

from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, *, skip_special_tokens: bool = True):
        self._decode_fn = tokenizer.decode
        self._skip = skip_special_tokens
        self.tokens: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens whose text has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._decode_fn(ids, skip_special_tokens=self._skip, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        self.tokens.append(token)
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        sent = self._decode(self.tokens[self._prefix : self._read])
        full = self._decode(self.tokens[self._prefix :])
        if len(full) <= len(sent) or (full.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.tokens)
        return full[len(sent) :]
