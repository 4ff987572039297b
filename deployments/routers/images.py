"""``POST /v1/images/generations`` (JSON), ``POST /v1/images/edits`` (multipart: ``image`` or
``image[]``, optional ``mask``), and ``GET /v1/images/files/{name}`` for the images answered
as URLs (kept on this ingress for ``ingress.image_urls_ttl_s``)."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Literal, cast

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from PIL import Image
from ray.serve.handle import DeploymentResponseGenerator
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from deployments.http import SSE_HEADERS, sse_errors_inline, sse_event
from mlx_orchard.errors import InvalidRequestError, NotFoundError, PayloadTooLargeError
from mlx_orchard.image_store import ImageFileStore
from mlx_orchard.images import ImageLimits, decode_image
from mlx_orchard.protocol.images import (
    ImageCompleted,
    ImageData,
    ImagePartial,
    ImageRequest,
    ImagesResponse,
    ImageTokens,
    ImageUsage,
)
from mlx_orchard.wire import ImageOut, ImagesStart

if TYPE_CHECKING:
    from deployments.ingress import Ingress

FAMILY = "images"
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
_LIST_FIELDS = ("image", "image[]")


def router(ingress: Ingress) -> APIRouter:
    api = APIRouter()
    options = ingress.options
    store = ImageFileStore(options.image_urls_ttl_s, int(options.image_urls_mb * 1e6))

    @api.post("/v1/images/generations")
    async def generations(req: ImageRequest, request: Request):
        return await ingress.bounded(generate(req, request, ingress, store, "image_generation"))

    @api.post("/v1/images/edits")
    async def edits(request: Request):
        req, references, mask, size = await _read_edit(request, options.images.limits())
        return await ingress.bounded(generate(req, request, ingress, store, "image_edit", references, mask, size))

    @api.get("/v1/images/files/{name}")
    async def files(name: str) -> Response:
        item = store.get(name)
        if item is None:
            raise NotFoundError(f"no image {name!r} here (image URLs expire after {options.image_urls_ttl_s:g} s)", param="name")
        return Response(item.data, media_type=item.media_type, headers={"Cache-Control": "private, max-age=3600"})

    return api


async def generate(req: ImageRequest, request: Request, ingress: Ingress, store: ImageFileStore,
                   kind: Literal["image_generation", "image_edit"], references: tuple[bytes, ...] = (),
                   mask: bytes | None = None, auto_size: tuple[int, int] | None = None):
    """``auto_size``: what ``size: auto`` means (an edit: the image's own size); else the model's default."""
    _, handle = await ingress.route(req.model, FAMILY)
    if req.stream and req.response_format == "url":
        raise InvalidRequestError("streamed images come as b64_json; leave response_format out", param="response_format")
    stream = cast(DeploymentResponseGenerator, handle.options(stream=True).generate.remote(
        req.prompt, n=req.n, size=req.dimensions(default=auto_size) if req.size != "auto" or auto_size else None,
        quality=req.quality,
        steps=req.steps, guidance=req.guidance, seed=req.seed, negative_prompt=req.negative_prompt,
        output_format=req.output_format, output_compression=req.output_compression, background=req.background,
        partial_images=req.partial_images if req.stream else 0, references=references, mask=mask,
        keep_alive_s=req.keep_alive_s()))
    try:  # the replica's checks (size, steps, what the model can do) answer before any 200
        start: ImagesStart = await stream.__anext__()
    except BaseException:
        stream.cancel()
        raise
    created = int(time.time())
    size = f"{start.width}x{start.height}"
    headers = {"x-orchard-served-by": start.served_by, "x-orchard-seed": str(start.seed)}
    quality = req.quality if req.quality in ("low", "medium", "high") else None

    if req.stream:
        tokens = (start.width // 16) * (start.height // 16)
        usage = ImageUsage(input_tokens=0, input_tokens_details=ImageTokens(image_tokens=0, text_tokens=0),
                           output_tokens=tokens, total_tokens=tokens)

        async def events() -> AsyncIterator[bytes]:
            try:
                async for item in stream:
                    if not isinstance(item, ImageOut):
                        continue
                    common = {"b64_json": base64.b64encode(item.data).decode(), "background": "opaque", "created_at": created,
                              "output_format": req.output_format, "quality": quality or "auto", "size": size}
                    if item.partial is not None:
                        yield sse_event(ImagePartial(type=f"{kind}.partial_image", partial_image_index=item.partial, **common))
                    else:
                        yield sse_event(ImageCompleted(type=f"{kind}.completed", usage=usage, **common))
            finally:
                stream.cancel()

        return StreamingResponse(sse_errors_inline(events()), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})

    images: dict[int, bytes] = {}
    try:
        async for item in stream:
            if isinstance(item, ImageOut) and item.partial is None:
                images[item.index] = item.data
    finally:
        stream.cancel()
    data = []
    for i in range(req.n):
        if req.response_format == "url":
            name = store.put(images[i], MEDIA_TYPES[req.output_format], req.output_format)
            data.append(ImageData(url=f"{str(request.base_url).rstrip('/')}/v1/images/files/{name}"))
        else:
            data.append(ImageData(b64_json=base64.b64encode(images[i]).decode()))
    body = ImagesResponse(created=created, data=data, background="opaque", output_format=req.output_format,
                          quality=quality, size=size)
    return Response(body.model_dump_json(exclude_none=True), media_type="application/json", headers=headers)


async def _read_edit(request: Request, limits: ImageLimits
                     ) -> tuple[ImageRequest, tuple[bytes, ...], bytes | None, tuple[int, int]]:
    """The form's fields as an ``ImageRequest``, its images re-encoded as PNG (decoded within the
    ingress's image limits), the mask (RGBA PNG, the first image's size) and the size ``auto``
    means: the first image's, in whole latent patches."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequestError("send the images as multipart/form-data (`image`, optional `mask`)", param="image")
    try:
        form = await request.form(max_files=limits.max_images + 1, max_fields=64)
    except MultiPartException as e:
        raise InvalidRequestError(f"could not read the multipart form: {e.message}", param="image") from None
    try:
        uploads = [v for k in _LIST_FIELDS for v in form.getlist(k) if isinstance(v, UploadFile)]
        if not uploads:
            raise InvalidRequestError("the `image` field with the image to edit is required", param="image")
        if len(uploads) > limits.max_images:
            raise InvalidRequestError(f"at most {limits.max_images} images per request", param="image")
        raw = [await _read_file(u, limits, "image") for u in uploads]
        mask_upload = form.get("mask")
        mask_raw = await _read_file(mask_upload, limits, "mask") if isinstance(mask_upload, UploadFile) else None
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str) and k not in (*_LIST_FIELDS, "mask")}
    finally:
        await form.close()
    req = ImageRequest.model_validate({k: _form_value(k, v) for k, v in fields.items()})
    images = await asyncio.gather(*(asyncio.to_thread(decode_image, data, limits, "image") for data in raw))
    references = tuple(await asyncio.gather(*(asyncio.to_thread(_png, loaded.image) for loaded in images)))
    mask = None
    if mask_raw is not None:
        mask = await asyncio.to_thread(_mask_png, mask_raw, limits, images[0].size)
    width, height = images[0].size
    return req, references, mask, (max(16, width // 16 * 16), max(16, height // 16 * 16))


async def _read_file(upload: UploadFile, limits: ImageLimits, param: str) -> bytes:
    data = await upload.read(limits.max_bytes + 1)
    if len(data) > limits.max_bytes:
        raise PayloadTooLargeError(f"an image is larger than {limits.max_bytes / 1e6:g} MB", param=param)
    return data


def _form_value(key: str, value: str) -> object:
    if key == "stream":  # a form's "true"/"false"
        return value.lower() in ("true", "1", "yes")
    return value


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _mask_png(data: bytes, limits: ImageLimits, size: tuple[int, int]) -> bytes:
    mask = decode_image(data, limits, "mask", mode="RGBA")  # a file that is no image is refused here
    with Image.open(io.BytesIO(data)) as raw:
        has_alpha = raw.mode in ("RGBA", "LA", "PA") or "transparency" in raw.info
    if not has_alpha:
        raise InvalidRequestError("the mask needs an alpha channel: transparent where the image is to change", param="mask")
    if mask.size != size:
        raise InvalidRequestError(f"the mask is {mask.size[0]}x{mask.size[1]}; it must be the image's size "
                                  f"({size[0]}x{size[1]})", param="mask")
    return _png(mask.image)
