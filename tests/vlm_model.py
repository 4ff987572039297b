"""A tiny random-weight vision-language model, built with mlx-vlm's own classes.

No package ships small VLM weights (``../shared/MODELS.md``), so the tests build a SmolVLM
(Idefics3 layout: a SigLIP vision tower, a pixel-shuffle connector, a Llama text model)
with small widths, the real SmolLM2 tokenizer plus SmolVLM's vision tokens, and
mlx-vlm's own image processor. Its answers are noise, but they are deterministic noise
that depends on every pixel: what the tests compare is whether the server computes
exactly what the model computes, image by image.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# SmolVLM's added tokens, in SmolVLM's own order (ids follow SmolLM2's 49152).
VISION_TOKENS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
IMAGE_SIZE = 64  # pixels per side the processor resizes to
PATCH = 8
SCALE = 2
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2 // SCALE**2  # tokens one image becomes (16)

# SmolVLM's template, shortened: images are `<image>`, text as written, turns end with
# <end_of_utterance> (the token the model stops at).
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% if loop.first %}:{% endif %}<image>"
    "{% elif part['type'] == 'text' %}{% if loop.first %}: {% endif %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_tiny_smolvlm(out: Path, tokenizer_dir: Path, seed: int = 0, *, image_size: int = IMAGE_SIZE, patch: int = PATCH,
                       vision_hidden: int = 32, vision_layers: int = 2, text_hidden: int = 64, text_layers: int = 2) -> Path:
    """Write a loadable mlx-vlm SmolVLM directory to ``out`` (tokenizer from ``tokenizer_dir``).
    The defaults make the tests' model; the benches build wider ones."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models.smolvlm import Model, ModelConfig
    from mlx_vlm.models.smolvlm.config import TextConfig, VisionConfig
    from transformers import AutoTokenizer
    from transformers.models.smolvlm import SmolVLMImageProcessorPil

    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    vocab = len(tokenizer)
    eos = ids["<end_of_utterance>"]
    text = {
        "model_type": "llama", "hidden_size": text_hidden, "intermediate_size": 2 * text_hidden, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": text_layers, "rms_norm_eps": 1e-5, "vocab_size": vocab,
        "rope_theta": 100000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False,
    }
    vision = {
        "model_type": "smolvlm_vision", "hidden_size": vision_hidden, "num_attention_heads": 2,
        "num_hidden_layers": vision_layers, "intermediate_size": 2 * vision_hidden, "patch_size": patch,
        "image_size": image_size, "num_channels": 3,
    }
    config = {
        "model_type": "smolvlm", "architectures": ["SmolVLMForConditionalGeneration"],
        "text_config": text, "vision_config": vision, "scale_factor": SCALE, "vocab_size": vocab,
        "image_token_id": ids["<image>"], "eos_token_id": [eos], "max_position_embeddings": 2048,
    }
    model_config = ModelConfig.from_dict(config)
    model_config.text_config = TextConfig.from_dict(text)
    model_config.vision_config = VisionConfig.from_dict(vision)
    mx.random.seed(seed)
    model = Model(model_config)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config, indent=1))

    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.eos_token = "<end_of_utterance>"
    tokenizer.save_pretrained(str(tmp))
    (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    processor = SmolVLMImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
    processor.save_pretrained(str(tmp))
    image_tokens = (image_size // patch) ** 2 // SCALE**2
    (tmp / "processor_config.json").write_text(
        json.dumps({"processor_class": "SmolVLMProcessor", "image_seq_len": image_tokens})
    )
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    tmp.rename(out)
    return out
