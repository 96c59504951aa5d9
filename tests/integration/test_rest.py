"""The REST service as served: a real `bentoml serve` process, called over HTTP with real PBMC
cells, for what needs the process (uploads, read in a child process; the probes, batching
across workers and metrics). The API itself is tested in-process: tests/unit/test_rest_api.py."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.conftest import assert_error as _err
from tests.integration.servers import bentoml_server, import_into_store

pytestmark = pytest.mark.integration

MAX_CELLS = 400
MAX_BODY = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def server(programs_home, linear_model):
    import_into_store(linear_model, programs_home)
    env = {
        "CELLEXPLAIN_MODELS": "pbmc-programs,pbmc-linear",
        "CELLEXPLAIN_WORKERS": "2",
        "CELLEXPLAIN_MAX_CELLS_PER_REQUEST": str(MAX_CELLS),
        "CELLEXPLAIN_MAX_BODY_BYTES": str(MAX_BODY),
        "CELLEXPLAIN_INTRA_OP_THREADS": "1",
    }
    with bentoml_server(programs_home, env) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def cells(pbmc):
    raw = pbmc.raw.to_adata()
    return list(raw.var_names), raw.X.toarray().astype(np.float32), list(pbmc.obs_names)


def test_probes_and_the_api_behind_bentoml(client):
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert [m["name"] for m in client.get("/v1/models").json()["models"]] == [
        "pbmc-programs",
        "pbmc-linear",
    ]
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["field"] == "model"
    # BentoML's own pages stay BentoML's
    assert client.get("/").status_code == 200 and client.get("/nope").status_code == 404


def test_batching_merges_concurrent_requests_and_metrics_appear(server, cells):
    genes, X, _ = cells
    body = {"genes": genes, "cells": X[:4].tolist(), "attributions": "none"}

    def call(_: int) -> int:
        with httpx.Client(base_url=server, timeout=60) as c:
            return c.post("/v1/annotate", json=body).status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(call, range(96))) == {200}
    text = httpx.get(f"{server}/metrics").text

    def value(name: str) -> float:
        return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    batches = value("cellexplain_batch_cells_count")
    cells_run = value("cellexplain_batch_cells_sum")
    assert batches > 0
    # 96 requests of 4 cells: merging means fewer onnxruntime calls than requests
    assert cells_run / batches > 4, (cells_run, batches)
    assert value("cellexplain_batch_requests_sum") > value("cellexplain_batch_requests_count")
    for name in (
        "cellexplain_cells_annotated_total",
        "cellexplain_confidence_bucket",
        "cellexplain_missing_gene_fraction_bucket",
        "cellexplain_inference_seconds_bucket",
        "cellexplain_attribution_seconds_bucket",
        "cellexplain_request_errors_total",
        "bentoml_service_request_total",
    ):
        assert name in text, name
    assert re.search(r'cellexplain_cells_annotated_total\{.*label="CD14\+ Monocyte".*\} \d', text)


N_UPLOAD = 300  # cells per uploaded file: within this server's MAX_CELLS


@pytest.fixture(scope="module")
def small_counts_h5ad(counts_h5ad, tmp_path_factory):
    import anndata as ad

    path = tmp_path_factory.mktemp("upload") / "pbmc_counts.h5ad"
    ad.read_h5ad(counts_h5ad)[:N_UPLOAD].copy().write_h5ad(path)
    return path


def test_h5ad_upload_comes_back_annotated(client, small_counts_h5ad, cells):
    import anndata as ad

    genes, _, _ = cells
    counts_h5ad = small_counts_h5ad
    with open(counts_h5ad, "rb") as f:
        r = client.post(
            "/v1/annotate/h5ad",
            files={"file": ("pbmc.h5ad", f)},
            data={"top_k": "3", "attributions": "full"},
        )
    assert r.status_code == 200, r.text[:500]
    assert r.headers["content-type"] == "application/x-hdf5"
    out_path = counts_h5ad.with_name("annotated.h5ad")
    out_path.write_bytes(r.content)
    out = ad.read_h5ad(out_path)
    assert out.n_obs == N_UPLOAD
    assert r.headers["content-disposition"] == 'attachment; filename="pbmc.annotated.h5ad"'
    for col in (
        "cellexplain_label",
        "cellexplain_predicted_label",
        "cellexplain_confidence",
        "cellexplain_top_genes",
        "cellexplain_explained_class",
    ):
        assert col in out.obs.columns, col
    assert out.obsm["cellexplain_attributions"].shape == (N_UPLOAD, 765)
    assert out.obsm["cellexplain_probabilities"].shape == (N_UPLOAD, 10)
    assert out.obsm["cellexplain_program_attributions"].shape[0] == N_UPLOAD
    info = out.uns["cellexplain"]
    assert info["input_kind"] == "counts" and list(info["genes"]) == genes
    assert all(len(t.split(";")) == 3 for t in out.obs["cellexplain_top_genes"])
    # the same cells as JSON counts give the same calls
    counts = out.X[:20].toarray() if hasattr(out.X, "toarray") else np.asarray(out.X[:20])
    js = client.post(
        "/v1/annotate",
        json={"genes": genes, "cells": counts.tolist(), "input": "counts", "attributions": "none"},
    ).json()
    assert [c["predicted_label"] for c in js["cells"]] == list(
        out.obs["cellexplain_predicted_label"][:20]
    )
    np.testing.assert_allclose(
        [c["confidence"] for c in js["cells"]], out.obs["cellexplain_confidence"][:20], rtol=1e-5
    )


def test_h5ad_upload_refuses_unknown_or_repeated_form_fields(client, small_counts_h5ad):
    """A misspelt option is not silently ignored (the JSON door refuses unknown fields too);
    every option the JSON door takes, the form takes, with the same checks."""
    for data, field in (
        ({"topk": "3"}, "topk"),
        ({"top_k": ["3", "5"]}, "top_k"),
        ({"top_k": "-1"}, "top_k"),
        ({"unassigned_threshold": "1.5"}, "unassigned_threshold"),
    ):
        with open(small_counts_h5ad, "rb") as f:
            r = client.post("/v1/annotate/h5ad", files={"file": ("x.h5ad", f)}, data=data)
        assert r.status_code == 400, r.text[:300]
        assert r.json()["error"]["field"] == field, r.text[:300]
    with open(small_counts_h5ad, "rb") as f:
        data = {"return_probabilities": "true", "top_k": "2", "unassigned_threshold": "0.9"}
        r = client.post("/v1/annotate/h5ad", files={"file": ("x.h5ad", f)}, data=data)
    assert r.status_code == 200, r.text[:300]


def test_h5ad_raw_layer_and_bad_files(client, pbmc, tmp_path):
    path = tmp_path / "pbmc.h5ad"
    pbmc[:N_UPLOAD].copy().write_h5ad(path)
    with open(path, "rb") as f:
        r = client.post(
            "/v1/annotate/h5ad",
            files={"file": ("pbmc.h5ad", f)},
            data={"layer": "raw", "attributions": "none"},
        )
    assert r.status_code == 200, r.text[:500]
    with open(path, "rb") as f:
        r = client.post(
            "/v1/annotate/h5ad", files={"file": ("pbmc.h5ad", f)}, data={"gene_key": "symbols"}
        )
    _err(r, 400, "gene_key", "not found in var")
    with open(path, "rb") as f:
        r = client.post(
            "/v1/annotate/h5ad", files={"file": ("pbmc.h5ad", f)}, data={"layer": "counts"}
        )
    _err(r, 400, "layer", "not found")
    r = client.post("/v1/annotate/h5ad", files={"file": ("junk.h5ad", b"not an hdf5 file")})
    _err(r, 400, "file", "not a readable .h5ad")
    r = client.post("/v1/annotate/h5ad", files={"file": ("empty.h5ad", b"")})
    _err(r, 400, "file", "empty")
    r = client.post("/v1/annotate/h5ad", data={"top_k": "3"})
    _err(r, 400, "file", "required")


def test_h5ad_with_invalid_values_names_the_cell(client, pbmc, tmp_path):
    path = tmp_path / "scaled.h5ad"
    pbmc[:N_UPLOAD].copy().write_h5ad(path)  # X holds scaled (z-scored) values: negative
    with open(path, "rb") as f:
        r = client.post("/v1/annotate/h5ad", files={"file": ("scaled.h5ad", f)})
    _err(r, 400, "file", r"cell '.+' \(row \d+\), gene '.+' is negative")
