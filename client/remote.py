"""Python client for the cellexplain service: REST or gRPC streaming, sync or async.

    import scanpy as sc
    from cellexplain.client.remote import annotate

    adata = sc.read_h5ad("cells.h5ad")
    annotate(adata, url="http://localhost:3000")          # writes obs/obsm/uns, like sc.tl.*
    adata.obs["cellexplain_label"].value_counts()

Retries with exponential backoff on HTTP 502/503/504, gRPC ``UNAVAILABLE``, an overloaded
server's gRPC ``RESOURCE_EXHAUSTED`` and connection errors, waiting at least the server's
``Retry-After`` (annotation is a pure function, so a retried request gives the same answer); other
errors raise :class:`ClientError` with the server's message and field.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import anndata as ad
import httpx
import numpy as np
import scipy.sparse as sp

from cellexplain.api.annotations import (
    Annotations,
    annotation_info,
    expression,
    gene_map,
    write_annotations,
)
from cellexplain.api.errors import ERROR_FIELD_KEY, RETRY_AFTER_KEY
from cellexplain.api.schemas import (
    DEFAULTS,
    AnnotateOptions,
    AnnotateResponse,
    AttributionMode,
    InputKind,
    ModelDetail,
    ModelList,
    RequestLimits,
)
from cellexplain.models.card import ModelCard

Transport = Literal["rest", "grpc"]
T = TypeVar("T")
RETRY_HTTP = {502, 503, 504}


#: the status grpcio's asyncio client gives a streaming call whose write failed because the
#: server had already ended it, in place of the server's own status (grpc/grpc#36066)
CORE_OVERWRITE = "Internal error from Core"


class ClientError(RuntimeError):
    """The service refused a request; ``status`` is the HTTP status or gRPC code name."""

    def __init__(self, message: str, status: int | str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.field = field


@dataclass
class Chunk:
    """Rows ``start:start+n`` of a dataset, ready to send."""

    start: int
    genes: list[str]
    X: np.ndarray | sp.csr_matrix
    cell_ids: list[str] | None = None

    @property
    def n(self) -> int:
        return int(self.X.shape[0])


async def _aiter(items: AsyncIterator[T] | Iterable[T]) -> AsyncIterator[T]:
    """Any iterable as an async iterator; a plain (possibly lazy, reading) iterable yields to
    the event loop between items, so responses are handled while the next chunk is read."""
    if isinstance(items, AsyncIterator):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
            await asyncio.sleep(0)


async def ordered_window(
    items: AsyncIterator[T] | Iterable[T],
    fn: Callable[[T], Awaitable[Any]],
    window: int,
) -> AsyncIterator[tuple[T, Any]]:
    """``fn`` over ``items`` with at most ``window`` calls in flight; results in input order."""
    pending: collections.deque[tuple[T, asyncio.Task[Any]]] = collections.deque()

    try:
        async for item in _aiter(items):
            pending.append((item, asyncio.ensure_future(fn(item))))
            if len(pending) >= window:
                first, task = pending.popleft()
                yield first, await task
        while pending:
            first, task = pending.popleft()
            yield first, await task
    finally:
        for _, task in pending:
            task.cancel()


#: a chunk's request fills at most this share of the server's body limit (rows differ in
#: density: a chunk of the densest cells stays within the limit)
BODY_SHARE = 0.5
#: rows whose encoding sizes the chunks
SAMPLE_ROWS = 256
#: the limits of a server that does not announce its own (the service's defaults)
DEFAULT_LIMITS = RequestLimits(
    max_cells_per_request=10_000, max_genes_per_request=60_000, max_body_bytes=64 * 1024**2
)


def stored_per_row(X: np.ndarray | sp.csr_matrix) -> np.ndarray:
    """Each row's non-zero values (what a request's size grows with, beside its rows)."""
    if sp.issparse(X):
        return np.diff(sp.csr_matrix(X).indptr)
    return np.count_nonzero(np.asarray(X), axis=1)


@dataclass(frozen=True)
class ChunkBudget:
    """What a request of a chunk costs, as the transport encodes it: ``fixed`` bytes (the gene
    list, the options), ``per_row`` bytes per cell and ``per_value`` per non-zero value, fitted
    on the first rows of the data; and the bytes a request may take (:data:`BODY_SHARE` of the
    server's body limit) and its cells."""

    fixed: float
    per_row: float
    per_value: float
    budget: float
    max_cells: int

    @classmethod
    def fit(
        cls, measure: Callable[[Chunk], int], sample: Chunk, limits: RequestLimits | None
    ) -> ChunkBudget:
        """``measure``: a chunk's request size in bytes; ``sample``: the first rows."""
        limits = limits or DEFAULT_LIMITS
        ids: list[str] | None = [] if sample.cell_ids is not None else None
        fixed = measure(Chunk(0, sample.genes, sample.X[:0], ids))
        n = max(sample.n, 1)
        zeros = sp.csr_matrix(sample.X.shape, dtype=np.float32) if sp.issparse(sample.X) else (
            np.zeros(sample.X.shape, dtype=np.float32)
        )  # fmt: skip
        empty_rows = measure(Chunk(0, sample.genes, zeros, sample.cell_ids))
        per_row = max((empty_rows - fixed) / n, 1.0)
        stored = int(stored_per_row(sample.X).sum())
        per_value = max((measure(sample) - empty_rows) / stored, 0.0) if stored else 24.0
        return cls(fixed, per_row, per_value, limits.max_body_bytes * BODY_SHARE,
                   limits.max_cells_per_request)  # fmt: skip

    def rows_for(self, sample: Chunk) -> int:
        """Cells per chunk at ``sample``'s density (its mean non-zero values per cell)."""
        values_per_row = float(stored_per_row(sample.X).mean()) if sample.n else 0.0
        room = self.budget - self.fixed
        cost = self.per_row + self.per_value * values_per_row
        return int(min(self.max_cells, max(1, room // max(cost, 1.0))))

    def split(self, chunk: Chunk) -> Iterator[Chunk]:
        """``chunk``, cut where its denser rows would take a request past the budget (rows
        read later may be denser than the first ones the chunk size was measured on)."""
        cost = np.cumsum(self.per_row + self.per_value * stored_per_row(chunk.X))
        room = self.budget - self.fixed
        start = 0
        while start < chunk.n:
            before = cost[start - 1] if start else 0.0
            end = int(np.searchsorted(cost, before + room, side="right"))
            end = min(max(end, start + 1), start + self.max_cells, chunk.n)
            if start == 0 and end == chunk.n:
                yield chunk
                return
            ids = chunk.cell_ids[start:end] if chunk.cell_ids is not None else None
            yield Chunk(chunk.start + start, chunk.genes, chunk.X[start:end], ids)
            start = end


def too_large_hint(e: ClientError, chunk_size: int, explicit: bool) -> ClientError:
    """A refusal of a chunk's size, with the flag that changes it."""
    what = (
        "lower --chunk-size (chunk_size), or leave it out: chunks are then sized by the "
        "server's announced limits"
        if explicit
        else "sized from the first rows, they were too large for these cells: pass a smaller "
        "--chunk-size (chunk_size)"
    )
    return ClientError(f"{e} (chunks of up to {chunk_size} cells: {what})", e.status, e.field)


def _json_cells(chunk: Chunk) -> tuple[list[str], list[Any]]:
    """Dense rows, or ``{gene: value}`` maps for sparse input (smaller for wide matrices);
    the gene list goes with both, so that all-zero genes count as measured."""
    if sp.issparse(chunk.X):
        Xc = sp.csr_matrix(chunk.X)
        genes = chunk.genes
        cells = [gene_map(genes, Xc, i) for i in range(Xc.shape[0])]
        return genes, cells
    return chunk.genes, np.asarray(chunk.X, dtype=np.float64).tolist()


class AsyncClient:
    """Async client. ``url`` is the REST base URL (default: :func:`default_url`); gRPC uses
    ``grpc_target`` (host:port, default: the URL's host on port 50051)."""

    def __init__(
        self,
        url: str | None = None,
        *,
        transport: Transport = "rest",
        grpc_target: str | None = None,
        timeout: float = 120.0,
        retries: int = 4,
        backoff: float = 0.5,
        headers: dict[str, str] | None = None,
        api_key: str | None = None,
    ) -> None:
        if transport not in ("rest", "grpc"):
            raise ValueError(f"transport must be 'rest' or 'grpc', got {transport!r}")
        self.url = (url or default_url()).rstrip("/")
        self.transport = transport
        host = httpx.URL(self.url).host or "localhost"
        self.grpc_target = grpc_target or f"{host}:50051"
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        headers = dict(headers or {})
        self._metadata: list[tuple[str, str]] = []
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
            self._metadata.append(("authorization", f"Bearer {api_key}"))
        self._http = httpx.AsyncClient(base_url=self.url, timeout=timeout, headers=headers)
        self._channel: Any = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()
        if self._channel is not None:
            await self._channel.close()

    # -- plumbing --------------------------------------------------------------------------
    async def _retrying(self, call: Callable[[], Coroutine[Any, Any, T]]) -> T:
        import grpc

        for attempt in range(self.retries + 1):
            asked = 0.0  # the server's Retry-After, when it said one
            try:
                return await call()
            except httpx.TransportError as e:
                if attempt == self.retries:
                    raise ClientError(
                        f"cannot reach {self.url} after {attempt + 1} attempts: "
                        f"{type(e).__name__}: {e}",
                        "unreachable",
                    ) from e
            except _RetryableError as e:
                if attempt == self.retries:
                    raise
                asked = _seconds(e.response.headers.get("retry-after"))
            except grpc.aio.AioRpcError as e:
                delay = grpc_retry_delay(e)
                if delay is None or attempt == self.retries:
                    raise ClientError(e.details() or str(e.code()), e.code().name, _field(e)) from e
                asked = delay
            await asyncio.sleep(min(MAX_RETRY_AFTER_S, max(asked, self.backoff * 2**attempt)))
        raise AssertionError("unreachable")

    async def _request(self, method: str, path: str, **kw: Any) -> Any:
        async def once() -> Any:
            r = await self._http.request(method, path, **kw)
            if r.status_code in RETRY_HTTP:
                raise _RetryableError(r)
            if r.status_code >= 400:
                try:
                    err = r.json()["error"]
                    raise ClientError(err["message"], r.status_code, err.get("field"))
                except (ValueError, KeyError, TypeError):
                    raise ClientError(r.text[:500], r.status_code) from None
            return r.json()

        try:
            return await self._retrying(once)
        except _RetryableError as e:
            raise ClientError(
                f"service unavailable after {self.retries + 1} attempts", e.response.status_code
            ) from e

    def _stub(self) -> Any:
        import grpc

        from cellexplain.api.codegen import load

        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                self.grpc_target,
                options=[
                    ("grpc.max_receive_message_length", 1 << 30),
                    ("grpc.max_send_message_length", 1 << 30),
                ],
            )
        return load("cellexplain_v1_pb2_grpc").CellExplainStub(self._channel)

    # -- API -------------------------------------------------------------------------------
    async def models(self) -> ModelList:
        return ModelList.model_validate(await self._request("GET", "/v1/models"))

    async def model(self, name: str | None = None) -> ModelDetail:
        """A served model's tag, providers and card (``None``: the default model), over the
        client's transport (gRPC ``GetModel`` needs no REST port)."""
        if self.transport == "grpc":
            from cellexplain.api.codegen import load

            pb = load("cellexplain_v1_pb2")
            stub = self._stub()
            res = await self._retrying(
                lambda: stub.GetModel(
                    pb.GetModelRequest(name=name or ""),
                    timeout=self.timeout,
                    metadata=self._metadata,
                )
            )
            limits = None
            if res.HasField("limits"):
                limits = RequestLimits(
                    max_cells_per_request=res.limits.max_cells_per_request,
                    max_genes_per_request=res.limits.max_genes_per_request,
                    max_body_bytes=res.limits.max_body_bytes,
                )
            return ModelDetail(
                tag=res.tag,
                providers=list(res.providers),
                card=ModelCard.model_validate_json(res.card_json),
                limits=limits,
            )
        if name is None:
            listed = (await self.models()).models
            name = next(m.name for m in listed if m.default)
        return ModelDetail.model_validate(await self._request("GET", f"/v1/models/{name}"))

    def request_bytes(self, chunk: Chunk, options: AnnotateOptions) -> int:
        """The size of ``chunk``'s request as this client's transport encodes it."""
        if self.transport == "grpc":
            from cellexplain.api import proto_v1 as converters

            req = converters.request_to_proto(chunk.genes, chunk.X, options, chunk.cell_ids)
            return int(req.ByteSize())
        return len(json.dumps(self._json_body(chunk, options), separators=(",", ":")))

    def _json_body(self, chunk: Chunk, options: AnnotateOptions) -> dict[str, Any]:
        genes, cells = _json_cells(chunk)
        body = {**options.model_dump(exclude_none=True), "genes": genes, "cells": cells}
        if chunk.cell_ids is not None:
            body["cell_ids"] = chunk.cell_ids
        return body

    async def annotate_chunk(self, chunk: Chunk, options: AnnotateOptions) -> AnnotateResponse:
        """Annotate one chunk (unary REST or gRPC call, with retries)."""
        if self.transport == "grpc":
            from cellexplain.api import proto_v1 as converters

            req = converters.request_to_proto(chunk.genes, chunk.X, options, chunk.cell_ids)
            stub = self._stub()
            res = await self._retrying(
                lambda: stub.Annotate(req, timeout=self.timeout, metadata=self._metadata)
            )
            return converters.response_from_proto(res)
        return AnnotateResponse.model_validate(
            await self._request("POST", "/v1/annotate", json=self._json_body(chunk, options))
        )

    async def annotate_chunks(
        self,
        chunks: AsyncIterator[Chunk] | Iterable[Chunk],
        options: AnnotateOptions,
        concurrency: int = 2,
    ) -> AsyncIterator[tuple[Chunk, AnnotateResponse]]:
        """Annotate a stream of chunks, ``concurrency`` in flight, results in order.

        REST sends concurrent requests; gRPC pushes the chunks through one ``AnnotateStream``
        call (re-opened, re-sending the unanswered chunks, if the server becomes unavailable).
        """
        if self.transport == "rest":
            async for item in ordered_window(
                chunks, lambda c: self.annotate_chunk(c, options), concurrency
            ):
                yield item
            return
        async for item in self._grpc_stream(chunks, options, max(concurrency, 1)):
            yield item

    async def annotations(
        self,
        chunks: AsyncIterator[Chunk] | Iterable[Chunk],
        options: AnnotateOptions,
        concurrency: int = 2,
    ) -> AsyncIterator[tuple[Chunk, Annotations, dict[str, Any]]]:
        """:meth:`annotate_chunks` decoded for an AnnData: each chunk with its
        :class:`~cellexplain.api.annotations.Annotations` and ``uns['cellexplain']``."""
        detail = await self.model(options.model)
        card = detail.card
        programs = card.gene_sets.programs if card.gene_sets else []
        async for chunk, res in self.annotate_chunks(chunks, options, concurrency):
            ann = Annotations.from_response(res, card.classes, programs, options.top_k)
            yield chunk, ann, response_info(detail, res)

    async def _grpc_stream(
        self,
        chunks: AsyncIterator[Chunk] | Iterable[Chunk],
        options: AnnotateOptions,
        window: int,
    ) -> AsyncIterator[tuple[Chunk, AnnotateResponse]]:
        import grpc

        from cellexplain.api import proto_v1 as converters
        from cellexplain.api.codegen import load

        # one small unary call first: a refused key or an unreachable server then fails with
        # its own status code, instead of surfacing mid-stream as a generic write error
        pb = load("cellexplain_v1_pb2")
        stub = self._stub()
        await self._retrying(
            lambda: stub.ListModels(
                pb.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata
            )
        )
        source = _aiter(chunks)
        pending: collections.deque[Chunk] = collections.deque()  # sent, not yet answered
        room = asyncio.Semaphore(window)  # a permit per chunk in flight
        attempt = 0

        failed: list[Exception] = []  # the chunks' own error (a bad file), raised as itself

        async def requests() -> AsyncIterator[Any]:
            for ch in list(pending):  # after a retry: the unanswered chunks again
                yield converters.request_to_proto(ch.genes, ch.X, options, ch.cell_ids)
            try:
                async for nxt in source:
                    await room.acquire()
                    pending.append(nxt)
                    yield converters.request_to_proto(nxt.genes, nxt.X, options, nxt.cell_ids)
            except Exception as e:  # raised inside gRPC's writer, it would only cancel the call
                failed.append(e)

        while True:
            # the library writes the requests as the iterator yields them: a server that ends
            # the call (a bad chunk) stops the writes, and reading gives its status and message
            call = self._stub().AnnotateStream(requests(), timeout=None, metadata=self._metadata)
            try:
                async for res in call:
                    attempt = 0
                    room.release()
                    yield pending.popleft(), converters.response_from_proto(res)
                if failed:
                    raise failed[0]
                if pending:
                    raise ClientError("stream ended before every chunk was answered", "DATA_LOSS")
                return
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.INTERNAL and e.details() == CORE_OVERWRITE:
                    # the server ended the call (a bad chunk) while the library was writing the
                    # next one, and the library put its own INTERNAL in place of the server's
                    # status (grpc/grpc#36066): the chunks still unanswered go again as unary
                    # calls, which give the server's own answer
                    for ch in list(pending):
                        yield ch, await self._grpc_unary(stub, pb, ch, options)
                        pending.popleft()
                    async for ch in source:
                        yield ch, await self._grpc_unary(stub, pb, ch, options)
                    if failed:
                        raise failed[0] from None
                    return
                delay = grpc_retry_delay(e)
                if delay is None or attempt >= self.retries:
                    raise ClientError(e.details() or str(code), code.name, _field(e)) from e
                await asyncio.sleep(min(MAX_RETRY_AFTER_S, max(delay, self.backoff * 2**attempt)))
                attempt += 1

    async def _grpc_unary(
        self, stub: Any, pb: Any, ch: Chunk, options: AnnotateOptions
    ) -> AnnotateResponse:
        from cellexplain.api import proto_v1 as converters

        req = converters.request_to_proto(ch.genes, ch.X, options, ch.cell_ids)
        res = await self._retrying(
            lambda: stub.Annotate(req, timeout=self.timeout, metadata=self._metadata)
        )
        return converters.response_from_proto(res)

    async def annotate(
        self,
        adata: ad.AnnData,
        *,
        model: str | None = None,
        gene_key: str | None = None,
        layer: str | None = None,
        input: InputKind = DEFAULTS.input,
        attributions: AttributionMode = DEFAULTS.attributions,
        top_k: int = DEFAULTS.top_k,
        target: str = DEFAULTS.target,
        unassigned_threshold: float | None = None,
        novelty_threshold: float | None = None,
        chunk_size: int | None = None,
        concurrency: int = 2,
    ) -> ad.AnnData:
        """Annotate ``adata`` in place and return it.

        Writes ``obs['cellexplain_label']``, ``obs['cellexplain_predicted_label']``,
        ``obs['cellexplain_confidence']``, ``obs['cellexplain_unassigned_reason']``,
        ``obs['cellexplain_novelty']``, ``obs['cellexplain_top_genes']`` and
        ``obs['cellexplain_genes_against']`` (values in ``obsm``),
        ``obsm['cellexplain_attributions']`` (cells x model genes, with
        ``attributions='full'``), ``obsm['cellexplain_probabilities']``,
        ``obsm['cellexplain_program_attributions']`` (programs models) and
        ``uns['cellexplain']`` (model, genes, classes, programs, gene matching).
        """
        opts = AnnotateOptions(
            model=model,
            input=input,
            top_k=top_k,
            attributions=attributions,
            target=target,
            return_probabilities=True,
            unassigned_threshold=unassigned_threshold,
            novelty_threshold=novelty_threshold,
        )
        genes, X = expression(adata, gene_key, layer)
        explicit = chunk_size is not None
        budget = None
        if chunk_size is None:
            detail = await self.model(model)
            sample = Chunk(0, genes, X[:SAMPLE_ROWS])
            budget = ChunkBudget.fit(lambda c: self.request_bytes(c, opts), sample, detail.limits)
            chunk_size = budget.rows_for(sample)
        elif chunk_size < 1:
            raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
        size = chunk_size
        chunks = [Chunk(s, genes, X[s : s + size]) for s in range(0, adata.n_obs, size)]
        if budget is not None:
            chunks = [part for c in chunks for part in budget.split(c)]
        parts: list[Annotations] = []
        info: dict[str, Any] = {}
        try:
            async for _, ann, chunk_info in self.annotations(chunks, opts, concurrency):
                parts.append(ann)
                info = info or chunk_info
        except ClientError as e:
            if e.status in (413, "RESOURCE_EXHAUSTED"):
                raise too_large_hint(e, size, explicit) from e
            raise
        write_annotations(adata, Annotations.concat(parts), info)
        for text in info.get("warnings", []):  # on stderr, where Python shows warnings
            warnings.warn(text, AnswerWarning, stacklevel=2)
        return adata


#: the service's URL when none is given and CELLEXPLAIN_URL is not set
DEFAULT_URL = "http://localhost:3000"


def default_url() -> str:
    """``CELLEXPLAIN_URL`` from the environment, else :data:`DEFAULT_URL`."""
    return os.environ.get("CELLEXPLAIN_URL") or DEFAULT_URL


class AnswerWarning(UserWarning):
    """The service's warning about an answer (for example, model genes missing)."""


#: the longest a client waits before a retry, whatever the server's Retry-After says
MAX_RETRY_AFTER_S = 30.0


#: what gRPC answers a call past a server's ``maximum_concurrent_rpcs`` (no metadata of ours)
CONCURRENCY_LIMIT = "Concurrent RPC limit exceeded"


def grpc_retry_delay(e: Any) -> float | None:
    """Seconds the server asked to wait before a retry of the failed gRPC call ``e`` (0: none
    said), or ``None`` when the call is not to be retried: ``UNAVAILABLE`` (a worker going
    away) and an overloaded server's ``RESOURCE_EXHAUSTED`` with ``retry-after`` are retried;
    a request too large, also ``RESOURCE_EXHAUSTED``, is not."""
    import grpc

    trailing = dict(e.trailing_metadata() or ())
    if e.code() == grpc.StatusCode.UNAVAILABLE:
        return 0.0
    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and RETRY_AFTER_KEY in trailing:
        return _seconds(trailing[RETRY_AFTER_KEY])
    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and CONCURRENCY_LIMIT in (e.details() or ""):
        return 1.0  # the worker's gRPC call limit (CELLEXPLAIN_GRPC_MAX_CONCURRENT_RPCS)
    return None


def _seconds(value: Any) -> float:
    """A Retry-After value in seconds (0 when absent or not a number of seconds)."""
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return 0.0


def _field(e: Any) -> str | None:
    """The request field a gRPC error names (the server's trailing metadata), if any."""
    field = dict(e.trailing_metadata() or ()).get(ERROR_FIELD_KEY)
    return field if isinstance(field, str) else None


class _RetryableError(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"HTTP {response.status_code}")
        self.response = response


def response_info(detail: ModelDetail, res: AnnotateResponse) -> dict[str, Any]:
    """``uns['cellexplain']`` from the model card and a response."""
    return annotation_info(
        detail.card,
        res.unassigned_threshold,
        res.input_kind,
        res.gene_matching,
        res.novelty_threshold,
        res.warnings,
    )


class Client:
    """The synchronous client: :class:`AsyncClient` on a private event loop thread (works in
    Jupyter, where a loop is already running)."""

    def __init__(self, url: str | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._async = self._run(_make(url, kwargs))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def models(self) -> ModelList:
        return self._run(self._async.models())

    def model(self, name: str | None = None) -> ModelDetail:
        return self._run(self._async.model(name))

    def annotate(self, adata: ad.AnnData, **kwargs: Any) -> ad.AnnData:
        """See :meth:`AsyncClient.annotate`."""
        return self._run(self._async.annotate(adata, **kwargs))

    def close(self) -> None:
        self._run(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():  # stopped: its resources go now, not at exit
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _make(url: str | None, kwargs: dict[str, Any]) -> AsyncClient:
    return AsyncClient(url, **kwargs)  # created on the client's own loop


def annotate(adata: ad.AnnData, url: str | None = None, **kwargs: Any) -> ad.AnnData:
    """Annotate ``adata`` in place with a running service (see :meth:`AsyncClient.annotate`);
    client options (``transport``, ``grpc_target``, ``timeout``, ``retries``) may be passed
    too."""
    client_keys = {
        "transport",
        "grpc_target",
        "timeout",
        "retries",
        "backoff",
        "headers",
        "api_key",
    }
    client_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in client_keys}
    with Client(url, **client_kw) as client:
        return client.annotate(adata, **kwargs)
