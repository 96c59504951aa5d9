"""The ``/v1`` OpenAPI document: FastAPI's, plus the request schema of ``/annotate`` (which is
parsed from raw bytes, so FastAPI cannot see it) and the error responses every operation can
give (FastAPI's 422 is a 400 here)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from cellexplain.api.schemas import AnnotateOptions, AnnotateRequest, ErrorResponse

#: error statuses each kind of /v1 operation can answer (401 only with CELLEXPLAIN_API_KEYS)
ERRORS_BY_METHOD = {
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
        "415": "an upload in another format than .h5ad (10x HDF5, Loom, Matrix Market, CSV): "
        "the message names it and the `cellexplain` command that reads it",
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

#: the JSON request body of POST /annotate, as the document declares it
ANNOTATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/AnnotateRequest"}}
        },
    }
}


def install(app: FastAPI) -> None:
    """Make ``app.openapi()`` (``/openapi.json``) return :func:`document`, built once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def document(app: FastAPI) -> dict[str, Any]:
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
    # the upload form reads every annotation option from its fields (service/app.py)
    options = AnnotateOptions.model_json_schema()["properties"]
    for name, body in components.items():
        if name.startswith("Body_annotate_h5ad"):
            body.setdefault("properties", {}).update(options)
    error_body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            errors = dict(ERRORS_BY_METHOD.get(method, {}))
            if "{" not in path and method == "get":
                errors.pop("404")
            for code, what in errors.items():
                responses[code] = {"description": what, "content": error_body}
    return schema
