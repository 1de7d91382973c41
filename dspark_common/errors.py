"""Typed errors of the domain. Services map them to HTTP / gRPC status in one place each."""

from __future__ import annotations


class DSparkError(Exception):
    """Base class: every error a user can cause or observe."""

    code = "internal"


class InvalidRequest(DSparkError, ValueError):
    """Bad input from a caller; `field` names the offending parameter."""

    code = "invalid_argument"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class NotFound(DSparkError, KeyError):
    """An unknown session or handle."""

    code = "not_found"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class FailedPrecondition(DSparkError):
    """A stale handle or a state that does not allow the call."""

    code = "failed_precondition"


class ResourceExhausted(DSparkError):
    """A configured limit (sessions, context length) was reached."""

    code = "resource_exhausted"


class Unavailable(DSparkError):
    """A peer service cannot be reached."""

    code = "unavailable"
