"""The ingress deployment: FastAPI routes for the OpenAI paths, routed to family deployments."""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict

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
    with_keepalive,
)
from deployments.http_metrics import RequestMetricsMiddleware, note_model
from deployments.metrics import enabled as metrics_enabled
from deployments.request_logs import join_serve_logs
from deployments.routers.models import router as models_router
from deployments.routers.playground import router as playground_router
from deployments.routers.uploads import FORM_SLACK
from mlx_orchard.config import IngressOptions
from mlx_orchard.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    OrchardError,
    RequestTimeoutError,
)
from mlx_orchard.families import FAMILIES
from mlx_orchard.models.manager import Route
from mlx_orchard.protocol.common import ErrorBody, ErrorResponse, ModelCard, ModelList

_REMEMBERED_ROUTES = 4096  # model ids resolved through the manager, kept for the next request


class Ingress:
    """What the routers ask of the ingress: model routes, handles, options, the timeout.
    Plain Python, so the routers can be tested in process with stand-in handles."""

    def __init__(
        self,
        routes: dict[str, Route],
        handles: dict[str, DeploymentHandle],
        options: IngressOptions = IngressOptions(),
        manager: DeploymentHandle | None = None,
        management_api: bool = True,
    ):
        self.routes = routes  # configured models and their aliases
        self.handles = handles  # deployment name -> handle
        self.options = options
        self.manager = manager  # the model catalog; None: only the configured models exist
        self.management_api = management_api and manager is not None
        self.api_key = options.api_key or os.environ.get("ORCHARD_API_KEY") or None
        self._found: OrderedDict[str, Route] = OrderedDict()
        self._model_handles: dict[tuple[str, str], DeploymentHandle] = {}

    async def route(self, model: str, family: str | tuple[str, ...] | None) -> tuple[Route, DeploymentHandle]:
        """The route of ``model`` and a handle whose calls carry it as Serve's multiplexed
        model id (so they reach a replica that has it loaded). Ids that are not configured
        are resolved by the model manager (found on disk, or downloaded when allowed)."""
        route = self.routes.get(model) or self._found.get(model)
        if route is None:
            if self.manager is None:
                raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")
            route = await self.manager.resolve.remote(model, self.options.request_timeout_s)
            self._found[model] = route
            while len(self._found) > _REMEMBERED_ROUTES:
                self._found.popitem(last=False)
        note_model(route.name)
        if family is not None and route.family not in ((family,) if isinstance(family, str) else family):
            raise InvalidRequestError(
                f"The model `{model}` is a {route.family} model and cannot serve this endpoint.",
                param="model",
            )
        return route, self.model_handle(route)

    def priority(self, request: Request, requested: int | None) -> int:
        """An LLM request's scheduling priority: its own field, else the ``x-priority`` header,
        else the path's configured default, else 0 (lower runs first)."""
        if requested is not None:
            return requested
        header = request.headers.get("x-priority")
        if header is not None:
            try:
                value = int(header)
            except ValueError:
                value = None
            if value is None or not -1000 <= value <= 1000:
                raise InvalidRequestError("x-priority must be an integer between -1000 and 1000", param="x-priority")
            return value
        return self.options.default_priority.get(request.url.path.removeprefix(request.scope.get("root_path", "")), 0)

    def model_handle(self, route: Route) -> DeploymentHandle:
        key = (route.deployment, route.name)
        handle = self._model_handles.get(key)
        if handle is None:
            handle = self.handles[route.deployment].options(multiplexed_model_id=route.name)
            if len(self._model_handles) < _REMEMBERED_ROUTES:
                self._model_handles[key] = handle
        return handle

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
            body = response.body_iterator
            if response.media_type == "text/event-stream" and self.options.sse_keepalive_s:
                body = with_keepalive(body, self.options.sse_keepalive_s)  # type: ignore[arg-type]
            response.body_iterator = with_deadline(body, deadline)  # type: ignore[arg-type]
        return response

    async def model_list(self) -> ModelList:
        if self.manager is None:
            return ModelList(data=[ModelCard(id=name, family=r.family) for name, r in self.routes.items()])
        return ModelList(data=await self.manager.cards.remote())

    async def model_card(self, model: str) -> ModelCard:
        if self.manager is None:
            for card in (await self.model_list()).data:
                if card.id == model:
                    return card
            raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model")
        return await self.manager.card.remote(model)


# An ingress waits on I/O: it reserves no CPU, so it never blocks model replicas from placing.
@serve.deployment(name="ingress", max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class IngressDeployment(Ingress):
    def __init__(self, *args, **kwargs):
        join_serve_logs()
        super().__init__(*args, **kwargs)

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

    routers = [models_router(ingress)]
    if ingress.options.playground:
        routers.append(playground_router())
    # A family without a router is served by another family's routes.
    routers += [family.router_factory()(ingress) for family in FAMILIES if family.router]
    for router in routers:
        app.include_router(router)

    # Bodies are limited while they are read, after the key check (no reading for strangers).
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=int(ingress.options.max_body_mb * 1e6),
        max_upload_bytes=int(ingress.options.max_upload_mb * 1e6) + FORM_SLACK,
    )
    if ingress.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=ingress.api_key)
    # Outside the others: preflights and error responses carry CORS headers too.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=ingress.options.cors_origins,
        allow_methods=["*"],
        allow_headers=["*"],
    )
    if metrics_enabled():  # outermost: every answer is counted, the other middlewares' refusals too
        routes = [*app.router.routes, *(route for router in routers for route in router.routes)]
        app.add_middleware(RequestMetricsMiddleware, routes=routes)
    return app
