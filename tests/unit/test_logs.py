"""Request ids and JSON log lines (service/logs.py), without a server."""

from __future__ import annotations

import asyncio
import json
import logging

from cellexplain.service import logs


def test_a_well_formed_id_is_kept_anything_else_replaced():
    assert logs.accept_id("abc-123_x.y:z/1+2=") == "abc-123_x.y:z/1+2="
    for bad in (None, "", "has space", "x" * 129, "line\nbreak", "é"):
        new = logs.accept_id(bad)
        assert new != bad and len(new) == 32 and int(new, 16) >= 0


def test_json_lines_carry_the_calls_id_and_model():
    record = logging.LogRecord(
        "cellexplain.x", logging.INFO, __file__, 1, "refused %s", ("it",), None
    )
    record.door, record.error, record.status = "rest", "invalid_input", 400
    logs.REQUEST_ID.set("req-1")
    logs.MODEL.set(("pbmc-programs", "v3"))
    try:
        assert logs.CallContext().filter(record)
    finally:
        logs.REQUEST_ID.set(None)
        logs.MODEL.set(None)
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["message"] == "refused it" and line["level"] == "INFO"
    assert line["request_id"] == "req-1"
    assert (line["model"], line["model_version"]) == ("pbmc-programs", "v3")
    assert (line["door"], line["error"], line["status"]) == ("rest", "invalid_input", 400)
    assert line["ts"].endswith("Z") and "T" in line["ts"]
    # outside a call: no id, no model (absent, not null)
    bare = logging.LogRecord("x", logging.WARNING, __file__, 1, "plain", (), None)
    logs.CallContext().filter(bare)
    assert set(json.loads(logs.JsonFormatter().format(bare))) == {
        "ts",
        "level",
        "logger",
        "message",
    }


def test_the_middleware_returns_the_id_and_scopes_it_to_the_request():
    seen: list[str | None] = []

    async def app(scope, receive, send):
        seen.append(logs.REQUEST_ID.get())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-request-id", b"spoofed")]})  # fmt: skip
        await send({"type": "http.response.body", "body": b""})

    async def call(headers: list[tuple[bytes, bytes]]) -> dict:
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "headers": headers}
        await logs.RequestIdMiddleware(app)(scope, None, send)
        return dict(sent[0]["headers"])

    got = asyncio.run(call([(b"x-request-id", b"client-7")]))
    assert got[b"x-request-id"] == b"client-7" and seen[-1] == "client-7"
    got = asyncio.run(call([(b"x-request-id", b"bad id")]))
    assert got[b"x-request-id"] != b"bad id" and len(got[b"x-request-id"]) == 32
    assert logs.REQUEST_ID.get() is None  # nothing leaks out of the request
