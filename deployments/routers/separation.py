"""``POST /v1/audio/separations`` (mlx-audio server's API): a multipart ``file``, ``model`` and
``description`` of what to extract; JSON with the target and the residual as base64 WAV."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Request

from deployments.routers.uploads import read_upload
from mlx_orchard.protocol.separation import SeparationForm, SeparationResponse

if TYPE_CHECKING:
    from deployments.ingress import Ingress

FAMILY = "separation"


def router(ingress: Ingress) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/audio/separations")
    async def separations(request: Request) -> SeparationResponse:
        return await ingress.bounded(separate(request, ingress))

    return api


async def separate(request: Request, ingress: Ingress) -> SeparationResponse:
    data, fields = await read_upload(request, int(ingress.options.max_upload_mb * 1e6))
    form = SeparationForm.model_validate(dict(fields))
    _, handle = await ingress.route(form.model, FAMILY)
    return await handle.separate.remote(data, description=form.description, steps=form.steps, method=form.method,
                                        seed=form.seed, keep_alive_s=form.keep_alive_s())
