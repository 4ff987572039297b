"""Convert a llama-family GGUF file into a plain mlx-lm model directory.

The result (config.json, model*.safetensors, tokenizer.json, tokenizer_config.json)
loads with ``mlx_lm.load(dir)`` and serves with ``mlx_lm.server --model dir``.

MLX reads GGUF itself (``mx.load``): Q4_0/Q4_1/Q8_0 come back as MLX affine
triples (weight/scales/biases, group size 32), F32/F16 stay float, BF16/Q2_K/Q6_K
come back dequantized to float16. What is left to do here is the llama.cpp ->
Hugging Face layout: tensor names, the Q/K row permutation, the config and the
tokenizer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx

from .cache import cache_root, sha256_of

GROUP_SIZE = 32  # every GGUF block type MLX keeps quantized has 32 weights per block

# ggml type ids. BF16, Q2_K and Q6_K reach us as float16 from mx.load (checked against
# gguf-py's reference dequantization). Q4_K is read too, but MLX's decoder disagrees
# with llama.cpp's reference on half the sub-blocks, so it is refused rather than
# silently producing a broken model; Q5_x, Q3_K, Q5_K and IQ types mx.load cannot read.
_SUPPORTED_TYPES = {0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 8: "Q8_0", 10: "Q2_K", 14: "Q6_K", 30: "BF16"}
_TYPE_NAMES = {6: "Q5_0", 7: "Q5_1", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 15: "Q8_K", 20: "IQ4_NL"}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# How llama.cpp's `tokenizer.ggml.pre` families split text before BPE (their regexes are
# those of the original Hugging Face tokenizers).
_GPT2 = "gpt2"
_DIGITS_GPT2 = "digits+gpt2"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS = {
    "default": _GPT2,
    "gpt-2": _GPT2,
    "smollm": _DIGITS_GPT2,
    "starcoder": _DIGITS_GPT2,
    "refact": _DIGITS_GPT2,
    "llama3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
}


def mlx_name(gguf_name: str) -> str:
    """mlx-lm llama parameter name for a llama.cpp tensor name (``.weight/.scales/.biases``)."""
    stem, _, suffix = gguf_name.rpartition(".")
    if m := re.fullmatch(r"blk\.(\d+)\.(\w+)", stem):
        if m[2] in _LAYER_NAMES:
            return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.{suffix}"
    elif stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no mlx-lm llama counterpart")


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K permutation, which interleaves each head's two rotary halves.

    llama.cpp reorders rows (h, half, i) -> (h, i, half) so its interleaved RoPE matches
    HF's half-split one; mlx-lm's llama uses the half-split form, so swap them back.
    Rows are output features, so this applies unchanged to weights, scales and biases.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_types(path: Path) -> dict[str, int]:
    """ggml type of each tensor, from the GGUF header (mx.load does not report it)."""
    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with open(path, "rb") as f:

        def read(fmt: str) -> int:
            return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

        def skip(vtype: int) -> None:
            if vtype == 8:  # string
                f.seek(read("Q"), 1)
            elif vtype == 9:  # array
                item, count = read("I"), read("Q")
                if item in scalar:
                    f.seek(scalar[item] * count, 1)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                f.seek(scalar[vtype], 1)

        magic, version = f.read(4), read("I")
        if magic != b"GGUF" or version < 2:
            raise ValueError(f"{path} is not a GGUF v2/v3 file")
        n_tensors, n_kv = read("Q"), read("Q")
        for _ in range(n_kv):
            f.seek(read("Q"), 1)
            skip(read("I"))
        types = {}
        for _ in range(n_tensors):
            name = f.read(read("Q")).decode()
            f.seek(8 * read("I"), 1)  # dims
            types[name] = read("I")
            f.seek(8, 1)  # data offset
        return types


def _meta(md: dict, key: str, default=None):
    value = md.get(key, default)
    if not (isinstance(value, mx.array) and value.ndim == 0):
        return value
    # float32 metadata (eps, rope base) printed at float32 precision: 1e-05, not 9.99999974e-06
    return float(f"{value.item():.7g}") if value.dtype == mx.float32 else value.item()


def _model_config(md: dict, weights: dict[str, mx.array]) -> dict:
    arch = md.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUF files are supported, not {arch!r}")
    if "rope_freqs.weight" in weights:
        raise ValueError("GGUF rope_freqs (Llama 3.1-style rope scaling) is not supported")
    hidden, heads = _meta(md, "llama.embedding_length"), _meta(md, "llama.attention.head_count")
    head_dim = _meta(md, "llama.attention.key_length", hidden // heads)
    if _meta(md, "llama.rope.dimension_count", head_dim) != head_dim:
        raise ValueError("partial rotary embeddings are not supported for llama GGUF files")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _meta(md, "llama.feed_forward_length"),
        "num_hidden_layers": _meta(md, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _meta(md, "llama.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _meta(md, "llama.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": _meta(md, "llama.rope.freq_base", 10000.0),
        "max_position_embeddings": _meta(md, "llama.context_length", 4096),
        "vocab_size": weights["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in weights,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
    }
    scaling = _meta(md, "llama.rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": _meta(md, "llama.rope.scaling.factor")}
    elif scaling != "none":
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported")
    for key in ("bos", "eos", "padding"):
        if (tid := _meta(md, f"tokenizer.ggml.{key}_token_id")) is not None:
            config[f"{'pad' if key == 'padding' else key}_token_id"] = tid
    return config


def _convert_weights(
    weights: dict[str, mx.array], config: dict, dequantize: bool
) -> tuple[dict[str, mx.array], dict | None]:
    """Renamed, un-permuted weights, and the mlx-lm ``quantization`` entry (None if float)."""
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    out: dict[str, mx.array] = {}
    bits_of: dict[str, int | None] = {}  # per linear/embedding module: bits, or None if float
    for name in sorted(n for n in weights if n.endswith(".weight")):
        stem = name.removesuffix(".weight")
        parts = {s: weights[f"{stem}.{s}"] for s in ("weight", "scales", "biases") if f"{stem}.{s}" in weights}
        kind = stem.split(".")[-1]
        if kind in heads:
            parts = {s: unpermute_rows(t, heads[kind]) for s, t in parts.items()}
        module = mlx_name(name).removesuffix(".weight")
        if "scales" in parts:
            w, scales, biases = parts["weight"], parts["scales"], parts["biases"]
            bits = w.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)
            if dequantize:
                # fp32 scales so the dequantized values are not rounded through float16
                parts = {"weight": mx.dequantize(
                    w, scales.astype(mx.float32), biases.astype(mx.float32), group_size=GROUP_SIZE, bits=bits
                )}
            else:
                bits_of[module] = bits
        else:
            if dequantize or parts["weight"].ndim == 1:
                parts = {"weight": parts["weight"].astype(mx.float32)}
            if parts["weight"].ndim == 2:
                bits_of[module] = None
        out.update({f"{module}.{s}": t for s, t in parts.items()})
    quantized = [b for b in bits_of.values() if b is not None]
    if not quantized:
        return out, None
    default = Counter(quantized).most_common(1)[0][0]
    quantization: dict = {"group_size": GROUP_SIZE, "bits": default, "mode": "affine"}
    for module, module_bits in bits_of.items():
        if module_bits is None:
            quantization[module] = False
        elif module_bits != default:
            quantization[module] = {"group_size": GROUP_SIZE, "bits": module_bits, "mode": "affine"}
    return out, quantization


def _save_weights(weights: dict[str, mx.array], out_dir: Path) -> None:
    """Write safetensors shards and their index the way mlx-lm's ``save_model`` does."""
    from mlx_lm.utils import make_shards

    shards = make_shards(weights)
    pattern = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = pattern.format(i, len(shards))
        mx.save_safetensors(str(out_dir / file), shard, metadata={"format": "mlx"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def write_tokenizer(md: dict, out_dir: Path) -> None:
    """tokenizer.json + tokenizer_config.json from GGUF tokenizer metadata (byte-level BPE)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    kind = md.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = md.get("tokenizer.ggml.pre", "default")
    if (split := _PRE_TOKENIZERS.get(pre)) is None:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {sorted(_PRE_TOKENIZERS)}")
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    types = md["tokenizer.ggml.token_type"].tolist() if "tokenizer.ggml.token_type" in md else [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]

    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(_meta(md, "tokenizer.ggml.add_space_prefix", False)),
        use_regex=split in (_GPT2, _DIGITS_GPT2),
    )
    tok = Tokenizer(models.BPE(
        {t: i for i, t in enumerate(tokens)}, merges, ignore_merges=split == _LLAMA3_SPLIT
    ))
    if split == _GPT2:
        tok.pre_tokenizer = byte_level
    elif split == _DIGITS_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()  # mlx-lm picks its BPE streaming detokenizer from this
    # Control tokens (3) are special; user-defined ones (4) are matched whole but are text.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == 4])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])

    def token(key: str) -> str | None:
        tid = _meta(md, f"tokenizer.ggml.{key}_token_id")
        return tokens[tid] if tid is not None and tid < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    add_bos = bool(_meta(md, "tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(_meta(md, "tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        head, tail = [bos] if add_bos else [], [eos] if add_eos else []

        def sequence(piece: str, type_id: int) -> list[str]:
            return [f"{t}:{type_id}" for t in head] + [f"{piece}:{type_id}"] + [f"{t}:{type_id}" for t in tail]

        tok.post_processor = processors.TemplateProcessing(
            single=sequence("$A", 0),
            pair=sequence("$A", 0) + sequence("$B", 1),
            special_tokens=[(t, tok.token_to_id(t)) for t in head + tail],  # type: ignore[arg-type]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(out_dir / "tokenizer.json"))

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _meta(md, "llama.context_length", 4096),
    }
    if template := md.get("tokenizer.chat_template"):
        config["chat_template"] = template
    config = {k: v for k, v in config.items() if v is not None}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dequantize: bool) -> Path:
    """Write an mlx-lm model directory for a llama GGUF file.

    ``dequantize=True`` stores float32 weights (faster than quantized matmuls on MLX's CPU
    backend); ``False`` keeps the GGUF's 4/8-bit blocks as MLX affine quantization.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    types = _tensor_types(gguf_path)
    if bad := sorted({t for t in types.values() if t not in _SUPPORTED_TYPES}):
        names = [_TYPE_NAMES.get(t, f"type {t}") for t in bad]
        raise ValueError(
            f"{gguf_path.name} holds tensors of GGUF types {names}; supported: {sorted(_SUPPORTED_TYPES.values())}"
        )
    loaded: Any = mx.load(str(gguf_path), return_metadata=True)  # (weights, metadata) for GGUF
    weights, md = loaded
    if 30 in types.values() and not all(mx.isfinite(w).all().item() for w in weights.values()):
        raise ValueError(f"{gguf_path.name}: BF16 values overflow the float16 that mx.load reads them as")
    config = _model_config(md, weights)
    converted, quantization = _convert_weights(weights, config, dequantize)
    del weights
    if quantization is not None:
        config["quantization"] = config["quantization_config"] = quantization
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_weights(converted, out_dir)
    (out_dir / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=4))
    write_tokenizer(md, out_dir)
    return out_dir


def load_or_convert(
    gguf_path: str | os.PathLike, *, dequantize: bool, expected_sha256: str | None = None
) -> Path:
    """Converted model directory for ``gguf_path``, cached by the file's sha256.

    Concurrent callers (replicas) may both convert; each writes into its own temp dir
    and renames it into place, so the first finished one wins and a half-written
    directory is never visible.
    """
    sha = sha256_of(gguf_path)
    if expected_sha256 is not None and sha != expected_sha256.lower():
        raise ValueError(f"sha256 of {gguf_path} is {sha}, expected {expected_sha256}")
    final = cache_root() / "gguf" / f"{sha[:16]}-{'f32' if dequantize else 'q'}"
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        convert_gguf(gguf_path, tmp, dequantize=dequantize)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "config.json").exists():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
