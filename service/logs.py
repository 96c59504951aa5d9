"""Request ids, JSON log lines and traces, the same for every door.

Every call carries a request id: the one the client sent (``X-Request-ID`` header, or
``x-request-id`` gRPC metadata) when it is 1 to 128 characters of ``A-Z a-z 0-9 . _ : / + = -``,
else one generated here (32 hex digits). It is returned (the ``X-Request-ID`` response header,
``x-request-id`` in the gRPC call's initial metadata), and every log line written while the call
is handled carries it, with the model the call reached (name and version) once it is known.

With ``CELLEXPLAIN_LOG_FORMAT=json`` each log line is one JSON object (``ts``, ``level``,
``logger``, ``message``, ``request_id``, ``model``, ``model_version``, ``trace_id``, and the
fields a line adds: ``door``, ``error``, ``status``...), for a log pipeline to index; ``text``
(the default outside the image) keeps BentoML's lines.

Traces: BentoML traces HTTP requests with OpenTelemetry (its ``tracing`` configuration picks the
exporter); gRPC calls get a server span of their own here (:class:`RequestIdInterceptor`), under
the caller's ``traceparent`` metadata when sent, through the same tracer provider. A line
logged inside a span carries its ``trace_id``.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
_WELL_FORMED = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")
#: the request id of the call being handled (None outside a call)
REQUEST_ID: ContextVar[str | None] = ContextVar("cellexplain_request_id", default=None)
#: the model (name, version) the call reached; version None for a model not served
MODEL: ContextVar[tuple[str, str | None] | None] = ContextVar("cellexplain_model", default=None)
_FIELDS = ("door", "error", "status", "field")


def accept_id(sent: str | None) -> str:
    """The id a call goes by: ``sent`` when well formed, else a new one."""
    if sent is not None and _WELL_FORMED.fullmatch(sent):
        return sent
    return uuid.uuid4().hex


def _trace_id() -> str | None:
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - BentoML depends on it
        return None
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


class CallContext(logging.Filter):
    """Puts the call's request id, model and trace id on every record (at logging time, on the
    thread and task that logs)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        model = MODEL.get()
        record.model, record.model_version = model if model else (None, None)
        record.trace_id = _trace_id()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module's docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "model", "model_version", "trace_id", *_FIELDS):
            value = getattr(record, key, None)
            if value is not None:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(fmt: str) -> None:
    """Put the call context on every handler of the root logger and of BentoML's, and with
    ``fmt == "json"`` write their lines as JSON; our own loggers (``cellexplain.*``) log from
    INFO on (call once per worker, after BentoML set its logging up)."""
    ours = logging.getLogger("cellexplain")
    if ours.level == logging.NOTSET:  # BentoML leaves the root at WARNING: ours said nothing
        ours.setLevel(logging.INFO)
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in ("bentoml", "bentoml.access"))]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, CallContext) for f in handler.filters):
                handler.addFilter(CallContext())
            if fmt == "json":
                handler.setFormatter(JsonFormatter())


class RequestIdMiddleware:
    """ASGI: each HTTP request gets its id (:func:`accept_id` of ``X-Request-ID``) for the
    time it is handled, and the id back in the ``X-Request-ID`` header of its answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = next((v for k, v in scope.get("headers", ()) if k == HEADER.encode()), None)
        rid = accept_id(sent.decode("latin-1") if sent is not None else None)
        token = REQUEST_ID.set(rid)
        model_token = MODEL.set(None)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != HEADER.encode()]
                message = {**message, "headers": [*headers, (HEADER.encode(), rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            MODEL.reset(model_token)
            REQUEST_ID.reset(token)


def _grpc_rid(context: Any) -> tuple[str, dict[str, str]]:
    meta = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    return accept_id(meta.get(HEADER)), meta


def grpc_call_wrappers(method: str) -> tuple[Any, Any]:
    """``(unary, streaming)``: wrap a behaviour so the call runs under its request id (sent
    back in the initial metadata) and a server span of ``method``."""
    from opentelemetry import propagate, trace

    tracer = trace.get_tracer("cellexplain.grpc")

    def start(context: Any) -> tuple[str, Any]:
        # each call runs in a task of its own (a copy of the server's context): set, never
        # reset (a streaming call's generator may be closed in another context)
        rid, meta = _grpc_rid(context)
        REQUEST_ID.set(rid)
        MODEL.set(None)
        span = tracer.start_as_current_span(
            method, context=propagate.extract(meta), kind=trace.SpanKind.SERVER
        )
        return rid, span

    def unary(behaviour: Any) -> Any:
        async def call(request: Any, context: Any) -> Any:
            rid, span = start(context)
            with span:
                await context.send_initial_metadata(((HEADER, rid),))
                return await behaviour(request, context)

        return call

    def streaming(behaviour: Any) -> Any:
        async def call(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            rid, span = start(context)
            with span:
                await context.send_initial_metadata(((HEADER, rid),))
                async for res in behaviour(requests, context):
                    yield res

        return call

    return unary, streaming
