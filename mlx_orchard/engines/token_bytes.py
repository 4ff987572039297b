"""Each token's own bytes and text, as OpenAI's logprobs report them.

A token can hold part of a UTF-8 character (byte-level BPE splits "€" over two tokens), so
its bytes come from the vocabulary itself, not from decoding it alone: byte-level BPE
vocabularies spell bytes with GPT-2's printable alphabet, SentencePiece ones write ``▁`` for
a space and ``<0xNN>`` for a raw byte. A token whose bytes are not valid UTF-8 on their own
is shown as ``bytes:\\xNN`` (OpenAI's convention).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _gpt2_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte, inverted."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TokenBytes:
    def __init__(self, tokenizer: Any):
        """``tokenizer``: the model's Hugging Face tokenizer."""
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._byte_level = "ByteLevel" in repr(getattr(backend, "decoder", None))
        self._special = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._compute(token_id)
        return found

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        raw: bytes
        if piece is None:
            raw = b""
        elif token_id in self._special:
            raw = piece.encode()
        elif self._byte_level and all(c in _gpt2_alphabet() for c in piece):
            raw = bytes(_gpt2_alphabet()[c] for c in piece)
        elif (match := _BYTE_TOKEN.match(piece)) is not None:
            raw = bytes([int(match.group(1), 16)])
        elif "▁" in piece:
            raw = piece.replace("▁", " ").encode()
        else:
            raw = self._tokenizer.decode([token_id]).encode()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text, list(raw)
