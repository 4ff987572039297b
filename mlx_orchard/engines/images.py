"""Image generation and editing over mflux: prompts in, PIL images out.

A model is an mflux pipeline named by an Orchard preset (``flux2-klein``, ``z-image-turbo``,
...), loaded from a local directory or a Hub repo the way mflux loads it. A directory may
carry ``mflux_overrides.json`` (``transformer_overrides`` / ``text_encoder_overrides`` for the
preset's ModelConfig: the tests' tiny model is one).

Batching: jobs of one shape (size, steps, guidance) go through the denoiser as one batch
where Orchard runs the preset's denoising loop itself (FLUX.2-klein): prompts are encoded
one by one, each job's noise comes from its own seed, and every step is one transformer
call over the whole batch, so a batched image equals the one mflux's own ``generate_image``
makes alone. Other presets run mflux's ``generate_image`` job by job. Edits (reference
images) run job by job on the preset's edit pipeline, loaded on first use.

Between steps the loop reports progress, hands out partial images (the batch's current
latents decoded) and stops when every job's caller has gone.

No Ray here. ``generate`` and ``edit`` run on the replica's MLX thread.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

from PIL import Image

from mlx_orchard.errors import InvalidRequestError

OVERRIDES_FILE = "mflux_overrides.json"


@dataclass(frozen=True)
class Preset:
    model_class: str  # "module:Class" of the text-to-image pipeline
    config: str  # mflux ModelConfig factory
    steps: int  # default steps ("auto" / "medium" quality)
    guidance: float | None  # default guidance; None: the pipeline's own
    edit_class: str | None = None  # the pipeline that takes reference images
    negative_prompt: bool = False  # the pipeline takes one
    batched: bool = False  # Orchard runs its denoising loop (one transformer call per step for a batch)
    generates: bool = True  # makes images from a prompt alone (an edit-only pipeline does not)


_FLUX = "mflux.models.flux.variants"
_FLUX2 = "mflux.models.flux2.variants"
_QWEN = "mflux.models.qwen.variants"
PRESETS: dict[str, Preset] = {
    "flux-schnell": Preset(f"{_FLUX}.txt2img.flux:Flux1", "schnell", 4, None, negative_prompt=True),
    "flux-dev": Preset(f"{_FLUX}.txt2img.flux:Flux1", "dev", 25, 3.5, negative_prompt=True),
    "flux-kontext-dev": Preset(f"{_FLUX}.kontext.flux_kontext:Flux1Kontext", "dev_kontext", 25, 2.5,
                               edit_class=f"{_FLUX}.kontext.flux_kontext:Flux1Kontext"),
    "flux2-klein": Preset(f"{_FLUX2}.txt2img.flux2_klein:Flux2Klein", "flux2_klein_4b", 4, 1.0,
                          edit_class=f"{_FLUX2}.edit.flux2_klein_edit:Flux2KleinEdit", batched=True),
    "z-image-turbo": Preset("mflux.models.z_image:ZImage", "z_image_turbo", 9, None, negative_prompt=True),
    "qwen-image": Preset(f"{_QWEN}.txt2img.qwen_image:QwenImage", "qwen_image", 30, 4.0, negative_prompt=True),
    "qwen-image-edit": Preset(f"{_QWEN}.edit.qwen_image_edit:QwenImageEdit", "qwen_image_edit", 30, 4.0,
                              edit_class=f"{_QWEN}.edit.qwen_image_edit:QwenImageEdit", negative_prompt=True,
                              generates=False),
}
# diffusers' pipeline class (model_index.json) -> preset; FLUX.1 schnell and dev share a class.
_PIPELINES = {"FluxKontextPipeline": "flux-kontext-dev", "Flux2KleinPipeline": "flux2-klein", "ZImagePipeline": "z-image-turbo",
              "QwenImagePipeline": "qwen-image", "QwenImageEditPipeline": "qwen-image-edit",
              "QwenImageEditPlusPipeline": "qwen-image-edit"}
QUALITY_STEPS = {"low": 0.5, "medium": 1.0, "auto": 1.0, "standard": 1.0, "high": 2.0, "hd": 2.0}
SIZE_STEP = 16  # latents are 1/16 of the image per side


@dataclass
class ImageJob:
    """One image to make. ``references``: images to edit (PNG bytes), empty for generation."""

    prompt: str
    seed: int
    width: int
    height: int
    steps: int
    guidance: float | None = None
    negative_prompt: str | None = None
    references: tuple[bytes, ...] = ()
    partial_images: int = 0
    on_partial: Callable[[int, Image.Image], None] | None = field(default=None, repr=False)  # (index, preview)
    cancelled: Callable[[], bool] = field(default=lambda: False, repr=False)

    def shape(self) -> tuple:
        """Jobs that can share a denoising batch have the same shape."""
        return (self.width, self.height, self.steps, self.guidance, bool(self.references))

    def partial_steps(self) -> set[int]:
        """The steps after which a partial image is sent: spread evenly, the last before the end."""
        k = self.partial_images
        return {max(0, (i + 1) * self.steps // (k + 1) - 1) for i in range(k)} if k else set()


def detect_preset(model_path: str | Path) -> str:
    """The preset of a model directory: its ``mflux_overrides.json`` or diffusers' ``model_index.json``."""
    path = Path(model_path)
    for name, key in ((OVERRIDES_FILE, "preset"), ("model_index.json", "_class_name")):
        try:
            value = json.loads((path / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        preset = value if value in PRESETS else _PIPELINES.get(str(value))
        if preset:
            return preset
    raise ValueError(f"{path}: cannot tell which image pipeline these weights are for; set `preset:` in the config "
                     f"({', '.join(PRESETS)})")


class ImageEngine:
    def __init__(self, model_path: str | Path, preset: str | None = None, *, quantize: int | None = None,
                 max_pixels: int = 2048 * 2048, max_steps: int = 100):
        preset = preset or detect_preset(model_path)
        if preset not in PRESETS:
            raise ValueError(f"unknown image preset {preset!r} (presets: {', '.join(PRESETS)})")
        self.preset = PRESETS[preset]
        self.model_path = str(model_path)
        self.quantize = quantize
        self.max_pixels = max_pixels
        self.max_steps = max_steps
        self.model_config = self._model_config()
        self.model: Any = _load_class(self.preset.model_class)(model_config=self.model_config, model_path=self.model_path,
                                                             quantize=quantize)
        self._edit_model: Any = None

    def _model_config(self) -> Any:
        from mflux.models.common.config import ModelConfig

        config = copy.copy(getattr(ModelConfig, self.preset.config)())  # the factory is lru_cached: copy
        overrides = Path(self.model_path) / OVERRIDES_FILE
        if overrides.is_file():
            saved = json.loads(overrides.read_text())
            config.transformer_overrides = saved.get("transformer_overrides", config.transformer_overrides)
            config.text_encoder_overrides = saved.get("text_encoder_overrides", config.text_encoder_overrides)
        return config

    @property
    def can_edit(self) -> bool:
        return self.preset.edit_class is not None

    def default_steps(self, quality: str | None) -> int:
        return max(1, round(self.preset.steps * QUALITY_STEPS.get(quality or "auto", 1.0)))

    def check(self, job: ImageJob) -> None:
        """Everything about one job that can be refused, before it joins a batch."""
        for name, side in (("width", job.width), ("height", job.height)):
            if side < SIZE_STEP or side % SIZE_STEP:
                raise InvalidRequestError(f"size: {name} {side} must be a multiple of {SIZE_STEP} (at least {SIZE_STEP})", param="size")
        if job.width * job.height > self.max_pixels:
            raise InvalidRequestError(f"size: {job.width}x{job.height} is more than the {self.max_pixels} pixels this model "
                                      "is allowed", param="size")
        if not 1 <= job.steps <= self.max_steps:
            raise InvalidRequestError(f"steps must be between 1 and {self.max_steps}", param="steps")
        if job.negative_prompt and not self.preset.negative_prompt:
            raise InvalidRequestError("this model takes no negative_prompt", param="negative_prompt")
        if not job.references and not self.preset.generates:
            raise InvalidRequestError("this model edits images: send them to /v1/images/edits", param="model")
        if job.references and not self.can_edit:
            raise InvalidRequestError("this model cannot edit images (use an edit model, e.g. flux2-klein or qwen-image-edit)",
                                      param="image")
        if job.partial_images and not self.preset.batched:
            raise InvalidRequestError("partial images are not available for this model", param="partial_images")

    def generate(self, jobs: list[ImageJob], on_step: Callable[[int, int], None] | None = None) -> list[Image.Image | None]:
        """Images for ``jobs`` (all of one ``shape``), in order; None for a job cancelled midway."""
        assert len({j.shape() for j in jobs}) == 1, "one shape per call"
        if jobs[0].references:
            return [self._edit(job) for job in jobs]
        if self.preset.batched:
            return self._denoise_batch(jobs, on_step)
        return [self._generate_one(job) for job in jobs]

    def _generate_one(self, job: ImageJob) -> Image.Image | None:
        if job.cancelled():
            return None
        return self.model.generate_image(**_pipeline_kwargs(job)).image

    def _edit(self, job: ImageJob) -> Image.Image | None:
        if job.cancelled():
            return None
        if self._edit_model is None:
            self._edit_model = self.model if self.preset.edit_class == self.preset.model_class else _load_class(
                self.preset.edit_class or "")(model_config=self.model_config, model_path=self.model_path, quantize=self.quantize)
        with tempfile.TemporaryDirectory(prefix="orchard-edit-") as tmp:
            paths = []
            for i, data in enumerate(job.references):  # mflux's edit pipelines read image files
                path = Path(tmp) / f"reference-{i}.png"
                path.write_bytes(data)
                paths.append(str(path))
            kwargs = {**_pipeline_kwargs(job), **reference_kwargs(self._edit_model, paths)}
            return self._edit_model.generate_image(**kwargs).image

    def _denoise_batch(self, jobs: list[ImageJob], on_step: Callable[[int, int], None] | None) -> list[Image.Image | None]:
        """FLUX.2-klein's txt2img loop (``Flux2Klein.generate_image``) over a batch."""
        import mlx.core as mx
        from mflux.models.common.config.config import Config
        from mflux.models.flux2.latent_creator.flux2_latent_creator import Flux2LatentCreator

        model, first = self.model, jobs[0]
        guidance = 1.0 if first.guidance is None else first.guidance
        config = Config(model_config=model.model_config, num_inference_steps=first.steps, height=first.height,
                        width=first.width, guidance=guidance, scheduler="flow_match_euler_discrete")
        encoded = [model._encode_prompt_pair(prompt=j.prompt, negative_prompt=" ", guidance=guidance) for j in jobs]
        embeds = mx.concatenate([e[0] for e in encoded])
        text_ids = encoded[0][1]  # prompts are padded to one length: the same ids for every row
        negative = mx.concatenate([e[2] for e in encoded]) if encoded[0][2] is not None else None
        negative_ids = encoded[0][3]
        noise = [Flux2LatentCreator.prepare_packed_latents(seed=j.seed, height=config.height, width=config.width, batch_size=1)
                 for j in jobs]
        latents = mx.concatenate([n[0] for n in noise])
        latent_ids, latent_height, latent_width = noise[0][1], noise[0][2], noise[0][3]
        predict = model._predict(model.transformer)
        partial_at = [j.partial_steps() for j in jobs]
        sent = [0] * len(jobs)
        live = list(range(len(jobs)))
        for step, t in enumerate(config.time_steps):
            live = [i for i in live if not jobs[i].cancelled()]
            if not live:
                return [None] * len(jobs)
            velocity = predict(latents=latents, latent_ids=latent_ids, prompt_embeds=embeds, text_ids=text_ids,
                               negative_prompt_embeds=negative, negative_text_ids=negative_ids, guidance=guidance,
                               timestep=config.scheduler.timesteps[t])
            latents = config.scheduler.step(noise=velocity, timestep=t, latents=latents, sigmas=config.scheduler.sigmas)
            mx.eval(latents)
            if on_step is not None:
                on_step(step + 1, config.num_inference_steps)
            for i in live:
                send = jobs[i].on_partial
                if send is not None and step in partial_at[i] and step < config.num_inference_steps - 1:
                    send(sent[i], self._decode(latents[i : i + 1], latent_height, latent_width)[0])
                    sent[i] += 1
        images = self._decode(latents, latent_height, latent_width)
        return [images[i] if i in live else None for i in range(len(jobs))]

    def _decode(self, latents: Any, latent_height: int, latent_width: int) -> list[Image.Image]:
        from mflux.utils.image_util import ImageUtil

        packed = latents.reshape(latents.shape[0], latent_height, latent_width, latents.shape[-1]).transpose(0, 3, 1, 2)
        decoded = self.model.vae.decode_packed_latents(packed, tiling_config=self.model.tiling_config)
        return [ImageUtil.to_pil(decoded[i : i + 1]) for i in range(decoded.shape[0])]


def _pipeline_kwargs(job: ImageJob) -> dict[str, Any]:
    """A job as mflux's ``generate_image`` arguments (guidance and negative prompt only when set:
    each pipeline has its own defaults)."""
    kwargs: dict[str, Any] = {"seed": job.seed, "prompt": job.prompt, "num_inference_steps": job.steps,
                              "width": job.width, "height": job.height}
    if job.guidance is not None:
        kwargs["guidance"] = job.guidance
    if job.negative_prompt:
        kwargs["negative_prompt"] = job.negative_prompt
    return kwargs


def reference_kwargs(pipeline: Any, paths: list[str]) -> dict[str, Any]:
    """How an edit pipeline takes its images: a list (FLUX.2, Qwen-Image-Edit) or one (Kontext)."""
    import inspect

    parameters = inspect.signature(pipeline.generate_image).parameters
    if "image_paths" in parameters:
        return {"image_paths": paths}
    if len(paths) > 1:
        raise InvalidRequestError("this model edits one image at a time", param="image")
    return {"image_path": paths[0]}


def _load_class(path: str) -> Any:
    module, _, name = path.partition(":")
    return getattr(import_module(module), name)
