"""One error family for every front door.

Each error carries its HTTP status and its gRPC status-code name, and the request field it is
about, so REST and gRPC clients get the same message.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """A request the service cannot answer; the message names the problem."""

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    kind = "invalid_argument"

    def __init__(self, message: str, field: str | None = None) -> None:
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


class NotReadyError(ServiceError):
    http_status = 503
    grpc_code = "UNAVAILABLE"
    kind = "unavailable"


class DeadlineExceededError(ServiceError):
    """The request did not get through inference within the configured timeout (HTTP 504)."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    kind = "timeout"
