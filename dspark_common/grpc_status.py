"""The one mapping between the domain errors (`dspark_common.errors`) and gRPC status codes, both
ways: servicers abort or fill a `SessionError` with `status_of`/`details_of`; clients turn a status
back into a typed error with `error_from_status`."""

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
from dspark_common.proto import common_pb2

_STATUS: dict[type[DSparkError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
}
_ERROR = {code: cls for cls, code in _STATUS.items()}
_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}


def status_of(err: BaseException) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.INTERNAL


def details_of(err: BaseException) -> str:
    """The message a caller sees: the error text, plus the offending field when known."""
    text = str(err) or type(err).__name__
    if not isinstance(err, DSparkError):
        text = f"internal error: {type(err).__name__}: {text}"
    field = getattr(err, "field", None)
    return f"{text} (field: {field})" if field and field not in text else text


def session_error(err: BaseException) -> common_pb2.SessionError:
    return common_pb2.SessionError(
        code=status_of(err).value[0], message=details_of(err), field=getattr(err, "field", None) or ""
    )


def code_name(value: int) -> str:
    code = _BY_VALUE.get(value)
    return code.name if code is not None else str(value)


def error_from_status(code: grpc.StatusCode | int, details: str, field: str | None = None) -> DSparkError:
    """The typed error for a status a peer returned (DSparkError for codes without one)."""
    if isinstance(code, int):
        code = _BY_VALUE.get(code, grpc.StatusCode.UNKNOWN)
    cls = _ERROR.get(code)
    if cls is None:
        return DSparkError(f"{code.name}: {details}")
    return InvalidRequest(details, field or None) if cls is InvalidRequest else cls(details)


async def abort(context: grpc.aio.ServicerContext, err: BaseException) -> None:
    """End an RPC with the error's status (raises, as context.abort does)."""
    await context.abort(status_of(err), details_of(err))
