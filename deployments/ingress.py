"""The ingress deployment: FastAPI routes for the OpenAI paths, routed to family deployments."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.cluster_view import ClusterView, cluster_view
from deployments.http import (
    APIKeyMiddleware,
    BodyLimitMiddleware,
    error_payload,
    error_response,
    with_deadline,
)
from deployments.routers.transcription import FORM_SLACK
from mlx_orchard.config import IngressOptions
from mlx_orchard.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    OrchardError,
    RequestTimeoutError,
)
from mlx_orchard.families import FAMILIES
from mlx_orchard.protocol.common import ErrorBody, ErrorResponse, ModelCard, ModelList


@dataclass(frozen=True)
class ModelRoute:
    """Where requests for one model name go."""

    name: str  # the canonical name (aliases point at the same route)
    family: str  # "llm", "embeddings", "transcription", ...
    deployment: str  # key into the ingress's handles


class Ingress:
    """What the routers ask of the ingress: model routes, handles, options, the timeout.
    Plain Python, so the routers can be tested in process with stand-in handles."""

    def __init__(
        self,
        routes: dict[str, ModelRoute],
        handles: dict[str, DeploymentHandle],
        options: IngressOptions = IngressOptions(),
    ):
        self.routes = routes
        self.handles = handles
        self.options = options
        self.api_key = options.api_key or os.environ.get("ORCHARD_API_KEY") or None

    def route(self, model: str, family: str) -> tuple[ModelRoute, DeploymentHandle]:
        route = self.routes.get(model)
        if route is None:
            raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")
        if route.family != family:
            raise InvalidRequestError(
                f"The model `{model}` is a {route.family} model and cannot serve this endpoint.",
                param="model",
            )
        return route, self.handles[route.deployment]

    async def bounded(self, work):
        """Await a route's work under the request timeout: 504 before the answer starts, a
        timeout error event once a stream has begun. Leaving early cancels the work."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.request_timeout_s
        try:
            response = await asyncio.wait_for(work, self.options.request_timeout_s)
        except TimeoutError:
            raise RequestTimeoutError("The request took longer than this server allows.") from None
        except (BackPressureError, DeploymentUnavailableError) as e:
            # Serve installs its own plain-text handlers for these on the ingress app, which
            # would win over ours: answer them here, in the error schema with Retry-After.
            status, body = error_payload(e)
            return JSONResponse(body, status_code=status, headers={"Retry-After": "1"})
        if isinstance(response, StreamingResponse):
            response.body_iterator = with_deadline(response.body_iterator, deadline)
        return response

    def model_list(self) -> ModelList:
        return ModelList(data=[ModelCard(id=name, family=r.family) for name, r in self.routes.items()])


# An ingress waits on I/O: it reserves no CPU, so it never blocks model replicas from placing.
@serve.deployment(name="ingress", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class IngressDeployment(Ingress):
    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)


def build_api(ingress: Ingress) -> FastAPI:
    app = FastAPI(title="Orchard", summary="OpenAI-compatible MLX models on Ray Serve", version="0.1.0")

    @app.exception_handler(OrchardError)
    async def _orchard_error(_: Request, exc: OrchardError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        body = ErrorResponse(error=ErrorBody(message=str(exc.detail), type="invalid_request_error", code=kind))
        return JSONResponse(body.model_dump(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _any_error(_: Request, exc: Exception):
        return error_response(exc)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/cluster")
    async def cluster() -> ClusterView:
        return await asyncio.to_thread(cluster_view)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ingress.model_list()

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> ModelCard:
        for card in ingress.model_list().data:
            if card.id == model:
                return card
        raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")

    for family in FAMILIES:
        app.include_router(family.router_factory()(ingress))

    # Bodies are limited while they are read, after the key check (no reading for strangers).
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=int(ingress.options.max_body_mb * 1e6),
        max_upload_bytes=int(ingress.options.max_upload_mb * 1e6) + FORM_SLACK,
    )
    if ingress.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=ingress.api_key)
    # Added last so it is outermost: preflights and error responses carry CORS headers too.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=ingress.options.cors_origins,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    return app
