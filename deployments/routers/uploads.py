"""Multipart uploads (audio files) read within limits, for every route that takes a ``file``."""

from __future__ import annotations

from fastapi import Request
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from mlx_orchard.errors import InvalidRequestError, PayloadTooLargeError

FORM_SLACK = 64 * 1024  # multipart headers and the small fields around the file


async def read_upload(request: Request, limit: int) -> tuple[bytes, list[tuple[str, str]]]:
    """The ``file`` field's bytes (at most ``limit``) and the other fields as (name, value) pairs.
    Too large: 413, checked from Content-Length before parsing and again while reading."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit + FORM_SLACK:
        raise PayloadTooLargeError(f"the upload is larger than the {limit / 1e6:g} MB limit", param="file")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequestError("send the audio as multipart/form-data with a `file` field", param="file")
    try:
        form = await request.form(max_files=1, max_fields=32)
    except MultiPartException as e:  # malformed multipart, too many parts or fields
        raise InvalidRequestError(f"could not read the multipart form: {e.message}", param="file") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidRequestError("the `file` field with the audio is required", param="file")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise PayloadTooLargeError(f"the upload is larger than the {limit / 1e6:g} MB limit", param="file")
        fields = [(k, v) for k, v in form.multi_items() if k != "file" and isinstance(v, str)]
        return data, fields
    finally:
        await form.close()
