"""One real-looking file through every door: the same cells must get the same answer.

The file is built as Cell Ranger writes one, not as our training data looks: ~30,000 genes
(today's GENCODE symbols in ``var_names``, Ensembl IDs in ``var['gene_ids']``), raw integer
counts (CSR), the model's 2017 symbols under their current names (``JCHAIN`` for ``IGJ``),
case-variant pairs of genes the model does not use (``C1orf220`` / ``C1ORF220``), columns in no
particular order. The model's genes carry the real PBMC counts.

Doors: REST JSON (sparse maps), the REST upload, typed gRPC unary and stream, the Python client
on both transports, ``cellexplain annotate`` on both transports and ``--local``; the Open
Inference Protocol on the aligned matrix. Labels, probabilities (matched by class name) and
full attributions must agree with ``--local``.
"""

from __future__ import annotations

import csv
import gzip
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import anndata as ad
import httpx
import numpy as np
import pytest
import scipy.sparse as sp
import tritonclient.http as thttp

from cellexplain.api.annotations import gene_map
from cellexplain.api.codegen import load
from cellexplain.client.remote import Client
from cellexplain.models.preprocess import normalize_log1p
from cellexplain.service.alignment import GeneAligner, previous_to_current
from tests.integration.servers import REPO, bentoml_server

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Variable names are not unique"),
]
pb = load("cellexplain_v1_pb2")
pb_grpc = load("cellexplain_v1_pb2_grpc")
MODEL = "pbmc-programs"
N_CELLS = 240
N_GENES = 30_000
CASE_PAIRS = 5
REPEATS = 2


@pytest.fixture(scope="module")
def server(programs_home):
    with bentoml_server(programs_home, {"CELLEXPLAIN_MODELS": MODEL}) as srv:
        yield srv


@pytest.fixture(scope="module")
def card(programs_model):
    return programs_model[0]


def gencode() -> list[tuple[str, str]]:
    """(Ensembl ID, symbol as GENCODE spells it) of the bundled table."""
    path = (
        resources.files("cellexplain.service")
        / "resources"
        / "gencode_v44_human_gene_id2name.csv.gz"
    )
    with path.open("rb") as raw, gzip.open(raw, "rt", newline="") as f:
        return [(r["gene_id"], r["gene_name"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def tenx(pbmc, card, tmp_path_factory) -> tuple[Path, int, int]:
    """The file, how many model genes it carries, and how many of those under a new name."""
    rng = np.random.default_rng(7)
    renamed = previous_to_current()
    ids = gencode()
    id_of = {}
    for gid, name in ids:
        id_of.setdefault(name.upper(), gid)
    raw = pbmc.raw.to_adata()[:N_CELLS]
    counts = np.rint(
        np.expm1(raw.X.toarray()) * (pbmc.obs["n_counts"].to_numpy()[:N_CELLS, None] / 1e4)
    )
    names, gene_ids, columns = [], [], []
    current = {name.upper(): name for _, name in ids}
    n_renamed = 0
    for j, g in enumerate(card.genes):
        today = current.get(renamed.get(g.upper(), g.upper()))
        if today is None:
            continue  # a clone name no current reference carries (RP11-...)
        n_renamed += today.upper() != g.upper()
        names.append(today)
        gene_ids.append(id_of.get(today.upper(), f"ENSG9{j:010d}"))
        columns.append(counts[:, j])
    n_model = len(names)
    aligner = GeneAligner(card.genes)
    fillers = [(gid, n) for gid, n in ids if aligner.claim(n) is None]  # not the model's
    seen: set[str] = set()
    fillers = [(gid, n) for gid, n in fillers if not (n.upper() in seen or seen.add(n.upper()))]
    lower = [(gid, n) for gid, n in fillers if n != n.upper() and "orf" in n][:CASE_PAIRS]
    rest = [f for f in fillers if f not in lower][: N_GENES - len(names) - 2 * CASE_PAIRS - REPEATS]
    for gid, n in [*rest, *lower]:
        names.append(n)
        gene_ids.append(gid)
        columns.append(rng.poisson(0.05, N_CELLS).astype(np.float64))
    for gid, n in lower:  # the older all-caps spelling of the same gene, as real references have
        names.append(n.upper())
        gene_ids.append(gid)
        columns.append(rng.poisson(0.05, N_CELLS).astype(np.float64))
    for k in range(REPEATS):  # one symbol of several loci, its name repeated (not made unique)
        names.append(rest[0][1])
        gene_ids.append(f"ENSG8{k:010d}")
        columns.append(rng.poisson(0.5, N_CELLS).astype(np.float64))
    order = rng.permutation(len(names))
    X = np.stack(columns, axis=1)[:, order]
    a = ad.AnnData(sp.csr_matrix(X.astype(np.float32)))
    a.var_names = [names[i] for i in order]
    a.var["gene_ids"] = [gene_ids[i] for i in order]
    a.obs_names = [f"{b}-1" for b in raw.obs_names]
    path = tmp_path_factory.mktemp("tenx") / "filtered_feature_bc_matrix.h5ad"
    a.write_h5ad(path)
    assert a.n_vars == N_GENES and a.var_names.nunique() == N_GENES - REPEATS
    return path, n_model, n_renamed


def arrays(adata: ad.AnnData, classes: list[str]) -> dict[str, np.ndarray]:
    assert list(adata.uns["cellexplain"]["classes"]) == classes
    return {
        "label": adata.obs["cellexplain_predicted_label"].astype(str).to_numpy(),
        "probabilities": np.asarray(adata.obsm["cellexplain_probabilities"]),
        "attributions": np.asarray(adata.obsm["cellexplain_attributions"]),
    }


def from_proto(res, classes: list[str]) -> dict[str, np.ndarray]:
    cells = [c for r in res for c in r.cells]
    return {
        "label": np.array([c.predicted_label for c in cells]),
        "probabilities": np.array([[c.probabilities[k] for k in classes] for c in cells]),
        "attributions": np.array([list(c.attributions) for c in cells]),
    }


def from_json(res: dict, classes: list[str]) -> dict[str, np.ndarray]:
    return {
        "label": np.array([c["predicted_label"] for c in res["cells"]]),
        "probabilities": np.array([[c["probabilities"][k] for k in classes] for c in res["cells"]]),
        "attributions": np.array([c["attributions"] for c in res["cells"]]),
    }


def cli(src: Path, out: Path, home: Path, *args: str) -> ad.AnnData:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    proc = subprocess.run(
        [sys.executable, "-m", "cellexplain", "annotate", str(src), "--out", str(out), "-q",
         "--attributions", "full", "--chunk-size", "100", *args],
        capture_output=True, text=True, env=env, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    return ad.read_h5ad(out)


def test_every_door_gives_the_same_answer(server, programs_home, card, tenx, tmp_path):
    tenx, n_model, n_renamed = tenx
    classes = list(card.classes)
    adata = ad.read_h5ad(tenx)
    genes, X = list(adata.var_names), sp.csr_matrix(adata.X)
    answers: dict[str, dict[str, np.ndarray]] = {}

    local = cli(tenx, tmp_path / "local.h5ad", programs_home, "--local")
    answers["cli --local"] = ref = arrays(local, classes)
    gm = local.uns["cellexplain"]["gene_matching"]
    # found: every model gene a current reference carries; renamed ones through HGNC
    assert gm["n_found"] == n_model and gm["n_previous_symbol"] == n_renamed > 40, gm
    # the all-caps spellings and the repeated names, left out
    assert gm["n_duplicated"] == CASE_PAIRS + REPEATS, gm
    answers["cli rest"] = arrays(
        cli(tenx, tmp_path / "rest.h5ad", programs_home, "--url", server.url), classes
    )
    answers["cli grpc"] = arrays(
        cli(tenx, tmp_path / "grpc.h5ad", programs_home, "--url", server.url,
            "--transport", "grpc", "--grpc", server.grpc),
        classes,
    )  # fmt: skip
    for transport in ("rest", "grpc"):
        with Client(server.url, transport=transport, grpc_target=server.grpc) as c:
            done = c.annotate(adata.copy(), attributions="full", chunk_size=80)
        answers[f"python client {transport}"] = arrays(done, classes)

    with open(tenx, "rb") as f:
        r = httpx.post(
            f"{server.url}/v1/annotate/h5ad",
            files={"file": ("x.h5ad", f)},
            data={"attributions": "full"},
            timeout=300,
        )
    assert r.status_code == 200, r.text[:500]
    (tmp_path / "upload.h5ad").write_bytes(r.content)
    answers["rest upload"] = arrays(ad.read_h5ad(tmp_path / "upload.h5ad"), classes)

    maps = [gene_map(genes, X, i) for i in range(X.shape[0])]
    body = {"genes": genes, "cells": maps, "attributions": "full", "return_probabilities": True}
    r = httpx.post(f"{server.url}/v1/annotate", json=body, timeout=300)
    assert r.status_code == 200, r.text[:500]
    answers["rest json"] = from_json(r.json(), classes)

    import grpc

    from cellexplain.api.proto_v1 import request_to_proto
    from cellexplain.api.schemas import AnnotateOptions

    opts = AnnotateOptions(attributions="full", return_probabilities=True)
    with grpc.insecure_channel(
        server.grpc, options=[("grpc.max_receive_message_length", 1 << 28)]
    ) as ch:
        stub = pb_grpc.CellExplainStub(ch)
        answers["grpc unary"] = from_proto(
            [stub.Annotate(request_to_proto(genes, X, opts))], classes
        )
        chunks = [request_to_proto(genes, X[s : s + 60], opts) for s in range(0, N_CELLS, 60)]
        answers["grpc stream"] = from_proto(list(stub.AnnotateStream(iter(chunks))), classes)

    # the Open Inference Protocol takes the model's own input: the aligned log1p matrix
    x = GeneAligner(card.genes).align(genes).apply(normalize_log1p(X))
    client = thttp.InferenceServerClient(server.url.removeprefix("http://"))
    inp = thttp.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    res = client.infer(MODEL, [inp])
    probs = res.as_numpy("probabilities")
    answers["oip rest"] = {
        "label": np.asarray(classes)[probs.argmax(1)],
        "probabilities": probs,
        "attributions": res.as_numpy("attributions"),
    }

    assert set(ref["label"]) > {"CD14+ Monocyte"}  # real calls, not one class for everything
    scale = np.abs(ref["attributions"]).max(axis=1, keepdims=True)
    for door, got in answers.items():
        assert got["label"].shape == (N_CELLS,), door
        assert (got["label"] == ref["label"]).all(), (door, (got["label"] != ref["label"]).sum())
        np.testing.assert_allclose(
            got["probabilities"], ref["probabilities"], atol=2e-6, err_msg=door
        )
        err = np.abs(got["attributions"] - ref["attributions"]) / scale
        assert err.max() < 1e-5, (door, float(err.max()))
