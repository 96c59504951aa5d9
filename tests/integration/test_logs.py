"""Logs an on-call engineer can use, from a real server (CELLEXPLAIN_LOG_FORMAT=json): each
door returns the call's request id (the client's, or one generated), and the JSON line written
for a refused call names it, the door, the error, and the model with its version."""

from __future__ import annotations

import json
import time

import grpc
import httpx
import numpy as np
import pytest

from cellexplain.api.codegen import load
from tests.integration.servers import bentoml_server

pytestmark = pytest.mark.integration
pb = load("cellexplain_v1_pb2")
pb_grpc = load("cellexplain_v1_pb2_grpc")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def server(programs_home):
    with bentoml_server(programs_home, {"CELLEXPLAIN_LOG_FORMAT": "json"}) as srv:
        yield srv


def log_lines(
    server, request_id: str, logger: str = "cellexplain.service.failures", timeout: float = 10
) -> list[dict]:
    """The JSON lines ``logger`` wrote for ``request_id`` (waiting for them to be flushed)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = []
        for raw in server.log.read_text().splitlines():
            if raw.startswith("{"):
                line = json.loads(raw)
                if line.get("request_id") == request_id and line["logger"] == logger:
                    lines.append(line)
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def test_rest_returns_the_id_and_logs_the_refusal_with_it(server, pbmc):
    genes = list(pbmc.raw.var_names)
    cells = np.expm1(pbmc.raw.X[:2].toarray()).round().tolist()
    cells[1][3] = -1.0
    body = {"genes": genes, "cells": cells}
    r = httpx.post(f"{server.url}/v1/annotate", json=body, headers={"X-Request-ID": "lab-run-42"})
    assert r.status_code == 400 and r.headers["x-request-id"] == "lab-run-42"
    (line,) = log_lines(server, "lab-run-42")
    assert line["level"] == "INFO" and line["door"] == "rest" and line["status"] == 400
    assert line["error"] == "invalid_argument" and line["field"] == "cells[1][3]"
    assert line["model"] == "pbmc-programs" and line["model_version"]
    # an unknown model is named as sent; without an id, one is made and returned
    r = httpx.post(f"{server.url}/v1/annotate", json={**body, "model": "nope"})
    rid = r.headers["x-request-id"]
    assert r.status_code == 404 and len(rid) == 32
    (line,) = log_lines(server, rid)
    assert line["model"] == "nope" and "model_version" not in line
    # BentoML's access line carries the id too, and the trace id of the request's span
    (access,) = log_lines(server, rid, "bentoml.access")
    assert "status=404" in access["message"] and len(access["trace_id"]) == 32
    # a good call has its id too; the OIP door as well
    ok = httpx.post(f"{server.url}/v1/annotate", json={"genes": genes, "cells": cells[:1]})
    assert ok.status_code == 200 and len(ok.headers["x-request-id"]) == 32
    r = httpx.get(f"{server.url}/v2/models/nope/ready", headers={"X-Request-ID": "oip-1"})
    assert r.status_code == 404 and r.headers["x-request-id"] == "oip-1"


def test_grpc_returns_the_id_in_its_metadata_and_logs_the_refusal(server, pbmc):
    genes = list(pbmc.raw.var_names)
    X = np.expm1(pbmc.raw.X[:2].toarray()).round().astype("<f4")
    X[0, 5] = np.nan
    req = pb.AnnotateRequest(
        genes=genes, dense=pb.DenseMatrix(n_cells=2, raw_le_float32=X.tobytes())
    )
    with grpc.insecure_channel(server.grpc) as ch:
        call = pb_grpc.CellExplainStub(ch).Annotate.with_call
        with pytest.raises(grpc.RpcError) as e:  # under the caller's trace (W3C traceparent)
            meta = [("x-request-id", "grpc-run-7"), ("traceparent", TRACEPARENT)]
            call(req, metadata=meta, timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(e.value.initial_metadata())["x-request-id"] == "grpc-run-7"
        X[0, 5] = 1.0
        good = pb.AnnotateRequest(
            genes=genes, dense=pb.DenseMatrix(n_cells=2, raw_le_float32=X.tobytes())
        )
        res, answered = call(good, timeout=30)
        assert len(res.cells) == 2 and len(dict(answered.initial_metadata())["x-request-id"]) == 32
    (line,) = log_lines(server, "grpc-run-7")
    assert line["door"] == "grpc" and line["error"] == "invalid_argument"
    assert line["model"] == "pbmc-programs" and line["model_version"]
    assert line["trace_id"] == TRACEPARENT.split("-")[1]  # the call's span is the caller's child
