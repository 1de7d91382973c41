"""The router's own errors and the one mapping from every domain error to an HTTP status with an
OpenAI-style error object, and to a gRPC status (the shared errors map through
`dspark_common.grpc_status`)."""

from __future__ import annotations

import grpc

from dspark_common.errors import (
    DSparkError,
    FailedPrecondition,
    InvalidRequest,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from dspark_common.grpc_status import details_of, status_of


class Unauthenticated(DSparkError):
    """No or a wrong bearer token."""

    code = "invalid_api_key"


class PayloadTooLarge(InvalidRequest):
    """The body or the prompt is over a configured limit."""

    code = "request_too_large"


class Overloaded(ResourceExhausted):
    """Too many generations at once; retry after `retry_after_s`."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelNotFound(NotFound):
    code = "model_not_found"


class SessionBusy(FailedPrecondition):
    """Another request is generating in the same session."""

    code = "session_busy"

    def __init__(self, message: str, field: str | None = "session_id") -> None:
        super().__init__(message)
        self.field = field


# (HTTP status, OpenAI error type), most specific class first.
_HTTP: list[tuple[type[BaseException], int, str]] = [
    (Unauthenticated, 401, "authentication_error"),
    (PayloadTooLarge, 413, "invalid_request_error"),
    (Overloaded, 429, "rate_limit_error"),
    (ModelNotFound, 404, "invalid_request_error"),
    (SessionBusy, 409, "invalid_request_error"),
    (InvalidRequest, 400, "invalid_request_error"),
    (NotFound, 404, "invalid_request_error"),
    (FailedPrecondition, 409, "invalid_request_error"),
    (ResourceExhausted, 429, "rate_limit_error"),
    (Unavailable, 503, "service_unavailable_error"),
]


def http_status_of(err: BaseException) -> tuple[int, str]:
    for cls, status, kind in _HTTP:
        if isinstance(err, cls):
            return status, kind
    return 500, "server_error"


def error_body(err: BaseException) -> dict:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    _, kind = http_status_of(err)
    if isinstance(err, DSparkError):
        message, code = str(err) or type(err).__name__, err.code
    else:
        message, code = f"internal error: {type(err).__name__}: {err}", "internal"
    if code == "invalid_argument":
        code = "invalid_value"
    return {"error": {"message": message, "type": kind, "param": getattr(err, "field", None), "code": code}}


def grpc_status_of(err: BaseException) -> grpc.StatusCode:
    if isinstance(err, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED
    return status_of(err)


async def grpc_abort(context: grpc.aio.ServicerContext, err: BaseException) -> None:
    await context.abort(grpc_status_of(err), details_of(err))
