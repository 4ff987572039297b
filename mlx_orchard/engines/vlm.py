"""Vision-language generation: ``LLMEngine``'s continuous batch over an mlx-vlm model.

The batch steps the model's language half exactly as it steps an LLM (mlx-lm's
``BatchGenerator``: requests join and leave between steps, sampling, stop strings, ``n``,
logprobs, grammars, the prefix cache, priorities). Images enter at admission: the prompt up
to the end of its last image is prefilled outside the batch from embeddings (the image
features scattered over the image's placeholder tokens) into the sequence's own KV cache,
and the text after it joins the batch like any prompt tail. So:

- the vision encoder runs once per image content (``VisionFeatureCache``, by pixel hash)
  however many turns of a conversation re-send the image;
- the prefix cache files a prompt under its tokens with every image's span overwritten
  by that image's hash, so a cached prefix is reused only for the same images at the same
  places, never for another image behind the same placeholder tokens;
- a sequence re-admitted after preemption or a failed step re-does its image prefill
  (or finds it in the prefix cache).

Prompts are built on the caller's thread (``encode_vision_chat``): the chat template
renders one image token per image, and each is replaced by what the model's own processor
expands that image into, with the processor's pixel arrays kept per image. No Ray here.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

from mlx_orchard.engines.llm import EngineStats, LLMEngine, _Sequence
from mlx_orchard.errors import InvalidRequestError

logger = logging.getLogger("orchard.vlm")

# Model types whose language half takes plain 1-D positions and one KV cache per layer, so
# mlx-lm's batch caches fit them (Qwen-VL's M-RoPE and sliding-window models do not).
BATCHABLE_MODEL_TYPES = frozenset({"smolvlm", "idefics3"})


@dataclass(frozen=True)
class ImageSpan:
    """One image's place in a prompt and what the encoder needs for it."""

    start: int  # its first token in the prompt
    length: int  # tokens it occupies (its processor's expansion, markers included)
    features: int  # of those, the placeholder tokens its features replace
    key: str  # content hash of its pixels (the encoder cache's key)
    pixels: dict[str, np.ndarray]  # the processor's arrays for this image alone

    def key_tokens(self) -> list[int]:
        """The prefix cache's stand-in for this span: negative ids (no token has one) drawn
        from the hash, so two images differ from the span's first position on."""
        digest = hashlib.sha256(self.key.encode()).digest()
        chunks = [int.from_bytes(digest[i : i + 4], "little") & 0x3FFFFFFF for i in range(0, 32, 4)]
        return [-1 - chunks[i % len(chunks)] for i in range(self.length)]


@dataclass
class VisionStats(EngineStats):
    images_encoded: int = 0  # vision-encoder passes (one per image not in the cache)
    image_cache_hits: int = 0  # images whose features came from the cache
    image_cache_bytes: int = 0


class VisionFeatureCache:
    """Image features by content hash, least recently used out, bounded in count and bytes.
    Engine thread only."""

    def __init__(self, max_items: int, max_bytes: int):
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[str, mx.array] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> mx.array | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
            self.hits += 1
        return found

    def put(self, key: str, features: mx.array) -> None:
        self.misses += 1
        if self.max_items <= 0 or features.nbytes > self.max_bytes:
            return
        self._items[key] = features
        self.nbytes += features.nbytes
        while len(self._items) > self.max_items or self.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.nbytes


class TextModel:
    """The language half of an mlx-vlm model, as mlx-lm's batch calls a model: token ids
    (or, from ``prefill_embeddings``, embeddings) in, logits out."""

    def __init__(self, vlm: Any):
        self.language_model = vlm.language_model

    def __call__(self, inputs: mx.array, cache: Any = None, inputs_embeds: mx.array | None = None) -> mx.array:
        return self.language_model(inputs, inputs_embeds=inputs_embeds, cache=cache).logits

    @property
    def layers(self) -> list:  # make_prompt_cache: one KVCache per layer
        return self.language_model.layers


class VLMEngine(LLMEngine):
    """``LLMEngine`` over an mlx-vlm model; ``generate(..., media=[ImageSpan...])``."""

    def __init__(self, model_path: Any, *, image_cache_size: int = 64, image_cache_bytes: int = 512 << 20,
                 **kwargs: Any):
        if kwargs.get("speculative") is not None or kwargs.get("kv_bits"):
            raise ValueError("speculative decoding and kv_bits are not available for vision models")
        self._image_cache_size, self._image_cache_bytes = image_cache_size, image_cache_bytes
        self._processor_lock = threading.Lock()  # one processor call at a time (tokenizers are not re-entrant)
        super().__init__(model_path, **kwargs)

    def _load_model(self) -> tuple[Any, Any, dict[str, Any]]:
        from mlx_lm.tokenizer_utils import TokenizerWrapper
        from mlx_vlm import load

        vlm, processor = load(self.model_path)
        config = vlm.config
        if config.model_type not in BATCHABLE_MODEL_TYPES:
            raise ValueError(
                f"{self.model_path}: mlx-vlm model type {config.model_type!r} is not supported yet "
                f"(supported: {', '.join(sorted(BATCHABLE_MODEL_TYPES))})"
            )
        self.vlm, self.processor = vlm, processor
        self.image_token_id = int(config.image_token_index)
        self.image_token = processor.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self._features = VisionFeatureCache(self._image_cache_size, self._image_cache_bytes)
        text = asdict(config.text_config)
        eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        eos_ids = {int(t) for t in eos if t is not None} | {processor.tokenizer.eos_token_id}
        tokenizer = TokenizerWrapper(processor.tokenizer, eos_token_ids=sorted(eos_ids))
        return TextModel(vlm), tokenizer, text

    # ---- prompts (a caller's thread) ----

    def encode_vision_chat(self, messages: list[dict[str, Any]], images: Sequence[Any], **template_kwargs: Any
                           ) -> tuple[list[int], list[ImageSpan]]:
        """The prompt of a conversation whose image parts (``{"type": "image"}``, in order)
        are ``images`` (``LoadedImage``s), and each image's span in it."""
        ids = self.encode_chat(messages, **template_kwargs)
        places = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(places) != len(images):
            raise InvalidRequestError(
                f"the chat template placed {len(places)} image tokens for {len(images)} images "
                f"(is {self.image_token!r} written in the text?)",
                param="messages",
            )
        out: list[int] = []
        spans: list[ImageSpan] = []
        done = 0
        for place, image in zip(places, images):
            out += ids[done:place]
            expansion, pixels = self._expand(image.image)
            features = sum(1 for t in expansion if t == self.image_token_id)
            spans.append(ImageSpan(len(out), len(expansion), features, image.sha256, pixels))
            out += expansion
            done = place + 1
        out += ids[done:]
        return out, spans

    def _expand(self, image: Any) -> tuple[list[int], dict[str, np.ndarray]]:
        """What the model's processor makes of one image: its tokens and its pixel arrays."""
        with self._processor_lock:
            inputs = self.processor(text=[self.image_token], images=[[image]])
        ids = [int(t) for t in np.asarray(inputs["input_ids"]).reshape(-1)]
        bos = self.processor.tokenizer.bos_token_id
        if bos is not None and ids and ids[0] == bos != self.image_token_id:  # the processor's, not the image's
            ids = ids[1:]
        pixels = {k: np.asarray(v) for k, v in inputs.items() if k not in ("input_ids", "attention_mask") and v is not None}
        return ids, pixels

    def check_media(self, prompt: Sequence[int], media: Sequence[Any]) -> None:
        # The spans index the prompt and size the features scattered into it: checked here,
        # against the prompt itself, before any of it reaches MLX.
        end = 0
        for span in media:
            if not isinstance(span, ImageSpan) or span.start < end or span.length < 1 or span.start + span.length >= len(prompt):
                raise InvalidRequestError("image spans must be ordered, inside the prompt, before its end", param="messages")
            inside = prompt[span.start : span.start + span.length]
            if sum(1 for t in inside if t == self.image_token_id) != span.features or span.features < 1:
                raise InvalidRequestError("an image span does not hold its image tokens", param="messages")
            end = span.start + span.length
        placed = sum(s.features for s in media)
        if sum(1 for t in prompt if t == self.image_token_id) != placed:
            raise InvalidRequestError("the prompt has image tokens that belong to no image", param="messages")

    # ---- the engine thread ----

    def _cache_key(self, seq: _Sequence, tokens: list[int]) -> list[int]:
        if not seq.media:
            return tokens
        key = list(tokens)
        for span in seq.media:
            key[span.start : span.start + span.length] = span.key_tokens()
        return key

    def _start_of(self, seq: _Sequence, tokens: list[int]) -> tuple[list | None, list[int]]:
        cache, rest = super()._start_of(seq, tokens)
        seq.prefilled_at_start = 0
        start = len(tokens) - len(rest)
        spans = [s for s in seq.media if s.start + s.length > start]
        if not spans:
            return cache, rest
        first = spans[0].start
        if first < start:  # a cached prefix that ends inside an image: back to the image's start
            if cache is not None and can_trim_prompt_cache(cache):
                trim_prompt_cache(cache, start - first)
                start = first
            else:
                cache, start = None, 0
                spans = list(seq.media)
        end = spans[-1].start + spans[-1].length
        if cache is None:
            cache = make_prompt_cache(self.model)
        self._prefill_images(cache, tokens[start:end], start, spans)
        seq.prefilled_at_start = end - start
        return cache, tokens[end:]

    def _image_features(self, span: ImageSpan) -> mx.array:
        found = self._features.get(span.key)
        if found is not None and found.shape[0] == span.features:
            return found
        arrays = {k: mx.array(v) for k, v in span.pixels.items()}
        pixel_values = arrays.pop("pixel_values")
        # The model's own embedding of a prompt that is nothing but this image's placeholder
        # tokens: exactly its projected features, one row per token.
        ids = mx.array([[self.image_token_id] * span.features])
        features = self.vlm.get_input_embeddings(ids, pixel_values, **arrays).inputs_embeds[0]
        mx.eval(features)
        if features.shape[0] != span.features:
            raise ValueError(f"the vision encoder made {features.shape[0]} features for {span.features} image tokens")
        self._features.put(span.key, features)
        return features

    def _prefill_images(self, cache: list, ids: list[int], start: int, spans: list[ImageSpan]) -> None:
        """Run ``ids`` (prompt positions ``start``...) into ``cache``, each span's image
        features in place of its placeholder tokens; chunked like any prefill."""
        tokens = mx.array([ids])
        embeds = self.vlm.get_input_embeddings(tokens, None).inputs_embeds[0]
        for span in spans:
            at = span.start - start
            rows = [at + j for j, t in enumerate(ids[at : at + span.length]) if t == self.image_token_id]
            embeds[mx.array(rows)] = self._image_features(span).astype(embeds.dtype)
        embeds = embeds[None]
        step = self.prefill_step_size
        for i in range(0, len(ids), step):
            self.model(tokens[:, i : i + step], cache=cache, inputs_embeds=embeds[:, i : i + step])
            mx.eval([c.state for c in cache])
        self._prefilled += len(ids)

    def stats(self) -> VisionStats:
        base = asdict(super().stats())
        cache = getattr(self, "_features", None)
        if cache is None:
            return VisionStats(**base)
        return VisionStats(**base, images_encoded=cache.misses, image_cache_hits=cache.hits, image_cache_bytes=cache.nbytes)
