"""Images a client sends (``image_url`` parts, Responses ``input_image``): data URLs decoded,
http(s) URLs fetched, both bounded, then decoded by Pillow. Plain Python, no Ray.

Every limit is checked before the work it bounds: a data URL's length before base64 is
decoded, a download's bytes while they arrive, an image's pixel count from its header before
its pixels are decoded (a small PNG can declare 100k x 100k). Fetching is the ingress's: the
client names the URL, so by default addresses in private, loopback, link-local and reserved
ranges are refused (no server-side request forgery into the user's network), at every
redirect hop; ``allow_private_networks`` lifts that for a trusted LAN. Any failure is a 400
that says what was wrong with which image, never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from mlx_orchard.errors import InvalidRequestError

FORMATS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "GIF": "gif"}  # Pillow's name -> ours


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 << 20  # encoded, per image
    max_pixels: int = 40_000_000  # width x height
    timeout_s: float = 10.0  # a whole fetch, redirects included
    max_redirects: int = 3
    allow_private_networks: bool = False
    max_images: int = 16  # per request: each one is fetched, decoded and sent to a replica
    max_edge: int = 3072  # longer sides are scaled down once decoded (no VLM looks closer)


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB, first frame
    sha256: str  # of the decoded pixels and size: the same picture in another encoding is the same image
    format: str  # png | jpeg | webp | gif

    @property
    def size(self) -> tuple[int, int]:
        return self.image.size


class ImageError(InvalidRequestError):
    """A client's image that cannot be used (400)."""


_LOADS_AT_ONCE = 4  # images of one request fetched and decoded at once
LOW_DETAIL_EDGE = 512  # OpenAI's `detail: low` looks at a 512 x 512 version of the image


def with_detail(loaded: LoadedImage, detail: str) -> LoadedImage:
    """``detail: low``: the image scaled down to fit 512 x 512 (fewer tiles, fewer tokens
    on models that split large images); otherwise as sent."""
    if detail != "low" or max(loaded.size) <= LOW_DETAIL_EDGE:
        return loaded
    small = loaded.image.copy()
    small.thumbnail((LOW_DETAIL_EDGE, LOW_DETAIL_EDGE), Image.Resampling.BICUBIC)
    return LoadedImage(small, pixel_hash(small), loaded.format)


async def take_images(messages: list[dict[str, Any]], limits: ImageLimits, *, vision: bool, model: str
                      ) -> tuple[list[dict[str, Any]], list[LoadedImage]]:
    """Load the image parts of chat-template messages (``{"type": "image", "url", "detail"}``,
    as the protocol writes them), all at once; the messages come back with bare
    ``{"type": "image"}`` parts, the images in the same order. Images for a model that is
    not a vision model are refused before anything is fetched."""
    found = [p for m in messages if isinstance(m.get("content"), list) for p in m["content"] if p.get("type") == "image"]
    if not found:
        return messages, []
    if not vision:
        raise InvalidRequestError(f"The model `{model}` is a text-only model; it does not accept images.",
                                  param="messages", code="model_not_multimodal")
    if len(found) > limits.max_images:
        raise InvalidRequestError(f"at most {limits.max_images} images per request; this one has {len(found)}",
                                  param="messages", code="too_many_images")
    # A few at a time: each may decode to hundreds of MB before it is scaled down.
    gate = asyncio.Semaphore(_LOADS_AT_ONCE)

    async def load(url: str) -> LoadedImage:
        async with gate:
            return await load_image(url, limits)

    loaded = await asyncio.gather(*(load(p.get("url", "")) for p in found))
    images = [with_detail(image, p.get("detail", "auto")) for image, p in zip(loaded, found)]
    bare = [
        {**m, "content": [{"type": "image"} if p.get("type") == "image" else p for p in m["content"]]}
        if isinstance(m.get("content"), list) else m
        for m in messages
    ]
    return bare, images


async def load_image(url: str, limits: ImageLimits, *, param: str = "messages",
                     client: httpx.AsyncClient | None = None) -> LoadedImage:
    """The image at ``url`` (a data URL or http(s)), decoded within ``limits``."""
    if not isinstance(url, str) or not url:
        raise ImageError("an image needs a url", param=param)
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        data = _data_url_bytes(url, limits, param)
    elif scheme in ("http", "https"):
        data = await _fetch(url, limits, param, client)
    else:
        raise ImageError(f"image urls must be data: or http(s): urls, not {scheme!r}", param=param)
    return await asyncio.to_thread(decode_image, data, limits, param)


def _data_url_bytes(url: str, limits: ImageLimits, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().startswith("data:image/") or not header.lower().endswith(";base64"):
        raise ImageError("a data url image must look like data:image/<type>;base64,<data>", param=param)
    if len(payload) > limits.max_bytes * 4 // 3 + 4:
        raise ImageError(f"the image is larger than {limits.max_bytes} bytes", param=param, code="image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the data url's image is not valid base64", param=param) from None


def decode_image(data: bytes, limits: ImageLimits, param: str = "messages", mode: str = "RGB") -> LoadedImage:
    """Bytes -> an image in ``mode`` (RGB; RGBA for masks), its pixel count checked from the
    header before decoding."""
    if len(data) > limits.max_bytes:
        raise ImageError(f"the image is larger than {limits.max_bytes} bytes", param=param, code="image_too_large")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in FORMATS:
                raise ImageError(f"unsupported image format {img.format}; send png, jpeg, webp or gif", param=param)
            width, height = img.size
            if width < 1 or height < 1 or width * height > limits.max_pixels:
                raise ImageError(f"the image is {width}x{height} pixels; at most {limits.max_pixels} pixels are accepted",
                                 param=param, code="image_too_large")
            img.seek(0)  # a GIF's (or animated WebP's) first frame
            rgb = img.convert(mode)
            rgb.load()
            if max(rgb.size) > limits.max_edge:
                rgb.thumbnail((limits.max_edge, limits.max_edge), Image.Resampling.BICUBIC)
            fmt = FORMATS[img.format]
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageError(f"the image could not be decoded ({type(e).__name__})", param=param) from None
    return LoadedImage(rgb, pixel_hash(rgb), fmt)


def pixel_hash(rgb: Image.Image) -> str:
    """The image's identity: its size and RGB pixels (not its encoding)."""
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()


async def _fetch(url: str, limits: ImageLimits, param: str, client: httpx.AsyncClient | None) -> bytes:
    own = client is None
    client = client or httpx.AsyncClient(follow_redirects=False)
    try:
        return await asyncio.wait_for(_follow(url, limits, param, client), limits.timeout_s)
    except TimeoutError:
        raise ImageError(f"fetching the image took longer than {limits.timeout_s:g} s", param=param) from None
    finally:
        if own:
            await client.aclose()


async def _follow(url: str, limits: ImageLimits, param: str, client: httpx.AsyncClient) -> bytes:
    for _ in range(limits.max_redirects + 1):
        await _check_address(url, limits, param)
        try:
            async with client.stream("GET", url, headers={"accept": "image/*"}) as r:
                if r.is_redirect and "location" in r.headers:
                    url = urljoin(url, r.headers["location"])
                    if urlsplit(url).scheme not in ("http", "https"):
                        raise ImageError("the image url redirects to a non-http url", param=param)
                    continue
                if r.status_code != 200:
                    raise ImageError(f"fetching the image failed: HTTP {r.status_code}", param=param)
                declared = r.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > limits.max_bytes:
                    raise ImageError(f"the image is larger than {limits.max_bytes} bytes", param=param, code="image_too_large")
                body = bytearray()
                async for chunk in r.aiter_bytes():
                    body += chunk
                    if len(body) > limits.max_bytes:
                        raise ImageError(f"the image is larger than {limits.max_bytes} bytes", param=param,
                                         code="image_too_large")
                return bytes(body)
        except httpx.HTTPError as e:
            raise ImageError(f"fetching the image failed: {type(e).__name__}", param=param) from None
    raise ImageError(f"the image url redirects more than {limits.max_redirects} times", param=param)


async def _check_address(url: str, limits: ImageLimits, param: str) -> None:
    """Refuse hosts in private, loopback, link-local, reserved or multicast ranges (every
    address the name resolves to), unless the config allows private networks."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise ImageError("the image url has no host", param=param)
    if limits.allow_private_networks:
        return
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
    except OSError:
        raise ImageError(f"the image url's host {host!r} cannot be resolved", param=param) from None
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if not address.is_global or address.is_multicast:
            raise ImageError(f"the image url's host {host!r} is in a private or reserved address range, which this "
                             "server does not fetch from", param=param, code="image_url_forbidden")
