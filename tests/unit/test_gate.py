"""The gate (:mod:`cellexplain.service.gate`) in-process, in front of a small ASGI app that
reads the body it is given and answers its length: every rule, and the API whose error body
each path gets."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send

from cellexplain.api.errors import ServiceError
from cellexplain.service import gate as gate_module
from cellexplain.service.failures import http_response
from cellexplain.service.gate import (
    HORIZON_S,
    MAX_HEADERS,
    STARTED_BYTES,
    YOUNG_S,
    Gate,
    Pending,
    check_head,
    door_of,
)
from cellexplain.service.settings import Settings

KEY = "a-secret-key"
LIMIT, H5AD_LIMIT = 2048, 8192


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the whole body (as the API's routes do), then answers its length; an error the
    gate raises while the body is read is answered as the API's handlers answer it."""
    n, more = 0, True
    try:
        while more:
            message = await receive()
            n += len(message.get("body", b""))
            more = message.get("more_body", False)
    except ServiceError as e:
        await http_response(door_of(scope["path"]), e)(scope, receive, send)
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(n).encode()})


def call(gate: Gate, method: str, path: str, **kw) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(gate)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.request(method, path, **kw)

    return asyncio.run(go())


@pytest.fixture
def gate() -> Gate:
    return Gate(echo, Settings(max_body_bytes=LIMIT, max_h5ad_bytes=H5AD_LIMIT))


def test_bodies_within_the_limit_pass_and_larger_ones_are_refused(gate):
    assert call(gate, "POST", "/v1/annotate", content=b"x" * LIMIT).text == str(LIMIT)
    r = call(gate, "POST", "/v1/annotate", content=b"x" * (LIMIT + 1))
    assert r.status_code == 413
    assert r.json()["error"]["field"] == "body"
    assert "CELLEXPLAIN_MAX_BODY_BYTES" in r.json()["error"]["message"]
    # uploads have their own limit
    assert call(gate, "POST", "/v1/annotate/h5ad", content=b"x" * 4000).text == "4000"
    r = call(gate, "POST", "/v1/annotate/h5ad", content=b"x" * (H5AD_LIMIT + 1))
    assert r.status_code == 413 and "CELLEXPLAIN_MAX_H5AD_BYTES" in r.text


def test_a_chunked_body_is_counted_as_it_arrives(gate):
    async def pieces():
        yield b"x" * 1200
        yield b"x" * 1200

    r = call(gate, "POST", "/v1/annotate", content=pieces())
    assert r.status_code == 413, r.text


def test_oip_paths_get_the_oip_error_body(gate):
    r = call(gate, "POST", "/v2/models/m/infer", content=b"x" * (LIMIT + 1))
    assert r.status_code == 413
    assert set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
    assert door_of("/v2") == door_of("/v2/health/ready") == "oip-rest"
    assert door_of("/v1/models") == door_of("/v2x") == door_of("/") == "rest"


def test_heads_are_bounded_and_checked(gate):
    many = {f"x-h{i}": "v" for i in range(MAX_HEADERS + 1)}
    assert call(gate, "GET", "/v1/models", headers=many).status_code == 431
    r = call(gate, "GET", "/v1/models", headers={"x-name": "caf\xe9".encode("latin-1")})
    assert r.status_code == 400 and "not UTF-8" in r.text
    r = call(gate, "POST", "/v1/annotate", content=b"{}", headers={"content-encoding": "gzip"})
    assert r.status_code == 400 and "Content-Encoding" in r.text
    with pytest.raises(Exception, match="x-api-key is given more than once"):
        check_head([(b"x-api-key", b"a"), (b"X-Api-Key", b"b")])


def test_api_keys_guard_everything_but_the_probes():
    gate = Gate(echo, Settings(api_keys=[KEY]))
    r = call(gate, "GET", "/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert call(gate, "GET", "/v1/models", headers={"x-api-key": "wrong"}).status_code == 401
    assert call(gate, "GET", "/v1/models", headers={"x-api-key": KEY}).status_code == 200
    auth = {"authorization": f"Bearer {KEY}"}
    assert call(gate, "GET", "/docs.json", headers=auth).status_code == 200
    for open_path in ("/livez", "/readyz", "/metrics", "/v2/health/ready"):
        assert call(gate, "GET", open_path).status_code == 200, open_path


def test_a_busy_worker_refuses_more_bodies_with_retry_after():
    gate = Gate(echo, Settings(max_body_bytes=LIMIT, max_inflight_bytes=3000))
    gate.inflight = 2000  # another request's body, held
    r = call(gate, "POST", "/v1/annotate", content=b"x" * 1200)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert "CELLEXPLAIN_MAX_INFLIGHT_BYTES" in r.text
    gate.inflight = 0  # a request alone is always admitted
    assert call(gate, "POST", "/v1/annotate", content=b"x" * LIMIT).text == str(LIMIT)
    assert gate.inflight == 0  # released when answered


def test_what_a_pending_body_counts_for():
    """Pending.expected: nothing before its first read; its whole promise while young once
    started; then what its pace would bring in HORIZON_S."""
    p = Pending(10 * STARTED_BYTES)
    assert p.expected(p.since) == 0  # a head alone holds nothing
    p.arrived(STARTED_BYTES)
    assert p.expected(p.since + 0.01) == 9 * STARTED_BYTES  # young and started: all of it
    later = p.since + 2 * YOUNG_S  # STARTED_BYTES in 0.5 s, kept up for HORIZON_S
    assert p.expected(later) == int(STARTED_BYTES / (2 * YOUNG_S) * HORIZON_S)
    trickled = Pending(64 << 20)
    trickled.arrived(10)
    assert trickled.expected(trickled.since + 0.01) == 10 / YOUNG_S * HORIZON_S  # not started
    assert trickled.expected(trickled.since + 10) == 2  # 1 byte a second, for 2 s


@pytest.mark.parametrize("first", ["burst", "trickle"])
def test_a_declared_body_counts_from_its_head_as_far_as_its_pace_bears_it_out(first, monkeypatch):
    """Under a burst the heads come before the bodies: what a Content-Length still promises
    counts at once for a body arriving at full speed, so the next request is refused at its
    head (its body never read), not piece by piece. A body trickled a byte at a time counts
    what it trickles, not what it declares: it blocks nobody."""
    monkeypatch.setattr(gate_module, "STARTED_BYTES", 100)  # bodies here are of 2 KiB at most
    gate = Gate(echo, Settings(max_body_bytes=LIMIT, max_inflight_bytes=3000))

    async def go() -> tuple[list[Message], list[Message], int]:
        go_on = asyncio.Event()
        pieces = [b"x" * 200, b"x" * 1600] if first == "burst" else [b"x"] * 4 + [b"x" * 1796]

        async def first_receive() -> Message:  # its last piece arrives only when told
            if len(pieces) == 1:
                await go_on.wait()
            elif first == "trickle":
                await asyncio.sleep(0.1)
            body = pieces.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(pieces)}

        def scope(n: int) -> Scope:
            headers = [(b"content-length", str(n).encode())]
            return {"type": "http", "method": "POST", "path": "/v1/annotate", "headers": headers}

        answers: list[Message] = []
        second: list[Message] = []
        read = [0]

        async def counted_receive() -> Message:
            read[0] += 1
            return {"type": "http.request", "body": b"y" * 1500, "more_body": False}

        async def keep(out: list[Message], m: Message) -> None:
            out.append(m)

        task = asyncio.create_task(gate(scope(1800), first_receive, lambda m: keep(answers, m)))
        while len(pieces) > 1:  # the first body is on its way, its last piece not yet here
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        if first == "burst":  # started (200 bytes) and young: all 1600 left are expected
            assert gate.inflight == 200 and gate.pending_bytes() == 1600
        else:  # 4 bytes in 0.4 s: 10 bytes a second is all it holds
            assert gate.inflight == 4 and gate.pending_bytes() <= 20
        await gate(scope(1500), counted_receive, lambda m: keep(second, m))
        go_on.set()
        await task
        return answers, second, read[0]

    answers, second, second_reads = asyncio.run(go())
    if first == "trickle":
        assert second[0]["status"] == 200 and second_reads == 1
    else:
        assert second[0]["status"] == 503 and second_reads == 0
        assert b"CELLEXPLAIN_MAX_INFLIGHT_BYTES" in second[1]["body"]
        assert b'"type":"overloaded"' in second[1]["body"].replace(b" ", b"")
    assert answers[0]["status"] == 200 and answers[1]["body"] == b"1800"
    assert gate.inflight == 0 and not gate.pending


def test_a_chunked_body_counts_as_it_arrives():
    """Without a Content-Length the head is weighed as a whole body of the limit, and the
    pieces count as they come: another body arriving meanwhile can fill the worker."""
    gate = Gate(echo, Settings(max_body_bytes=LIMIT, max_inflight_bytes=3100))
    gate.inflight = 1000  # another request's body, held: 1000 + 2048 passes the head

    async def pieces():
        yield b"x" * 500
        gate.inflight += 1500  # a third request's body arrives meanwhile
        yield b"x" * 200  # 3000 + 200 passes the bound

    r = call(gate, "POST", "/v1/annotate", content=pieces())
    assert r.status_code == 503 and "CELLEXPLAIN_MAX_INFLIGHT_BYTES" in r.text
    assert gate.inflight == 2500  # its own bytes released, the others' held


@pytest.mark.parametrize("bytes_per_piece, status", [(10, 408), (200, 200)])
def test_a_body_below_the_minimum_rate_over_a_window_is_a_408(bytes_per_piece, status):
    """Each piece within the timeout of the one before is not enough: a body must also average
    http_body_min_rate over each http_body_timeout_s window (a large first piece then a byte
    now and then held its share of the budget indefinitely)."""
    gate = Gate(
        echo,
        Settings(max_body_bytes=LIMIT, http_body_timeout_s=0.2, http_body_min_rate=1000),
    )

    async def pieces():
        for _ in range(10):  # 0.5 s: 200 or 4,000 bytes a second
            yield b"x" * bytes_per_piece
            await asyncio.sleep(0.05)

    r = call(gate, "POST", "/v1/annotate", content=pieces())
    assert r.status_code == status, r.text
    if status == 408:
        assert r.json()["error"]["field"] == "body"
        assert "CELLEXPLAIN_HTTP_BODY_MIN_RATE" in r.json()["error"]["message"]
    else:
        assert r.text == str(10 * bytes_per_piece)
    assert gate.inflight == 0
