"""The ingress's request metrics: every HTTP request and WebSocket by route, model and status,
the ones shed (429/503) or cancelled (the client left first), and the body bytes received."""

from __future__ import annotations

import asyncio
import contextvars

from starlette.routing import Match

from deployments.metrics import counter

# The request's labels: the middleware puts a fresh dict here; ``note_model`` (called by the
# ingress once a model id has resolved) fills in the model. A dict, not a value, so a label set
# in the endpoint's own context still reaches the middleware.
_labels: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("orchard_request_labels", default=None)


def note_model(model: str) -> None:
    """Labels the request being handled with ``model`` (a configured or resolved id: never an
    arbitrary client string, which would grow the metric's series without bound)."""
    labels = _labels.get()
    if labels is not None:
        labels["model"] = model


def _route(scope, routes: list) -> str:
    """The route's template (/v1/models/{model_id}), never the raw path; unmatched paths share one."""
    route = scope.get("route")  # set by the router once it matched
    if route is None:  # refused before routing (401, 413): matched here, as the router would
        route = next((r for r in routes if hasattr(r, "path") and r.matches(scope)[0] == Match.FULL), None)
    return getattr(route, "path", None) or "unmatched"


class RequestMetricsMiddleware:
    """Outermost on the ingress, so refusals by the other middlewares (401, 413) count too."""

    def __init__(self, app, routes: list):
        self.app = app
        self.routes = routes  # the app's routes, to name those of requests refused before routing
        tags: dict[str, str] = {}
        self.requests = counter("orchard_ingress_requests", "requests by route, model and status", tags,
                                ("route", "model", "status"))
        self.shed = counter("orchard_ingress_shed_requests", "requests answered 429 or 503 (shed for load)", tags,
                            ("route", "model", "status"))
        self.cancelled = counter("orchard_ingress_cancelled_requests", "requests whose client left before the answer ended",
                                 tags, ("route", "model"))
        self.body_bytes = counter("orchard_ingress_request_bytes", "request body bytes received", tags, ("route",))

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        labels = {"model": ""}
        _labels.set(labels)
        status = ""
        finished = False
        received = 0
        left = False

        async def counting_receive():
            nonlocal received, left
            message = await receive()
            kind = message["type"]
            if kind == "http.request":
                received += len(message.get("body", b""))
            elif kind in ("http.disconnect", "websocket.disconnect") and not finished:
                left = True
            return message

        async def noting_send(message):
            nonlocal status, finished
            kind = message["type"]
            if kind == "http.response.start":
                status = str(message["status"])
            elif kind == "http.response.body" and not message.get("more_body", False):
                finished = True
            elif kind == "websocket.accept":
                status = "101"
            elif kind == "websocket.close" and not status:
                status = "403"  # closed before accepting: the handshake is refused
            await send(message)

        try:
            await self.app(scope, counting_receive, noting_send)
        except asyncio.CancelledError:
            left = True
            raise
        finally:
            route = _route(scope, self.routes)
            model = labels["model"]
            if scope["type"] == "websocket":
                left = False  # a socket ends when either side closes: not a cancellation
                finished = True
            status = status or ("499" if left else "500")  # 499: client closed the request (nginx's)
            self.requests.inc(tags={"route": route, "model": model, "status": status})
            if status in ("429", "503"):
                self.shed.inc(tags={"route": route, "model": model, "status": status})
            if left and not finished:
                self.cancelled.inc(tags={"route": route, "model": model})
            if received:
                self.body_bytes.inc(received, tags={"route": route})
