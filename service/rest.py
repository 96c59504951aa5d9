"""The REST front door: a BentoML service with the versioned API mounted at ``/v1``.

Only translation lives here: HTTP in, :class:`~service.core.Annotator` call, HTTP out. BentoML
provides the server processes, ``/livez``, ``/readyz`` and ``/metrics``.

Run: ``bentoml serve service.rest:CellExplain --port 3000`` (``make serve`` does).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

import bentoml
from fastapi import FastAPI, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models import __version__
from service import auth, metrics, oip, oip_http
from service.anndata_io import read_h5ad_bytes, to_h5ad_bytes
from service.core import Annotator
from service.errors import ServiceError, TooLargeError
from service.grpc.server import GrpcServer
from service.schemas import (
    AnnotateOptions,
    AnnotateRequest,
    AnnotateResponse,
    AttributionMode,
    ErrorResponse,
    InputKind,
    ModelDetail,
    ModelList,
)
from service.settings import Settings

log = logging.getLogger(__name__)
SETTINGS = Settings.from_env()
H5AD_MEDIA_TYPE = "application/x-hdf5"


class BodySizeLimit:
    """Refuse request bodies over the limit with 413 before they are read into memory.

    ``.h5ad`` uploads have their own limit (``max_h5ad_bytes``); every other route has
    ``max_body_bytes``.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_h5ad_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_h5ad_bytes = max_h5ad_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        h5ad = str(scope.get("path", "")).endswith("/annotate/h5ad")
        limit, setting = (
            (self.max_h5ad_bytes, "CELLEXPLAIN_MAX_H5AD_BYTES")
            if h5ad
            else (self.max_bytes, "CELLEXPLAIN_MAX_BODY_BYTES")
        )
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(send, _too_large(int(declared), limit, setting))
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _too_large(received, limit, setting)
            return message

        await self.app(scope, limited, send)

    async def _reject(self, send: Send, err: TooLargeError) -> None:
        metrics.ERRORS.labels(door="rest", type=err.kind).inc()
        await JSONResponse(err.to_dict(), status_code=err.http_status)(
            {"type": "http"}, _no_receive, send
        )


class ApiKeyAuth:
    """Require an API key (``CELLEXPLAIN_API_KEYS``) on the API routes; probes stay open.

    Errors use the app's error body: ``/v1``'s, or the Open Inference Protocol's (``oip``)."""

    def __init__(self, app: ASGIApp, keys: list[str], oip: bool = False) -> None:
        self.app = app
        self.keys = keys
        self.oip = oip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] != "http" or not self.keys or path in auth.OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers") or []}
        try:
            auth.check(self.keys, headers.get("authorization"), headers.get("x-api-key"))
        except auth.UnauthenticatedError as e:
            metrics.ERRORS.labels(door="oip-rest" if self.oip else "rest", type=e.kind).inc()
            body = {"error": e.message} if self.oip else e.to_dict()
            response = JSONResponse(
                body, status_code=e.http_status, headers={"WWW-Authenticate": "Bearer"}
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _too_large(n: int, limit: int, setting: str) -> TooLargeError:
    return TooLargeError(
        f"request body of {n} bytes exceeds the limit of {limit} bytes ({setting}); "
        "split the request",
        "body",
    )


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


app = FastAPI(
    title="cellexplain",
    version=__version__,
    description="Cell-type annotation with per-gene attributions computed inside the model's "
    "ONNX graph. Errors are JSON: {error: {type, field, message}}.",
)
app.add_middleware(
    BodySizeLimit, max_bytes=SETTINGS.max_body_bytes, max_h5ad_bytes=SETTINGS.max_h5ad_bytes
)
app.add_middleware(ApiKeyAuth, keys=SETTINGS.api_keys)


def _error_response(err: ServiceError) -> JSONResponse:
    metrics.ERRORS.labels(door="rest", type=err.kind).inc()
    return JSONResponse(err.to_dict(), status_code=err.http_status)


#: error statuses each kind of /v1 operation can answer (401 only with CELLEXPLAIN_API_KEYS)
_ERRORS_BY_METHOD = {
    "get": {"401": "missing or wrong API key", "404": "unknown model"},
    "post": {
        "400": "invalid request: the message names the field and the problem",
        "401": "missing or wrong API key",
        "404": "unknown model",
        "413": "too many cells or genes, or too large a body or upload",
        "503": "the model is not loaded yet",
        "504": "inference did not finish within CELLEXPLAIN_REQUEST_TIMEOUT_S",
    },
}


def _openapi() -> dict[str, Any]:
    """FastAPI's document, plus the request schema of /annotate (parsed from raw bytes) and
    the error responses every operation can give (FastAPI's 422 is a 400 here)."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (AnnotateRequest, ErrorResponse):
            definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in definition.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components[model.__name__] = definition
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
        error_body = {"application/json": {"schema": error_ref}}
        for path, item in schema.get("paths", {}).items():
            for method, op in item.items():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                errors = dict(_ERRORS_BY_METHOD.get(method, {}))
                if "{" not in path and method == "get":
                    errors.pop("404")
                for code, what in errors.items():
                    responses[code] = {"description": what, "content": error_body}
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]


@app.exception_handler(ServiceError)
async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
    return _error_response(exc)


@app.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return _error_response(_validation_failure(list(exc.errors())))


@app.exception_handler(ValidationError)
async def _pydantic_error(_: Request, exc: ValidationError) -> JSONResponse:
    return _error_response(_validation_failure(list(exc.errors())))


def _validation_failure(errors: list[Any]) -> ServiceError:
    """One 400 naming the first invalid field (and how many more problems there are)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # a union (dense rows | sparse maps) reports one error per branch: name the field once
    field = ".".join(p for p in loc if not p.startswith(("list[", "dict[")))
    message = f"{field or 'body'}: {first.get('msg', 'invalid')}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return ServiceError(message, field or None)


@app.exception_handler(Exception)
async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error")
    metrics.ERRORS.labels(door="rest", type="internal").inc()
    body = {"error": {"type": "internal", "field": None, "message": "internal error"}}
    return JSONResponse(body, status_code=500)


# -- the Open Inference Protocol (KServe V2) over HTTP, at /v2 ----------------------------------
v2 = FastAPI(
    title="cellexplain: Open Inference Protocol (V2)",
    version=__version__,
    description="KServe/Triton V2 REST protocol; errors are {error: message} as it specifies.",
    openapi_url="/v2/openapi.json",
    docs_url=None,
    redoc_url=None,
)
v2.add_middleware(
    BodySizeLimit, max_bytes=SETTINGS.max_body_bytes, max_h5ad_bytes=SETTINGS.max_h5ad_bytes
)
v2.add_middleware(ApiKeyAuth, keys=SETTINGS.api_keys, oip=True)


@v2.exception_handler(ServiceError)
async def _v2_service_error(_: Request, exc: ServiceError) -> JSONResponse:
    metrics.ERRORS.labels(door="oip-rest", type=exc.kind).inc()
    return JSONResponse({"error": exc.message}, status_code=exc.http_status)


@v2.exception_handler(Exception)
async def _v2_unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error")
    metrics.ERRORS.labels(door="oip-rest", type="internal").inc()
    return JSONResponse({"error": "internal error"}, status_code=500)


@bentoml.service(
    name="cellexplain",
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.request_timeout_s + 30},  # parsing + serialising too
    http={"port": SETTINGS.http_port},
)
@bentoml.asgi_app(app, path="/v1")
@bentoml.asgi_app(v2, path="/")  # passive mount: its routes are /v2/...
class CellExplain:
    """Serves the configured models over REST (and, from the same core, gRPC)."""

    def __init__(self) -> None:
        self.annotator = Annotator.from_settings(SETTINGS)
        self.grpc: GrpcServer | None = None
        if SETTINGS.grpc_enabled:
            self.grpc = GrpcServer(self.annotator, SETTINGS)
            self.grpc.start()

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        if self.grpc is not None:
            self.grpc.stop(SETTINGS.shutdown_grace_s)
        self.annotator.close()

    def __is_ready__(self) -> bool:
        return bool(self.annotator.models)

    @app.post(
        "/annotate",
        response_model=AnnotateResponse,
        response_model_exclude_none=True,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/AnnotateRequest"}}
                },
            }
        },
    )
    async def annotate(self, request: Request) -> Response:
        """Annotate cells: labels, confidence, and the genes that drove each call."""
        # parsed and serialised by pydantic-core straight from/to bytes (4x faster than
        # json.loads + validation for large matrices); NaN/Infinity reach our own checks
        body = AnnotateRequest.model_validate_json(await request.body())
        return Response(await self.annotator.annotate_json(body), media_type="application/json")

    @app.post(
        "/annotate/h5ad",
        response_class=Response,
        responses={200: {"content": {H5AD_MEDIA_TYPE: {}}, "description": "annotated .h5ad"}},
    )
    async def annotate_h5ad(
        self,
        file: UploadFile,
        model: Annotated[str | None, Form()] = None,
        gene_key: Annotated[str | None, Form(description="var column with genes")] = None,
        layer: Annotated[str | None, Form(description="'raw', a layer, or X")] = None,
        input: Annotated[InputKind, Form()] = "auto",
        top_k: Annotated[int, Form(ge=0)] = 10,
        attributions: Annotated[AttributionMode, Form()] = "full",
        target: Annotated[str, Form()] = "predicted",
        unassigned_threshold: Annotated[float | None, Form(ge=0, le=1)] = None,
    ) -> Response:
        """Upload an .h5ad file and get it back annotated: obs label/confidence/top-gene
        columns, attributions and probabilities in obsm, the details in uns['cellexplain']."""
        opts = AnnotateOptions(
            model=model,
            input=input,
            top_k=top_k,
            attributions=attributions,
            target=target,
            unassigned_threshold=unassigned_threshold,
        )
        data = await file.read()
        adata = await run_in_threadpool(read_h5ad_bytes, data)
        await self.annotator.annotate_anndata(adata, opts, gene_key, layer)
        body = await run_in_threadpool(to_h5ad_bytes, adata)
        name = Path(file.filename or "cells.h5ad").stem
        return Response(
            body,
            media_type=H5AD_MEDIA_TYPE,
            headers={"Content-Disposition": f'attachment; filename="{name}.annotated.h5ad"'},
        )

    @app.get("/models")
    def models(self) -> ModelList:
        """The served models."""
        return self.annotator.list_models()

    @app.get("/models/{name}")
    def model(self, name: str) -> ModelDetail:
        """A served model's card (genes, classes, metrics, attribution method)."""
        return self.annotator.model_detail(name)

    # -- Open Inference Protocol ---------------------------------------------------------------
    @v2.get("/v2")
    def v2_server_metadata(self) -> dict[str, object]:
        return oip.server_metadata()

    @v2.get("/v2/health/live")
    def v2_live(self) -> dict[str, bool]:
        return {"live": True}

    @v2.get("/v2/health/ready")
    def v2_ready(self) -> dict[str, bool]:
        return {"ready": self.__is_ready__()}

    @v2.get("/v2/models/{name}")
    @v2.get("/v2/models/{name}/versions/{version}")
    def v2_model_metadata(self, name: str, version: str | None = None) -> dict[str, object]:
        lm = self.annotator.get(name)
        oip.check_version(lm, version)
        return oip.model_metadata(lm)

    @v2.get("/v2/models/{name}/ready")
    @v2.get("/v2/models/{name}/versions/{version}/ready")
    def v2_model_ready(self, name: str, version: str | None = None) -> JSONResponse:
        lm = self.annotator.get(name)
        oip.check_version(lm, version)
        return JSONResponse({"name": name, "ready": True})

    @v2.post("/v2/models/{name}/infer")
    @v2.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer(self, name: str, request: Request, version: str | None = None) -> Response:
        """Inference on the model's own input ``x`` (FP32 [n, n_genes], log1p CP10k of the
        model's genes in card order) and optional ``target`` (INT64)."""
        req = oip_http.decode(await request.body(), request.headers.get(oip_http.HEADER_LENGTH))
        lm, outputs = await oip.infer(self.annotator, name, version, req.inputs, req.requested)
        body, headers = oip_http.encode(lm.name, lm.model.card.version, req, outputs)
        return Response(body, headers=headers)
