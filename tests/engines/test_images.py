"""ImageEngine on the tiny random-weight FLUX.2-klein, against mflux's own generate_image."""

from __future__ import annotations

import numpy as np
import pytest

from mlx_orchard.engines.images import ImageEngine, ImageJob
from mlx_orchard.errors import InvalidRequestError


@pytest.fixture(scope="module")
def engine(tiny_image_dir):
    return ImageEngine(tiny_image_dir, "flux2-klein", max_pixels=128 * 128, max_steps=8)


def alone(engine: ImageEngine, job: ImageJob) -> np.ndarray:
    made = engine.model.generate_image(seed=job.seed, prompt=job.prompt, num_inference_steps=job.steps,
                                       width=job.width, height=job.height)
    return np.array(made.image.convert("RGB"))


def test_a_batch_makes_what_each_job_makes_alone(engine):
    jobs = [ImageJob("a red fox", 1, 64, 48, 2), ImageJob("a blue car", 2, 64, 48, 2), ImageJob("a red fox", 3, 64, 48, 2)]
    images = engine.generate(jobs)
    for job, image in zip(jobs, images):
        assert image is not None and image.size == (64, 48)
        np.testing.assert_array_equal(np.array(image), alone(engine, job))
    assert not np.array_equal(np.array(images[0]), np.array(images[2]))  # another seed, another image


def test_partial_images_and_progress_come_between_steps(engine):
    partials, steps = [], []
    job = ImageJob("a red fox", 1, 32, 32, 4, partial_images=2, on_partial=lambda k, im: partials.append((k, im.size)))
    [final] = engine.generate([job], on_step=lambda s, total: steps.append((s, total)))
    assert partials == [(0, (32, 32)), (1, (32, 32))] and steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    np.testing.assert_array_equal(np.array(final), alone(engine, job))


def test_a_batch_whose_callers_left_stops(engine):
    steps = []
    job = ImageJob("a red fox", 1, 32, 32, 8, cancelled=lambda: len(steps) >= 2)
    assert engine.generate([job], on_step=lambda s, total: steps.append(s)) == [None]
    assert steps == [1, 2]


@pytest.mark.parametrize("change, param", [
    ({"width": 40}, "size"), ({"height": 0}, "size"), ({"width": 256, "height": 256}, "size"),
    ({"steps": 9}, "steps"), ({"steps": 0}, "steps"), ({"negative_prompt": "blurry"}, "negative_prompt"),
])
def test_what_the_model_cannot_do_is_refused_before_any_work(engine, change, param):
    job = ImageJob(**{"prompt": "x", "seed": 0, "width": 64, "height": 64, "steps": 2, **change})
    with pytest.raises(InvalidRequestError) as e:
        engine.check(job)
    assert e.value.param == param


def test_the_preset_is_read_from_the_model_directory(tiny_image_dir, tmp_path):
    from mlx_orchard.engines.images import detect_preset

    assert detect_preset(tiny_image_dir) == "flux2-klein"
    (tmp_path / "model_index.json").write_text('{"_class_name": "ZImagePipeline"}')
    assert detect_preset(tmp_path) == "z-image-turbo"
    (tmp_path / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')  # schnell or dev: the config must say
    with pytest.raises(ValueError, match="preset"):
        detect_preset(tmp_path)


@pytest.mark.parametrize("preset", ["flux-kontext-dev", "flux2-klein", "qwen-image-edit"])
def test_each_edit_pipeline_gets_its_images_the_way_its_generate_image_takes_them(preset):
    from mlx_orchard.engines.images import PRESETS, _load_class, reference_kwargs

    edit_class = PRESETS[preset].edit_class
    assert edit_class is not None
    pipeline = _load_class(edit_class)  # the class: its generate_image signature is what matters
    one = reference_kwargs(pipeline, ["a.png"])
    if preset == "flux-kontext-dev":
        assert one == {"image_path": "a.png"}
        with pytest.raises(InvalidRequestError):
            reference_kwargs(pipeline, ["a.png", "b.png"])
    else:
        assert one == {"image_paths": ["a.png"]} and reference_kwargs(pipeline, ["a", "b"]) == {"image_paths": ["a", "b"]}


def test_every_preset_names_a_pipeline_and_a_config_mflux_has():
    from mflux.models.common.config import ModelConfig

    from mlx_orchard.engines.images import PRESETS, _load_class

    for preset in PRESETS.values():
        assert callable(getattr(ModelConfig, preset.config))
        for path in filter(None, (preset.model_class, preset.edit_class)):
            assert hasattr(_load_class(path), "generate_image")
