"""A tiny random-weight SAM-Audio (text-prompted source separation), built with mlx-audio's
own classes.

No package ships SAM-Audio weights, so the tests build one with small widths: the DACVAE
codec (8 kHz, hop 256: 31.25 feature frames a second), a two-layer DiT and a two-layer T5
text encoder under ``text_encoder/`` with the real SmolLM2 tokenizer. Its separations are
noise, but deterministic noise that depends on the audio and on the description: the tests
compare the server's answer with what the model computes in this process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SAMPLE_RATE = 8_000
HOP = 256

CONFIG = {
    "model_type": "sam_audio",
    "in_channels": 6 * 8,
    "num_anchors": 3,
    "anchor_embedding_dim": 8,
    "audio_codec": {"encoder_dim": 4, "encoder_rates": [2, 4, 4, 8], "latent_dim": 16, "decoder_dim": 96,
                    "decoder_rates": [8, 4, 4, 2], "n_codebooks": 1, "codebook_size": 16, "codebook_dim": 8,
                    "sample_rate": SAMPLE_RATE},
    "text_encoder": {"name": "text_encoder", "dim": 32, "max_length": 64},
    "transformer": {"dim": 32, "n_heads": 2, "n_layers": 2, "context_dim": 32, "out_channels": 16, "multiple_of": 16,
                    "max_positions": 2000, "frequency_embedding_dim": 32},
}
T5 = {"model_type": "t5", "d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2,
      "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32, "is_gated_act": True,
      "dense_act_fn": "gelu_new", "layer_norm_epsilon": 1e-6}


def build_tiny_sam_audio(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a SAM-Audio directory (config.json, model.safetensors, text_encoder/) to ``out``."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_audio.sts.models.sam_audio import SAMAudio, SAMAudioConfig
    from mlx_audio.sts.models.sam_audio.text_encoder import T5Config, T5Encoder
    from transformers import AutoTokenizer

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "text_encoder").mkdir(parents=True)

    mx.random.seed(seed)
    model = SAMAudio(SAMAudioConfig.from_dict(CONFIG))
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(str(tmp / "text_encoder"))
    t5 = {**T5, "vocab_size": len(tokenizer)}
    encoder = T5Encoder(T5Config(**{k: v for k, v in t5.items() if k != "model_type"}))
    mx.save_safetensors(str(tmp / "text_encoder" / "model.safetensors"), dict(tree_flatten(encoder.parameters())))
    (tmp / "text_encoder" / "config.json").write_text(json.dumps(t5, indent=1))
    (tmp / "config.json").write_text(json.dumps(CONFIG, indent=1))
    tmp.rename(out)
    return out
