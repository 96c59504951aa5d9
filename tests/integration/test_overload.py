"""Overload refused early, against a real `bentoml serve` (one worker, one onnxruntime thread, a
queue bound of 256 cells): a burst of concurrent requests gets answers or, past the bound, an
immediate 503 with Retry-After (REST) / RESOURCE_EXHAUSTED with ``retry-after`` (gRPC), never a
timeout; ``/metrics`` shows the queue, the waits and the model; the Python client, retrying as
the server asks, annotates every cell."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import anndata as ad
import grpc
import httpx
import numpy as np
import pytest

from cellexplain.api.codegen import load
from cellexplain.api.errors import RETRY_AFTER_KEY
from cellexplain.client import annotate
from tests.integration.servers import bentoml_server

pytestmark = pytest.mark.integration
pb = load("cellexplain_v1_pb2")
pb_grpc = load("cellexplain_v1_pb2_grpc")

ENV = {
    "CELLEXPLAIN_MODELS": "pbmc-programs",
    "CELLEXPLAIN_WORKERS": "1",
    "CELLEXPLAIN_INTRA_OP_THREADS": "1",
    "CELLEXPLAIN_MAX_BATCH_CELLS": "128",
    "CELLEXPLAIN_MAX_QUEUED_CELLS": "256",
}
BURST = 16  # concurrent requests of 512 cells: 8,192 cells against a bound of 256


@pytest.fixture(scope="module")
def server(programs_home):
    with bentoml_server(programs_home, ENV) as srv:
        yield srv


@pytest.fixture(scope="module")
def cells(pbmc) -> tuple[list[str], np.ndarray]:
    raw = pbmc.raw.to_adata()
    counts = np.rint(np.expm1(raw.X.toarray()) * 3).astype(np.float32)
    return list(raw.var_names), counts[:512]


def test_rest_burst_past_the_bound_is_refused_at_once_with_retry_after(server, cells):
    genes, X = cells
    body = {"genes": genes, "cells": X.tolist(), "top_k": 1}

    async def burst() -> list[tuple[int, float, httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:

            async def one() -> tuple[int, float, httpx.Response]:
                t0 = time.monotonic()
                r = await c.post("/v1/annotate", json=body)
                return r.status_code, time.monotonic() - t0, r

            return list(await asyncio.gather(*[one() for _ in range(BURST)]))

    got = asyncio.run(burst())
    codes = [code for code, _, _ in got]
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    for code, took, r in got:
        if code == 503:
            err = r.json()["error"]
            # the model's queue, or the bodies waiting for the parser, is full
            assert err["type"] == "overloaded"
            assert re.search(r"CELLEXPLAIN_MAX_(QUEUED_CELLS|WAITING_PARSES)", err["message"])
            assert int(r.headers["retry-after"]) >= 1
            assert took < 5, took  # refused on arrival, not after queueing (generous: 2 cores)
        else:
            assert len(r.json()["cells"]) == 512

    text = httpx.get(f"{server.url}/metrics").text
    assert re.search(r'cellexplain_queued_cells\{model="pbmc-programs",pid="\d+"\} 0\.0', text)
    assert re.search(r'cellexplain_inflight_cells\{model="pbmc-programs",pid="\d+"\} 0\.0', text)
    waits = re.search(r'cellexplain_queue_wait_seconds_count\{model="pbmc-programs"\} (\S+)', text)
    assert waits and float(waits.group(1)) >= 4 * codes.count(200)  # 4 chunks of 128 each
    assert re.search(
        r'cellexplain_model_info\{model="pbmc-programs",sha256="[0-9a-f]{64}",version="[^"]+"\} 1',
        text,
    )
    refused = re.search(r'cellexplain_request_errors_total\{door="rest",type="overloaded"\} (\S+)',
                        text)  # fmt: skip
    assert refused and float(refused.group(1)) >= codes.count(503)


def test_grpc_burst_gets_resource_exhausted_with_retry_after(server, cells):
    genes, X = cells
    req = pb.AnnotateRequest(
        genes=genes,
        dense=pb.DenseMatrix(n_cells=len(X), raw_le_float32=X.astype("<f4").tobytes()),
        options=pb.AnnotateOptions(top_k=1),
    )

    async def burst() -> list:
        async with grpc.aio.insecure_channel(server.grpc) as ch:
            stub = pb_grpc.CellExplainStub(ch)
            return list(
                await asyncio.gather(
                    *[stub.Annotate(req) for _ in range(BURST)], return_exceptions=True
                )
            )

    got = asyncio.run(burst())
    refused = [g for g in got if isinstance(g, grpc.aio.AioRpcError)]
    assert refused and len(refused) < BURST, got
    for e in refused:
        assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
        # the model's queue, or the messages waiting for the parser, is full
        assert re.search(r"CELLEXPLAIN_MAX_(QUEUED_CELLS|WAITING_PARSES)", e.details()), e
        assert int(dict(e.trailing_metadata())[RETRY_AFTER_KEY]) >= 1


def test_a_lone_stream_is_not_refused_by_its_own_chunks(server, cells):
    """Alone on the worker, an AnnotateStream of 200-cell chunks (several in flight, together
    past the 256-cell bound) is answered in full: a request alone is always admitted, and a
    stream's chunks are one request to that rule."""
    genes, X = cells

    def chunks():
        for i in range(6):
            part = X[i * 50 : i * 50 + 200]
            yield pb.AnnotateRequest(
                genes=genes if i == 0 else [],
                dense=pb.DenseMatrix(
                    n_cells=len(part), raw_le_float32=part.astype("<f4").tobytes()
                ),
                options=pb.AnnotateOptions(top_k=1),
            )

    with grpc.insecure_channel(server.grpc) as ch:
        answers = list(pb_grpc.CellExplainStub(ch).AnnotateStream(chunks(), timeout=60))
    assert [len(a.cells) for a in answers] == [200] * 6


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_the_client_retries_an_overloaded_server_and_gets_every_cell(server, cells, transport):
    """While a burst of other clients' requests fills the queue, the Python client's calls,
    retrying as the server asks, are all answered."""
    genes, X = cells
    body = {"genes": genes, "cells": X.tolist(), "top_k": 1}
    stop = threading.Event()

    async def flood(loops: int, rounds: int | None) -> None:
        """``loops`` clients each sending request after request (until ``stop``, or
        ``rounds`` each), so that the queue is never empty for long."""

        async def loop(c: httpx.AsyncClient) -> None:
            sent = 0
            while not stop.is_set() and (rounds is None or sent < rounds):
                await c.post("/v1/annotate", json=body)
                sent += 1

        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            await asyncio.gather(*[loop(c) for _ in range(loops)])

    def flooding(loops: int, rounds: int | None) -> threading.Thread:
        t = threading.Thread(target=lambda: asyncio.run(flood(loops, rounds)), daemon=True)
        t.start()
        return t

    def one(retries: int) -> ad.AnnData:
        a = ad.AnnData(X.copy())
        a.var_names = genes
        return annotate(
            a, url=server.url, grpc_target=server.grpc, transport=transport, retries=retries,
            backoff=0.1, chunk_size=512,
        )  # fmt: skip

    async def burst(retries: int) -> list[ad.AnnData | BaseException]:
        calls = [asyncio.to_thread(one, retries) for _ in range(4)]
        return list(await asyncio.gather(*calls, return_exceptions=True))

    burst_now = flooding(8, 3)
    try:
        with_retries = asyncio.run(burst(8))
    finally:
        burst_now.join(timeout=120)
    for out in with_retries:
        assert isinstance(out, ad.AnnData), out
        assert out.obs["cellexplain_label"].notna().all() and out.n_obs == 512
