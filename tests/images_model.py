"""A tiny random-weight FLUX.2-klein image model, built at test time with mflux's own classes.

Why FLUX.2-klein: it is the only mflux family whose transformer *and* text encoder take their
sizes from the ModelConfig (``transformer_overrides`` / ``text_encoder_overrides`` go straight
into ``Flux2Transformer(**...)`` and ``Qwen3TextEncoder(**...)``). Z-Image builds
``ZImageTransformer()`` / ``TextEncoder()`` with full-size defaults and FLUX.1 hard-codes its
widths, so shrinking them would mean patching mflux.

The directory is written in mflux's saved-model format (``ModelSaver.save_model``, the format of
``mflux-save`` and of the ``*-mflux-4bit`` repos), so it loads the way a user loads a local model::

    from mflux.models.flux2.variants.txt2img.flux2_klein import Flux2Klein
    model = Flux2Klein(model_config=tiny_model_config(out), model_path=str(out))
    image = model.generate_image(seed=1, prompt="a cat", num_inference_steps=2, width=64, height=64)

Three things are not like a real checkpoint:

* The text encoder has 27 layers (of width 32): the klein pipeline always stacks the hidden states
  of layers 9, 18 and 27, so it needs at least that many. ``joint_attention_dim`` is 3 x its width.
* The VAE is narrower than the one the loader builds. ``Flux2Initializer`` constructs
  ``Flux2VAE()`` at its full (128, 256, 512, 512) widths, which takes ~17 s for a 64x64 decode on
  this CPU. We save the weights of a VAE 32 channels wide everywhere (GroupNorm(32) needs a
  multiple of 32); the loader applies them with ``Module.update(strict=False)``, which swaps in
  the smaller arrays without a shape check (mflux notes this itself in
  ``flux2_vae/small_decoder.py``). Nothing checks for missing keys either, so the tiny VAE is
  given a 1x1 ``conv_shortcut`` wherever the full one changes width (four resnets), and its
  parameter names are checked against the full VAE's before saving.
* The tokenizer is whatever ``tokenizer_dir`` holds (e.g. SmolLM2's ``tokenizer.json``), copied
  into ``tokenizer/``. klein loads it as ``Qwen2TokenizerFast`` and only needs a chat template and
  a pad token (it pads to 512); the text encoder's vocabulary is sized to the tokenizer.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

TEXT_HIDDEN = 32
TINY_TEXT_ENCODER = {
    "hidden_size": TEXT_HIDDEN,
    "intermediate_size": 64,
    "num_hidden_layers": 27,  # klein reads hidden states 9, 18 and 27
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
}
TINY_TRANSFORMER = {
    "num_layers": 1,
    "num_single_layers": 1,
    "num_attention_heads": 2,
    "attention_head_dim": 32,
    "axes_dims_rope": (8, 8, 8, 8),  # sums to attention_head_dim
    "joint_attention_dim": 3 * TEXT_HIDDEN,
    "timestep_guidance_channels": 64,
}
TINY_VAE_CHANNELS = (32, 32, 32, 32)  # full VAE: (128, 256, 512, 512)
CONFIG_FILE = "mflux_overrides.json"  # read by mlx_orchard.engines.images


def _vocab_size(tokenizer_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)


def tiny_model_config(model_dir: Path | None = None):
    """The ModelConfig to load the tiny model with: flux2-klein-4b's schedule, tiny widths.
    With ``model_dir``, the text encoder overrides (vocab size included) come from its json."""
    from mflux.models.common.config import ModelConfig

    config = copy.copy(ModelConfig.flux2_klein_4b())  # the preset is lru_cached: never mutate it
    config.aliases = ["flux2-klein-tiny"]
    config.transformer_overrides = dict(TINY_TRANSFORMER)
    config.text_encoder_overrides = dict(TINY_TEXT_ENCODER)
    if model_dir is not None:
        saved = json.loads((Path(model_dir) / CONFIG_FILE).read_text())
        config.transformer_overrides = saved["transformer_overrides"]
        config.text_encoder_overrides = saved["text_encoder_overrides"]
    return config


def _tiny_vae():
    """A Flux2VAE 32 channels wide with exactly the parameter names of the full one."""
    from mflux.models.flux2.model.flux2_vae.encoder.encoder import Flux2Encoder
    from mflux.models.flux2.model.flux2_vae.vae import Flux2VAE
    from mlx import nn
    from mlx.utils import tree_flatten

    vae = Flux2VAE(decoder_block_out_channels=TINY_VAE_CHANNELS)
    vae.encoder = Flux2Encoder(block_out_channels=TINY_VAE_CHANNELS)
    full = Flux2VAE()  # never evaluated: MLX builds its random init lazily
    tiny_modules = dict(vae.named_modules())
    for name, module in full.named_modules():
        if getattr(module, "conv_shortcut", None) is not None:  # in != out channels in the full VAE
            width = TINY_VAE_CHANNELS[0]
            tiny_modules[name].conv_shortcut = nn.Conv2d(width, width, kernel_size=1, stride=1)
    names = lambda module: {key for key, _ in tree_flatten(module.parameters())}  # noqa: E731
    assert names(vae) == names(full), names(vae) ^ names(full)
    return vae


def build_tiny_image_model(out: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Write a tiny random-weight FLUX.2-klein model (about 5 MB plus the tokenizer) to ``out``;
    load it with ``Flux2Klein(model_config=tiny_model_config(out), model_path=str(out))``."""
    import mlx.core as mx
    from mflux.models.common.config import ModelConfig
    from mflux.models.common.weights.saving.model_saver import ModelSaver
    from mflux.models.flux2.model.flux2_text_encoder.qwen3_text_encoder import Qwen3TextEncoder
    from mflux.models.flux2.model.flux2_transformer.transformer import Flux2Transformer
    from mflux.models.flux2.weights.flux2_weight_definition import Flux2KleinWeightDefinition
    from mlx.utils import tree_map

    out, tokenizer_dir = Path(out), Path(tokenizer_dir)
    if (out / CONFIG_FILE).is_file():
        return out
    final, out = out, out.with_name(out.name + ".partial")
    shutil.rmtree(out, ignore_errors=True)
    text_encoder_overrides = {**TINY_TEXT_ENCODER, "vocab_size": _vocab_size(tokenizer_dir)}

    mx.random.seed(seed)
    parts = SimpleNamespace(
        vae=_tiny_vae(),
        transformer=Flux2Transformer(**TINY_TRANSFORMER),
        text_encoder=Qwen3TextEncoder(**text_encoder_overrides),
        tokenizers={},  # copied below as files, not re-saved through transformers
    )
    for module in (parts.vae, parts.transformer, parts.text_encoder):
        # Stored in bf16 like real checkpoints: the mflux format is loaded without a dtype cast.
        module.update(tree_map(lambda a: a.astype(ModelConfig.precision), module.parameters()))
        mx.eval(module.parameters())

    out.mkdir(parents=True, exist_ok=True)
    ModelSaver.save_model(model=parts, bits=None, base_path=str(out), weight_definition=Flux2KleinWeightDefinition)
    (out / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / "tokenizer" / name)
    (out / CONFIG_FILE).write_text(
        json.dumps(
            {
                "preset": "flux2-klein",
                "base": "flux2-klein-4b",
                "transformer_overrides": TINY_TRANSFORMER,
                "text_encoder_overrides": text_encoder_overrides,
                "vae_block_out_channels": TINY_VAE_CHANNELS,
                "seed": seed,
            },
            indent=2,
        )
    )
    out.rename(final)
    return final
