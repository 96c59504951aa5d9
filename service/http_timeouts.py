"""Read timeouts for HTTP connections: a head must arrive within a bound, and a body must keep
moving.

uvicorn (which BentoML runs with its h11 parser) closes a keep-alive connection idle after an
answer, but sets no deadline on a connection that has sent nothing yet or only part of a request
head: 200 slow-header connections, 500 idle ones and 100 slow bodies stayed open indefinitely,
each holding a socket and its buffers. Two bounds close them:

* **head** (:func:`install`): from a connection's start, or from the first byte of a request
  after the previous answer, the whole head must arrive within ``head_timeout_s``; otherwise
  the connection is closed (nothing is answered: there is no request yet to answer). The same
  deadline closes a connection still sending the body of a request already answered. This
  patches uvicorn's ``H11Protocol`` (BentoML builds uvicorn's config itself; a test fails if an
  upgrade moves what is patched);
* **body** (:func:`receive_with_timeout`, used by the gate in ``service/rest.py``): each piece
  of a body must arrive within ``body_timeout_s`` of the previous one; otherwise 408.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cellexplain.api.errors import RequestTimeoutError

log = logging.getLogger(__name__)


def install(head_timeout_s: float) -> bool:
    """Give every HTTP/1.1 connection of this process's uvicorn a head deadline; returns
    whether uvicorn's h11 protocol was found and patched."""
    try:
        import h11
        from uvicorn.protocols.http.h11_impl import H11Protocol
    except ImportError:  # pragma: no cover
        log.error("uvicorn's h11 protocol moved: no deadline on request heads")
        return False
    if getattr(H11Protocol, "_cellexplain_head_timeout", None) is not None:
        H11Protocol._cellexplain_head_timeout = head_timeout_s  # type: ignore[attr-defined]
        return True
    made, received, lost, complete = (
        H11Protocol.connection_made,
        H11Protocol.data_received,
        H11Protocol.connection_lost,
        H11Protocol.on_response_complete,
    )

    def arm(self: Any) -> None:
        if getattr(self, "_cx_head_timer", None) is None:
            self._cx_head_timer = self.loop.call_later(
                H11Protocol._cellexplain_head_timeout,  # type: ignore[attr-defined]
                expired,
                self,
            )

    def disarm(self: Any) -> None:
        timer = getattr(self, "_cx_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._cx_head_timer = None

    def unanswerable(self: Any) -> bool:
        """A head still incomplete, or a body still arriving that nobody reads (its request
        was answered: uvicorn cancels its keep-alive timer on data, and sets none again)."""
        if self.transport.is_closing():
            return False
        state = self.conn.their_state
        answered = self.cycle is not None and self.cycle.response_complete
        return state is h11.IDLE or (answered and state is h11.SEND_BODY)

    def expired(self: Any) -> None:
        self._cx_head_timer = None
        if unanswerable(self):
            log.info("closing a connection whose request did not arrive in time")
            self.transport.close()

    def connection_made(self: Any, transport: Any) -> None:
        made(self, transport)
        arm(self)

    def data_received(self: Any, data: bytes) -> None:
        received(self, data)
        if unanswerable(self):
            arm(self)  # from the head's first byte (or the connection's start)
        else:
            disarm(self)

    def on_response_complete(self: Any) -> None:
        complete(self)
        if unanswerable(self):  # answered while its body is still (or never) coming
            arm(self)

    def connection_lost(self: Any, exc: Exception | None) -> None:
        disarm(self)
        lost(self, exc)

    H11Protocol._cellexplain_head_timeout = head_timeout_s  # type: ignore[attr-defined]
    H11Protocol.connection_made = connection_made  # type: ignore[method-assign]
    H11Protocol.data_received = data_received  # type: ignore[method-assign]
    H11Protocol.connection_lost = connection_lost  # type: ignore[method-assign]
    H11Protocol.on_response_complete = on_response_complete  # type: ignore[method-assign]
    return True


async def receive_with_timeout(receive: Any, timeout_s: float) -> Any:
    """The next ASGI message of a request; a body piece that takes longer than ``timeout_s``
    is a :class:`~cellexplain.api.errors.RequestTimeoutError` (408)."""
    try:
        async with asyncio.timeout(timeout_s):  # no task per message, as wait_for makes
            return await receive()
    except TimeoutError:
        raise RequestTimeoutError(
            f"the request body stopped arriving for {timeout_s:g} s "
            "(CELLEXPLAIN_HTTP_BODY_TIMEOUT_S): send it without pauses",
            "body",
        ) from None
