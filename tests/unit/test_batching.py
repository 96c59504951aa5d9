"""The batcher (:mod:`cellexplain.service.batching`) in-process, over a real onnxruntime session:
concurrent requests merged into fewer runs with each request's own rows back, large ones split
at the batch size, deadlines, shutdown."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from cellexplain.api.errors import DeadlineExceededError, NotReadyError, OverloadedError
from cellexplain.models.runtime import OnnxModel
from cellexplain.service import metrics
from cellexplain.service.batching import Batcher, Party


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


def _gauge(gauge, name: str) -> float:
    return sum(s.value for f in gauge.collect() for s in f.samples if s.labels.get("model") == name)


def test_past_its_queue_bound_a_request_is_refused_at_once_and_the_gauges_drain(model, x):
    """A worker with 200 cells queued refuses more at once (no timeout), saying when to come
    back; what it admitted is answered; the queue and in-flight gauges rise and return to 0,
    and every admitted chunk's wait is observed."""
    targets = np.full(len(x), -1, np.int64)
    batcher = Batcher("t-overload", model, max_cells=50, max_latency_s=0.0, max_queued=200)
    seen: list[float] = []

    async def load() -> list:
        async def watch() -> None:
            for _ in range(200):
                seen.append(_gauge(metrics.QUEUED_CELLS, "t-overload"))
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        calls = [batcher.predict(x[:100], targets[:100]) for _ in range(12)]
        out = list(await asyncio.gather(*calls, return_exceptions=True))
        watcher.cancel()
        return out

    t0 = time.monotonic()
    try:
        got = asyncio.run(load())
    finally:
        batcher.close()
    refused = [g for g in got if isinstance(g, OverloadedError)]
    answered = [g for g in got if not isinstance(g, BaseException)]
    assert refused and answered and len(refused) + len(answered) == 12, got
    assert all(r.retry_after_s >= 1 and "CELLEXPLAIN_MAX_QUEUED_CELLS" in r.message
               for r in refused)  # fmt: skip
    assert time.monotonic() - t0 < 10
    assert max(seen) > 0 and max(seen) <= 200
    assert _gauge(metrics.QUEUED_CELLS, "t-overload") == 0
    assert _gauge(metrics.INFLIGHT_CELLS, "t-overload") == 0
    waits = [s.value for f in metrics.QUEUE_WAIT_SECONDS.collect() for s in f.samples
             if s.labels.get("model") == "t-overload" and s.name.endswith("_count")]  # fmt: skip
    assert waits == [2 * len(answered)]  # two chunks of 50 per answered request
    # a request alone is admitted whatever its size
    alone = Batcher("t-alone", model, max_cells=50, max_latency_s=0.0, max_queued=10)
    try:
        assert asyncio.run(alone.predict(x[:300], targets[:300])).probabilities.shape[0] == 300
    finally:
        alone.close()


def test_check_room_refuses_as_admit_would_without_admitting(model):
    """What a door asks before parsing a request it can size: the same refusal as admit(), and
    nothing counted either way."""
    batcher = Batcher("t-room", model, max_cells=50, max_latency_s=0.0, max_queued=100)
    try:
        batcher.check_room(500)  # an empty queue takes a request of any size
        with batcher.admit(80):
            batcher.check_room(20)
            with pytest.raises(OverloadedError) as e:
                batcher.check_room(21)
            assert "80 cells queued" in e.value.message
            assert "CELLEXPLAIN_MAX_QUEUED_CELLS" in e.value.message
            assert _gauge(metrics.QUEUED_CELLS, "t-room") == 80
            with pytest.raises(OverloadedError):
                batcher.admit(21)
        assert _gauge(metrics.QUEUED_CELLS, "t-room") == 0
    finally:
        batcher.close()


def test_a_partys_own_cells_do_not_make_its_next_request_wait_for_room(model):
    """A stream's chunks (one Party) are alone together: with only the party's cells queued a
    chunk is admitted past the bound; another request's cells make the bound apply."""
    batcher = Batcher("t-party", model, max_cells=50, max_latency_s=0.0, max_queued=100)
    party = Party()
    try:
        with batcher.admit(80, party), batcher.admit(80, party) as second:
            assert party.cells == 160 and second.party is party
            with pytest.raises(OverloadedError):
                batcher.admit(30)  # anyone else: 160 queued is past the bound
        assert party.cells == 0 and not party.members
        with batcher.admit(10):  # another request queued: the party is not alone
            with pytest.raises(OverloadedError):
                batcher.admit(95, party)
            with batcher.admit(90, party):  # within the bound
                assert party.cells == 90
    finally:
        batcher.close()


def test_the_client_retries_overload_and_unavailable_but_not_a_request_too_large():
    import grpc

    from cellexplain.api.errors import RETRY_AFTER_KEY
    from cellexplain.client.remote import grpc_retry_delay

    def failed(code, trailing=()):
        return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing))

    overloaded = failed(grpc.StatusCode.RESOURCE_EXHAUSTED, [(RETRY_AFTER_KEY, "3")])
    assert grpc_retry_delay(overloaded) == 3.0
    assert grpc_retry_delay(failed(grpc.StatusCode.UNAVAILABLE)) == 0.0
    assert grpc_retry_delay(failed(grpc.StatusCode.RESOURCE_EXHAUSTED)) is None  # too large
    assert grpc_retry_delay(failed(grpc.StatusCode.INVALID_ARGUMENT)) is None
