"""Client images (issue 12's inputs): data URLs and http(s) URLs fetched from a real local
HTTP server, decoded by Pillow within their limits; every bad image is a 400 that says why,
and private addresses are refused unless the config allows them."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from mlx_orchard.errors import InvalidRequestError
from mlx_orchard.images import ImageError, ImageLimits, load_image
from tests.http_files import serve_files

pytestmark = pytest.mark.asyncio(loop_scope="module")

LAN = ImageLimits(allow_private_networks=True, timeout_s=5)  # the test server is on 127.0.0.1


def encoded(fmt: str, size=(8, 6), colour=(200, 30, 40), **save) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, fmt, **save)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.fixture(scope="module")
def server():
    png = encoded("PNG")
    routes = {
        "/red.png": (200, png),
        "/big.png": (200, encoded("PNG", size=(64, 64)) + b"\0" * 4096),
        "/text": (200, b"not an image at all"),
        "/loop": (302, "/loop"),
        "/hop": (302, "/red.png"),
    }
    with serve_files(routes) as url:
        yield url


@pytest.mark.parametrize("fmt,mime", [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"), ("GIF", "image/gif")])
async def test_data_urls_of_each_format_decode_to_rgb(fmt, mime):
    img = await load_image(data_url(encoded(fmt), mime), ImageLimits())
    assert img.size == (8, 6) and img.image.mode == "RGB" and img.format == fmt.lower()
    r, g, b = img.image.getpixel((3, 3))
    assert r > 150 and g < 80 and b < 80  # red survives every codec


async def test_an_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (4, 4), c) for c in ((0, 0, 255), (0, 255, 0))]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    img = await load_image(data_url(out.getvalue(), "image/gif"), ImageLimits())
    assert img.image.getpixel((1, 1))[2] > 200  # blue, the first frame


async def test_the_same_picture_in_two_encodings_has_one_hash():
    png = await load_image(data_url(encoded("PNG")), ImageLimits())
    webp = await load_image(data_url(encoded("WEBP", lossless=True), "image/webp"), ImageLimits())
    other = await load_image(data_url(encoded("PNG", colour=(0, 0, 0))), ImageLimits())
    assert png.sha256 == webp.sha256 != other.sha256


@pytest.mark.parametrize(
    "url,says",
    [
        (data_url(b"hello, not an image"), "could not be decoded"),
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:text/plain;base64,aGk=", "data:image/"),
        ("ftp://example.com/a.png", r"data: or http\(s\)"),
        ("", "needs a url"),
    ],
)
async def test_bad_data_urls_are_400s_that_say_why(url, says):
    with pytest.raises(ImageError, match=says) as e:
        await load_image(url, ImageLimits())
    assert e.value.status_code == 400


async def test_sizes_are_checked_before_decoding():
    with pytest.raises(ImageError, match="pixels") as e:
        await load_image(data_url(encoded("PNG", size=(100, 100))), ImageLimits(max_pixels=1000))
    assert e.value.code == "image_too_large"
    with pytest.raises(ImageError, match="larger than"):
        await load_image(data_url(encoded("PNG", size=(64, 64))), ImageLimits(max_bytes=50))


async def test_http_images_are_fetched_through_redirects(server):
    img = await load_image(f"{server}/hop", LAN)
    assert img.size == (8, 6)


@pytest.mark.parametrize(
    "path,limits,says",
    [
        ("/missing.png", LAN, "HTTP 404"),
        ("/text", LAN, "could not be decoded"),
        ("/big.png", ImageLimits(allow_private_networks=True, max_bytes=1000), "larger than"),
        ("/loop", LAN, "redirects more than"),
        ("/red.png", ImageLimits(), "private or reserved"),  # the default guard: no fetching from 127.0.0.1
    ],
)
async def test_bad_http_images_are_400s_that_say_why(server, path, limits, says):
    with pytest.raises(ImageError, match=says) as e:
        await load_image(f"{server}{path}", limits)
    assert e.value.status_code == 400


async def test_an_unreachable_host_is_a_400():
    with pytest.raises(ImageError, match="fetching the image failed|cannot be resolved"):
        await load_image("http://127.0.0.1:9/none.png", LAN)


async def test_large_images_are_scaled_down_once_decoded():
    img = await load_image(data_url(encoded("PNG", size=(4000, 1000))), ImageLimits(max_edge=1000))
    assert img.size == (1000, 250)


async def test_too_many_images_are_refused_before_any_is_loaded():
    from mlx_orchard.images import take_images

    parts = [{"type": "image", "url": "http://192.0.2.1/never-fetched.png"}] * 5
    with pytest.raises(InvalidRequestError) as refused:
        await take_images([{"role": "user", "content": parts}], ImageLimits(max_images=4), vision=True, model="m")
    assert refused.value.code == "too_many_images"
    with pytest.raises(InvalidRequestError) as text_only:
        await take_images([{"role": "user", "content": parts}], ImageLimits(), vision=False, model="m")
    assert "text-only" in str(text_only.value)
