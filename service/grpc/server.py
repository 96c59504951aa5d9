"""The gRPC server: typed API, Open Inference Protocol, health checking and reflection.

It runs inside each BentoML worker process, on its own thread and event loop, and shares that
worker's :class:`~cellexplain.service.core.Annotator` (and so its batchers) with REST.
Several workers bind the same port (``SO_REUSEPORT``, gRPC's default on Linux) and the kernel
spreads connections.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cellexplain.api.errors import InvalidInputError, OverloadedError, ServiceError, brief
from cellexplain.service import auth, logs, metrics, v1
from cellexplain.service.core import Annotator
from cellexplain.service.failures import recorded
from cellexplain.service.grpc.oip_converters import check_infer_wire
from cellexplain.service.grpc.servicers import (
    CellExplainServicer,
    InferenceServicer,
    abort_with,
    oip_grpc,
    oip_pb,
    pb,
    pb_grpc,
)
from cellexplain.service.offload import LARGE, Offload
from cellexplain.service.settings import Settings

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["CellExplain"].full_name,
    oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
)
_OWN_SERVICES = tuple(f"/{name}/" for name in SERVICE_NAMES)


def build_server(
    annotator: Annotator, settings: Settings
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """A configured (not yet started) server, the port it bound (``grpc_port`` 0 picks a free
    one), and its health servicer."""
    limit = settings.max_body_bytes
    server = grpc.aio.server(
        # beyond it gRPC refuses a call (RESOURCE_EXHAUSTED) before reading its message: under
        # overload a worker held every message sent to it (3 GB at 3x capacity, 1024-cell
        # calls) and its loop answered even refusals seconds late
        maximum_concurrent_rpcs=settings.grpc_max_concurrent_rpcs,
        interceptors=[
            RequestIdInterceptor(),
            TimingInterceptor(),
            *([ApiKeyInterceptor(settings.api_keys)] if settings.api_keys else []),
            MalformedMessageInterceptor(settings, annotator),
            ErrorInterceptor(),
        ],
        options=[
            ("grpc.max_receive_message_length", limit),
            # answers are bounded by the cell limit, not the body limit (as over REST): with
            # the body limit a full OIP answer of many genes failed after the work was done
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1),
        ],
    )
    pb_grpc.add_CellExplainServicer_to_server(CellExplainServicer(annotator), server)
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(annotator), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{settings.grpc_host}:{settings.grpc_port}")
    return server, port, health_servicer


class GrpcServer:
    """Runs :func:`build_server` on a background thread with its own event loop."""

    def __init__(self, annotator: Annotator, settings: Settings) -> None:
        self.annotator = annotator
        self.settings = settings
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="grpc", daemon=True)
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._stopping: concurrent.futures.Future[None] | None = None
        self._stop_lock = threading.Lock()

    def start(self) -> int:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=30)
        log.info("gRPC serving on port %d", self.port)
        return self.port

    async def _start(self) -> int:
        server, port, health_servicer = build_server(self.annotator, self.settings)
        if port == 0:
            raise RuntimeError(f"could not bind gRPC port {self.settings.grpc_port}")
        await server.start()
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server, self._health = server, health_servicer
        return port

    def set_serving(self, serving: bool) -> None:
        """Report every service SERVING or NOT_SERVING on gRPC health (a worker of the server
        died: the HTTP probes fail at the same time); nothing once a stop has begun."""
        with self._stop_lock:
            if self._health is None or self._stopping is not None:
                return
            health_servicer = self._health
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )

        async def _set() -> None:
            for name in ("", *SERVICE_NAMES):
                await health_servicer.set(name, status)

        asyncio.run_coroutine_threadsafe(_set(), self._loop).result(timeout=10)

    def stop_async(self, grace_s: float) -> None:
        """Start a graceful stop (health NOT_SERVING, new calls refused, calls in flight get
        ``grace_s``) without waiting for it; called at SIGTERM, beside HTTP's drain."""
        with self._stop_lock:
            if self._server is None or self._health is None or self._stopping is not None:
                return
            server, health_servicer = self._server, self._health

            async def _stop() -> None:
                await health_servicer.enter_graceful_shutdown()
                await server.stop(grace_s)

            self._stopping = asyncio.run_coroutine_threadsafe(_stop(), self._loop)

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting calls and let in-flight ones finish (up to ``grace_s``), and wait."""
        self.stop_async(grace_s)
        stopping = self._stopping
        if stopping is None or self._server is None:
            return
        try:
            stopping.result(timeout=grace_s + 5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._server = None


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid API key (``UNAUTHENTICATED``), or with the key's metadata
    given twice (``INVALID_ARGUMENT``), except health checks. A refused call's message is never
    parsed: its handler discards the bytes."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(auth.OPEN_GRPC_PREFIXES):
            return handler
        try:
            auth.check_metadata(self.keys, tuple(details.invocation_metadata or ()))
        except ServiceError as e:
            recorded(_door(details), e)
            return _denying(handler, e)
        return handler


def _denying(handler: Any, err: ServiceError) -> Any:
    """A handler of the same shape as ``handler`` that aborts with ``err`` without parsing the
    request."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await abort_with(context, err)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await abort_with(context, err)
        yield  # pragma: no cover  (makes this an async generator)

    kw = {"request_deserializer": _discard, "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)


def _discard(data: bytes) -> None:
    return None


def _handler_kwargs(handler: Any) -> dict[str, Any]:
    return {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }


class _Refused:
    """What a request becomes when it is refused before or while being parsed (instead of
    gRPC's INTERNAL for a message protobuf cannot parse)."""

    def __init__(self, error: ServiceError) -> None:
        self.error = error


class _Deferred:
    """A large request's bytes, parsed off the event loop by the handler (see below)."""

    def __init__(self, data: bytes) -> None:
        self.data = data


class MalformedMessageInterceptor(grpc.aio.ServerInterceptor):
    """Every request message of the typed API, the Open Inference Protocol and health checking
    (reflection keeps gRPC's handling) is decoded here:

    * first counted in its wire bytes where a method has such a check
      (:func:`~cellexplain.service.v1.check_annotate_wire`,
      :func:`~cellexplain.service.grpc.oip_converters.check_infer_wire`), so a message too
      large once parsed is refused before it is;
    * a large ``Annotate`` message's model and cell count are read from its wire bytes
      (:func:`~cellexplain.service.v1.annotate_wire_demand`) and a queue that cannot take them
      refuses the call before the message is parsed (at 3x capacity, parsing the refused
      messages had cost a third of the answered cells);
    * large ones (:data:`~cellexplain.service.offload.LARGE`) checked and parsed on a thread,
      one at a time, as REST's bodies (:class:`~cellexplain.service.offload.Offload`): a
      unary call finding ``max_waiting_parses`` messages waiting is refused at once
      (``RESOURCE_EXHAUSTED`` with retry-after), so a backlog of parses never grows unbounded
      in front of the model's queue (under 3x load on a contended CPU it did, and refusals
      took seconds);
    * malformed protobuf bytes get ``INVALID_ARGUMENT`` naming the problem (gRPC's own answer
      to a request its deserializer cannot parse is ``INTERNAL``, a server error).

    Responses a servicer already serialised (bytes) go out as they are."""

    def __init__(self, settings: Settings, annotator: Annotator) -> None:
        self.annotator = annotator
        annotate = functools.partial(
            v1.check_annotate_wire,
            max_cells=settings.max_cells_per_request,
            max_genes=settings.max_genes_per_request,
        )
        typed, oip_service = SERVICE_NAMES
        self.wire_checks: dict[str, Callable[[bytes], None]] = {
            f"/{typed}/Annotate": annotate,
            f"/{typed}/AnnotateStream": annotate,
            f"/{oip_service}/ModelInfer": check_infer_wire,
        }
        #: methods whose model and cells are read from the wire before a large message is
        #: parsed: a full queue refuses them unparsed
        self.demands: dict[str, Callable[[bytes], tuple[str | None, int] | None]] = {
            f"/{typed}/Annotate": v1.annotate_wire_demand,
        }
        self.max_waiting = settings.max_waiting_parses
        self._offload: Offload | None = None  # made on the gRPC loop, on first use

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        method = str(details.method)
        if handler is None or not method.startswith((*_OWN_SERVICES, *auth.OPEN_GRPC_PREFIXES)):
            return handler
        parse = handler.request_deserializer
        wire_check = self.wire_checks.get(method)
        demand = self.demands.get(method)

        def decode(data: bytes) -> Any:
            try:
                if wire_check is not None:
                    wire_check(data)
                return parse(data) if parse is not None else data
            except ServiceError as e:
                return _Refused(e)
            except Exception as e:  # DecodeError, and whatever a damaged message raises
                return _Refused(
                    InvalidInputError(
                        f"the request message is not a valid protobuf for this method "
                        f"({type(e).__name__}: {brief(str(e), 160)})"
                    )
                )

        def safe(data: bytes) -> Any:  # runs on the gRPC loop: only small messages here
            return _Deferred(data) if len(data) >= LARGE else decode(data)

        async def decoded(request: Any, bounded: bool = True) -> Any:
            if not isinstance(request, _Deferred):
                return request
            if self._offload is None:
                self._offload = Offload(self.max_waiting)
            try:
                if bounded and demand is not None and (wanted := demand(request.data)):
                    self.annotator.check_room(*wanted)  # a full queue: refused unparsed
                parse = functools.partial(decode, request.data)
                return await self._offload.parse(len(request.data), parse, bounded)
            except OverloadedError as e:
                return _Refused(e)

        serialise = handler.response_serializer

        def passing_bytes(message: Any) -> bytes:  # service/v1.py answers with ready bytes
            return message if isinstance(message, bytes) else serialise(message)

        kw = {"request_deserializer": safe, "response_serializer": passing_bytes}

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            recorded(_door(details), request.error)
            await abort_with(context, request.error)

        def one_request(behaviour: Any) -> Any:  # unary, and health's Watch (writes its answers)
            async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
                request = await decoded(request)
                if isinstance(request, _Refused):
                    await refuse(request, context)
                return await behaviour(request, context)

            return handle

        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(one_request(handler.unary_unary), **kw)
        if handler.stream_stream is not None:
            stream_behaviour = handler.stream_stream

            async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
                async for r in requests:
                    r = await decoded(r, bounded=False)  # the stream holds its place
                    if isinstance(r, _Refused):
                        raise r.error
                    yield r

            def streaming(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
                return stream_behaviour(checked(requests), context)

            return grpc.stream_stream_rpc_method_handler(streaming, **kw)
        if handler.unary_stream is not None and not inspect.isasyncgenfunction(
            handler.unary_stream
        ):
            return grpc.unary_stream_rpc_method_handler(one_request(handler.unary_stream), **kw)
        return handler


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Each call of ours under its request id and a server span
    (:func:`~cellexplain.service.logs.grpc_call_wrappers`); first in the chain, so that what
    the others log carries them."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or not str(details.method).startswith(_OWN_SERVICES):
            return handler
        unary, streaming = logs.grpc_call_wrappers(str(details.method))
        kw = _handler_kwargs(handler)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kw)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kw)
        return handler


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Every error a servicer of ours raises, counted and answered in one place
    (:func:`~cellexplain.service.failures.recorded`, then
    :func:`~cellexplain.service.grpc.servicers.abort_with`: the status
    :mod:`cellexplain.api.errors` gives it, its field in the trailing metadata), as the REST
    doors' handlers do; servicers only raise."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None or not str(details.method).startswith(_OWN_SERVICES):
            return handler
        door = _door(details)

        async def fail(context: grpc.aio.ServicerContext, exc: Exception) -> None:
            err = recorded(door, exc)
            if err is not None:
                await abort_with(context, err)

        kw = _handler_kwargs(handler)
        if handler.unary_unary is not None:
            behaviour = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behaviour(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await fail(context, e)

            return grpc.unary_unary_rpc_method_handler(unary, **kw)
        if handler.stream_stream is not None:
            stream_behaviour = handler.stream_stream

            async def streaming(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                try:
                    async for res in stream_behaviour(requests, context):
                        yield res
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await fail(context, e)

            return grpc.stream_stream_rpc_method_handler(streaming, **kw)
        return handler


def _door(details: Any) -> str:
    return "oip-grpc" if str(details.method).startswith("/inference.") else "grpc"


class TimingInterceptor(grpc.aio.ServerInterceptor):
    """Observes ``cellexplain_grpc_request_seconds{method, code}`` for every call (unary and
    bidirectional streaming; health checks excluded)."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        method = str(details.method)
        if handler is None or method.startswith(auth.OPEN_GRPC_PREFIXES):
            return handler
        name = method.rsplit("/", 1)[-1]

        def observe(context: grpc.aio.ServicerContext, t0: float, failed: bool) -> None:
            code = context.code() if hasattr(context, "code") else None
            label = code.name if isinstance(code, grpc.StatusCode) else None
            label = label or ("UNKNOWN" if failed else "OK")
            metrics.GRPC_SECONDS.labels(method=name, code=label).observe(time.perf_counter() - t0)

        if handler.unary_unary is not None:
            behaviour = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                t0, failed = time.perf_counter(), True
                try:
                    res = await behaviour(request, context)
                    failed = False
                    return res
                finally:
                    observe(context, t0, failed)

            return grpc.unary_unary_rpc_method_handler(unary, **_handler_kwargs(handler))
        if handler.stream_stream is not None:
            stream_behaviour = handler.stream_stream

            async def streaming(
                requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                t0, failed = time.perf_counter(), True
                try:
                    async for res in stream_behaviour(requests, context):
                        yield res
                    failed = False
                finally:
                    observe(context, t0, failed)

            return grpc.stream_stream_rpc_method_handler(streaming, **_handler_kwargs(handler))
        return handler
