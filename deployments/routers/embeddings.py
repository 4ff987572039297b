"""``/v1/embeddings``: check the request, call the embeddings deployment, shape the answer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import Response

from mlx_orchard.protocol.embeddings import EmbeddingRequest, EmbeddingResponse

if TYPE_CHECKING:
    from deployments.ingress import Ingress

FAMILY = "embeddings"


def router(ingress: Ingress) -> APIRouter:
    api = APIRouter()

    @api.post("/v1/embeddings", response_model=EmbeddingResponse)
    async def embeddings(req: EmbeddingRequest):
        return await ingress.bounded(embed(req, ingress))

    return api


async def embed(req: EmbeddingRequest, ingress: Ingress) -> Response:
    _, handle = await ingress.route(req.model, FAMILY)
    vectors, tokens = await handle.embed.remote(
        req.texts_or_ids(), truncate=req.truncate, dimensions=req.dimensions, keep_alive_s=req.keep_alive_s()
    )
    body = EmbeddingResponse.build(req.model, vectors, tokens, req.encoding_format)
    # Serialized here: FastAPI would otherwise validate the whole response model once more.
    return Response(body.model_dump_json(), media_type="application/json")
