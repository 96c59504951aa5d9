"""Every error the service raises, and how each front door answers it: one place.

Each error carries its HTTP status, its gRPC status-code name and its ``type``, and the request
field it is about; :meth:`ServiceError.to_dict` is the ``/v1`` JSON body,
:meth:`ServiceError.oip_body` the Open Inference Protocol's, and :func:`from_exception` turns
anything else a request can raise (a pydantic validation failure, a data error from
:mod:`cellexplain.models`, a bug) into one of them. REST, gRPC and the OIP doors only call
these. Messages are bounded
(:data:`MAX_MESSAGE_CHARS`) and echo client input only through :func:`brief`, so a 1 MiB gene
name comes back cut, not whole (a gRPC status over the metadata limit would otherwise reach the
client as ``RESOURCE_EXHAUSTED`` instead of the real error).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from typing import Any

#: gRPC trailing-metadata key carrying an error's request field (REST has it in the body)
ERROR_FIELD_KEY = "cellexplain-error-field"
#: gRPC trailing metadata of an overloaded refusal: seconds to wait before retrying
RETRY_AFTER_KEY = "retry-after"
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
        """The ``/v1`` error body (:class:`~cellexplain.api.schemas.ErrorResponse`)."""
        return {"error": {"type": self.kind, "field": self.field, "message": self.message}}

    def oip_body(self) -> dict[str, Any]:
        """The Open Inference Protocol's error body: ``{"error": message}``."""
        return {"error": self.message}


class InvalidInputError(ServiceError):
    """Malformed or inconsistent request content (HTTP 400, INVALID_ARGUMENT)."""


class UnsupportedFormatError(InvalidInputError):
    """An upload in a format the door does not read (HTTP 415, INVALID_ARGUMENT): the message
    names the format and the command that reads it."""

    http_status = 415
    kind = "unsupported_format"


class ModelNotFoundError(ServiceError):
    http_status = 404
    grpc_code = "NOT_FOUND"
    kind = "not_found"


class TooLargeError(ServiceError):
    """Too many cells or genes, or too large a body (HTTP 413, RESOURCE_EXHAUSTED)."""

    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"
    kind = "too_large"


class HeadersTooLargeError(TooLargeError):
    """A request head with too many or too large header fields (HTTP 431)."""

    http_status = 431


class RequestTimeoutError(ServiceError):
    """A request body that stopped arriving (HTTP 408, DEADLINE_EXCEEDED)."""

    http_status = 408
    grpc_code = "DEADLINE_EXCEEDED"
    kind = "request_timeout"


class UnprocessableError(ServiceError):
    """Content the service stopped reading because it took too long, though every declared
    size was within the limits (HTTP 422, RESOURCE_EXHAUSTED): an upload whose reader ran past
    its CPU-time or wall-clock limit."""

    http_status = 422
    grpc_code = "RESOURCE_EXHAUSTED"
    kind = "unprocessable"


class InsufficientStorageError(ServiceError):
    """The server's temporary space is full (HTTP 507, RESOURCE_EXHAUSTED): a fault of the
    server's, not of the request; another replica, or a retry later, may succeed."""

    http_status = 507
    grpc_code = "RESOURCE_EXHAUSTED"
    kind = "insufficient_storage"


class UnauthenticatedError(ServiceError):
    """Missing or wrong API key (HTTP 401, UNAUTHENTICATED)."""

    http_status = 401
    grpc_code = "UNAUTHENTICATED"
    kind = "unauthenticated"


class NotReadyError(ServiceError):
    """The model cannot take requests now: the worker is shutting down (HTTP 503,
    UNAVAILABLE; clients retry, and another replica answers)."""

    http_status = 503
    grpc_code = "UNAVAILABLE"
    kind = "unavailable"


class OverloadedError(ServiceError):
    """The worker has more cells queued for the model than it admits
    (``CELLEXPLAIN_MAX_QUEUED_CELLS``): refused at once (HTTP 503 with ``Retry-After``,
    RESOURCE_EXHAUSTED with ``retry-after`` trailing metadata) instead of timing out later.
    ``retry_after_s``: when the queue should have drained."""

    http_status = 503
    grpc_code = "RESOURCE_EXHAUSTED"
    kind = "overloaded"

    def __init__(self, message: str, retry_after_s: int = 1, field: str | None = None) -> None:
        super().__init__(message, field)
        self.retry_after_s = max(1, int(retry_after_s))


class DeadlineExceededError(ServiceError):
    """The request did not get through inference within the configured timeout (HTTP 504)."""

    http_status = 504
    grpc_code = "DEADLINE_EXCEEDED"
    kind = "timeout"


class InternalError(ServiceError):
    """A bug of ours (HTTP 500, INTERNAL): the client gets no detail, the log the traceback."""

    http_status = 500
    grpc_code = "INTERNAL"
    kind = "internal"

    def __init__(self, message: str = "internal error", field: str | None = None) -> None:
        super().__init__(message, field)


def validation_failure(errors: Sequence[Any]) -> ServiceError:
    """One 400 naming the first invalid field of a pydantic (or FastAPI) validation failure, and
    how many more problems there are."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # a union (dense rows | sparse maps) reports one error per branch: name the field once
    field = ".".join(p for p in loc if not p.startswith(("list[", "dict[")))
    message = f"{field or 'body'}: {first.get('msg', 'invalid')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return InvalidInputError(message, field or None)


def caused_by(exc: BaseException, test: Callable[[BaseException], bool]) -> BaseException | None:
    """The first of ``exc`` and the exceptions it came from (``__cause__``, else
    ``__context__``: anndata wraps h5py's errors, h5py the system's) that passes ``test``."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if test(cause):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a full disk or quota (``ENOSPC``, ``EDQUOT``; h5py names the errno
    only in its message)."""
    if not isinstance(exc, OSError):
        return False
    return exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc)


def from_exception(exc: BaseException) -> ServiceError:
    """The error a front door answers for ``exc``: itself if a :class:`ServiceError`; a 400 for
    invalid options (pydantic) or data (:class:`~cellexplain.models.errors.DataError` and kin,
    which name their field); a 507 for a full disk (``ENOSPC``, ``EDQUOT``);
    :class:`InternalError` for anything else."""
    from pydantic import ValidationError

    from cellexplain.models.errors import DataError, PreprocessError

    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, ValidationError):
        return validation_failure(exc.errors())
    if isinstance(exc, DataError | PreprocessError):
        return InvalidInputError(str(exc), exc.field)
    if disk_full(exc):
        return InsufficientStorageError(
            "the server's temporary space is full (its TMPDIR): the request was not processed "
            "and nothing of it was kept; retry later or on another replica"
        )
    return InternalError()
