"""gRPC servicers: translate, call the core, translate back. They only raise: every error is
counted and answered by the error interceptor (:class:`~cellexplain.service.grpc.server.
ErrorInterceptor`, with :func:`abort_with`), from the same
:class:`~cellexplain.api.errors.ServiceError` family as REST."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from functools import partial
from typing import Any, NoReturn

import grpc

from cellexplain.api import proto_v1 as converters
from cellexplain.api.codegen import load
from cellexplain.api.errors import (
    ERROR_FIELD_KEY,
    RETRY_AFTER_KEY,
    InvalidInputError,
    OverloadedError,
    ServiceError,
)
from cellexplain.service import oip, v1
from cellexplain.service.batching import Party
from cellexplain.service.core import Annotator
from cellexplain.service.grpc import oip_converters
from cellexplain.service.offload import Offload, answer_bytes

log = logging.getLogger(__name__)
pb = load("cellexplain_v1_pb2")
pb_grpc = load("cellexplain_v1_pb2_grpc")
oip_pb = load("grpc_predict_v2_pb2")
oip_grpc = load("grpc_predict_v2_pb2_grpc")

#: chunks of one AnnotateStream call in flight at once (bounds the stream's memory)
STREAM_WINDOW = 4


async def abort_with(context: grpc.aio.ServicerContext, err: ServiceError) -> NoReturn:
    """Abort a call with ``err``'s gRPC status and message; its request field goes in the
    trailing metadata (``cellexplain-error-field``, ASCII), as REST has it in the body."""
    trailing: tuple[tuple[str, str], ...] = ()
    if err.field:
        trailing = ((ERROR_FIELD_KEY, err.field.encode("ascii", "backslashreplace").decode()),)
    if isinstance(err, OverloadedError):  # as HTTP's Retry-After: the client waits that long
        trailing += ((RETRY_AFTER_KEY, str(err.retry_after_s)),)
    await context.abort(getattr(grpc.StatusCode, err.grpc_code), err.message, trailing)
    raise AssertionError("unreachable")


_CellExplainBase: Any = pb_grpc.CellExplainServicer
_InferenceBase: Any = oip_grpc.GRPCInferenceServiceServicer


class CellExplainServicer(_CellExplainBase):
    """``cellexplain.v1.CellExplain``."""

    def __init__(self, annotator: Annotator) -> None:
        self.annotator = annotator
        self._offload: Offload | None = None  # made on the server's loop, on first use

    async def _annotate(
        self, req: Any, genes: list[str], opts: Any, party: Party | None = None
    ) -> bytes:
        """The serialised ``AnnotateResponse`` (written from arrays: :mod:`~.v1`); the
        server's response serializer passes bytes through. A large answer is written on a
        thread (:mod:`~cellexplain.service.offload`), as REST's are."""
        g, X, field = converters.matrix(req, genes)
        ids = list(req.cell_ids) or None
        res = await self.annotator.annotate(
            g, X, opts, ids, field, prepare_off_loop=True, party=party
        )
        if self._offload is None:
            self._offload = Offload()
        return await self._offload.render(answer_bytes(res), partial(v1.protobuf_bytes, res))

    async def Annotate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        opts = converters.options(request.options)
        return await self._annotate(request, list(request.genes), opts)

    async def AnnotateStream(  # noqa: N802
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        # a reader task starts one annotation task per chunk; at most STREAM_WINDOW wait in the
        # queue, and each result is sent as soon as it and those before it are done
        queue: asyncio.Queue[asyncio.Task[Any] | BaseException | None] = asyncio.Queue(
            maxsize=STREAM_WINDOW
        )

        async def read() -> None:
            genes: list[str] = []
            opts = None
            try:
                chunk = 0
                async for req in request_iterator:
                    if req.HasField("options") or opts is None:
                        opts = converters.options(req.options)
                    if req.genes:
                        genes = list(req.genes)
                    await queue.put(
                        asyncio.create_task(self._chunk(req, genes, opts, chunk, party))
                    )
                    chunk += 1
                await queue.put(None)
            except BaseException as e:  # surfaced by the sender below
                await queue.put(e)

        party = Party()  # the stream's chunks: not refused by each other in the queue
        reader = asyncio.create_task(read())
        current: asyncio.Task[Any] | None = None
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                current = item
                yield await item
        except Exception:
            # the reader stops reading the call's messages before the call is aborted
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            raise
        finally:
            # however the call ends (an error, or the client cancelling it: then this generator
            # is closed or cancelled, which is not an Exception), nothing of it runs on: the
            # reader and every queued chunk are cancelled, so no answer is held for nobody
            reader.cancel()
            if current is not None:
                current.cancel()
            while not queue.empty():
                left = queue.get_nowait()
                if isinstance(left, asyncio.Task):
                    left.cancel()

    async def _chunk(self, req: Any, genes: list[str], opts: Any, chunk: int, party: Party) -> Any:
        try:
            return await self._annotate(req, genes, opts, party)
        except ServiceError as e:
            e.message = f"chunk {chunk}: {e.message}"
            raise

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        models = self.annotator.list_models().models
        summaries = [
            # proto3 floats have no null: an imported model's missing score is NaN
            pb.ModelSummary(**{**m.model_dump(), "test_macro_f1": _score(m.test_macro_f1)})
            for m in models
        ]
        return pb.ListModelsResponse(models=summaries)

    async def GetModel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        detail = self.annotator.model_detail(request.name)
        limits = pb.RequestLimits(**detail.limits.model_dump()) if detail.limits else None
        return pb.GetModelResponse(
            tag=detail.tag,
            providers=detail.providers,
            card_json=detail.card.model_dump_json(),
            limits=limits,
        )


def _score(value: float | None) -> float:
    return float("nan") if value is None else value


class InferenceServicer(_InferenceBase):
    """``inference.GRPCInferenceService`` (the Open Inference Protocol)."""

    def __init__(self, annotator: Annotator) -> None:
        self.annotator = annotator

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return oip_pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return oip_pb.ServerReadyResponse(ready=bool(self.annotator.models))

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        oip.check_version(self.annotator.get(request.name), request.version)
        return oip_pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        return oip_pb.ServerMetadataResponse(**oip.server_metadata())

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        lm = self.annotator.get(request.name)
        oip.check_version(lm, request.version)
        md = oip.model_metadata(lm)
        res = oip_pb.ModelMetadataResponse(
            name=md["name"], versions=md["versions"], platform=md["platform"]
        )
        for key in ("inputs", "outputs"):
            for t in md[key]:  # type: ignore[attr-defined]
                getattr(res, key).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return res

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        if not request.model_name:
            raise InvalidInputError("model_name is required", "model_name")
        oip.check_output_count(len(request.outputs))
        inputs = oip_converters.infer_inputs(request)
        requested = [o.name for o in request.outputs] or None
        lm, outputs = await oip.infer(
            self.annotator, request.model_name, request.model_version, inputs, requested
        )
        return oip_converters.infer_response(lm.name, lm.model.card.version, request.id, outputs)
