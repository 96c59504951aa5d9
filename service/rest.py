"""The REST front door: a BentoML service with the versioned API mounted at ``/v1``.

Only translation lives here: HTTP in, :class:`~cellexplain.service.core.Annotator` call, HTTP
out. BentoML provides the server processes, ``/livez``, ``/readyz`` and ``/metrics``.

Run: ``bentoml serve cellexplain.service.rest:CellExplain --port 3000`` (``make serve`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.util
import logging
import os
import re
import shutil
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, BinaryIO, TypeVar

import bentoml
from fastapi import FastAPI, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cellexplain import __version__
from cellexplain.api.errors import (
    HeadersTooLargeError,
    InternalError,
    InvalidInputError,
    ModelNotFoundError,
    NotReadyError,
    ServiceError,
    TooLargeError,
    UnauthenticatedError,
    brief,
    disk_full,
    from_exception,
    validation_failure,
)
from cellexplain.api.schemas import (
    DEFAULTS,
    AnnotateOptions,
    AnnotateRequest,
    AnnotateResponse,
    AttributionMode,
    ErrorResponse,
    InputKind,
    ModelDetail,
    ModelList,
)
from cellexplain.service import (
    allocator,
    auth,
    http_timeouts,
    jsonbody,
    metrics,
    oip,
    oip_http,
    sandbox,
    v1,
)
from cellexplain.service.anndata_io import info as result_info
from cellexplain.service.anndata_io import open_result, to_annotations
from cellexplain.service.core import Annotator, resolve_models
from cellexplain.service.grpc.server import GrpcServer
from cellexplain.service.h5ad_check import Limits
from cellexplain.service.settings import Settings, SettingsError
from cellexplain.service.shutdown import ShutdownDeadline
from cellexplain.service.workers import WorkerWatch

log = logging.getLogger(__name__)
try:
    SETTINGS = Settings.from_env()
except SettingsError as e:  # one line naming the variable, not a traceback through the loader
    sys.exit(f"cellexplain: {e}")
allocator.tune(trim_every_s=SETTINGS.malloc_trim_s)  # every worker, before the model and requests
metrics.bound_http_route_labels()  # no metric label takes a path a client chose
http_timeouts.install(SETTINGS.http_header_timeout_s)  # request heads arrive in time
if importlib.util.find_spec("httptools") is not None:
    # uvicorn's "auto" HTTP parser, which BentoML uses: httptools when installed, else h11
    log.warning(
        "httptools is installed, so uvicorn parses HTTP with it: it bounds neither the size "
        "nor the number of a request's headers while it reads them (h11, used without it, "
        "refuses a head still incomplete beyond ~272 KiB) and keeps trailing spaces in header "
        "values; serve from an environment without httptools (the service's requirements do "
        "not include it)"
    )
H5AD_MEDIA_TYPE = "application/x-hdf5"
#: bodies from this size on are parsed off the event loop, one at a time (docs/security.md)
LARGE_BODY = 1 << 20
_LARGE_PARSE = asyncio.Semaphore(1)
#: uploads read at once in this worker (each in a child process: service/sandbox.py)
_UPLOADS = asyncio.Semaphore(SETTINGS.max_concurrent_uploads)
SANDBOX = sandbox.SandboxLimits(
    SETTINGS.upload_memory_bytes, SETTINGS.upload_cpu_s, SETTINGS.upload_timeout_s
)
T = TypeVar("T")


class Gate:
    """The first thing every HTTP request meets, on the whole server (BentoML's own routes
    ``/``, ``/docs.json`` included):

    * header values must be UTF-8 (400 naming the header);
    * with ``CELLEXPLAIN_API_KEYS`` set, every path but the probes and ``/metrics`` needs a key
      (401);
    * bodies over the limit are refused with 413 before they are read into memory (``.h5ad``
      uploads have ``max_h5ad_bytes``, everything else ``max_body_bytes``).

    Errors use the body of the API the path belongs to: ``/v2`` (Open Inference Protocol) gets
    ``{"error": message}``, everything else ``/v1``'s ``{"error": {type, field, message}}``.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.keys = settings.api_keys
        self.max_bytes = settings.max_body_bytes
        self.max_h5ad_bytes = settings.max_h5ad_bytes
        self.body_timeout_s = settings.http_body_timeout_s
        self.inflight_limit = settings.inflight_bytes
        #: bytes of request bodies admitted and not yet answered, in this worker
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        oip_path = path == "/v2" or path.startswith("/v2/")
        try:
            raw_headers = scope.get("headers") or []
            _check_head(raw_headers)
            headers = _decode_headers(raw_headers)
            if self.keys and path not in auth.OPEN_PATHS:
                auth.check(self.keys, headers.get("authorization"), headers.get("x-api-key"))
            h5ad = path.endswith("/annotate/h5ad")
            limit, setting = (
                (self.max_h5ad_bytes, "CELLEXPLAIN_MAX_H5AD_BYTES")
                if h5ad
                else (self.max_bytes, "CELLEXPLAIN_MAX_BODY_BYTES")
            )
            declared = headers.get("content-length", "")
            known = declared.isascii() and declared.isdigit()
            # leading zeros are allowed (h11 takes 20 digits); more than 18 significant digits
            # is more than any limit, without asking int() to read them
            size = int(declared) if known and len(declared.lstrip("0")) <= 18 else 1 << 62
            if known and size > limit:
                raise _too_large(size, limit, setting)
            # what the body may hold in memory while it is parsed and answered; uploads are
            # spooled to disk. A request alone is always admitted, so any body within the
            # limit can be served
            chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            body = 0 if h5ad else (size if known else (limit if chunked else 0))
            if body and self.inflight and self.inflight + body > self.inflight_limit:
                raise self._busy(body)
        except ServiceError as e:
            await _reject(scope, receive, send, e, oip_path)
            return
        received = held = 0
        more_body = True

        async def limited() -> Message:
            nonlocal received, more_body, held
            if more_body:  # each piece of the body within the timeout of the one before
                message = await http_timeouts.receive_with_timeout(receive, self.body_timeout_s)
            else:  # after the body: a wait for the client to go away, not timed
                message = await receive()
            if message["type"] == "http.request":
                more_body = bool(message.get("more_body", False))
                piece = len(message.get("body", b""))
                received += piece
                if received > limit:
                    raise _too_large(received, limit, setting)
                if not h5ad and piece:  # held bytes are counted as they arrive
                    others = self.inflight - held  # a request alone is always admitted
                    if others and self.inflight + piece > self.inflight_limit:
                        raise self._busy(piece)
                    held += piece
                    self.inflight += piece
            return message

        try:
            await self.app(scope, limited, send)
        finally:
            self.inflight -= held

    def _busy(self, more: int) -> NotReadyError:
        return NotReadyError(
            f"this worker holds {self.inflight} bytes of request bodies; {more} more would pass "
            f"CELLEXPLAIN_MAX_INFLIGHT_BYTES ({self.inflight_limit}): retry shortly",
            "body",
        )


#: a request head's bounds: h11 bounds only a head that is still incomplete, so ~128 KiB in
#: one read (thousands of small fields, ~3 MB of Python objects) reaches the app; refused here
MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024
#: headers that must not be given twice (one would be read, silently; a proxy might read the
#: other)
_SINGLE_HEADERS = (
    b"inference-header-content-length",
    b"content-encoding",
    b"authorization",
    b"x-api-key",
)


def _check_head(raw: list[tuple[bytes, bytes]]) -> None:
    """Refuse a head of more than :data:`MAX_HEADERS` fields or :data:`MAX_HEADER_BYTES`
    (431), a compressed body (no Content-Encoding is supported) and a header of
    :data:`_SINGLE_HEADERS` given twice (400)."""
    size = sum(len(k) + len(v) for k, v in raw)
    if len(raw) > MAX_HEADERS or size > MAX_HEADER_BYTES:
        raise HeadersTooLargeError(
            f"the request has {len(raw)} header fields of {size} bytes in all; the limits are "
            f"{MAX_HEADERS} fields and {MAX_HEADER_BYTES} bytes",
            "headers",
        )
    names = Counter(k.lower() for k, _ in raw)
    for name in _SINGLE_HEADERS:
        if names[name] > 1:
            raise InvalidInputError(f"header {name.decode()} is given more than once", "headers")
    for k, v in raw:
        if k.lower() == b"content-encoding" and v.strip().lower() not in (b"", b"identity"):
            raise InvalidInputError(
                f"Content-Encoding {brief(v.decode('latin-1'))} is not supported: send the "
                "body uncompressed",
                "headers",
            )


def _decode_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for k, v in raw:
        name = k.decode("latin-1").lower()
        try:
            headers[name] = v.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError(f"header {brief(name)} is not UTF-8 text", "headers") from None
    return headers


async def _reject(scope: Scope, receive: Receive, send: Send, err: ServiceError, oip: bool) -> None:
    await _error_response(err, "oip-rest" if oip else "rest")(scope, receive, send)


def _error_response(err: ServiceError, door: str) -> JSONResponse:
    """``err`` counted and answered in its API's body (``/v1``:
    :meth:`~cellexplain.api.errors.ServiceError.to_dict`, ``/v2``: ``{error: message}``)."""
    metrics.ERRORS.labels(door=door, type=err.kind).inc()
    body = err.oip_body() if door == "oip-rest" else err.to_dict()
    extra = None
    if isinstance(err, UnauthenticatedError):
        extra = {"WWW-Authenticate": "Bearer"}
    elif isinstance(err, NotReadyError):
        extra = {"Retry-After": "1"}
    return JSONResponse(body, status_code=err.http_status, headers=extra)


def _too_large(n: int, limit: int, setting: str) -> TooLargeError:
    return TooLargeError(
        f"request body of {n} bytes exceeds the limit of {limit} bytes ({setting}); "
        "split the request",
        "body",
    )


def _disconnected(door: str) -> Response:
    """A client that went away mid-request: counted as such, not as an error of ours (499, the
    status proxies use for it, so BentoML's request metrics do not count a 500)."""
    log.info("client disconnected before its request was read (%s)", door)
    metrics.ERRORS.labels(door=door, type="client_disconnect").inc()
    return Response(status_code=499)


def safe_filename(name: str | None, default: str = "cells") -> str:
    """An upload's file name reduced to ``[A-Za-z0-9._-]`` (at most 100 characters, without
    its extension) for the ``Content-Disposition`` of the answer: no quotes, separators,
    control characters or non-ASCII text can reach the header."""
    stem = Path(str(name or "")).name
    if stem.lower().endswith(".h5ad"):
        stem = stem[: -len(".h5ad")]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:100]
    return stem or default


app = FastAPI(
    title="cellexplain",
    version=__version__,
    description="Cell-type annotation with per-gene attributions computed inside the model's "
    "ONNX graph. Errors are JSON: {error: {type, field, message}}.",
)


#: error statuses each kind of /v1 operation can answer (401 only with CELLEXPLAIN_API_KEYS)
_ERRORS_BY_METHOD = {
    "get": {
        "400": "a header is not UTF-8, given twice, or a Content-Encoding (not supported)",
        "401": "missing or wrong API key",
        "404": "unknown model",
        "431": "more than 100 header fields or 32 KiB of them",
    },
    "post": {
        "400": "invalid request: the message names the field and the problem",
        "401": "missing or wrong API key",
        "404": "unknown model",
        "413": "too many cells or genes, or too large a body or upload (declared, or once "
        "read: CELLEXPLAIN_UPLOAD_MEMORY_BYTES)",
        "422": "an upload whose reading ran past CELLEXPLAIN_UPLOAD_TIMEOUT_S or "
        "CELLEXPLAIN_UPLOAD_CPU_S",
        "431": "more than 100 header fields or 32 KiB of them",
        "408": "the request body stopped arriving for CELLEXPLAIN_HTTP_BODY_TIMEOUT_S",
        "503": "the model is not loaded yet, or the worker holds CELLEXPLAIN_MAX_INFLIGHT_BYTES "
        "of requests (Retry-After)",
        "504": "inference did not finish within CELLEXPLAIN_REQUEST_TIMEOUT_S",
        "507": "the server's temporary space (TMPDIR) is full: retry later or elsewhere",
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


def _answer_error(door: str, exc: Exception) -> Response:
    """Every error of either API, answered in that API's body (``/v1``:
    :meth:`~cellexplain.api.errors.ServiceError.to_dict`, ``/v2``: ``{error: message}``) with
    the status :mod:`cellexplain.api.errors` gives it, and counted. FastAPI's validation errors
    are 400s; Starlette's own (unknown route, wrong method, an unparsable multipart body) keep
    their status; a client that went away is a 499, not an error of ours."""
    if isinstance(exc, ClientDisconnect):
        return _disconnected(door)
    err: ServiceError
    if isinstance(exc, RequestValidationError):
        err = validation_failure(list(exc.errors()))
    elif isinstance(exc, StarletteHTTPException):
        found = _http_status_error(exc)
        if found is None:
            return _disconnected(door)
        err = found
    else:
        err = from_exception(exc)
        if isinstance(err, InternalError):
            log.error("unexpected error (%s)", door, exc_info=exc)
    response = _error_response(err, door)
    if isinstance(exc, StarletteHTTPException):
        response.headers.update(exc.headers or {})  # e.g. Allow on a 405
    return response


def _http_status_error(exc: StarletteHTTPException) -> ServiceError | None:
    """The error a Starlette exception stands for: the ServiceError behind it (a body limit hit
    inside form parsing), ``None`` for a client that went away, otherwise Starlette's own status
    and text."""
    if isinstance(exc.__cause__, ClientDisconnect):
        return None
    if isinstance(exc.__cause__, ServiceError):
        return exc.__cause__
    if disk_full(exc.__cause__ or exc):  # the multipart parser spools uploads to TMPDIR
        return from_exception(exc.__cause__ or exc)
    err = (
        ModelNotFoundError(str(exc.detail))
        if exc.status_code == 404
        else ServiceError(str(exc.detail))
    )
    err.http_status = exc.status_code
    return err


# -- the Open Inference Protocol (KServe V2) over HTTP, at /v2 ----------------------------------
v2 = FastAPI(
    title="cellexplain: Open Inference Protocol (V2)",
    version=__version__,
    description="KServe/Triton V2 REST protocol; errors are {error: message} as it specifies.",
    openapi_url="/v2/openapi.json",
    docs_url=None,
    redoc_url=None,
)


async def _reject_request(door: str, _: Request, exc: Exception) -> Response:
    return _answer_error(door, exc)


for _api, _door in ((app, "rest"), (v2, "oip-rest")):
    for _kind in (
        Exception,
        ServiceError,
        RequestValidationError,
        ValidationError,
        ClientDisconnect,
        StarletteHTTPException,
    ):
        _api.add_exception_handler(_kind, functools.partial(_reject_request, _door))


@bentoml.service(
    name="cellexplain",
    workers=SETTINGS.n_workers,
    traffic={"timeout": SETTINGS.request_timeout_s + 30},  # parsing + serialising too
    http={"port": SETTINGS.http_port},
)
@bentoml.asgi_app(app, path="/v1")
@bentoml.asgi_app(v2, path="/")  # passive mount: its routes are /v2/...
class CellExplain:
    """Serves the configured models over REST (and, from the same core, gRPC)."""

    @bentoml.on_deployment
    def _check_models() -> None:
        """Once, before any worker starts: a model that is missing stops the server with one
        line, rather than workers that fail and are restarted without end."""
        try:
            resolve_models(SETTINGS)
        except SettingsError as e:
            sys.exit(f"cellexplain: {e}")

    def __init__(self) -> None:
        sandbox.remove_orphans()  # what workers killed mid-upload left in TMPDIR
        self.annotator = Annotator.from_settings(SETTINGS)
        self.grpc: GrpcServer | None = None
        if SETTINGS.grpc_enabled:
            self.grpc = GrpcServer(self.annotator, SETTINGS)
            self.grpc.start()

        self._deadline = ShutdownDeadline(SETTINGS.shutdown_grace_s, self._drain_grpc)
        self._deadline.install()
        # a sibling that died is not replaced inside a container: the probes say so
        self.workers = WorkerWatch(
            SETTINGS.n_workers, self.grpc.set_serving if self.grpc is not None else None
        )
        self.workers.start()

    def _drain_grpc(self) -> None:
        if self.grpc is not None:
            self.grpc.stop_async(SETTINGS.shutdown_grace_s)

    @bentoml.on_shutdown
    def _shutdown(self) -> None:
        self.workers.stop()
        if self.grpc is not None:
            self.grpc.stop(SETTINGS.shutdown_grace_s)
        self.annotator.close()

    def __is_ready__(self) -> bool:
        """``/readyz``: every model loaded and warmed up, and every worker alive."""
        return bool(self.annotator.models) and self.workers.all_alive()

    def __is_alive__(self) -> bool:
        """``/livez``: every worker the server started is alive (a dead one is not replaced
        inside a container: the kubelet restarts the container instead)."""
        return self.workers.all_alive()

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
        body = await read_body(request)
        # read straight from bytes into arrays, the limits checked before and while parsing
        # (service/jsonbody.py); big bodies are parsed off the event loop
        parse = functools.partial(
            jsonbody.parse_annotate,
            body,
            SETTINGS.max_cells_per_request,
            SETTINGS.max_genes_per_request,
        )
        req = await _parse_body(body, parse)
        res = await self.annotator.annotate(
            req.genes, req.X, req.options, req.cell_ids, req.genes_field
        )
        # written from the result's arrays (service/v1.py), off the event loop
        body = await run_in_threadpool(v1.json_bytes, res)
        return Response(body, media_type="application/json")

    @app.post(
        "/annotate/h5ad",
        response_class=Response,
        responses={200: {"content": {H5AD_MEDIA_TYPE: {}}, "description": "annotated .h5ad"}},
    )
    async def annotate_h5ad(
        self,
        request: Request,
        file: UploadFile,
        model: Annotated[str | None, Form()] = None,
        gene_key: Annotated[str | None, Form(description="var column with genes")] = None,
        layer: Annotated[str | None, Form(description="'raw', a layer, or X")] = None,
        input: Annotated[InputKind, Form()] = DEFAULTS.input,
        top_k: Annotated[int, Form(ge=0)] = DEFAULTS.top_k,
        attributions: Annotated[AttributionMode, Form()] = DEFAULTS.attributions,
        target: Annotated[str, Form()] = DEFAULTS.target,
        unassigned_threshold: Annotated[float | None, Form(ge=0, le=1)] = None,
    ) -> Response:
        """Upload an .h5ad file and get it back annotated: obs label/confidence/top-gene
        columns, attributions and probabilities in obsm, the details in uns['cellexplain'].

        The upload is checked and read in a child process with memory, CPU-time and wall-clock
        limits (service/sandbox.py), after a check that it is self-contained and within the
        cell, gene and byte limits once decompressed (service/h5ad_check.py); it goes from the
        request to a temporary file and back without being held in memory whole."""
        _check_form_fields(await request.form())
        opts = AnnotateOptions(
            model=model,
            input=input,
            top_k=top_k,
            attributions=attributions,
            target=target,
            unassigned_threshold=unassigned_threshold,
        )
        limits = Limits(
            SETTINGS.max_cells_per_request, SETTINGS.max_genes_per_request, SETTINGS.max_h5ad_bytes
        )
        async with _UPLOADS:
            with (
                sandbox.upload_folder() as tmp,
                sandbox.SandboxedUpload(tmp, limits, SANDBOX, gene_key, layer) as job,
            ):
                await run_in_threadpool(_save_upload, file, tmp / "upload.h5ad")
                # checked and read in a child process that may die, never here (service/sandbox.py);
                # a client that goes away meanwhile ends the work (and the child) at once
                data = await _unless_disconnected(request, job.read_async())
                names = data.cells
                genes = data.genes

                def where(r: int, c: int) -> tuple[str, str]:
                    return f"cell {brief(names[r])} (row {r}), gene {brief(genes[c])}", "file"

                res = await _unless_disconnected(
                    request,
                    self.annotator.annotate(genes, data.X, opts, names, "var_names", where),
                )
                del data
                path = await _unless_disconnected(
                    request, job.write_async(to_annotations(res), result_info(res))
                )
                out = open_result(path)
        # the open result file outlives its (removed) directory until the answer is sent
        name = safe_filename(file.filename)
        return StreamingResponse(
            _stream_file(out),
            media_type=H5AD_MEDIA_TYPE,
            headers={
                "Content-Disposition": f'attachment; filename="{name}.annotated.h5ad"',
                "Content-Length": str(os.fstat(out.fileno()).st_size),
            },
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
        body = await read_body(request)
        header = request.headers.get(oip_http.HEADER_LENGTH)
        decode = functools.partial(oip_http.decode, body, header, SETTINGS.max_cells_per_request)
        req = await _parse_body(body, decode, oip_http.json_size(header, len(body)))
        lm, outputs = await oip.infer(self.annotator, name, version, req.inputs, req.requested)
        answer, headers = oip_http.encode(lm.name, lm.model.card.version, req, outputs)
        return Response(answer, headers=headers)


CellExplain.add_asgi_middleware(Gate, settings=SETTINGS)  # type: ignore[attr-defined]


async def read_body(request: Request) -> bytes | bytearray:
    """The request's body, in one buffer: with a Content-Length (the gate has held it to the
    limit) read straight into a buffer of that size, not gathered in pieces and joined, which
    holds the body twice at the join (a refused 8 MB body's peak passed its bound)."""
    declared = request.headers.get("content-length", "")
    if not (declared.isascii() and declared.isdigit()):
        return await request.body()
    buf = bytearray(int(declared))
    view = memoryview(buf)
    filled = 0
    async for piece in request.stream():
        end = filled + len(piece)
        if end > len(buf):  # h11 holds bodies to their Content-Length; never trusted
            raise InvalidInputError("the body is longer than its Content-Length", "body")
        view[filled:end] = piece
        filled = end
    view.release()
    if filled != len(buf):
        raise InvalidInputError("the body is shorter than its Content-Length", "body")
    return buf


async def _parse_body(
    body: bytes | bytearray, parse: Callable[[], T], json_size: int | None = None
) -> T:
    """Run ``parse`` on a request body: small ones inline; from :data:`LARGE_BODY` of JSON on
    (``json_size``: the JSON part, default the whole body), off the event loop and one at a time
    per worker, so parsers' memory peaks do not add up. Binary tensors after a small JSON header
    are read in place: inline, with no thread hand-off."""
    if (len(body) if json_size is None else json_size) < LARGE_BODY:
        return parse()
    async with _LARGE_PARSE:
        return await run_in_threadpool(parse)


#: the upload form's fields (annotate_h5ad's parameters)
UPLOAD_FIELDS = (
    "file",
    "model",
    "gene_key",
    "layer",
    "input",
    "top_k",
    "attributions",
    "target",
    "unassigned_threshold",
)


def _check_form_fields(form: Any) -> None:
    """Refuse (400) an upload form with a field the endpoint does not read or one given twice,
    as the JSON door refuses unknown fields: a misspelt option must not be silently ignored."""
    keys = [k for k, _ in form.multi_items()]
    unknown = [k for k in keys if k not in UPLOAD_FIELDS]
    if unknown:
        raise InvalidInputError(
            f"{brief(unknown[0])}: unknown form field; the fields are {', '.join(UPLOAD_FIELDS)}",
            unknown[0][:80],
        )
    twice = sorted(k for k, n in Counter(keys).items() if n > 1)
    if twice:
        raise InvalidInputError(f"form field {brief(twice[0])} is given more than once", twice[0])


def _save_upload(file: UploadFile, path: Path) -> None:
    """Copy an upload (spooled to disk by the multipart parser) to ``path`` in 1 MiB pieces."""
    file.file.seek(0)
    try:
        with path.open("wb") as out:
            shutil.copyfileobj(file.file, out, 1 << 20)
    except OSError as e:  # a full disk is a 507, answered (not re-raised by Starlette)
        raise from_exception(e) if disk_full(e) else e from e
    if path.stat().st_size == 0:
        raise InvalidInputError("the uploaded file is empty", "file")


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """``work``, unless the client goes away first: then ``work`` is cancelled (an upload's
    reader is killed with it) and the request ends as a disconnect (499). For requests whose
    body has been read: the next ASGI message can only be the client leaving."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientDisconnect()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def _stream_file(f: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await run_in_threadpool(f.read, 1 << 20):
            yield chunk
    finally:
        f.close()
