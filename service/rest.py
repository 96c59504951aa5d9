"""The REST front door: a BentoML service with the versioned API mounted at ``/v1``.

Only translation lives here: HTTP in, :class:`~service.core.Annotator` call, HTTP out. BentoML
provides the server processes, ``/livez``, ``/readyz`` and ``/metrics``.

Run: ``bentoml serve service.rest:CellExplain --port 3000`` (``make serve`` does).
"""

from __future__ import annotations

import logging
from typing import Any

import bentoml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models import __version__
from service import metrics
from service.core import Annotator
from service.errors import ServiceError, TooLargeError
from service.schemas import AnnotateRequest, AnnotateResponse, ModelDetail, ModelList
from service.settings import Settings

log = logging.getLogger(__name__)
SETTINGS = Settings.from_env()


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413 before they are read into memory."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(send, int(declared))
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise TooLargeError(self._message(received), "body")
            return message

        await self.app(scope, limited, send)

    def _message(self, n: int) -> str:
        return (
            f"request body of {n} bytes exceeds the limit of {self.max_bytes} bytes "
            "(CELLEXPLAIN_MAX_BODY_BYTES); split the request"
        )

    async def _reject(self, send: Send, n: int) -> None:
        err = TooLargeError(self._message(n), "body")
        metrics.ERRORS.labels(door="rest", type=err.kind).inc()
        await JSONResponse(err.to_dict(), status_code=err.http_status)(
            {"type": "http"}, _no_receive, send
        )


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


app = FastAPI(
    title="cellexplain",
    version=__version__,
    description="Cell-type annotation with per-gene attributions computed inside the model's "
    "ONNX graph. Errors are JSON: {error: {type, field, message}}.",
)
app.add_middleware(BodySizeLimit, max_bytes=SETTINGS.max_body_bytes)


def _error_response(err: ServiceError) -> JSONResponse:
    metrics.ERRORS.labels(door="rest", type=err.kind).inc()
    return JSONResponse(err.to_dict(), status_code=err.http_status)


@app.exception_handler(ServiceError)
async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
    return _error_response(exc)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors: list[Any] = list(exc.errors())
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # a union (dense rows | sparse maps) reports one error per branch: name the field once
    field = ".".join(p for p in loc if not p.startswith(("list[", "dict[")))
    message = f"{field or 'body'}: {first.get('msg', 'invalid')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return _error_response(ServiceError(message, field or None))


@bentoml.service(
    name="cellexplain",
    workers=SETTINGS.workers,
    traffic={"timeout": 300},
)
@bentoml.asgi_app(app, path="/v1")
class CellExplain:
    """Serves the configured models over REST (and, from the same core, gRPC)."""

    def __init__(self) -> None:
        self.annotator = Annotator.from_settings(SETTINGS)

    def __is_ready__(self) -> bool:
        return bool(self.annotator.models)

    @app.post("/annotate", response_model_exclude_none=True)
    async def annotate(self, body: AnnotateRequest) -> AnnotateResponse:
        """Annotate cells: labels, confidence, and the genes that drove each call."""
        return await self.annotator.annotate(body)

    @app.get("/models")
    def models(self) -> ModelList:
        """The served models."""
        return self.annotator.list_models()

    @app.get("/models/{name}")
    def model(self, name: str) -> ModelDetail:
        """A served model's card (genes, classes, metrics, attribution method)."""
        return self.annotator.model_detail(name)
