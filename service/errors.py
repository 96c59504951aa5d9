"""One error family for every front door.

Each error carries its HTTP status and its gRPC status-code name, and the request field it is
about, so REST and gRPC clients get the same message. Messages are bounded
(:data:`MAX_MESSAGE_CHARS`) and echo client input only through :func:`brief`, so a 1 MiB gene
name comes back cut, not whole (a gRPC status over the metadata limit would otherwise reach the
client as ``RESOURCE_EXHAUSTED`` instead of the real error).
"""

from __future__ import annotations

from typing import Any

#: longest error message sent to a client (characters)
MAX_MESSAGE_CHARS = 2000
#: longest piece of client input echoed in a message (characters)
MAX_ECHO_CHARS = 80


def brief(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters (with how much was cut), for echoing client
    input in an error message."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class ServiceError(Exception):
    """A request the service cannot answer; the message names the problem."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    kind = "invalid_argument"

    def __init__(self, message: str, field: str | None = None) -> None:
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + " ... (message cut)"
        if field is not None and len(field) > MAX_ECHO_CHARS:
            field = field[:MAX_ECHO_CHARS] + "..."
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"type": self.kind, "field": self.field, "message": self.message}}


class InvalidInputError(ServiceError):
    """Malformed or inconsistent request content (HTTP 400, INVALID_ARGUMENT)."""


class ModelNotFoundError(ServiceError):
    http_status = 404
    grpc_code = "NOT_FOUND"
    kind = "not_found"


class TooLargeError(ServiceError):
    """Too many cells or genes, or too large a body (HTTP 413, RESOURCE_EXHAUSTED)."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"
    kind = "too_large"


class UnauthenticatedError(ServiceError):
    """Missing or wrong API key (HTTP 401, UNAUTHENTICATED)."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"
    kind = "unauthenticated"


class NotReadyError(ServiceError):
    http_status = 503
    grpc_code = "UNAVAILABLE"
    kind = "unavailable"


class DeadlineExceededError(ServiceError):
    """The request did not get through inference within the configured timeout (HTTP 504)."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    kind = "timeout"
