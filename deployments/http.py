"""HTTP plumbing owned by the ingress: OpenAI error bodies, SSE framing, the API key."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from mlx_orchard.errors import (
    AuthenticationError,
    OrchardError,
    PayloadTooLargeError,
    RequestTimeoutError,
)
from mlx_orchard.protocol.common import ErrorBody, ErrorResponse

logger = logging.getLogger("orchard.ingress")


def _cause(exc: BaseException) -> BaseException:
    # Ray wraps a replica's exception in RayTaskError; the original is its .cause.
    while (cause := getattr(exc, "cause", None)) is not None and cause is not exc:
        exc = cause
    return exc


def _validation_message(errors: list[Any]) -> tuple[str, str | None]:
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return f"We could not parse the JSON body of your request: {msg}", None
    return (f"{param}: {msg}" if param else msg), param


def request_id() -> str:
    """Ray Serve's id of the request being handled (echoed to the client as x-request-id)."""
    from ray.serve.context import _get_serve_request_context

    try:
        return _get_serve_request_context().request_id or "-"
    except Exception:  # noqa: BLE001 - outside a Serve request
        return "-"


def error_payload(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """Every failure, as (status, OpenAI error body). Only Orchard's typed errors and request
    validation are client errors; anything else is a 500 whose details stay in the log."""
    from ray.exceptions import (
        ActorDiedError,
        ActorUnavailableError,
        RayActorError,
        TaskCancelledError,
    )
    from ray.serve.exceptions import (
        BackPressureError,
        DeploymentUnavailableError,
        RayServeException,
    )

    exc = _cause(exc)
    status, etype, code, param = 500, "server_error", None, None
    if isinstance(exc, OrchardError):
        status, etype, code, param, message = exc.status_code, exc.type, exc.code, exc.param, exc.message
    elif isinstance(exc, RequestValidationError | ValidationError):
        status, etype = 400, "invalid_request_error"
        message, param = _validation_message(list(exc.errors()))
    elif isinstance(exc, BackPressureError):
        status, code, message = 503, "overloaded", "The server is at capacity; retry shortly."
    elif isinstance(exc, ActorDiedError | ActorUnavailableError | RayActorError | DeploymentUnavailableError):
        status, code, message = 503, "service_unavailable", "The model replica is unavailable; retry shortly."
    elif isinstance(exc, TaskCancelledError):
        status, code, message = 503, "service_unavailable", "The request was cancelled on the model replica."
    elif isinstance(exc, RayServeException):
        status, code, message = 503, "service_unavailable", "The model service is unavailable; retry shortly."
    else:
        message = f"The server had an error while processing your request (request id {request_id()})."
    if status >= 500:
        # The client sees the id; the log has the id and the whole story.
        logger.error("request %s failed with %d: %s: %s", request_id(), status, type(exc).__name__, exc,
                     exc_info=exc if status == 500 else None)
    # Messages may quote what the client sent: keep them encodable whatever it was.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    body = ErrorResponse(error=ErrorBody(message=message, type=etype, param=param, code=code))
    return status, body.model_dump()


def error_response(exc: BaseException) -> JSONResponse:
    status, body = error_payload(exc)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(body, status_code=status, headers=headers)


def sse_event(data: BaseModel | dict[str, Any]) -> bytes:
    text = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data)
    return f"data: {text}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no caching, no proxy buffering


async def with_deadline(events: AsyncIterator[bytes], deadline: float) -> AsyncIterator[bytes]:
    """An event stream cut at ``deadline`` (loop time) with a timeout error event; leaving it
    closes the inner stream, which cancels the work behind it."""
    loop = asyncio.get_running_loop()
    inner = events
    try:
        while True:
            try:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                event = await asyncio.wait_for(anext(inner), remaining)
            except StopAsyncIteration:
                return
            except TimeoutError:
                _, body = error_payload(RequestTimeoutError("The request took longer than this server allows."))
                yield sse_event(body)
                yield SSE_DONE
                return
            yield event
    finally:
        close = getattr(inner, "aclose", None)  # a generator: closing it cancels the work behind it
        if close is not None:
            await close()


SSE_KEEPALIVE = b": keep-alive\n\n"


async def with_keepalive(events: AsyncIterator[bytes], interval_s: float) -> AsyncIterator[bytes]:
    """An event stream that sends an SSE comment whenever ``interval_s`` passes without an
    event (a long prefill, a queue): clients and proxies that time out idle connections keep
    it, and every SSE parser skips comments. Leaving it closes the inner stream."""
    inner = events.__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(inner))
            done, _ = await asyncio.wait({pending}, timeout=interval_s)
            if not done:
                yield SSE_KEEPALIVE
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                pending = None
                return
            pending = None
            yield event
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        close = getattr(inner, "aclose", None)
        if close is not None:
            await close()


async def sse_errors_inline(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Once a stream has begun its status is sent; a later failure becomes an error event."""
    try:
        async for event in events:
            yield event
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the client
        _, body = error_payload(exc)
        yield sse_event(body)
        yield SSE_DONE


def _path(scope) -> str:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):  # mounted under a route prefix
        path = path[len(root) :]
    return path


async def _refuse(scope, receive, send, exc: OrchardError) -> None:
    if scope["type"] == "websocket":
        # Closing before accepting answers the handshake with 403.
        await send({"type": "websocket.close", "code": 1008, "reason": exc.message[:120]})
        return
    await error_response(exc)(scope, receive, send)


class APIKeyMiddleware:
    """``/v1/*`` needs the API key on every transport; ``/health`` and CORS preflights stay open.

    HTTP sends ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``, as Anthropic's SDK does). WebSocket clients send the same header, or,
    from a browser that cannot set headers, the subprotocol ``openai-insecure-api-key.<key>``
    as OpenAI's realtime API accepts. Plain ASGI (not BaseHTTPMiddleware) so streamed
    responses and client disconnects pass through untouched.
    """

    _SUBPROTOCOL = b"openai-insecure-api-key."

    def __init__(self, app, api_key: str):
        self.app = app
        self._key = api_key.encode()

    def _authorized(self, scope) -> bool:
        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key):
            return True
        # Anthropic's SDK (and Claude Code) send the key as x-api-key.
        if b"x-api-key" in headers and hmac.compare_digest(headers[b"x-api-key"].strip(), self._key):
            return True
        if scope["type"] == "websocket":
            for proto in headers.get(b"sec-websocket-protocol", b"").split(b","):
                proto = proto.strip()
                if proto.startswith(self._SUBPROTOCOL) and hmac.compare_digest(
                    proto[len(self._SUBPROTOCOL) :], self._key
                ):
                    return True
        return False

    async def __call__(self, scope, receive, send):
        guarded = scope["type"] == "websocket" or (scope["type"] == "http" and scope["method"] != "OPTIONS")
        path = _path(scope)
        if guarded and (path == "/v1" or path.startswith("/v1/")) and not self._authorized(scope):
            error = AuthenticationError("Incorrect or missing API key: send `Authorization: Bearer <key>`.")
            await _refuse(scope, receive, send, error)
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses request bodies over a limit while they are read, never buffering more than it.

    A declared ``Content-Length`` over the limit is refused before a byte is read; a body
    sent without one (chunked) is counted as it arrives. Multipart uploads have their own,
    larger limit. The body read here is handed on as one message.
    """

    def __init__(self, app, max_bytes: int, max_upload_bytes: int):
        self.app = app
        self.max_bytes = max_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        multipart = headers.get(b"content-type", b"").lower().startswith(b"multipart/")
        limit = self.max_upload_bytes if multipart else self.max_bytes
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(scope, receive, send, _too_large(limit))
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _refuse(scope, receive, send, _too_large(limit))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as Starlette expects

        await self.app(scope, replay, send)


def _too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"The request body is larger than this server's limit of {limit / 1e6:g} MB.")
