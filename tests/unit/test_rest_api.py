"""The HTTP API (``/v1`` and ``/v2``) in-process: the app :func:`~cellexplain.service.app.
create_app` builds, behind its gate, over a real :class:`~cellexplain.service.core.Annotator`
with real onnxruntime sessions of models trained here, called with real PBMC cells through
Starlette's test client (no server process: ``tests/integration/test_rest.py`` serves what needs
one: uploads, read in a child process, the probes and metrics of ``bentoml serve``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from starlette.testclient import TestClient

from cellexplain.models.preprocess import normalize_log1p
from cellexplain.models.runtime import OnnxModel
from cellexplain.service.app import create_app
from cellexplain.service.core import Annotator
from cellexplain.service.settings import Settings
from tests.conftest import assert_error as _err

MAX_CELLS = 400
MAX_BODY = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def client(programs_model, linear_model):
    """The app over the programs (default) and linear models, with this module's limits."""
    settings = Settings(
        models=[],
        model_dirs=[str(programs_model[1]), str(linear_model)],
        max_cells_per_request=MAX_CELLS,
        max_body_bytes=MAX_BODY,
        intra_op_threads=1,
        grpc_enabled=False,
    )
    annotator = Annotator.from_settings(settings)
    with TestClient(create_app(settings, annotator)) as c:
        yield c
    annotator.close()


@pytest.fixture(scope="module")
def cells(pbmc):
    raw = pbmc.raw.to_adata()
    return list(raw.var_names), raw.X.toarray().astype(np.float32), list(pbmc.obs_names)


def test_health_and_models(client, programs_model):
    card, _ = programs_model
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    models = client.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["pbmc-programs", "pbmc-linear"]
    assert [m["default"] for m in models] == [True, False]
    detail = client.get("/v1/models/pbmc-programs").json()
    assert detail["card"]["genes"] == card.genes
    assert detail["card"]["onnx"]["sha256"] == card.onnx.sha256
    assert detail["providers"][0] == "CPUExecutionProvider"
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["field"] == "model"


def test_annotation_matches_in_process_onnx(client, cells, programs_model):
    genes, X, ids = cells
    _, artifact = programs_model
    n = 60
    body = {
        "genes": genes,
        "cells": X[:n].tolist(),
        "cell_ids": ids[:n],
        "top_k": 5,
        "attributions": "full",
        "return_probabilities": True,
        "input": "log1p_cp10k",
    }
    r = client.post("/v1/annotate", json=body)
    assert r.status_code == 200, r.text
    res = r.json()
    local = OnnxModel(artifact).predict(X[:n])
    classes = local and OnnxModel(artifact).classes
    assert res["input_kind"] == "log1p_cp10k"
    assert res["gene_matching"]["n_found"] == 765 and res["gene_matching"]["n_missing"] == 0
    assert [c["id"] for c in res["cells"]] == ids[:n]
    assert [c["predicted_label"] for c in res["cells"]] == [
        classes[i] for i in local.probabilities.argmax(1)
    ]
    conf = np.array([c["confidence"] for c in res["cells"]])
    np.testing.assert_allclose(conf, local.probabilities.max(1), rtol=1e-6)
    full = np.array([c["attributions"] for c in res["cells"]])
    np.testing.assert_allclose(full, local.attributions, rtol=1e-5, atol=1e-7)
    assert res["attribution_genes"] == genes
    assert local.novelty is not None
    np.testing.assert_allclose([c["novelty"] for c in res["cells"]], local.novelty, rtol=1e-6)
    for c, p, nov in zip(res["cells"], local.probabilities, local.novelty, strict=True):
        called = c["confidence"] >= 0.5 and nov < res["novelty_threshold"]
        assert c["label"] == (c["predicted_label"] if called else "Unassigned")
        np.testing.assert_allclose([c["probabilities"][k] for k in classes], p, rtol=1e-6)
        assert len(c["program_attributions"]) > 20
        total = sum(p["attribution"] for p in c["program_attributions"])
        assert total + c["free_units_attribution"] == pytest.approx(
            sum(c["attributions"]), abs=1e-3
        )


def test_top_genes_are_ranked_by_magnitude(client, cells):
    genes, X, _ = cells
    r = client.post("/v1/annotate", json={"genes": genes, "cells": X[:5].tolist(), "top_k": 8})
    for c in r.json()["cells"]:
        mags = [abs(g["attribution"]) for g in c["top_genes"]]
        assert len(mags) == 8 and mags == sorted(mags, reverse=True)
        assert c["explained_class"] == c["predicted_label"]


def full_transcriptome_counts(pbmc, X: np.ndarray, n_filler: int = 2000) -> tuple[list, np.ndarray]:
    """Undo the log1p-CP10k of the PBMC cells into integer counts, and add filler genes that
    carry the rest of each cell's total (obs n_counts), as a full transcriptome would."""
    totals = pbmc.obs["n_counts"].to_numpy()[: len(X)]
    counts = np.rint(np.expm1(X) * totals[:, None] / 1e4)
    rest = np.maximum(totals - counts.sum(1), 0)
    rng = np.random.default_rng(0)
    filler = np.stack([rng.multinomial(int(r), np.full(n_filler, 1 / n_filler)) for r in rest])
    genes = [*list(pbmc.raw.var_names), *(f"FILLER{i}" for i in range(n_filler))]
    return genes, np.hstack([counts, filler]).astype(np.float64)


def test_raw_counts_give_the_labels_of_normalised_input(client, cells, pbmc, programs_model):
    genes, X, _ = cells
    n = 120
    cgenes, counts = full_transcriptome_counts(pbmc, X[:n])
    r_counts = client.post(
        "/v1/annotate", json={"genes": cgenes, "cells": counts.tolist(), "attributions": "none"}
    )
    r_norm = client.post(
        "/v1/annotate", json={"genes": genes, "cells": X[:n].tolist(), "attributions": "none"}
    )
    assert r_counts.status_code == 200, r_counts.text
    res = r_counts.json()
    assert res["input_kind"] == "counts"  # detected
    assert res["gene_matching"]["n_unused"] == 2000
    labels_counts = [c["predicted_label"] for c in res["cells"]]
    labels_norm = [c["predicted_label"] for c in r_norm.json()["cells"]]
    agree = np.mean([a == b for a, b in zip(labels_counts, labels_norm, strict=True)])
    assert agree >= 0.97  # counts are rounded, so a borderline cell may flip
    # and exactly what the in-process pipeline gives for the same counts
    _, artifact = programs_model
    model = OnnxModel(artifact)
    local = model.predict(normalize_log1p(counts)[:, :765])
    assert labels_counts == [model.classes[i] for i in local.probabilities.argmax(1)]


def test_sparse_maps_equal_dense_rows(client, cells):
    genes, X, _ = cells
    dense = client.post("/v1/annotate", json={"genes": genes, "cells": X[:10].tolist()}).json()
    maps = [{g: float(v) for g, v in zip(genes, row, strict=True) if v > 0} for row in X[:10]]
    sparse = client.post("/v1/annotate", json={"cells": maps})
    assert sparse.status_code == 200, sparse.text
    s = sparse.json()
    assert [c["predicted_label"] for c in s["cells"]] == [
        c["predicted_label"] for c in dense["cells"]
    ]
    np.testing.assert_allclose(
        [c["confidence"] for c in s["cells"]], [c["confidence"] for c in dense["cells"]], rtol=1e-6
    )
    # genes that are zero in every cell are absent from the maps, hence reported missing
    assert s["gene_matching"]["n_missing"] == int((X[:10].sum(0) == 0).sum())


def test_gene_alignment_case_and_ensembl(client, cells):
    genes, X, _ = cells
    base = client.post("/v1/annotate", json={"genes": genes, "cells": X[:5].tolist()}).json()
    lower = client.post(
        "/v1/annotate", json={"genes": [g.lower() for g in genes], "cells": X[:5].tolist()}
    ).json()
    assert [c["confidence"] for c in lower["cells"]] == [c["confidence"] for c in base["cells"]]
    from cellexplain.service.alignment import ensembl_to_symbol

    to_id = {}
    for gid, sym in ensembl_to_symbol().items():
        to_id.setdefault(sym, gid)
    ids = [to_id.get(g.upper(), g) for g in genes]
    n_ids = sum(i.startswith("ENSG") for i in ids)
    assert n_ids >= 650  # PBMC data uses some pre-GENCODE-44 symbols
    ens = client.post("/v1/annotate", json={"genes": ids, "cells": X[:5].tolist()}).json()
    assert ens["gene_matching"]["n_found"] >= n_ids
    assert [c["predicted_label"] for c in ens["cells"]] == [
        c["predicted_label"] for c in base["cells"]
    ]


def test_missing_genes_are_zero_filled_and_counted(client, cells):
    genes, X, _ = cells
    keep = slice(0, 700)
    r = client.post("/v1/annotate", json={"genes": genes[keep], "cells": X[:3, keep].tolist()})
    gm = r.json()["gene_matching"]
    assert gm["n_missing"] == 65 and gm["missing_fraction"] == pytest.approx(65 / 765)
    # listed by the model's reliance on them (the card's gene importance), the most first
    card = client.get("/v1/models/pbmc-programs").json()["card"]
    weight = dict(zip(card["genes"], card["gene_importance"], strict=True))
    missing = sorted(genes[700:], key=lambda g: -weight[g])
    assert gm["missing"] == missing[: len(gm["missing"])]
    share = sum(weight[g] for g in genes[700:]) / sum(weight.values())
    assert gm["missing_importance"] == pytest.approx(share, rel=1e-6)
    # under 10% of the genes and of their importance: no warning; beyond, one naming them
    assert (r.json()["warnings"] == []) == (share <= 0.1)
    half = slice(0, 380)
    r = client.post("/v1/annotate", json={"genes": genes[half], "cells": X[:3, half].tolist()})
    (warning,) = r.json()["warnings"]
    first = max(genes[380:], key=lambda g: weight[g])
    assert "385 of the model's 765 genes (50%" in warning and f"missing: {first}," in warning


def test_unassigned_threshold_override(client, cells):
    genes, X, _ = cells
    r = client.post(
        "/v1/annotate",
        json={
            "genes": genes,
            "cells": X[:20].tolist(),
            "unassigned_threshold": 1.0,
            "attributions": "none",
        },
    )
    res = r.json()
    assert res["unassigned_threshold"] == 1.0
    assert all(c["label"] == "Unassigned" for c in res["cells"])
    assert all(c["predicted_label"] != "Unassigned" for c in res["cells"])


def test_explicit_target_class(client, cells):
    genes, X, _ = cells
    r = client.post(
        "/v1/annotate", json={"genes": genes, "cells": X[:4].tolist(), "target": "cd56+ nk"}
    )
    assert r.status_code == 200
    assert {c["explained_class"] for c in r.json()["cells"]} == {"CD56+ NK"}


def test_bad_inputs_get_clear_4xx(client, cells):
    genes, X, _ = cells
    row = X[0].tolist()
    post = lambda body: client.post("/v1/annotate", json=body)  # noqa: E731
    _err(post({"genes": genes, "cells": [row], "model": "nope"}), 404, "model", "unknown model")
    _err(post({"genes": [], "cells": [row]}), 400, "genes", "genes is empty")
    _err(post({"genes": genes, "cells": []}), 400, "cells", "cells is empty")
    _err(post({"genes": ["cd3e", "Cd3e"], "cells": [[1, 2]]}), 400, "genes", "duplicated gene")
    _err(post({"genes": genes, "cells": [row, row[:10]]}), 400, r"cells\[1\]", "has 10 values")
    neg = list(row)
    neg[3] = -2.0
    _err(post({"genes": genes, "cells": [neg]}), 400, r"cells\[0\]\[3\]", "negative")
    _err(post({"genes": genes, "cells": [["x"] * 765]}), 400, r"cells\[0\]\[0\]", "not a number")
    _err(post({"cells": [row]}), 400, "genes", "genes is required")
    _err(post({"genes": genes, "cells": [row], "target": "T cell"}), 400, "target", "not a class")
    _err(post({"genes": genes, "cells": [row], "top_k": 1000}), 400, "top_k", "limit")
    _err(
        post({"genes": genes, "cells": [row], "cell_ids": ["a", "b"]}),
        400,
        "cell_ids",
        "2 ids for 1 cells",
    )
    _err(
        post({"genes": [f"ENSMUSG{i:011d}" for i in range(765)], "cells": [row]}),
        400,
        "genes",
        "mouse or another species",
    )
    _err(
        post({"genes": genes, "cells": [[v * 1000 + 20 for v in row]], "input": "log1p_cp10k"}),
        400,
        "input",
        "input='counts'",
    )
    _err(post({"genes": genes, "cells": [row], "unexpected": 1}), 400, "unexpected", "")
    # options are typed: JSON says what a value is, so "5", true or 2.0 for an int is refused
    for bad in ({"top_k": "5"}, {"top_k": True}, {"top_k": 2.0}, {"return_probabilities": "yes"},
                {"return_probabilities": 1}, {"unassigned_threshold": "0.5"}):  # fmt: skip
        (name,) = bad
        _err(post({"genes": genes, "cells": [row], **bad}), 400, name, "valid")
    _err(post({"cells": [{}]}), 400, "cells", "maps name no gene")
    # NaN and Infinity are not JSON, but Python clients send them: still a 400, never a 500
    body = json.dumps({"genes": ["CD3E", "LYZ"], "cells": [[1.0, float("nan")]]})
    r = client.post("/v1/annotate", content=body, headers={"content-type": "application/json"})
    _err(r, 400, r"cells\[0\]\[1\]", "NaN")
    body = json.dumps({"genes": ["CD3E", "LYZ"], "cells": [[float("inf"), 1.0]]})
    r = client.post("/v1/annotate", content=body, headers={"content-type": "application/json"})
    _err(r, 400, r"cells\[0\]\[0\]", "infinite")
    r = client.post(
        "/v1/annotate", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400


def test_too_many_cells_and_too_large_a_body(client, cells):
    genes, X, _ = cells
    r = client.post("/v1/annotate", json={"genes": genes[:2], "cells": [[1, 2]] * (MAX_CELLS + 1)})
    _err(r, 413, "cells", f"limit is {MAX_CELLS}")
    rows = (np.tile(X[:1], (MAX_CELLS, 1)).astype(np.float64) + 1 / 3).tolist()  # long reprs
    big = json.dumps({"genes": genes, "cells": rows})
    assert len(big) > MAX_BODY
    r = client.post("/v1/annotate", content=big, headers={"content-type": "application/json"})
    _err(r, 413, "body", "exceeds the limit")


@pytest.mark.parametrize(
    "options",
    [
        {"top_k": 3},
        {"attributions": "full", "return_probabilities": True},
        {"attributions": "none"},
        {"model": "pbmc-linear", "top_k": 2, "unassigned_threshold": 0.99},
    ],
    ids=["top_k", "full+probabilities", "none", "linear"],
)
def test_fast_json_responses_conform_to_the_response_model(client, cells, options):
    """REST writes responses from plain values without pydantic (the fast path): they must be
    exactly what the validated AnnotateResponse would serialise to."""
    from cellexplain.api.schemas import AnnotateResponse

    genes, X, ids = cells
    body = {"genes": genes, "cells": X[:12].tolist(), "cell_ids": ids[:12], **options}
    r = client.post("/v1/annotate", json=body)
    assert r.status_code == 200, r.text
    validated = AnnotateResponse.model_validate_json(r.content)
    assert validated.model_dump(mode="json", exclude_none=True) == r.json()
    assert len(validated.cells) == 12


def test_openapi_describes_the_api(client):
    doc = client.get("/v1/openapi.json").json()
    assert "/annotate" in doc["paths"] and "/models/{name}" in doc["paths"]
    schemas = doc["components"]["schemas"]
    assert {"AnnotateRequest", "AnnotateResponse", "CellAnnotation"} <= set(schemas)
    assert "top_k" in schemas["AnnotateRequest"]["properties"]
    # the upload form documents every option it reads
    from cellexplain.api.schemas import OPTION_NAMES

    (form,) = [v for k, v in schemas.items() if k.startswith("Body_annotate_h5ad")]
    assert {"file", "gene_key", "layer", *OPTION_NAMES} <= set(form["properties"])
    # every error the gate can give is documented, on every operation
    for item in doc["paths"].values():
        for op in item.values():
            assert {"400", "401", "431"} <= set(op["responses"]), op.get("operationId")


def test_several_models_served_at_once(client, cells):
    genes, X, _ = cells
    body = {"genes": genes, "cells": X[:8].tolist(), "top_k": 2}
    default = client.post("/v1/annotate", json=body).json()
    linear = client.post("/v1/annotate", json={**body, "model": "pbmc-linear"}).json()
    assert default["model"] == "pbmc-programs" and linear["model"] == "pbmc-linear"
    assert all("program_attributions" in c for c in default["cells"])
    assert not any("program_attributions" in c for c in linear["cells"])
    assert linear["attribution_method"] == "integrated_gradients"


def test_log1p_values_sent_as_counts_are_read_as_asked_and_said(client, cells):
    genes, X, _ = cells
    body = {"genes": genes, "cells": X[:5].tolist(), "input": "counts", "attributions": "none"}
    r = client.post("/v1/annotate", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["input_kind"] == "counts"
    (warning,) = r.json()["warnings"]
    assert "look like log1p" in warning and "log1p_cp10k" in warning
    auto = client.post("/v1/annotate", json={**body, "input": "auto"}).json()
    assert auto["input_kind"] == "log1p_cp10k" and auto["warnings"] == []
