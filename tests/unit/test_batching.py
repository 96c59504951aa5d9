"""The batcher (:mod:`cellexplain.service.batching`) in-process, over a real onnxruntime session:
concurrent requests merged into fewer runs with each request's own rows back, large ones split
at the batch size, deadlines, shutdown."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from cellexplain.api.errors import DeadlineExceededError, NotReadyError
from cellexplain.models.runtime import OnnxModel
from cellexplain.service import metrics
from cellexplain.service.batching import Batcher


@pytest.fixture(scope="module")
def model(programs_model) -> OnnxModel:
    return OnnxModel(programs_model[1], intra_op_threads=1)


@pytest.fixture(scope="module")
def x(model, pbmc) -> np.ndarray:
    """Real cells as the graph takes them: log1p CP10k (pbmc68k's .raw) of the model's genes."""
    return pbmc.raw.to_adata()[:, model.genes].X.toarray().astype(np.float32)


def runs(name: str) -> tuple[float, float]:
    """(onnxruntime runs, cells run) the batcher ``name`` has counted."""
    count = total = 0.0
    for family in metrics.BATCH_CELLS.collect():
        for s in family.samples:
            if s.labels.get("model") == name and s.name.endswith("_count"):
                count = s.value
            if s.labels.get("model") == name and s.name.endswith("_sum"):
                total = s.value
    return count, total


def test_concurrent_requests_are_merged_and_each_gets_its_own_rows(model, x):
    batcher = Batcher("t-merge", model, max_cells=256, max_latency_s=0.05)
    targets = np.full(len(x), -1, np.int64)
    alone = model.predict(x[:64], targets[:64])

    async def many() -> list:
        parts = [batcher.predict(x[i : i + 8], targets[i : i + 8]) for i in range(0, 64, 8)]
        return list(await asyncio.gather(*parts))

    try:
        got = asyncio.run(many())
    finally:
        batcher.close()
    n_runs, cells = runs("t-merge")
    assert cells == 64 and n_runs < 8, (n_runs, cells)  # 8 requests, fewer runs
    for i, p in enumerate(got):
        np.testing.assert_allclose(
            p.probabilities, alone.probabilities[8 * i : 8 * i + 8], atol=1e-5
        )
        np.testing.assert_allclose(p.attributions, alone.attributions[8 * i : 8 * i + 8], atol=1e-4)


def test_a_large_request_runs_in_batches_of_the_limit(model, x):
    batcher = Batcher("t-split", model, max_cells=100, max_latency_s=0.0)
    targets = np.full(len(x), -1, np.int64)
    try:
        p = asyncio.run(batcher.predict(x[:350], targets[:350]))
    finally:
        batcher.close()
    assert runs("t-split") == (4, 350)
    direct = model.predict(x[:350], targets[:350])
    np.testing.assert_allclose(p.probabilities, direct.probabilities, atol=1e-5)


def test_a_request_past_its_deadline_is_refused_and_a_closed_batcher_says_so(model, x):
    targets = np.full(len(x), -1, np.int64)
    batcher = Batcher("t-deadline", model, max_cells=8, max_latency_s=0.0, timeout_s=1e-4)
    try:
        with pytest.raises(DeadlineExceededError, match="CELLEXPLAIN_REQUEST_TIMEOUT_S"):
            asyncio.run(batcher.predict(np.tile(x, (4, 1)), np.tile(targets, 4)))
    finally:
        batcher.close()
    with pytest.raises(NotReadyError, match="shutting down"):
        asyncio.run(batcher.predict(x[:2], targets[:2]))
