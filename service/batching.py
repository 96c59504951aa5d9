"""Adaptive batching: concurrent requests for one model share onnxruntime calls.

Each request is cut into chunks of at most ``max_cells`` cells. One worker task per model takes
chunks off a queue and merges them, up to ``max_cells`` cells, into one onnxruntime call that runs
in a dedicated thread. While a call runs, new chunks queue up, so batches grow with the load; at
low load a chunk waits at most ``max_latency_s`` for company. Memory is bounded by ``max_cells``
whatever the request size.

Overload is refused early: a worker holding more than ``max_queued`` cells for the model
refuses a new request at once (:class:`~cellexplain.api.errors.OverloadedError`: 503 with
``Retry-After``, RESOURCE_EXHAUSTED), the wait estimated from the recent rate; a request alone is
always admitted. A door admits a request (:meth:`Batcher.admit`) as it arrives, before checking,
aligning and normalising its cells: those cells count as queued from then on, so the work a
worker has accepted (in preparation or in the queue) is what the bound limits, and a refusal
costs no preparation. The cells queued and in flight are gauges, the time a chunk waits a
histogram.

The queue lives on the batcher's own event loop (its own thread), so every front door shares it
whatever loop it runs on: REST on the HTTP server's loop, gRPC on its server's loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellexplain.api.errors import DeadlineExceededError, NotReadyError, OverloadedError
from cellexplain.models.runtime import OnnxModel, Prediction
from cellexplain.service import metrics
from cellexplain.service.settings import QUEUED_BATCHES


class Admission:
    """``n`` cells a request brought into a batcher's queue (:meth:`Batcher.admit`): they count
    as queued until their chunks are taken into a batch; :meth:`close` (or leaving the ``with``
    block) gives back those never taken (a bad request, a timeout, a cancelled call)."""

    def __init__(self, batcher: Batcher, n: int, party: Party | None = None) -> None:
        self.batcher = batcher
        self.n = n
        self.left = n
        self.party = party
        if party is not None:
            party.members.add(self)

    def taken(self, k: int) -> None:
        """``k`` of the cells went into an onnxruntime call."""
        k = min(k, self.left)
        self.left -= k
        self.batcher._release(k)

    def close(self) -> None:
        self.taken(self.left)
        if self.party is not None:
            self.party.members.discard(self)

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Party:
    """Requests that come as one, the chunks of one gRPC stream: to the queue's rule that a
    request alone is always admitted, a chunk is alone when only its party's cells are queued
    (a lone stream is never refused by its own chunks in flight)."""

    def __init__(self) -> None:
        self.members: set[Admission] = set()

    @property
    def cells(self) -> int:
        """The party's cells still counted as queued."""
        return sum(a.left for a in list(self.members))


@dataclass
class _Chunk:
    x: np.ndarray
    target: np.ndarray
    future: asyncio.Future[Prediction]
    queued_at: float
    admission: Admission


def concat_predictions(parts: list[Prediction]) -> Prediction:
    """The predictions of consecutive batches as one (optional outputs stay ``None``)."""
    if len(parts) == 1:
        return parts[0]
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(Prediction):
        arrays = [getattr(p, f.name) for p in parts]
        fields[f.name] = None if arrays[0] is None else np.concatenate(arrays)
    return Prediction(**fields)


def slice_prediction(p: Prediction, sl: slice) -> Prediction:
    """Rows ``sl`` of every output."""
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(Prediction):
        value = getattr(p, f.name)
        fields[f.name] = None if value is None else value[sl]
    return Prediction(**fields)


class Batcher:
    """Merges concurrent prediction requests for one model (one instance per model and loop)."""

    def __init__(
        self,
        name: str,
        model: OnnxModel,
        max_cells: int,
        max_latency_s: float,
        timeout_s: float | None = None,
        max_queued: int | None = None,
    ) -> None:
        self.name = name
        #: cells queued at most before new requests are refused (default: the settings' rule)
        self.max_queued = max_queued or QUEUED_BATCHES * max_cells
        self._queued = 0  # cells admitted and not yet in an onnxruntime call (any thread)
        self._lock = threading.Lock()
        self._seconds_per_cell = 0.0  # recent onnxruntime time per cell, for Retry-After
        self._queued_gauge = metrics.QUEUED_CELLS.labels(model=name)
        self._admitted = metrics.ADMITTED_CELLS.labels(model=name)
        self._inflight_gauge = metrics.INFLIGHT_CELLS.labels(model=name)
        self._wait = metrics.QUEUE_WAIT_SECONDS.labels(model=name)
        self.timeout_s = timeout_s
        self.model = model
        self.max_cells = max_cells
        self.max_latency_s = max_latency_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ort-{name}")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"batcher-{name}", daemon=True
        )
        self._thread.start()
        self._queue: asyncio.Queue[_Chunk] = asyncio.run_coroutine_threadsafe(
            self._make_queue(), self._loop
        ).result()
        self._task: asyncio.Task[None] = asyncio.run_coroutine_threadsafe(
            self._spawn(), self._loop
        ).result()
        self._closed = False

    async def _spawn(self) -> asyncio.Task[None]:
        return asyncio.create_task(self._worker(), name=f"batcher-{self.name}")

    @staticmethod
    async def _make_queue() -> asyncio.Queue[_Chunk]:
        return asyncio.Queue()

    async def predict(
        self, x: np.ndarray, target: np.ndarray, admission: Admission | None = None
    ) -> Prediction:
        """Run the graph on ``x`` ``[n, n_genes]`` (model input) with per-cell ``target``;
        ``admission``: the cells' place in the queue, taken when the request arrived
        (:meth:`admit`; without it they are admitted now).

        Callable from any event loop; the work is queued on the batcher's loop. Raises
        :class:`~cellexplain.api.errors.OverloadedError` when the queue is full,
        :class:`~cellexplain.api.errors.DeadlineExceededError` after ``timeout_s`` (its chunks
        still queued are then skipped)."""
        if admission is None:
            with self.admit(x.shape[0]) as own:
                return await self.predict(x, target, own)
        if self._closed:
            raise NotReadyError(
                f"model {self.name} is shutting down on this worker: retry (another worker or "
                "replica answers)"
            )
        fut = asyncio.run_coroutine_threadsafe(self._predict(x, target, admission), self._loop)
        return await asyncio.wrap_future(fut)

    async def _predict(self, x: np.ndarray, target: np.ndarray, admission: Admission) -> Prediction:
        if self.timeout_s is None:
            return await self._queue_and_wait(x, target, admission)
        try:
            return await asyncio.wait_for(
                self._queue_and_wait(x, target, admission), self.timeout_s
            )
        except TimeoutError:
            raise DeadlineExceededError(
                f"inference for {x.shape[0]} cells did not finish within "
                f"{self.timeout_s:g} s (CELLEXPLAIN_REQUEST_TIMEOUT_S); the service is "
                "overloaded or the request too large: retry later or send fewer cells"
            ) from None

    def admit(self, n: int, party: Party | None = None) -> Admission:
        """Count ``n`` cells of an arriving request into the queue (from any thread), or refuse
        them when the queue is full (a request alone is always admitted; one of a ``party`` is
        alone when only the party's cells are queued).

        Raises:
            OverloadedError: 503 with ``Retry-After`` / RESOURCE_EXHAUSTED, the wait estimated
                from the recent onnxruntime time per cell.
        """
        with self._lock:
            queued = self._queued
            own = party.cells if party is not None else 0
            if not self._full(queued, n, own):
                self._queued += n
                queued = -1
        if queued >= 0:
            raise self._overloaded(queued, n)
        self._queued_gauge.inc(n)
        self._admitted.inc(n)
        return Admission(self, n, party)

    def check_room(self, n: int) -> None:
        """Refuse ``n`` cells as :meth:`admit` would now, without admitting them: for a door
        that learns a request's size before it parses the request (the queue may still refuse
        it once parsed).

        Raises:
            OverloadedError: as :meth:`admit`.
        """
        queued = self._queued
        if self._full(queued, n):
            raise self._overloaded(queued, n)

    def _full(self, queued: int, n: int, own: int = 0) -> bool:
        return queued > own and queued + n > self.max_queued

    def _overloaded(self, queued: int, n: int) -> OverloadedError:
        wait = math.ceil(queued * self._seconds_per_cell) if self._seconds_per_cell else 1
        return OverloadedError(
            f"model {self.name} has {queued} cells queued on this worker, and "
            f"{n} more would pass its bound of {self.max_queued} "
            f"(CELLEXPLAIN_MAX_QUEUED_CELLS): retry in {max(1, wait)} s, or send fewer "
            "cells at once",
            retry_after_s=wait,
        )

    def _release(self, n: int) -> None:
        if n:
            with self._lock:
                self._queued -= n
            self._queued_gauge.dec(n)

    @staticmethod
    def _taken(chunk: _Chunk) -> None:
        chunk.admission.taken(chunk.x.shape[0])

    async def _queue_and_wait(
        self, x: np.ndarray, target: np.ndarray, admission: Admission
    ) -> Prediction:
        queue = self._queue
        loop = asyncio.get_running_loop()
        futures = []
        now = time.monotonic()
        for start in range(0, x.shape[0], self.max_cells):
            sl = slice(start, start + self.max_cells)
            fut: asyncio.Future[Prediction] = loop.create_future()
            queue.put_nowait(_Chunk(x[sl], target[sl], fut, now, admission))
            futures.append(fut)
        try:
            return concat_predictions(list(await asyncio.gather(*futures)))
        finally:
            for f in futures:  # on timeout: chunks not yet run are skipped by the worker
                f.cancel()

    async def _worker(self) -> None:
        queue = self._queue
        loop = asyncio.get_running_loop()
        carry: _Chunk | None = None
        while True:
            if carry is not None:
                first = carry
            else:
                first = await queue.get()
                self._taken(first)
            carry = None
            batch = [first]
            cells = first.x.shape[0]
            deadline = time.monotonic() + self.max_latency_s
            while cells < self.max_cells:
                try:
                    nxt = queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(queue.get(), remaining)
                    except TimeoutError:
                        break
                self._taken(nxt)
                if cells + nxt.x.shape[0] > self.max_cells:
                    carry = nxt
                    break
                batch.append(nxt)
                cells += nxt.x.shape[0]
            live = [c for c in batch if not c.future.done()]  # a cancelled request drops out
            if not live:
                continue
            x = np.concatenate([c.x for c in live]) if len(live) > 1 else live[0].x
            t = np.concatenate([c.target for c in live]) if len(live) > 1 else live[0].target
            started = time.monotonic()
            for c in live:
                self._wait.observe(started - c.queued_at)
            t0 = time.perf_counter()
            self._inflight_gauge.set(x.shape[0])
            try:
                pred = await loop.run_in_executor(
                    self._executor, self.model.predict, x, t, self.max_cells
                )
            except Exception as e:  # surfaced to each waiting request
                for c in live:
                    if not c.future.done():
                        c.future.set_exception(e)
                continue
            finally:
                self._inflight_gauge.set(0)
            took = time.perf_counter() - t0
            per_cell = took / max(x.shape[0], 1)  # smoothed over the last ~10 batches
            self._seconds_per_cell = (
                per_cell
                if not self._seconds_per_cell
                else (0.9 * self._seconds_per_cell + 0.1 * per_cell)
            )
            metrics.INFERENCE_SECONDS.labels(model=self.name).observe(took)
            metrics.BATCH_CELLS.labels(model=self.name).observe(x.shape[0])
            metrics.BATCH_REQUESTS.labels(model=self.name).observe(len(live))
            metrics.WORKER_RSS.set(metrics.resident_bytes())
            start = 0
            for c in live:
                n = c.x.shape[0]
                if not c.future.done():
                    c.future.set_result(slice_prediction(pred, slice(start, start + n)))
                start += n

    def close(self) -> None:
        """Stop the worker task (letting it finish cancelling), its loop and its thread."""
        if self._closed:
            return
        self._closed = True

        async def stop_worker() -> None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(stop_worker(), self._loop).result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()
            self._executor.shutdown(wait=False, cancel_futures=True)
