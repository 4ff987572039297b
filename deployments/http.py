"""HTTP plumbing owned by the ingress: OpenAI error bodies, SSE framing, the API key."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from mlx_orchard.errors import AuthenticationError, OrchardError
from mlx_orchard.protocol.common import ErrorBody, ErrorResponse

logger = logging.getLogger("orchard.ingress")


def _cause(exc: BaseException) -> BaseException:
    # Ray wraps a replica's exception in RayTaskError; the original is its .cause.
    while getattr(exc, "cause", None) is not None and exc.cause is not exc:
        exc = exc.cause
    return exc


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return f"We could not parse the JSON body of your request: {msg}", None
    return (f"{param}: {msg}" if param else msg), param


def error_payload(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """Every failure, as (status, OpenAI error body). 5xx details stay in the log."""
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RayServeException
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    exc = _cause(exc)
    status, etype, code, param = 500, "server_error", None, None
    if isinstance(exc, OrchardError):
        status, etype, code, param, message = exc.status_code, exc.type, exc.code, exc.param, exc.message
    elif isinstance(exc, RequestValidationError | ValidationError):
        status, etype = 400, "invalid_request_error"
        message, param = _validation_message(list(exc.errors()))
    elif isinstance(exc, ValueError):
        status, etype, message = 400, "invalid_request_error", str(exc)
    elif isinstance(exc, BackPressureError):
        status, code, message = 503, "overloaded", "The server is at capacity; retry shortly."
    elif isinstance(exc, ActorDiedError | ActorUnavailableError | RayActorError | DeploymentUnavailableError):
        status, code, message = 503, "service_unavailable", "The model replica is unavailable; retry shortly."
    elif isinstance(exc, RayServeException):
        status, code, message = 503, "service_unavailable", "The model service is unavailable; retry shortly."
    else:
        logger.error("unhandled error", exc_info=exc)
        message = "The server had an error while processing your request."
    if status >= 500 and not isinstance(exc, OrchardError):
        logger.warning("request failed: %s: %s", type(exc).__name__, exc)
    body = ErrorResponse(error=ErrorBody(message=message, type=etype, param=param, code=code))
    return status, body.model_dump()


def error_response(exc: BaseException) -> JSONResponse:
    status, body = error_payload(exc)
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


def sse_event(data: BaseModel | dict[str, Any]) -> bytes:
    text = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data)
    return f"data: {text}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


async def sse_errors_inline(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Once a stream has begun its status is sent; a later failure becomes an error event."""
    try:
        async for event in events:
            yield event
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the client
        _, body = error_payload(exc)
        yield sse_event(body)
        yield SSE_DONE


class APIKeyMiddleware:
    """``/v1/*`` needs ``Authorization: Bearer <key>``; ``/health`` and CORS preflights stay open.

    Plain ASGI (not BaseHTTPMiddleware) so streamed responses and client disconnects
    pass through untouched.
    """

    def __init__(self, app, api_key: str):
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # mounted under a route prefix
            path = path[len(root) :]
        if scope["type"] == "http" and path.startswith("/v1/") and scope["method"] != "OPTIONS":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                response = error_response(
                    AuthenticationError("Incorrect or missing API key: send `Authorization: Bearer <key>`.")
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
