"""The one rule for what runs off an event loop, for every door (REST, OIP, uploads, gRPC).

A step whose cost grows with the request, parsing a body or rendering an answer, runs on a
thread when it touches :data:`LARGE` bytes or more (a body by its length, an answer by the
result's arrays), so one big request never stalls the other calls on its loop (health checks
included); smaller ones run inline, where a thread hand-off would cost more than the work. Large
parses also run one at a time per loop, so parsers' memory peaks do not add up; and at most
``max_waiting`` wait for their turn: beyond that a body is refused at once (503 with
``Retry-After``), as a full model queue refuses cells. Parsing is REST's bottleneck under load
(a JSON body costs more to parse than its cells to run), and bodies waiting to be parsed are a
queue of their own that the model's bound does not see.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import TypeVar

from cellexplain.api.errors import OverloadedError
from cellexplain.service.core import Result

T = TypeVar("T")
#: from this many bytes on, a step runs on a thread
LARGE = 1 << 20


def answer_bytes(res: Result) -> int:
    """What rendering ``res`` reads: its per-cell arrays, in bytes (an answer's size is of the
    same order)."""
    arrays = (res.probabilities, res.attributions, res.program_attributions)
    return sum(a.nbytes for a in arrays if a is not None) + 64 * len(res)


class Offload:
    """The rule, for one event loop (its semaphore belongs to that loop: make one per loop,
    on first use inside it)."""

    def __init__(self, max_waiting: int = 0) -> None:
        self._parsing: asyncio.Semaphore | None = None
        self.max_waiting = max_waiting  # 0: no bound
        self._waiting = 0
        self._seconds_per_parse = 0.0  # recent, for Retry-After

    async def parse(self, size: int, parse: Callable[[], T], bounded: bool = True) -> T:
        """``parse()``, which reads ``size`` bytes: inline when small, else on a thread, one
        at a time. ``bounded=False``: wait for the turn however many wait (a stream's next
        message, whose call holds its place already).

        Raises:
            OverloadedError: ``max_waiting`` large bodies already wait for their turn.
        """
        if size < LARGE:
            return parse()
        if self._parsing is None:
            self._parsing = asyncio.Semaphore(1)
        full = self.max_waiting and self._waiting >= self.max_waiting
        if bounded and full and self._parsing.locked():
            wait = max(1, math.ceil(self._waiting * self._seconds_per_parse))
            raise OverloadedError(
                f"{self._waiting} large request bodies are waiting to be parsed on this worker "
                f"(its bound, CELLEXPLAIN_MAX_WAITING_PARSES, is {self.max_waiting}): retry in "
                f"{wait} s, or send smaller requests",
                retry_after_s=wait,
            )
        self._waiting += 1
        try:
            await self._parsing.acquire()
        finally:  # acquired, or cancelled while waiting: no longer waiting either way
            self._waiting -= 1
        t0 = time.perf_counter()
        try:
            return await asyncio.to_thread(parse)
        finally:
            self._parsing.release()
            took = time.perf_counter() - t0
            self._seconds_per_parse = 0.8 * self._seconds_per_parse + 0.2 * took

    async def render(self, size: int, render: Callable[[], T]) -> T:
        """``render()`` of an answer from ``size`` bytes of arrays (:func:`answer_bytes` for a
        :class:`~cellexplain.service.core.Result`): inline when small, else on a thread."""
        if size < LARGE:
            return render()
        return await asyncio.to_thread(render)
