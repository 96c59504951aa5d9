"""gRPC (typed cellexplain.v1) and the Open Inference Protocol (REST /v2 and gRPC) against a
real server, over real channels; OIP through Triton's own client library, which we did not
write."""

from __future__ import annotations

import json
import re

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from tritonclient.utils import InferenceServerException

from cellexplain.api.codegen import load
from tests.integration.servers import bentoml_server

pytestmark = pytest.mark.integration
pb = load("cellexplain_v1_pb2")
pb_grpc = load("cellexplain_v1_pb2_grpc")

MAX_CELLS = 2000
MAX_BYTES = 4 * 1024 * 1024
MODEL = "pbmc-programs"


@pytest.fixture(scope="module")
def server(programs_home):
    home = programs_home
    env = {
        "CELLEXPLAIN_MODELS": MODEL,
        "CELLEXPLAIN_MAX_CELLS_PER_REQUEST": str(MAX_CELLS),
        "CELLEXPLAIN_MAX_BODY_BYTES": str(MAX_BYTES),
    }
    with bentoml_server(home, env) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc) as ch:
        yield pb_grpc.CellExplainStub(ch)


@pytest.fixture(scope="module")
def cells(pbmc):
    raw = pbmc.raw.to_adata()
    return list(raw.var_names), raw.X.toarray().astype(np.float32), list(pbmc.obs_names)


def dense_request(genes, X, raw=True, **options):
    dense = (
        pb.DenseMatrix(n_cells=len(X), raw_le_float32=X.astype("<f4").tobytes())
        if raw
        else pb.DenseMatrix(n_cells=len(X), values=pb.PackedValues(values=X.ravel()))
    )
    return pb.AnnotateRequest(genes=genes, dense=dense, options=pb.AnnotateOptions(**options))


def rest(server, body):
    r = httpx.post(f"{server.url}/v1/annotate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_typed_annotate_equals_rest(server, stub, cells):
    genes, X, ids = cells
    n = 40
    ref = rest(
        server,
        {
            "genes": genes,
            "cells": X[:n].tolist(),
            "cell_ids": ids[:n],
            "attributions": "full",
            "return_probabilities": True,
        },
    )
    for raw in (True, False):
        req = dense_request(
            genes, X[:n], raw=raw, attributions=pb.ATTRIBUTIONS_FULL, return_probabilities=True
        )
        req.cell_ids.extend(ids[:n])
        res = stub.Annotate(req)
        assert res.model == MODEL and res.input_kind == ref["input_kind"]
        assert res.gene_matching.n_found == 765
        assert [c.id for c in res.cells] == ids[:n]
        assert [c.label for c in res.cells] == [c["label"] for c in ref["cells"]]
        np.testing.assert_allclose(
            [c.confidence for c in res.cells], [c["confidence"] for c in ref["cells"]], rtol=1e-6
        )
        np.testing.assert_allclose(
            np.array([list(c.attributions) for c in res.cells]),
            np.array([c["attributions"] for c in ref["cells"]]),
            rtol=1e-5,
            atol=1e-7,
        )
        assert dict(res.cells[0].probabilities).keys() == ref["cells"][0]["probabilities"].keys()


def test_typed_top_genes_sparse_and_options(stub, server, cells):
    genes, X, _ = cells
    ref = rest(server, {"genes": genes, "cells": X[:5].tolist(), "top_k": 3})
    res = stub.Annotate(dense_request(genes, X[:5], top_k=3))
    for c, r in zip(res.cells, ref["cells"], strict=True):
        assert [g.gene for g in c.top_genes] == [g["gene"] for g in r["top_genes"]]
        assert [p.program for p in c.program_attributions] == [
            p["program"] for p in r["program_attributions"]
        ]
        assert c.free_units_attribution == pytest.approx(r["free_units_attribution"], rel=1e-5)
    sparse = pb.SparseCells(
        cells=[
            pb.SparseCell(values={g: float(v) for g, v in zip(genes, row, strict=True) if v})
            for row in X[:5]
        ]
    )
    res_sparse = stub.Annotate(pb.AnnotateRequest(sparse=sparse))
    assert [c.label for c in res_sparse.cells] == [c.label for c in res.cells]
    target = stub.Annotate(dense_request(genes, X[:3], target="CD56+ NK"))
    assert {c.explained_class for c in target.cells} == {"CD56+ NK"}
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [m.name for m in models] == [MODEL] and models[0].default
    card = stub.GetModel(pb.GetModelRequest(name=MODEL))
    assert '"genes"' in card.card_json and card.providers[0] == "CPUExecutionProvider"


def worker_peak_rss_kb(server) -> int:
    """Peak resident memory (VmHWM) summed over the server's processes."""
    from pathlib import Path

    total = 0
    pids = [p.name for p in Path("/proc").iterdir() if p.name.isdigit()]
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            stat = Path(f"/proc/{pid}/stat").read_text().split()
        except OSError:
            continue
        if int(stat[4]) != server.proc.pid:  # process group of the server
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total


def test_stream_thousands_of_cells_with_bounded_memory(stub, server, cells):
    genes, X, _ = cells

    def chunks(repeats: int, size: int = 250):
        data = np.tile(X, (repeats, 1))
        for start in range(0, len(data), size):
            first = start == 0
            yield pb.AnnotateRequest(
                genes=genes if first else [],
                options=pb.AnnotateOptions(top_k=2) if first else None,
                dense=pb.DenseMatrix(
                    n_cells=len(data[start : start + size]),
                    raw_le_float32=data[start : start + size].tobytes(),
                ),
                cell_ids=[f"c{start + i}" for i in range(len(data[start : start + size]))],
            )

    small = list(stub.AnnotateStream(chunks(2)))
    assert sum(len(r.cells) for r in small) == 1400
    peak_small = worker_peak_rss_kb(server)
    big = stub.AnnotateStream(chunks(10))
    got = [c.id for r in big for c in r.cells]
    assert got == [f"c{i}" for i in range(7000)]  # every cell, in order
    peak_big = worker_peak_rss_kb(server)
    # 5x the cells through one call: the peak grows by far less than the data would need
    # (7000 cells x 765 genes x float32 x several copies would be >100 MB)
    assert peak_big - peak_small < 60_000, (peak_small, peak_big)


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.grpc) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for name in ("", "cellexplain.v1.CellExplain", "inference.GRPCInferenceService"):
            res = health.Check(health_pb2.HealthCheckRequest(service=name))
            assert res.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(ch).get_services())
        assert {
            "cellexplain.v1.CellExplain",
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
        } <= services


def test_grpc_errors_map_to_status_codes(stub, cells):
    genes, X, _ = cells

    def code(req):
        with pytest.raises(grpc.RpcError) as e:
            stub.Annotate(req)
        return e.value.code(), e.value.details()

    c, msg = code(dense_request(["cd3e", "Cd3e"], np.ones((1, 2), np.float32)))
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "duplicated gene" in msg
    c, msg = code(dense_request(genes, X[:2], model="nope"))
    assert c == grpc.StatusCode.NOT_FOUND and "unknown model" in msg
    bad = dense_request(genes, X[:2])
    bad.dense.n_cells = 3
    c, msg = code(bad)
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "n_cells x genes" in msg
    nan = X[:1].copy()
    nan[0, 5] = np.nan
    c, msg = code(dense_request(genes, nan))
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "NaN" in msg and "cells[0][5]" in msg
    c, msg = code(dense_request(genes[:2], np.ones((MAX_CELLS + 1, 2), np.float32)))
    assert c == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in msg
    c, msg = code(dense_request(genes, np.ones((MAX_CELLS, 765), np.float32)))  # 6.1 MB > 4 MiB
    assert c == grpc.StatusCode.RESOURCE_EXHAUSTED
    c, msg = code(pb.AnnotateRequest(genes=genes))
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "dense or sparse" in msg
    c, msg = code(dense_request(genes, X[:1], unassigned_threshold=2.0))
    assert c == grpc.StatusCode.INVALID_ARGUMENT and "unassigned_threshold" in msg


def test_stream_error_names_the_chunk(stub, cells):
    genes, X, _ = cells

    def chunks():
        yield dense_request(genes, X[:10])
        bad = X[10:20].copy()
        bad[2, 3] = -1
        yield pb.AnnotateRequest(dense=pb.DenseMatrix(n_cells=10, raw_le_float32=bad.tobytes()))

    with pytest.raises(grpc.RpcError) as e:
        list(stub.AnnotateStream(chunks()))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "chunk 1" in e.value.details() and "negative" in e.value.details()


def test_grpc_calls_are_timed_by_method_and_code(server):
    """Runs after the calls above: the timing interceptor saw successful and refused calls,
    unary and streaming."""
    text = httpx.get(f"{server.url}/metrics").text
    counts = {}
    for line in text.splitlines():
        m = re.match(r"cellexplain_grpc_request_seconds_count\{(.*)\} (\S+)", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            counts[(labels["method"], labels["code"])] = float(m.group(2))
    assert counts[("Annotate", "OK")] >= 2
    assert counts[("Annotate", "INVALID_ARGUMENT")] >= 5
    assert counts[("Annotate", "NOT_FOUND")] >= 1
    assert counts[("AnnotateStream", "OK")] >= 1
    assert counts[("AnnotateStream", "INVALID_ARGUMENT")] >= 1
    assert not [k for k in counts if k[0] == "Check"]  # health checks are not counted


# -- Open Inference Protocol, through tritonclient ----------------------------------------------


@pytest.fixture(scope="module")
def triton_http(server):
    return thttp.InferenceServerClient(server.url.removeprefix("http://"))


@pytest.fixture(scope="module")
def triton_grpc(server):
    return tgrpc.InferenceServerClient(server.grpc)


def test_oip_metadata_and_health(triton_http, triton_grpc):
    assert triton_http.is_server_live() and triton_http.is_server_ready()
    assert triton_grpc.is_server_live() and triton_grpc.is_server_ready()
    assert triton_http.is_model_ready(MODEL) and triton_grpc.is_model_ready(MODEL)
    assert triton_http.get_server_metadata()["name"] == "cellexplain"
    assert triton_grpc.get_server_metadata().name == "cellexplain"
    md_http = triton_http.get_model_metadata(MODEL)
    md_grpc = triton_grpc.get_model_metadata(MODEL)
    assert md_http["inputs"][0] == {"name": "x", "datatype": "FP32", "shape": [-1, 765]}
    assert [i.name for i in md_grpc.inputs] == ["x", "target"]
    assert list(md_grpc.inputs[0].shape) == [-1, 765]
    names = [o["name"] for o in md_http["outputs"]]
    assert names == [o.name for o in md_grpc.outputs]
    assert {"probabilities", "attributions", "labels", "program_attributions"} <= set(names)


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_oip_infer_equals_rest(transport, triton_http, triton_grpc, server, cells):
    genes, X, _ = cells
    n = 30
    ref = rest(
        server,
        {
            "genes": genes,
            "cells": X[:n].tolist(),
            "input": "log1p_cp10k",
            "attributions": "full",
            "return_probabilities": True,
        },
    )
    mod = thttp if transport == "http" else tgrpc
    client = triton_http if transport == "http" else triton_grpc
    x = mod.InferInput("x", [n, 765], "FP32")
    x.set_data_from_numpy(X[:n])
    outs = [mod.InferRequestedOutput(name) for name in ("probabilities", "attributions", "labels")]
    res = client.infer(MODEL, [x], outputs=outs)
    labels = [s.decode() for s in res.as_numpy("labels")]
    assert labels == [c["label"] for c in ref["cells"]]
    np.testing.assert_allclose(
        res.as_numpy("attributions"),
        np.array([c["attributions"] for c in ref["cells"]]),
        rtol=1e-5,
        atol=1e-7,
    )
    probs = res.as_numpy("probabilities")
    np.testing.assert_allclose(probs.max(1), [c["confidence"] for c in ref["cells"]], rtol=1e-6)
    # an explicit target class, and all outputs when none are named
    t = mod.InferInput("target", [1], "INT64")
    t.set_data_from_numpy(np.array([6], dtype=np.int64))
    res_all = client.infer(MODEL, [x, t])
    assert (res_all.as_numpy("explained_class") == 6).all()
    assert res_all.as_numpy("program_attributions").shape[0] == n
    if transport == "http":  # JSON (non-binary) outputs too
        r = client.infer(
            MODEL, [x], outputs=[thttp.InferRequestedOutput("labels", binary_data=False)]
        )
        assert [s.decode() if isinstance(s, bytes) else s for s in r.as_numpy("labels")] == labels


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_oip_errors(transport, triton_http, triton_grpc, cells):
    _, X, _ = cells
    mod = thttp if transport == "http" else tgrpc
    client = triton_http if transport == "http" else triton_grpc
    x = mod.InferInput("x", [2, 765], "FP32")
    x.set_data_from_numpy(X[:2])
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("nope", [x])
    short = mod.InferInput("x", [2, 10], "FP32")
    short.set_data_from_numpy(X[:2, :10])
    with pytest.raises(InferenceServerException, match=r"shape \[n, 765\]"):
        client.infer(MODEL, [short])
    with pytest.raises(InferenceServerException, match="unknown output"):
        client.infer(MODEL, [x], outputs=[mod.InferRequestedOutput("embeddings")])
    twice = [mod.InferRequestedOutput("labels"), mod.InferRequestedOutput("labels")]
    with pytest.raises(InferenceServerException, match="asked for twice: 'labels'"):
        client.infer(MODEL, [x], outputs=twice)
    neg = mod.InferInput("x", [1, 765], "FP32")
    neg.set_data_from_numpy(-np.ones((1, 765), np.float32))
    with pytest.raises(InferenceServerException, match="negative"):
        client.infer(MODEL, [neg])


def test_oip_rest_json_error_format(server):
    r = httpx.post(
        f"{server.url}/v2/models/{MODEL}/infer",
        json={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 765], "data": [0.0] * 10}]},
    )
    assert r.status_code == 400
    assert "needs 765 values, got 10" in r.json()["error"]
    r = httpx.get(f"{server.url}/v2/models/nope")
    assert r.status_code == 404 and "unknown model" in r.json()["error"]
    r = httpx.get(f"{server.url}/v2/models/{MODEL}/versions/7/ready")
    assert r.status_code == 400 and "version" in r.json()["error"]


def test_oip_rest_binary_choices_follow_the_binary_tensor_extension(server, cells):
    """``binary_data_output`` is the default for every output without its own ``binary_data``
    (listed or not); an output's own choice wins; the binary outputs decode to the JSON ones."""
    _, X, _ = cells
    x = X[:3]
    url = f"{server.url}/v2/models/{MODEL}/infer"
    inputs = [{"name": "x", "datatype": "FP32", "shape": [3, 765], "data": x.ravel().tolist()}]
    plain = httpx.post(url, json={"inputs": inputs, "outputs": [{"name": "probabilities"}]})
    assert plain.status_code == 200
    want = np.array(plain.json()["outputs"][0]["data"], dtype=np.float32).reshape(3, -1)
    body = {
        "inputs": inputs,
        "parameters": {"binary_data_output": True},
        "outputs": [
            {"name": "probabilities"},  # no choice of its own: the request's default (binary)
            {"name": "labels", "parameters": {"binary_data": False}},  # its own choice
        ],
    }
    r = httpx.post(url, json=body)
    assert r.status_code == 200, r.text
    n = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:n])
    probs, labels = head["outputs"]
    assert probs["name"] == "probabilities" and "data" not in probs
    size = probs["parameters"]["binary_data_size"]
    assert n + size == len(r.content)
    got = np.frombuffer(r.content[n : n + size], dtype="<f4").reshape(3, -1)
    np.testing.assert_array_equal(got, want)
    assert labels["name"] == "labels" and len(labels["data"]) == 3
