"""``/v1/models``: what models exist and where they are loaded, and managing them:
download, load, unload, delete (also in mlx-audio server's form, ``?model_name=``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter, Query
from pydantic import Field

from mlx_orchard.errors import ForbiddenError
from mlx_orchard.protocol.common import ModelCard, ModelDeleted, ModelList, OpenAIRequest, parse_keep_alive

if TYPE_CHECKING:
    from deployments.ingress import Ingress


class DownloadRequest(OpenAIRequest):
    repo_id: str = Field(max_length=256)
    revision: str | None = Field(None, max_length=256)


class LoadRequest(OpenAIRequest):
    keep_alive: float | str | None = None


def router(ingress: Ingress) -> APIRouter:
    api = APIRouter()

    def manager():
        if not ingress.management_api:
            raise ForbiddenError("Model management is turned off on this server (models.management_api).")
        return ingress.manager

    async def load(model: str, keep_alive: float | str | None = None) -> ModelCard:
        manager()
        keep = parse_keep_alive(keep_alive)
        route, _ = await ingress.route(model, family=None)
        await ingress.model_handle(route).load.remote(keep_alive_s=keep)
        return await ingress.model_card(model)

    async def unload(model: str) -> ModelCard:
        return await manager().unload.remote(model)

    @api.get("/v1/models")
    async def list_models() -> ModelList:
        return await ingress.model_list()

    @api.get("/v1/models/{model:path}")
    async def get_model(model: str) -> ModelCard:
        return await ingress.model_card(model)

    @api.post("/v1/models/download", status_code=202)
    async def download(req: DownloadRequest) -> ModelCard:
        return await manager().download.remote(req.repo_id, req.revision)

    @api.post("/v1/models/{model:path}/load")
    async def load_model(model: str, req: LoadRequest | None = None) -> ModelCard:
        return await ingress.bounded(load(model, req.keep_alive if req else None))

    @api.post("/v1/models/{model:path}/unload")
    async def unload_model(model: str) -> ModelCard:
        return await ingress.bounded(unload(model))

    @api.delete("/v1/models/{model:path}")
    async def delete_model(model: str) -> ModelDeleted:
        await manager().delete.remote(model)
        return ModelDeleted(id=model)

    # mlx-audio server's form: POST loads, DELETE unloads.
    @api.post("/v1/models")
    async def load_by_name(model_name: str = Query(max_length=256)) -> ModelCard:
        return await ingress.bounded(load(model_name))

    @api.delete("/v1/models")
    async def unload_by_name(model_name: str = Query(max_length=256)) -> ModelCard:
        return await ingress.bounded(unload(model_name))

    return api

