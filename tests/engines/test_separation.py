"""SeparationEngine on the tiny random-weight SAM-Audio, against mlx-audio's own calls."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from mlx_orchard.engines.separation import CHUNK_SECONDS, OVERLAP_SECONDS, SeparationEngine
from mlx_orchard.errors import InvalidRequestError
from tests.separation_model import SAMPLE_RATE


@pytest.fixture(scope="module")
def engine(tiny_sam_audio_dir):
    return SeparationEngine(tiny_sam_audio_dir)


def noise(seconds: float, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SAMPLE_RATE))).astype(np.float32)


def test_a_short_clip_is_what_mlx_audio_computes(engine):
    import mlx.core as mx

    samples = noise(1.3)
    ours = engine.separate(samples, "speech", steps=4, method="euler", seed=3)
    theirs = engine.model.separate_long(mx.array(samples)[None, None, :], ["speech"], ode_opt={"method": "euler", "step_size": 0.25},
                                        ode_decode_chunk_size=50, seed=3)
    np.testing.assert_array_equal(ours.target, np.array(theirs.target[0]).reshape(-1)[: len(samples)])
    np.testing.assert_array_equal(ours.residual, np.array(theirs.residual[0]).reshape(-1)[: len(samples)])


def test_long_audio_is_cut_into_overlapping_windows_and_joined_to_its_length(engine):
    n = int(24.5 * SAMPLE_RATE)
    windows = engine.chunks(n)
    size, overlap = int(CHUNK_SECONDS * SAMPLE_RATE), int(OVERLAP_SECONDS * SAMPLE_RATE)
    assert windows[0] == (0, size) and windows[-1][1] == n
    assert all(b[0] == a[1] - overlap for a, b in zip(windows, windows[1:]))
    assert engine.chunks(size) == [(0, size)]
    joined = engine.separate(noise(12.0), "speech", steps=2)
    assert len(joined.target) == len(joined.residual) == 12 * SAMPLE_RATE
    assert np.isfinite(joined.target).all()


@pytest.mark.parametrize("description, steps, method, param", [
    ("", 16, "midpoint", "description"), ("x" * 1001, 16, "midpoint", "description"),
    ("speech", 3, "midpoint", "steps"), ("speech", 16, "rk4", "method"),
])
def test_bad_arguments_are_refused_before_any_work(engine, description, steps, method, param):
    with pytest.raises(InvalidRequestError) as e:
        engine.separate(noise(0.5), description, steps=steps, method=method)
    assert e.value.param == param


def test_a_model_with_a_missing_weight_fails_at_load(tiny_sam_audio_dir, tmp_path):
    import mlx.core as mx

    broken = shutil.copytree(tiny_sam_audio_dir, tmp_path / "broken")
    weights = mx.load(str(broken / "model.safetensors"))
    del weights["transformer.layers.0.attention.wq.weight"]
    mx.save_safetensors(str(broken / "model.safetensors"), weights)
    with pytest.raises(ValueError, match="transformer.layers.0.attention.wq.weight"):
        SeparationEngine(broken)
    shutil.rmtree(broken / "text_encoder")
    with pytest.raises(ValueError, match="text encoder"):
        SeparationEngine(tiny_sam_audio_dir, text_encoder_dir=broken / "text_encoder")
