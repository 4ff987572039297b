"""Text-prompted source separation over mlx-audio's SAM-Audio: audio + "what to extract" ->
the target sound and the rest (the residual).

A model directory holds SAM-Audio's ``config.json`` and ``*.safetensors`` and its T5 text
encoder under ``text_encoder/`` (config, weights, tokenizer). mlx-audio's own loader fetches
T5 from the Hub by name at first use and turns a weight file that does not fit into a
warning and random weights; here both are loaded up front from the directory, strictly, so
a broken model fails at load, not on a user's request.

Audio longer than ``CHUNK_SECONDS`` is separated in overlapping chunks joined with a
cosine crossfade (mlx-audio's ``separate_long`` scheme), so memory and the DiT's positions
stay bounded whatever the length; the caller bounds the length itself
(``max_audio_seconds``). Chunks are separate calls, so a replica can interleave requests and
drop a cancelled one between chunks. Each chunk's starting noise comes from the request's
seed and the chunk's index: the same request gives the same audio.

No Ray here. ``encode_description`` and ``separate_chunk`` run on the replica's MLX thread.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from mlx_orchard.errors import InvalidRequestError

STEPS = (2, 4, 8, 16, 32)  # the ODE step counts SAM-Audio is documented with
METHODS = ("midpoint", "euler")
CHUNK_SECONDS, OVERLAP_SECONDS = 10.0, 3.0  # mlx-audio's defaults for long audio
MAX_DESCRIPTION_CHARS = 1000


@dataclass(frozen=True)
class Separation:
    target: np.ndarray  # float32 mono at the model's sample rate
    residual: np.ndarray


class SeparationEngine:
    """One loaded SAM-Audio model and its text encoder."""

    def __init__(self, model_dir: str | Path, *, text_encoder_dir: str | Path | None = None):
        import mlx.core as mx
        from mlx_audio.sts.models.sam_audio import SAMAudio, SAMAudioConfig, SAMAudioProcessor

        self.model_dir = Path(model_dir)
        config = SAMAudioConfig.from_dict(json.loads((self.model_dir / "config.json").read_text()))
        model: Any = SAMAudio(config)
        weights = _load_safetensors(self.model_dir)
        if not weights:
            raise ValueError(f"{model_dir}: no *.safetensors weights")
        # SAM-Audio's own renaming and transposes (a no-op for weights already in MLX layout);
        # every parameter but the decoder's watermarker must be there.
        weights = model.sanitize(weights)
        _require_all(model, weights, model_dir, optional="wm_model")
        model.load_weights(list(weights.items()), strict=False)
        model.processor = SAMAudioProcessor(config.audio_codec.hop_length, config.audio_codec.sample_rate)
        self._load_text_encoder(model, Path(text_encoder_dir) if text_encoder_dir else self.model_dir / "text_encoder")
        mx.eval(model.parameters())
        model.eval()
        self.model = model
        self.sample_rate = int(model.sample_rate)
        frames = CHUNK_SECONDS * self.sample_rate / config.audio_codec.hop_length
        if config.transformer.use_rope and frames > config.transformer.max_positions:
            raise ValueError(f"{model_dir}: a {CHUNK_SECONDS:g} s chunk is {frames:.0f} frames, more than the "
                             f"{config.transformer.max_positions} positions the model has")

    @staticmethod
    def _load_text_encoder(model: Any, path: Path) -> None:
        from mlx_audio.sts.models.sam_audio.text_encoder import T5Config, T5Encoder
        from transformers import AutoTokenizer

        if not (path / "config.json").is_file():
            raise ValueError(f"{path}: SAM-Audio's T5 text encoder (config.json, model.safetensors, tokenizer) is missing")
        raw = json.loads((path / "config.json").read_text())
        fields = T5Config.__dataclass_fields__
        encoder: Any = T5Encoder(T5Config(**{k: v for k, v in raw.items() if k in fields}))
        weights = T5Encoder.sanitize(_load_safetensors(path))
        _require_all(encoder, weights, path)
        names = _parameter_names(encoder)  # a full T5 checkpoint has more (lm_head)
        encoder.load_weights([(k, v) for k, v in weights.items() if k in names], strict=True)
        encoder.eval()
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if tokenizer.pad_token is None:
            raise ValueError(f"{path}: the tokenizer has no pad token (descriptions are padded to one length)")
        model.text_encoder.model = encoder  # mlx-audio's wrapper then skips its Hub download
        model.text_encoder.tokenizer = tokenizer

    def check(self, description: str, steps: int, method: str) -> None:
        if not description.strip():
            raise InvalidRequestError("description must say what to extract (e.g. 'speech', 'drums')", param="description")
        if len(description) > MAX_DESCRIPTION_CHARS:
            raise InvalidRequestError(f"description is longer than {MAX_DESCRIPTION_CHARS} characters", param="description")
        if steps not in STEPS:
            raise InvalidRequestError(f"steps must be one of {', '.join(map(str, STEPS))}", param="steps")
        if method not in METHODS:
            raise InvalidRequestError(f"method must be one of {', '.join(METHODS)}", param="method")

    def encode_description(self, description: str) -> Any:
        """T5 features of the description, computed once per request for all its chunks."""
        import mlx.core as mx

        features, mask = self.model.text_encoder([description])
        mx.eval(features, mask)
        return features, mask

    def chunks(self, n_samples: int) -> list[tuple[int, int]]:
        """(start, end) of each chunk: one for short audio, else overlapping 10 s windows."""
        size, overlap = int(CHUNK_SECONDS * self.sample_rate), int(OVERLAP_SECONDS * self.sample_rate)
        if n_samples <= size:
            return [(0, n_samples)]
        hop = size - overlap
        count = math.ceil((n_samples - overlap) / hop)
        return [(i * hop, min(i * hop + size, n_samples)) for i in range(count)]

    def separate_chunk(self, samples: np.ndarray, text: Any, *, steps: int, method: str, seed: int) -> Separation:
        """One chunk through the codec, ``steps`` ODE steps of the DiT and the decoder. The
        starting noise comes from ``seed`` alone (no global random state)."""
        import mlx.core as mx

        model = self.model
        audio = mx.array(np.ascontiguousarray(samples, dtype=np.float32))[None, None, :]
        frames = int(model.audio_codec.wav_idx_to_feature_idx(len(samples)))
        noise = mx.random.normal((1, frames, 2 * model.config.audio_codec.codebook_dim), key=mx.random.key(seed), dtype=model.dtype)
        features, mask = text
        result = model.separate(audio, [""], sizes=mx.array([frames]), noise=noise,
                                ode_opt={"method": method, "step_size": 1.0 / steps}, ode_decode_chunk_size=50,
                                _text_features=features, _text_mask=mask)
        target = np.array(result.target[0], dtype=np.float32).reshape(-1)[: len(samples)]
        residual = np.array(result.residual[0], dtype=np.float32).reshape(-1)[: len(samples)]
        mx.clear_cache()
        return Separation(target, residual)

    def separate(self, samples: np.ndarray, description: str, *, steps: int = 16, method: str = "midpoint",
                 seed: int = 42) -> Separation:
        """All chunks in turn (the deployment runs them one MLX job each, so requests interleave)."""
        self.check(description, steps, method)
        text = self.encode_description(description)
        joined = Crossfade(self.sample_rate)
        for i, (start, end) in enumerate(self.chunks(len(samples))):
            joined.add(self.separate_chunk(samples[start:end], text, steps=steps, method=method, seed=seed + i))
        return joined.result()


def _load_safetensors(directory: Path) -> dict[str, Any]:
    import mlx.core as mx

    weights: dict[str, Any] = {}
    for path in sorted(directory.glob("*.safetensors")):
        weights.update(cast(dict[str, Any], mx.load(str(path))))
    return weights


def _parameter_names(module: Any) -> set[str]:
    from mlx.utils import tree_flatten

    return set(dict(cast(list[tuple[str, Any]], tree_flatten(module.parameters()))))


def _require_all(module: Any, weights: dict, where: str | Path, optional: str | None = None) -> None:
    missing = sorted(k for k in _parameter_names(module) if k not in weights and not (optional and optional in k))
    if missing:
        raise ValueError(f"{where}: {len(missing)} weights are missing ({', '.join(missing[:5])}, ...)")


class Crossfade:
    """Joins chunk separations whose windows overlap by ``OVERLAP_SECONDS`` with a cosine fade."""

    def __init__(self, sample_rate: int):
        self.overlap = int(OVERLAP_SECONDS * sample_rate)
        self._parts: dict[str, list[np.ndarray]] = {"target": [], "residual": []}

    def add(self, chunk: Separation) -> None:
        first = not self._parts["target"]
        for name, parts in self._parts.items():
            audio = getattr(chunk, name)
            if not first:
                n = min(self.overlap, len(parts[-1]), len(audio))
                fade_in = (0.5 * (1 - np.cos(np.pi * np.linspace(0, 1, n)))).astype(np.float32)
                tail = parts[-1][-n:]
                parts[-1] = parts[-1][:-n]
                parts.append(tail * (1 - fade_in) + audio[:n] * fade_in)
                audio = audio[n:]
            parts.append(audio)

    def result(self) -> Separation:
        return Separation(np.concatenate(self._parts["target"]), np.concatenate(self._parts["residual"]))
