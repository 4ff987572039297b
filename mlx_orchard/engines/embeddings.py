"""Sentence-embedding engine: a local MLX encoder model, pooled and normalized like sentence-transformers.

Plain Python with no Ray or protocol imports. Every MLX call happens in the thread that
calls ``embed`` so a deployment can keep all MLX work on one thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_embeddings.utils import load_model
from tokenizers import Tokenizer

# Errors that reach the ingress live in mlx_orchard.errors: unpickling one there must not
# import this module (and MLX with it).
from mlx_orchard.errors import InputTooLongError, InvalidRequestError

__all__ = ["EmbeddingEngine", "InputTooLongError", "SentenceConfig", "shorten"]

# Pooling modes in the order sentence-transformers concatenates them.
_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}




@dataclass(frozen=True)
class SentenceConfig:
    """What sentence-transformers' module files say about pooling, normalization and length."""

    pooling: tuple[str, ...]
    normalize: bool
    max_seq_length: int | None

    @classmethod
    def read(cls, model_dir: Path) -> SentenceConfig:
        modules_file = model_dir / "modules.json"
        if not modules_file.exists():
            # A bare HF/MLX encoder: mean pooling + unit norm, as mlx-embeddings' text_embeds does.
            return cls(("mean",), True, _read_json(model_dir / "sentence_bert_config.json").get("max_seq_length"))
        modules = json.loads(modules_file.read_text())
        normalize = any(m["type"].endswith(".Normalize") for m in modules)
        pooling: tuple[str, ...] = ("mean",)
        for module in modules:
            if module["type"].endswith(".Pooling"):
                cfg = _read_json(model_dir / module["path"] / "config.json")
                if mode := cfg.get("pooling_mode"):  # newer single-key form
                    pooling = (mode.removesuffix("_token").removesuffix("_tokens"),)
                else:
                    pooling = tuple(name for key, name in _POOLING_KEYS.items() if cfg.get(key))
                unknown = [k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k not in _POOLING_KEYS]
                if unknown or not pooling or any(p not in _POOLING_KEYS.values() for p in pooling):
                    raise ValueError(f"unsupported pooling config in {model_dir / module['path']}: {cfg}")
        return cls(pooling, normalize, _read_json(model_dir / "sentence_bert_config.json").get("max_seq_length"))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _load_tokenizer(model_dir: Path) -> Tokenizer:
    if (model_dir / "tokenizer.json").exists():
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    else:  # only vocab.txt & co: let transformers build the fast tokenizer, from disk only
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True).backend_tokenizer
    # tokenizer.json files often carry fixed padding/truncation (MiniLM's: pad and cut to 128);
    # lengths are the engine's business, so both are switched off.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


class EmbeddingEngine:
    """Loads an encoder model from a local directory and turns token ids into embeddings."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        supports_dimensions: bool = False,
        max_batch_tokens: int = 16384,
        max_input_tokens: int | None = None,
    ) -> None:
        """``supports_dimensions`` declares a Matryoshka-trained model (truncated vectors stay
        meaningful); nothing in the usual config files says so. ``max_batch_tokens`` caps the
        padded size (rows × longest) of one forward pass. ``max_input_tokens`` can lower the
        model's own input limit (never raise it)."""
        self.model_dir = Path(model_path)
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"embedding model directory not found: {self.model_dir}")
        config = _read_json(self.model_dir / "config.json")
        self.model = load_model(self.model_dir)  # local path: mlx-embeddings never touches the hub
        self.tokenizer = _load_tokenizer(self.model_dir)
        self.sentence = SentenceConfig.read(self.model_dir)

        self.hidden_size: int = config["hidden_size"]
        self.dimensions: int = self.hidden_size * len(self.sentence.pooling)
        self.vocab_size: int = config["vocab_size"]
        self.supports_dimensions = supports_dimensions
        self.max_batch_tokens = max_batch_tokens
        # sentence-transformers' max_seq_length (256 for MiniLM) is the length the model was
        # tuned for and where the reference implementation cuts; the 512 positions only bound it.
        positions = config.get("max_position_embeddings")
        limits = [n for n in (self.sentence.max_seq_length, positions, max_input_tokens) if n]
        if not limits:
            raise ValueError(f"{self.model_dir}: no max_seq_length or max_position_embeddings in config")
        self.max_input_tokens: int = min(limits)
        self.pad_id: int = config.get("pad_token_id") or 0  # value is irrelevant: masked out
        self._prefix, self._suffix = self._special_affixes()

    def _special_affixes(self) -> tuple[list[int], list[int]]:
        """Ids the post-processor wraps around one sequence ([CLS] … [SEP] for BERT)."""
        probe = "hello"
        bare = self.tokenizer.encode(probe, add_special_tokens=False).ids
        full = self.tokenizer.encode(probe).ids
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return full[:start], full[start + len(bare) :]
        raise ValueError(f"{self.model_dir}: cannot locate special tokens in the tokenizer's template")

    # -- tokens ---------------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, special tokens included, untruncated."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def add_special_tokens(self, ids: list[int]) -> list[int]:
        """Wrap bare ids (an OpenAI token-id input) the way ``tokenize`` wraps text."""
        return [*self._prefix, *ids, *self._suffix]

    def _fit(self, ids: list[int], index: int, truncate: bool) -> list[int]:
        if not ids:
            raise InvalidRequestError(f"input {index} is empty", param="input")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise InvalidRequestError(
                f"input {index} has token ids outside the vocabulary [0, {self.vocab_size})", param="input"
            )
        limit = self.max_input_tokens
        if len(ids) <= limit:
            return ids
        if not truncate:
            raise InputTooLongError(
                f"input {index} has {len(ids)} tokens, more than this model's limit of {limit}; "
                "shorten it or request truncation",
                param="input",
            )
        # Keep the special tokens at both ends, cut the body (as sentence-transformers does).
        head = self._prefix if ids[: len(self._prefix)] == self._prefix else []
        tail = self._suffix if self._suffix and ids[-len(self._suffix) :] == self._suffix else []
        body = ids[len(head) : len(ids) - len(tail)]
        return [*head, *body[: limit - len(head) - len(tail)], *tail]

    def prepare(self, batch: list[list[int]], *, truncate: bool = False) -> list[list[int]]:
        """Validated (and, when asked, truncated) inputs; raises before any model work, so a
        caller that batches requests can check each one on its own."""
        return [self._fit(list(ids), i, truncate) for i, ids in enumerate(batch)]

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None:
            return
        if not self.supports_dimensions:
            raise InvalidRequestError(
                f"model {self.model_dir.name} does not support the dimensions parameter", param="dimensions"
            )
        if not 0 < dimensions <= self.dimensions:
            raise InvalidRequestError(
                f"dimensions must be between 1 and {self.dimensions}, got {dimensions}", param="dimensions"
            )

    # -- embeddings -----------------------------------------------------------------------

    def embed(
        self, batch: list[list[int]], *, truncate: bool = False, dimensions: int | None = None
    ) -> np.ndarray:
        """Embeddings (float32, [len(batch), dim]) for already tokenized inputs.

        Raises ``InputTooLongError`` for inputs over ``max_input_tokens`` unless ``truncate``.
        """
        self.check_dimensions(dimensions)
        return shorten(self.embed_prepared(self.prepare(batch, truncate=truncate)), dimensions)

    def embed_prepared(self, seqs: list[list[int]], *, wanted: Callable[[int], bool] | None = None) -> np.ndarray:
        """Embeddings of inputs that ``prepare`` already checked: callers that validate each
        request on its own before batching them skip a second pass over every token.

        ``wanted(i)`` is asked before each forward pass: rows nobody wants any more (their
        caller left) are skipped, and their vectors stay zero."""
        out = np.zeros((len(seqs), self.dimensions), dtype=np.float32)
        # Sorting by length keeps padding low when a token budget splits the batch.
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        groups: list[list[int]] = [[]]
        for i in order:
            if groups[-1] and (len(groups[-1]) + 1) * len(seqs[i]) > self.max_batch_tokens:
                groups.append([])
            groups[-1].append(i)
        for group in groups:
            if wanted is not None:
                group = [i for i in group if wanted(i)]
            if group:
                out[group] = self._forward([seqs[j] for j in group])
        return out

    def _forward(self, seqs: list[list[int]]) -> np.ndarray:
        """One forward pass over ``seqs``, right-padded to the longest."""
        width = max(len(s) for s in seqs)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(seqs), width), dtype=np.float32)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = s
            mask[row, : len(s)] = 1.0
        mask_mx = mx.array(mask)
        hidden = self.model(mx.array(ids), attention_mask=mask_mx).last_hidden_state.astype(mx.float32)
        vectors = mx.concatenate([self._pool(mode, hidden, mask_mx) for mode in self.sentence.pooling], axis=-1)
        if self.sentence.normalize:
            vectors = vectors / mx.maximum(mx.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)
        return np.asarray(vectors)  # evaluates only what the pooling needs

    @staticmethod
    def _pool(mode: str, hidden: mx.array, mask: mx.array) -> mx.array:
        weights = mask[..., None]
        if mode == "cls":
            return hidden[:, 0]
        if mode == "max":
            return mx.max(mx.where(weights > 0, hidden, -1e9), axis=1)
        summed = mx.sum(hidden * weights, axis=1)
        count = mx.maximum(mx.sum(weights, axis=1), 1e-9)
        return summed / (count if mode == "mean" else mx.sqrt(count))


def shorten(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka-style shorter vectors: keep the first ``dimensions``, re-normalize."""
    if dimensions is None:
        return vectors
    out = vectors[:, :dimensions]
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
