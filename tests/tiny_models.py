"""Tiny random-weight models built at test time with the libraries' own classes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def write_tiny_llama(dst: Path, tokenizer_from: Path, *, seed: int, quantize: dict | None = None) -> Path:
    """A 2-layer llama with SmolLM2's tokenizer (so chat templates work), random weights
    from ``seed``, saved as mlx-lm saves models; ``quantize`` {group_size, bits} quantizes it."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    src = json.loads((tokenizer_from / "config.json").read_text())
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "vocab_size": src["vocab_size"],
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": src.get("bos_token_id"),
        "eos_token_id": src.get("eos_token_id"),
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    if quantize:
        nn.quantize(model, group_size=quantize["group_size"], bits=quantize["bits"])
        config["quantization"] = dict(quantize)
    mx.eval(model.parameters())
    dst.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, dst / name)
    return dst


def link_copy(src: Path, dst: Path) -> Path:
    """A copy of a model directory under another name: hard links (no second 540 MB on disk)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file():
            try:
                (dst / f.name).hardlink_to(f)
            except OSError:
                shutil.copy(f, dst / f.name)
    return dst


def greedy_reference(path: Path, messages: list[dict], max_tokens: int) -> str:
    """What mlx-lm itself generates greedily for this chat: the text Orchard must answer."""
    import mlx.core as mx
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(path))
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    out: list[int] = []
    for r in stream_generate(model, tokenizer, ids, max_tokens=max_tokens, sampler=lambda x: mx.argmax(x, axis=-1)):
        if r.token in tokenizer.eos_token_ids:
            break
        out.append(r.token)
    return tokenizer.decode(out)
