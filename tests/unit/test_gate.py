"""The gate (:mod:`cellexplain.service.gate`) in-process, in front of a small ASGI app that
reads the body it is given and answers its length: every rule, and the API whose error body
each path gets."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from cellexplain.api.errors import ServiceError
from cellexplain.service.failures import http_response
from cellexplain.service.gate import MAX_HEADERS, Gate, check_head, door_of
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
