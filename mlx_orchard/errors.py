"""Errors that carry their OpenAI shape: HTTP status, ``type``, ``code`` and ``param``.

Engines and deployments raise them; the ingress turns every failure into
``{"error": {"message", "type", "param", "code"}}`` in one place. Only these typed errors
reach a client as 4xx: any other exception (an MLX or numpy ``ValueError`` included) is an
internal fault, answered 500 with its details kept in the log.
"""

from __future__ import annotations


class OrchardError(Exception):
    status_code = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def __reduce__(self):
        # Keep keyword arguments when Ray pickles the error across processes.
        return (_rebuild, (type(self), self.message, self.param, self.code))


def _rebuild(cls, message, param, code):
    return cls(message, param=param, code=code)


class InvalidRequestError(OrchardError, ValueError):
    status_code = 400
    type = "invalid_request_error"


class InputTooLongError(InvalidRequestError):
    """An embeddings input has more tokens than the model accepts (and no truncation)."""


class ContextLengthExceededError(InvalidRequestError):
    code = "context_length_exceeded"


class AuthenticationError(OrchardError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFoundError(OrchardError):
    status_code = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFoundError(OrchardError):
    """A stored object (a response) that is not here."""

    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLargeError(OrchardError):
    status_code = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class ServiceUnavailableError(OrchardError):
    status_code = 503
    type = "server_error"
    code = "service_unavailable"


class OverloadedError(ServiceUnavailableError):
    """A bounded queue is full: the caller should retry after ``Retry-After`` seconds."""

    code = "overloaded"


class RequestTimeoutError(OrchardError):
    status_code = 504
    type = "server_error"
    code = "timeout"


class EngineError(OrchardError):
    """The model failed while working on this request (the replica itself carries on)."""

    status_code = 500
    type = "server_error"
    code = "engine_error"


class ConflictError(OrchardError):
    """The resource is in a state that forbids this (deleting a model that is loaded)."""

    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class InsufficientMemoryError(OrchardError):
    """Loading the model would exceed the replica's memory budget (or its model limit)."""

    status_code = 507
    type = "server_error"
    code = "insufficient_memory"


class ForbiddenError(OrchardError):
    status_code = 403
    type = "invalid_request_error"
    code = "forbidden"
