"""The HTTP API as one ASGI app, built by :func:`create_app` from settings and an annotator:
``/v1`` (the typed API: JSON and ``.h5ad`` uploads) and ``/v2`` (the Open Inference Protocol),
behind the :class:`~cellexplain.service.gate.Gate`.

Only translation lives here: HTTP in, :class:`~cellexplain.service.core.Annotator` call, HTTP
out; every error is answered by :func:`~cellexplain.service.failures.http_response`. Importing
this module does nothing else: the BentoML service (:mod:`cellexplain.service.rest`) builds the
app in each worker, and tests build it in-process::

    app = create_app(settings, Annotator.from_settings(settings))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        await c.get("/v1/models")
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from typing import Annotated

from fastapi import FastAPI, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Mount
from starlette.types import ASGIApp

from cellexplain import __version__
from cellexplain.api.errors import ServiceError, brief
from cellexplain.api.schemas import (
    OPTION_NAMES,
    AnnotateOptions,
    AnnotateResponse,
    ModelDetail,
    ModelList,
)
from cellexplain.service import jsonbody, oip, oip_http, openapi, sandbox, v1
from cellexplain.service.anndata_io import info as result_info
from cellexplain.service.anndata_io import open_result, to_annotations
from cellexplain.service.core import Annotator
from cellexplain.service.failures import http_response
from cellexplain.service.gate import Gate, door_of
from cellexplain.service.h5ad_check import Limits
from cellexplain.service.logs import RequestIdMiddleware
from cellexplain.service.offload import Offload, answer_bytes
from cellexplain.service.settings import Settings
from cellexplain.service.uploads import (
    H5AD_MEDIA_TYPE,
    check_form_fields,
    read_body,
    safe_filename,
    save_upload,
    stream_file,
    unless_disconnected,
)

#: the upload form's fields: the file, where its genes and values are, and every annotation
#: option (AnnotateOptions' fields, read from the form as the JSON door reads them)
UPLOAD_FIELDS = ("file", "gene_key", "layer", *OPTION_NAMES)


def create_app(
    settings: Settings,
    annotator: Annotator,
    ready: Callable[[], bool] | None = None,
    gate: bool = True,
    alive: Callable[[], bool] | None = None,
) -> ASGIApp:
    """The HTTP API over ``annotator``, with ``settings``' limits.

    Args:
        ready: what ``/v2/health/ready`` and ``/v2/models/{name}/ready`` report (default: the
            annotator has models); not ready, they answer 503, the status KServe's probes read.
        alive: what ``/v2/health/live`` reports (default: always; 503 when not).
        gate: wrap the app in the :class:`~cellexplain.service.gate.Gate` (the BentoML service
            puts the gate around its whole server instead, its own routes included).
    """
    is_ready = ready or (lambda: bool(annotator.models))
    is_alive = alive or (lambda: True)
    offload = Offload(settings.max_waiting_parses)
    uploads = asyncio.Semaphore(settings.max_concurrent_uploads)  # readers at once, per worker
    sandbox_limits = sandbox.SandboxLimits(
        settings.upload_memory_bytes, settings.upload_cpu_s, settings.upload_timeout_s
    )
    upload_limits = Limits(
        settings.max_cells_per_request, settings.max_genes_per_request, settings.max_h5ad_bytes
    )

    api = FastAPI(
        title="cellexplain",
        version=__version__,
        description="Cell-type annotation with per-gene attributions computed inside the "
        "model's ONNX graph. Errors are JSON: {error: {type, field, message}}.",
    )
    openapi.install(api)

    @api.post(
        "/annotate",
        response_model=AnnotateResponse,
        response_model_exclude_none=True,
        openapi_extra=openapi.ANNOTATE_BODY,
    )
    async def annotate(request: Request) -> Response:
        """Annotate cells: labels, confidence, and the genes that drove each call."""
        body = await read_body(request)
        # read straight from bytes into arrays, the limits checked before and while parsing
        # (service/jsonbody.py)
        parse = functools.partial(
            jsonbody.parse_annotate,
            body,
            settings.max_cells_per_request,
            settings.max_genes_per_request,
        )
        req = await offload.parse(len(body), parse)
        res = await annotator.annotate(req.genes, req.X, req.options, req.cell_ids, req.genes_field)
        answer = await offload.render(answer_bytes(res), functools.partial(v1.json_bytes, res))
        return Response(answer, media_type="application/json")

    @api.post(
        "/annotate/h5ad",
        response_class=Response,
        responses={200: {"content": {H5AD_MEDIA_TYPE: {}}, "description": "annotated .h5ad"}},
    )
    async def annotate_h5ad(
        request: Request,
        file: UploadFile,
        gene_key: Annotated[str | None, Form(description="var column with genes")] = None,
        layer: Annotated[str | None, Form(description="'raw', a layer, or X")] = None,
    ) -> Response:
        """Upload an .h5ad file and get it back annotated: obs label/confidence/top-gene
        columns, attributions and probabilities in obsm, the details in uns['cellexplain'].

        The upload is checked and read in a child process with memory, CPU-time and wall-clock
        limits (service/sandbox.py), after a check that it is self-contained and within the
        cell, gene and byte limits once decompressed (service/h5ad_check.py); it goes from the
        request to a temporary file and back without being held in memory whole."""
        form = await request.form()
        check_form_fields(form, UPLOAD_FIELDS)
        opts = AnnotateOptions.model_validate({k: form[k] for k in OPTION_NAMES if k in form})
        async with uploads:
            with (
                sandbox.upload_folder() as tmp,
                sandbox.SandboxedUpload(tmp, upload_limits, sandbox_limits, gene_key, layer) as job,
            ):
                await asyncio.to_thread(save_upload, file, tmp / "upload.h5ad")
                # checked and read in a child process that may die, never here
                # (service/sandbox.py); a client that goes away meanwhile ends the work (and
                # the child) at once
                data = await unless_disconnected(request, job.read_async())
                names, genes = data.cells, data.genes

                def where(r: int, c: int) -> tuple[str, str]:
                    return f"cell {brief(names[r])} (row {r}), gene {brief(genes[c])}", "file"

                res = await unless_disconnected(
                    request, annotator.annotate(genes, data.X, opts, names, "var_names", where)
                )
                del data
                annotations = await offload.render(
                    answer_bytes(res), functools.partial(to_annotations, res)
                )
                path = await unless_disconnected(
                    request, job.write_async(annotations, result_info(res))
                )
                out = open_result(path)
        # the open result file outlives its (removed) directory until the answer is sent
        name = safe_filename(file.filename)
        return StreamingResponse(
            stream_file(out),
            media_type=H5AD_MEDIA_TYPE,
            headers={
                "Content-Disposition": f'attachment; filename="{name}.annotated.h5ad"',
                "Content-Length": str(os.fstat(out.fileno()).st_size),
            },
        )

    @api.get("/models")
    def models() -> ModelList:
        """The served models."""
        return annotator.list_models()

    @api.get("/models/{name}")
    def model_detail(name: str) -> ModelDetail:
        """A served model's card (genes, classes, metrics, attribution method)."""
        return annotator.model_detail(name)

    # -- the Open Inference Protocol (KServe V2) over HTTP ---------------------------------------
    v2 = FastAPI(
        title="cellexplain: Open Inference Protocol (V2)",
        version=__version__,
        description="KServe/Triton V2 REST protocol; errors are {error: message} as it specifies.",
        openapi_url="/v2/openapi.json",
        docs_url=None,
        redoc_url=None,
    )

    @v2.get("/v2")
    def v2_server_metadata() -> dict[str, object]:
        return oip.server_metadata()

    # probes answer with their status code (KServe's and the kubelet's read it), the body too
    @v2.get("/v2/health/live")
    def v2_live() -> JSONResponse:
        live = is_alive()
        return JSONResponse({"live": live}, status_code=200 if live else 503)

    @v2.get("/v2/health/ready")
    def v2_ready() -> JSONResponse:
        ready_now = is_ready()
        return JSONResponse({"ready": ready_now}, status_code=200 if ready_now else 503)

    @v2.get("/v2/models/{name}")
    @v2.get("/v2/models/{name}/versions/{version}")
    def v2_model_metadata(name: str, version: str | None = None) -> dict[str, object]:
        lm = annotator.get(name)
        oip.check_version(lm, version)
        return oip.model_metadata(lm)

    @v2.get("/v2/models/{name}/ready")
    @v2.get("/v2/models/{name}/versions/{version}/ready")
    def v2_model_ready(name: str, version: str | None = None) -> JSONResponse:
        lm = annotator.get(name)
        oip.check_version(lm, version)
        ready_now = is_ready()
        return JSONResponse(
            {"name": name, "ready": ready_now}, status_code=200 if ready_now else 503
        )

    @v2.post("/v2/models/{name}/infer")
    @v2.post("/v2/models/{name}/versions/{version}/infer")
    async def v2_infer(name: str, request: Request, version: str | None = None) -> Response:
        """Inference on the model's own input ``x`` (FP32 [n, n_genes], log1p CP10k of the
        model's genes in card order) and optional ``target`` (INT64)."""
        body = await read_body(request)
        header = request.headers.get(oip_http.HEADER_LENGTH)
        decode = functools.partial(oip_http.decode, body, header, settings.max_cells_per_request)
        json_part = oip_http.json_size(header, len(body))
        req = await offload.parse(len(body) if json_part is None else json_part, decode)
        lm, outputs = await oip.infer(annotator, name, version, req.inputs, req.requested)
        size = sum(t.data.nbytes for t in outputs)
        encode = functools.partial(oip_http.encode, lm.name, lm.model.card.version, req, outputs)
        answer, headers = await offload.render(size, encode)
        return Response(answer, headers=headers)

    async def answer_error(request: Request, exc: Exception) -> Response:
        return http_response(door_of(request.scope.get("path", "")), exc)

    # each kind by name: Starlette answers a handler for Exception itself only after the
    # error has reached its server-error middleware, which then raises it again
    for app in (api, v2):
        for kind in (
            Exception,
            ServiceError,
            RequestValidationError,
            ValidationError,
            ClientDisconnect,
            StarletteHTTPException,
        ):
            app.add_exception_handler(kind, answer_error)

    root: ASGIApp = Starlette(routes=[Mount("/v1", app=api), Mount("", app=v2)])
    # outermost: a request refused by the gate has its id too
    return RequestIdMiddleware(Gate(root, settings) if gate else root)
