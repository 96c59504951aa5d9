"""The gate: the first thing every HTTP request meets, on the whole server (BentoML's own
routes ``/`` and ``/docs.json`` included), before any body is read.

* a head of more than :data:`MAX_HEADERS` fields or :data:`MAX_HEADER_BYTES` is refused (431),
  a header value that is not UTF-8, a compressed body, or a header of :data:`SINGLE_HEADERS`
  given twice (400);
* with ``CELLEXPLAIN_API_KEYS`` set, every path but the probes and ``/metrics`` needs a key
  (401);
* bodies over the limit are refused with 413 before they are read into memory (``.h5ad``
  uploads have ``max_h5ad_bytes``, everything else ``max_body_bytes``), and while they arrive;
* a body that stops arriving for ``http_body_timeout_s``, or that averages less than
  ``http_body_min_rate`` bytes a second over any such window, gets 408;
* a worker holding ``max_inflight_bytes`` of bodies answers 503 with ``Retry-After`` (type
  ``overloaded``). Bytes are held as they arrive; a head is also weighed against what the
  declared bodies still arriving have yet to send, as far as each one's pace bears it out
  (:class:`Pending`), so under a burst a request is refused before its body is read, while a
  trickled body holds no more than it trickles.

Errors use the body of the API the path belongs to: ``/v2`` (Open Inference Protocol) gets
``{"error": message}``, everything else ``/v1``'s ``{"error": {type, field, message}}``.
"""

from __future__ import annotations

import time
from collections import Counter

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cellexplain.api.errors import (
    HeadersTooLargeError,
    InvalidInputError,
    OverloadedError,
    RequestTimeoutError,
    ServiceError,
    TooLargeError,
    brief,
)
from cellexplain.service import auth, http_timeouts
from cellexplain.service.failures import http_response
from cellexplain.service.settings import Settings

#: a request head's bounds: h11 bounds only a head that is still incomplete, so ~128 KiB in
#: one read (thousands of small fields, ~3 MB of Python objects) reaches the app; refused here
MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024
#: headers that must not be given twice (one would be read, silently; a proxy might read the
#: other)
SINGLE_HEADERS = (
    b"inference-header-content-length",
    b"content-encoding",
    b"authorization",
    b"x-api-key",
)


#: what a declared body has yet to send counts whole while it is young (its first
#: :data:`YOUNG_S`, once a first read of :data:`STARTED_BYTES` has come: a burst's heads all
#: come before their bodies), then at most as what it would send in :data:`HORIZON_S` at the
#: pace it has kept since its head: a burst's bodies, arriving at full speed, count whole,
#: while a connection that declares a large body and trickles it holds what it trickles
YOUNG_S = 0.25
STARTED_BYTES = 64 * 1024
HORIZON_S = 2.0


class Pending:
    """A body being received: the bytes its Content-Length still promises (0 for a chunked
    body or an upload), what it sent and since when, and its current pace window (its start,
    what came in it)."""

    __slots__ = ("left", "sent", "since", "window_sent", "window_start")

    def __init__(self, declared: int) -> None:
        self.left = declared
        self.sent = 0
        self.since = self.window_start = time.monotonic()
        self.window_sent = 0

    def arrived(self, n: int) -> None:
        self.left = max(0, self.left - n)
        self.sent += n
        self.window_sent += n

    def keep_pace(self, min_rate: int, window_s: float) -> None:
        """Refuse (408) a body that sent less than ``min_rate`` bytes a second over the
        ``window_s`` window just ended (checked as each piece comes; the window then starts
        again)."""
        now = time.monotonic()
        elapsed = now - self.window_start
        if elapsed < window_s:
            return
        if self.window_sent < min_rate * elapsed:
            raise RequestTimeoutError(
                f"the request body arrived at {self.window_sent / elapsed:.0f} bytes/s over the "
                f"last {elapsed:.0f} s, below CELLEXPLAIN_HTTP_BODY_MIN_RATE "
                f"({min_rate} bytes/s): send it at once",
                "body",
            )
        self.window_start, self.window_sent = now, 0

    def expected(self, now: float) -> int:
        """What it counts for now: its whole promise while young and started, then as far as
        its pace bears it out."""
        age = now - self.since
        if age < YOUNG_S and self.sent >= min(STARTED_BYTES, self.sent + self.left):
            return self.left
        pace = self.sent / max(age, YOUNG_S)
        return min(self.left, int(pace * HORIZON_S))


def door_of(path: str) -> str:
    """The API a path belongs to: ``oip-rest`` under ``/v2``, otherwise ``rest``."""
    return "oip-rest" if path == "/v2" or path.startswith("/v2/") else "rest"


class Gate:
    """ASGI middleware enforcing the module's rules on ``app``, with ``settings``' limits."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.keys = settings.api_keys
        self.max_bytes = settings.max_body_bytes
        self.max_h5ad_bytes = settings.max_h5ad_bytes
        self.body_timeout_s = settings.http_body_timeout_s
        self.min_rate = settings.http_body_min_rate
        self.inflight_limit = settings.inflight_bytes
        #: bytes of request bodies received and not yet answered, in this worker
        self.inflight = 0
        #: the bodies being received, with what they have still to send
        self.pending: set[Pending] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        try:
            raw_headers = scope.get("headers") or []
            check_head(raw_headers)
            headers = decode_headers(raw_headers)
            if self.keys and path not in auth.OPEN_PATHS:
                auth.check(self.keys, headers.get("authorization"), headers.get("x-api-key"))
            h5ad = path.endswith("/annotate/h5ad")
            limit, setting = (
                (self.max_h5ad_bytes, "CELLEXPLAIN_MAX_H5AD_BYTES")
                if h5ad
                else (self.max_bytes, "CELLEXPLAIN_MAX_BODY_BYTES")
            )
            declared = headers.get("content-length", "")
            known = declared.isascii() and declared.isdigit()
            # leading zeros are allowed (h11 takes 20 digits); more than 18 significant digits
            # is more than any limit, without asking int() to read them
            size = int(declared) if known and len(declared.lstrip("0")) <= 18 else 1 << 62
            if known and size > limit:
                raise too_large(size, limit, setting)
            # what the body may hold in memory while it is parsed and answered; uploads are
            # spooled to disk. A request alone is always admitted, so any body within the
            # limit can be served
            chunked = "chunked" in headers.get("transfer-encoding", "").lower()
            body = 0 if h5ad else (size if known else (limit if chunked else 0))
            holding = self.inflight + self.pending_bytes()
            if body and holding and holding + body > self.inflight_limit:
                raise self._busy(body, holding)
        except ServiceError as e:
            await http_response(door_of(path), e)(scope, receive, send)
            return
        # what a declared body has still to send counts from its head, as far as its pace
        # bears it out (heads after it are weighed against it, and refused before their bodies
        # are read); counted only as they arrived, a burst passed its heads together and was
        # refused piece by piece, seconds later
        pending = Pending(size if known and not h5ad else 0)
        self.pending.add(pending)
        received = held = 0
        more_body = True

        async def limited() -> Message:
            nonlocal received, more_body, held
            if more_body:  # each piece of the body within the timeout of the one before
                message = await http_timeouts.receive_with_timeout(receive, self.body_timeout_s)
            else:  # after the body: a wait for the client to go away, not timed
                message = await receive()
            if message["type"] == "http.request":
                more_body = bool(message.get("more_body", False))
                piece = len(message.get("body", b""))
                received += piece
                if received > limit:
                    raise too_large(received, limit, setting)
                pending.arrived(piece)  # an upload's promise is 0: it only keeps its pace
                if more_body and self.min_rate:
                    pending.keep_pace(self.min_rate, self.body_timeout_s)
                if not h5ad and piece:  # held bytes are counted as they arrive
                    others = self.inflight - held  # a request alone is always admitted
                    if others and self.inflight + piece > self.inflight_limit:
                        raise self._busy(piece)
                    held += piece
                    self.inflight += piece
            return message

        try:
            await self.app(scope, limited, send)
        finally:
            self.inflight -= held
            self.pending.discard(pending)

    def pending_bytes(self) -> int:
        """What the declared bodies now arriving have still to send, each as far as its pace
        bears it out (:meth:`Pending.expected`)."""
        now = time.monotonic()
        return sum(p.expected(now) for p in self.pending)

    def _busy(self, more: int, held: int | None = None) -> OverloadedError:
        held = self.inflight if held is None else held
        return OverloadedError(
            f"this worker holds {held} bytes of request bodies; {more} more would pass "
            f"CELLEXPLAIN_MAX_INFLIGHT_BYTES ({self.inflight_limit}): retry shortly",
            retry_after_s=1,
            field="body",
        )


def check_head(raw: list[tuple[bytes, bytes]]) -> None:
    """Refuse a head of more than :data:`MAX_HEADERS` fields or :data:`MAX_HEADER_BYTES`
    (431), a compressed body (no Content-Encoding is supported) and a header of
    :data:`SINGLE_HEADERS` given twice (400)."""
    size = sum(len(k) + len(v) for k, v in raw)
    if len(raw) > MAX_HEADERS or size > MAX_HEADER_BYTES:
        raise HeadersTooLargeError(
            f"the request has {len(raw)} header fields of {size} bytes in all; the limits are "
            f"{MAX_HEADERS} fields and {MAX_HEADER_BYTES} bytes",
            "headers",
        )
    names = Counter(k.lower() for k, _ in raw)
    for name in SINGLE_HEADERS:
        if names[name] > 1:
            raise InvalidInputError(f"header {name.decode()} is given more than once", "headers")
    for k, v in raw:
        if k.lower() == b"content-encoding" and v.strip().lower() not in (b"", b"identity"):
            raise InvalidInputError(
                f"Content-Encoding {brief(v.decode('latin-1'))} is not supported: send the "
                "body uncompressed",
                "headers",
            )


def decode_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Header names (lower case) to values, refusing (400) a value that is not UTF-8."""
    headers: dict[str, str] = {}
    for k, v in raw:
        name = k.decode("latin-1").lower()
        try:
            headers[name] = v.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInputError(f"header {brief(name)} is not UTF-8 text", "headers") from None
    return headers


def too_large(n: int, limit: int, setting: str) -> TooLargeError:
    return TooLargeError(
        f"request body of {n} bytes exceeds the limit of {limit} bytes ({setting}); "
        "split the request",
        "body",
    )
