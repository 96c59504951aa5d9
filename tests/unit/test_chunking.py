"""Chunks sized by bytes (client/remote.py, ChunkBudget): fitted on the first rows, cut again
where later rows are denser, so that no request passes the server's body limit."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import scipy.sparse as sp

from cellexplain.api.schemas import AnnotateOptions, RequestLimits
from cellexplain.client.remote import SAMPLE_ROWS, AsyncClient, Chunk, ChunkBudget

LIMITS = RequestLimits(max_cells_per_request=10_000, max_genes_per_request=60_000,
                       max_body_bytes=2 * 1024**2)  # fmt: skip


def cells(dense: bool) -> Chunk:
    """1,000 cells x 3,000 genes: the first 400 with ~50 log1p values each, the rest with a
    value in every gene (a deeper sample concatenated after a shallow one)."""
    rng = np.random.default_rng(0)
    X = np.zeros((1000, 3000), dtype=np.float32)
    X[:400] = np.where(rng.random((400, 3000)) < 50 / 3000, rng.random((400, 3000)) * 3, 0)
    X[400:] = rng.random((600, 3000)) * 3 + 0.01
    ids = [f"cell{i}" for i in range(1000)]
    return Chunk(0, [f"G{j}" for j in range(3000)], X if dense else sp.csr_matrix(X), ids)


@pytest.mark.parametrize("transport", ["rest", "grpc"])
@pytest.mark.parametrize("dense", [True, False])
def test_no_request_passes_the_limit_when_later_rows_are_denser(transport, dense):
    client = AsyncClient("http://127.0.0.1:9", transport=transport)
    opts = AnnotateOptions()
    data = cells(dense)
    sample = Chunk(0, data.genes, data.X[:SAMPLE_ROWS], data.cell_ids[:SAMPLE_ROWS])
    budget = ChunkBudget.fit(lambda c: client.request_bytes(c, opts), sample, LIMITS)
    size = budget.rows_for(sample)
    parts, wholes = [], []
    for s in range(0, data.n, size):
        whole = Chunk(s, data.genes, data.X[s : s + size], data.cell_ids[s : s + size])
        wholes.append(client.request_bytes(whole, opts))
        parts += list(budget.split(whole))
    if transport == "rest" or not dense:  # uncut, the dense rows' chunks would be refused
        assert max(wholes) > LIMITS.max_body_bytes
    sizes = [client.request_bytes(p, opts) for p in parts]
    assert max(sizes) <= LIMITS.max_body_bytes, (size, sizes)
    # every cell once, in order; the dense rows got smaller chunks than the first ones
    assert [p.start for p in parts] == list(np.cumsum([0] + [p.n for p in parts[:-1]]))
    assert sum(p.n for p in parts) == data.n
    assert [i for p in parts for i in p.cell_ids] == data.cell_ids
    if transport == "rest" or not dense:  # gRPC sends dense values as raw float32 bytes
        assert parts[-1].n < parts[0].n
    asyncio.run(client.close())
