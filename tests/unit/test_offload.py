"""The offload rule (:mod:`cellexplain.service.offload`), on one event loop: small steps run
inline, large parses one at a time on a thread, and past ``max_waiting`` waiting parses a
bounded call is refused at once while an unbounded one (a stream's next message) waits."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cellexplain.api.errors import OverloadedError
from cellexplain.service.offload import LARGE, Offload


def test_small_parses_run_inline_and_large_ones_on_a_thread():
    async def go() -> tuple[str, str]:
        off = Offload()
        small = await off.parse(10, lambda: threading.current_thread().name)
        large = await off.parse(LARGE, lambda: threading.current_thread().name)
        return small, large

    small, large = asyncio.run(go())
    assert small == threading.main_thread().name
    assert large != threading.main_thread().name


def test_past_the_waiting_bound_a_parse_is_refused_at_once_unless_unbounded():
    release = threading.Event()

    def slow() -> str:
        release.wait(10)
        return "parsed"

    async def go() -> tuple[list[str], OverloadedError, str]:
        off = Offload(max_waiting=1)
        running = asyncio.create_task(off.parse(LARGE, slow))
        await asyncio.sleep(0.05)  # the first holds the parser
        waiting = asyncio.create_task(off.parse(LARGE, lambda: "second"))
        await asyncio.sleep(0.05)  # one waits: the bound
        with pytest.raises(OverloadedError) as refused:
            await off.parse(LARGE, lambda: "never")
        unbounded = asyncio.create_task(off.parse(LARGE, lambda: "stream", bounded=False))
        await asyncio.sleep(0.05)
        assert not unbounded.done()  # it waits for its turn instead
        release.set()
        return [await running, await waiting], refused.value, await unbounded

    done, err, streamed = asyncio.run(go())
    assert done == ["parsed", "second"] and streamed == "stream"
    assert err.retry_after_s >= 1 and "CELLEXPLAIN_MAX_WAITING_PARSES" in err.message
