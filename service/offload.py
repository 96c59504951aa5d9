"""The one rule for what runs off an event loop, for every door (REST, OIP, uploads, gRPC).

A step whose cost grows with the request, parsing a body or rendering an answer, runs on a
thread when it touches :data:`LARGE` bytes or more (a body by its length, an answer by the
result's arrays), so one big request never stalls the other calls on its loop (health checks
included); smaller ones run inline, where a thread hand-off would cost more than the work. Large
parses also run one at a time per loop, so parsers' memory peaks do not add up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

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

    def __init__(self) -> None:
        self._parsing: asyncio.Semaphore | None = None

    async def parse(self, size: int, parse: Callable[[], T]) -> T:
        """``parse()``, which reads ``size`` bytes: inline when small, else on a thread, one
        at a time."""
        if size < LARGE:
            return parse()
        if self._parsing is None:
            self._parsing = asyncio.Semaphore(1)
        async with self._parsing:
            return await asyncio.to_thread(parse)

    async def render(self, size: int, render: Callable[[], T]) -> T:
        """``render()`` of an answer from ``size`` bytes of arrays (:func:`answer_bytes` for a
        :class:`~cellexplain.service.core.Result`): inline when small, else on a thread."""
        if size < LARGE:
            return render()
        return await asyncio.to_thread(render)
