"""Image generation and editing through real Serve and the OpenAI SDK (issue #14).

One Serve app for the module with the tiny random-weight FLUX.2-klein (tests/images_model.py).
Reference images come from mflux's own ``Flux2Klein.generate_image`` in this process: the
server, batching or not, must make exactly the image the model makes for that seed.
"""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from tests.conftest import default_args, module_app, replica_stats, sdk_client

APP, MODEL = "images", "tiny-klein"
STEPS = 2
URL_TTL_S = 3


@pytest.fixture(scope="module")
def app(serve_instance, tiny_image_dir):
    args = default_args()
    config = {
        "ingress": {**args["ingress"], "image_urls_ttl_s": URL_TTL_S, "images": {"max_image_mb": 0.05, "max_images": 4}},
        "runtime": args["runtime"],
        "pools": {"images": {"batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.3},
                             "deployment": {"ray_actor_options": {"num_cpus": 0.1}}}},
        "images": [{"name": MODEL, "source": str(tiny_image_dir), "preset": "flux2-klein", "default_size": "64x64",
                    "max_pixels": 128 * 128, "max_steps": 8}],
    }
    with module_app(serve_instance, APP, config) as url:
        yield url


@pytest.fixture(scope="module")
def sdk(app) -> openai.OpenAI:
    return sdk_client(app)


@pytest.fixture(scope="module")
def reference(tiny_image_dir):
    """mflux's own pipeline in this process: (prompt, seed, width, height) -> RGB pixels."""
    from mflux.models.flux2.variants.txt2img.flux2_klein import Flux2Klein

    from tests.images_model import tiny_model_config

    model = Flux2Klein(model_config=tiny_model_config(tiny_image_dir), model_path=str(tiny_image_dir))
    cache: dict = {}

    def image(prompt: str, seed: int, width: int = 64, height: int = 64) -> np.ndarray:
        key = (prompt, seed, width, height)
        if key not in cache:
            made = model.generate_image(seed=seed, prompt=prompt, num_inference_steps=STEPS, width=width, height=height)
            cache[key] = np.array(made.image.convert("RGB"))
        return cache[key]

    return image


def pixels(b64: str, fmt: str = "PNG") -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as img:
        assert img.format == fmt
        return np.array(img.convert("RGB"))


def generate(sdk: openai.OpenAI, prompt: str, seed: int, **kwargs):
    return sdk.images.generate(model=MODEL, prompt=prompt, extra_body={"seed": seed, "steps": STEPS}, **kwargs)


def stats(handle_loop) -> dict:
    return replica_stats(handle_loop, APP, "images", MODEL)


def test_an_image_of_the_requested_size_is_what_the_model_makes(sdk, reference):
    reply = generate(sdk, "a lighthouse at dusk", 5, size="96x64")
    assert reply.size == "96x64" and reply.output_format == "png" and len(reply.data) == 1
    image = pixels(reply.data[0].b64_json)
    assert image.shape == (64, 96, 3)
    np.testing.assert_array_equal(image, reference("a lighthouse at dusk", 5, 96, 64))
    # size auto is the model's default
    assert pixels(generate(sdk, "a lighthouse at dusk", 5).data[0].b64_json).shape == (64, 64, 3)


def test_n_images_take_consecutive_seeds_and_a_seed_repeats(sdk, reference):
    reply = generate(sdk, "three boats", 20, n=3, size="64x32")
    images = [pixels(d.b64_json) for d in reply.data]
    for i, image in enumerate(images):
        np.testing.assert_array_equal(image, reference("three boats", 20 + i, 64, 32))
    assert len({im.tobytes() for im in images}) == 3
    again = generate(sdk, "three boats", 21, size="64x32")
    assert again.data[0].b64_json == reply.data[1].b64_json  # the same seed gives the same bytes


def test_concurrent_requests_of_one_shape_share_the_denoiser(sdk, reference, handle_loop):
    prompts = [f"a garden, variant {i}" for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda p: generate(sdk, p, 7), prompts))
    for prompt, reply in zip(prompts, replies):
        np.testing.assert_array_equal(pixels(reply.data[0].b64_json), reference(prompt, 7))
    assert stats(handle_loop)["largest"] >= 2  # at least two jobs went through one batch


def test_url_answers_are_served_until_they_expire(sdk, app):
    b64 = generate(sdk, "a red kite", 3).data[0].b64_json
    reply = generate(sdk, "a red kite", 3, response_format="url")
    url = reply.data[0].url
    assert url.startswith(f"{app}/v1/images/files/") and reply.data[0].b64_json is None
    got = httpx.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert got.content == base64.b64decode(b64)
    time.sleep(URL_TTL_S + 0.5)
    gone = httpx.get(url)
    assert gone.status_code == 404 and gone.json()["error"]["message"]


@pytest.mark.parametrize("fmt, pil", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_other_output_formats(sdk, fmt, pil):
    small = generate(sdk, "a field of wheat", 4, output_format=fmt, output_compression=30)
    large = generate(sdk, "a field of wheat", 4, output_format=fmt, output_compression=95)
    assert pixels(small.data[0].b64_json, pil).shape == (64, 64, 3) and small.output_format == fmt
    assert len(small.data[0].b64_json) < len(large.data[0].b64_json)


def test_a_stream_sends_partial_images_then_the_final_one(app, sdk):
    body = {"model": MODEL, "prompt": "a city at night", "seed": 9, "steps": 4, "stream": True, "partial_images": 2}
    events = []
    with httpx.stream("POST", f"{app}/v1/images/generations", json=body, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e["partial_image_index"] for e in events[:2]] == [0, 1]
    final = sdk.images.generate(model=MODEL, prompt="a city at night", extra_body={"seed": 9, "steps": 4})
    assert events[-1]["b64_json"] == final.data[0].b64_json  # previews change nothing
    assert events[-1]["usage"]["output_tokens"] == 16 and events[0]["b64_json"] != events[-1]["b64_json"]


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def test_an_edit_with_a_mask_keeps_the_masked_pixels(sdk):
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    mask = Image.new("RGBA", (64, 48), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 40))  # transparent: the part to change
    reply = sdk.images.edit(model=MODEL, image=("photo.png", png(original), "image/png"),
                            mask=("mask.png", png(mask), "image/png"), prompt="a hat", extra_body={"seed": 2, "steps": STEPS})
    edited = pixels(reply.data[0].b64_json)
    assert edited.shape == (48, 64, 3) and reply.size == "64x48"
    kept = np.array(mask)[..., 3] == 255
    np.testing.assert_array_equal(edited[kept], np.array(original)[kept])
    assert (edited[~kept] != np.array(original)[~kept]).any()
    # without a mask the whole picture is the model's
    whole = pixels(sdk.images.edit(model=MODEL, image=("photo.png", png(original), "image/png"), prompt="a hat",
                                   extra_body={"seed": 2, "steps": STEPS}).data[0].b64_json)
    assert (whole[kept] != np.array(original)[kept]).any()


@pytest.mark.parametrize("case, status, param", [
    ("size not a multiple of 16", 400, "size"),
    ("size not WxH", 400, "size"),
    ("size over max_pixels", 400, "size"),
    ("n 11", 400, "n"),
    ("steps over max", 400, "steps"),
    ("transparent background", 400, "background"),
    ("negative prompt", 400, "negative_prompt"),
    ("url stream", 400, "response_format"),
    ("unknown model", 404, "model"),
    ("empty prompt", 400, "prompt"),
])
def test_bad_generation_requests_get_an_openai_error(app, case, status, param):
    body: dict = {"model": MODEL, "prompt": "a cat", "steps": STEPS}
    match case:
        case "size not a multiple of 16":
            body["size"] = "65x64"
        case "size not WxH":
            body["size"] = "big"
        case "size over max_pixels":
            body["size"] = "256x256"
        case "n 11":
            body["n"] = 11
        case "steps over max":
            body["steps"] = 9
        case "transparent background":
            body["background"] = "transparent"
        case "negative prompt":
            body["negative_prompt"] = "blurry"
        case "url stream":
            body.update(stream=True, response_format="url")
        case "unknown model":
            body["model"] = "no-such-painter"
        case "empty prompt":
            body["prompt"] = ""
    r = httpx.post(f"{app}/v1/images/generations", json=body, timeout=120)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("case, status, param", [
    ("not an image", 400, "image"),
    ("no image", 400, "image"),
    ("too large", 413, "image"),
    ("mask of another size", 400, "mask"),
    ("mask without alpha", 400, "mask"),
    ("mask not an image", 400, "mask"),
])
def test_bad_edits_get_an_openai_error(app, case, status, param):
    image = png(Image.new("RGB", (64, 64), (10, 200, 30)))
    files: list = [("image", ("a.png", image, "image/png"))]
    match case:
        case "not an image":
            files = [("image", ("a.png", b"GIF89a but not really", "image/png"))]
        case "no image":
            files = []
        case "too large":
            noisy = Image.fromarray(np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8))
            files = [("image", ("a.png", png(noisy), "image/png"))]
        case "mask of another size":
            files.append(("mask", ("m.png", png(Image.new("RGBA", (32, 32))), "image/png")))
        case "mask without alpha":
            files.append(("mask", ("m.png", png(Image.new("RGB", (64, 64))), "image/png")))
        case "mask not an image":
            files.append(("mask", ("m.png", b"nope", "image/png")))
    data = {"model": MODEL, "prompt": "paint it", "steps": str(STEPS)}
    r = httpx.post(f"{app}/v1/images/edits", data=data, files=files or {"x": ("x", b"", "text/plain")}, timeout=120)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_the_replica_still_answers_after_the_bad_requests(sdk, reference):
    np.testing.assert_array_equal(pixels(generate(sdk, "a quiet lake", 11).data[0].b64_json), reference("a quiet lake", 11))
