"""How every door turns a failure into its answer, and the one place failures are counted.

:func:`recorded` maps any exception to the :class:`~cellexplain.api.errors.ServiceError` it
stands for (``None``: the client went away, which is not an error of ours), counts it in
``cellexplain_errors_total{door,type}`` and logs the unexpected ones; the HTTP doors answer with
:func:`http_response`, gRPC with :func:`~cellexplain.service.grpc.servicers.abort_with` (the
error interceptor, :mod:`cellexplain.service.grpc.server`).
"""

from __future__ import annotations

import logging

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from cellexplain.api.errors import (
    InternalError,
    ModelNotFoundError,
    NotReadyError,
    OverloadedError,
    ServiceError,
    UnauthenticatedError,
    disk_full,
    from_exception,
    validation_failure,
)
from cellexplain.service import metrics

log = logging.getLogger(__name__)


def recorded(door: str, exc: BaseException) -> ServiceError | None:
    """The error ``exc`` stands for, counted under ``door``; ``None`` (counted as
    ``client_disconnect``) for a client that went away. Unexpected exceptions are logged with
    their traceback and become an :class:`~cellexplain.api.errors.InternalError`."""
    err = _as_service_error(exc)
    if err is None:
        log.info("client disconnected before its request was read (%s)", door)
        metrics.ERRORS.labels(door=door, type="client_disconnect").inc()
        return None
    fields = {"door": door, "error": err.kind, "status": err.http_status, "field": err.field}
    if isinstance(err, InternalError):
        log.error("unexpected error (%s)", door, exc_info=exc, extra=fields)
    else:  # with the request id and the model (service/logs.py), for the one who asks why
        log.info("refused (%s, %s): %s", door, err.kind, err.message, extra=fields)
    metrics.ERRORS.labels(door=door, type=err.kind).inc()
    return err


def _as_service_error(exc: BaseException) -> ServiceError | None:
    if isinstance(exc, ServiceError):
        return exc
    if isinstance(exc, ClientDisconnect):
        return None
    if isinstance(exc, RequestValidationError):  # FastAPI's 422 is a 400 here
        return validation_failure(list(exc.errors()))
    if isinstance(exc, StarletteHTTPException):
        cause = exc.__cause__
        if isinstance(cause, ClientDisconnect):
            return None
        if isinstance(cause, ServiceError):  # a body limit hit inside form parsing
            return cause
        if disk_full(cause or exc):  # the multipart parser spools uploads to TMPDIR
            return from_exception(cause or exc)
        err = (  # Starlette's own: unknown route, wrong method, an unparsable multipart body
            ModelNotFoundError(str(exc.detail))
            if exc.status_code == 404
            else ServiceError(str(exc.detail))
        )
        err.http_status = exc.status_code
        return err
    if isinstance(exc, Exception):
        return from_exception(exc)
    raise exc  # KeyboardInterrupt, SystemExit, CancelledError: not a failure to answer


def http_response(door: str, exc: BaseException) -> Response:
    """``exc`` counted (:func:`recorded`) and answered in the body of its door's API (``rest``:
    :meth:`~cellexplain.api.errors.ServiceError.to_dict`, ``oip-rest``: ``{"error": message}``)
    with the status :mod:`cellexplain.api.errors` gives it; a client that went away gets 499,
    the status proxies use for it (so BentoML's request metrics count no 500)."""
    err = recorded(door, exc)
    if err is None:
        return Response(status_code=499)
    body = err.oip_body() if door == "oip-rest" else err.to_dict()
    headers: dict[str, str] = {}
    if isinstance(err, UnauthenticatedError):
        headers["WWW-Authenticate"] = "Bearer"
    elif isinstance(err, NotReadyError):
        headers["Retry-After"] = "1"
    elif isinstance(err, OverloadedError):
        headers["Retry-After"] = str(err.retry_after_s)
    if isinstance(exc, StarletteHTTPException):
        headers.update(exc.headers or {})  # e.g. Allow on a 405
    return JSONResponse(body, status_code=err.http_status, headers=headers or None)
