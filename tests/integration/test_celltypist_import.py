"""A CellTypist model trained by CellTypist 1.7.1 itself (its own venv, scikit-learn < 1.6),
imported with `cellexplain models import-celltypist` and served: the same labels as
`celltypist.annotate` (majority voting off) on cells it did not train on, its decision scores
within float32 rounding, with cells lacking some of its genes too; and at the REST door."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import httpx
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from benchmarks.file_to_file import CT_PYTHON, celltypist_venv
from tests.integration.servers import REPO, bentoml_server

pytestmark = pytest.mark.integration
NAME = "ct-pbmc"

#: argv: counts .h5ad with obs['bulk_labels'], output .pkl (CellTypist's defaults, as a lab
#: trains one: normalise, log1p, celltypist.train)
TRAIN = """
import sys, warnings
import anndata as ad, celltypist, scanpy as sc
warnings.simplefilter("ignore")
a = ad.read_h5ad(sys.argv[1])
sc.pp.normalize_total(a, target_sum=1e4)
sc.pp.log1p(a)
celltypist.train(a, labels="bulk_labels").write(sys.argv[2])
"""
#: argv: counts .h5ad, model .pkl, output prefix: CellTypist's labels and decision scores
ANNOTATE = """
import sys, warnings
import anndata as ad, celltypist, numpy as np, scanpy as sc
warnings.simplefilter("ignore")
a = ad.read_h5ad(sys.argv[1])
sc.pp.normalize_total(a, target_sum=1e4)
sc.pp.log1p(a)
p = celltypist.annotate(a, model=celltypist.models.Model.load(sys.argv[2]), majority_voting=False)
np.save(sys.argv[3] + "_labels.npy", p.predicted_labels["predicted_labels"].astype(str).to_numpy())
np.save(sys.argv[3] + "_decision.npy", p.decision_matrix.to_numpy())
"""


def _ct(script: str, *args: object) -> None:
    proc = subprocess.run([str(CT_PYTHON), "-c", script, *map(str, args)], capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def setting(pbmc, tmp_path_factory):
    """CellTypist trained on 70% of the PBMCs; the other 30% kept for annotation (all genes,
    and with 60 of the model's genes left out); the model imported into a fresh store."""
    celltypist_venv()  # .venv-celltypist (created once: pip install celltypist==1.7.1)
    d = tmp_path_factory.mktemp("celltypist")
    raw = pbmc.raw.to_adata()
    counts = np.rint(np.expm1(raw.X.toarray()) * (pbmc.obs["n_counts"].to_numpy()[:, None] / 1e4))
    cells = ad.AnnData(
        sp.csr_matrix(counts.astype(np.float32)),
        obs=pbmc.obs[["bulk_labels"]].copy(),
        var=pd.DataFrame(index=raw.var_names),
    )
    held = np.random.default_rng(0).permutation(cells.n_obs)
    train, test = cells[np.sort(held[210:])].copy(), cells[np.sort(held[:210])].copy()
    train.write_h5ad(d / "train.h5ad")
    test.obs = test.obs[[]]
    test.write_h5ad(d / "test.h5ad")
    dropped = [str(g) for g in test.var_names[::13]][:60]
    test[:, ~test.var_names.isin(dropped)].copy().write_h5ad(d / "test_missing.h5ad")
    _ct(TRAIN, d / "train.h5ad", d / "model.pkl")
    for kind in ("test", "test_missing"):
        _ct(ANNOTATE, d / f"{kind}.h5ad", d / "model.pkl", d / kind)
    home = d / "bentoml"
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    proc = subprocess.run(
        [sys.executable, "-m", "cellexplain", "models", "import-celltypist", str(d / "model.pkl"),
         "--name", NAME, "--out", str(d / "artifact")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"imported into the BentoML store as {NAME}:" in proc.stdout
    return d, env


def _annotate(d: Path, env: dict[str, str], kind: str) -> ad.AnnData:
    out = d / f"{kind}.cellexplain.h5ad"
    proc = subprocess.run(
        [sys.executable, "-m", "cellexplain", "annotate", str(d / f"{kind}.h5ad"), "--local",
         "--model", NAME, "--out", str(out), "--force", "-q"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return ad.read_h5ad(out)


@pytest.mark.parametrize("kind", ["test", "test_missing"])
def test_the_imported_model_answers_as_celltypist_does(setting, kind):
    d, env = setting
    ours = _annotate(d, env, kind)
    labels = np.load(d / f"{kind}_labels.npy", allow_pickle=True)
    decision = np.load(d / f"{kind}_decision.npy")
    np.testing.assert_array_equal(ours.obs["cellexplain_predicted_label"].astype(str), labels)
    # the graph's probabilities are the softmax of CellTypist's decision scores
    want = np.exp(decision - decision.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(ours.obsm["cellexplain_probabilities"], want, atol=2e-5)
    matching = ours.uns["cellexplain"]["gene_matching"]
    if kind == "test":
        assert matching["n_missing"] == 0
    else:  # the 60 left out (one may be found under another name of the same gene)
        assert 55 <= matching["n_missing"] <= 60
        dropped = set(ad.read_h5ad(d / "test.h5ad").var_names) - set(
            ad.read_h5ad(d / "test_missing.h5ad").var_names
        )
        assert set(matching["missing"]) <= dropped
        assert "read as zero" not in " ".join(ours.uns["cellexplain"]["warnings"])
    # the evidence: coefficient x standardised expression, largest first
    values = ours.obsm["cellexplain_top_genes_attribution"]
    assert (np.nan_to_num(values[:, 0]) >= np.nan_to_num(values[:, 1])).all()


def test_the_imported_model_is_served_and_a_hostile_pickle_is_refused(setting, tmp_path):
    d, env = setting
    test = ad.read_h5ad(d / "test.h5ad")
    labels = np.load(d / "test_labels.npy", allow_pickle=True)
    home = Path(env["BENTOML_HOME"])
    with bentoml_server(home, {"CELLEXPLAIN_MODELS": NAME}) as srv:
        cells = [
            {g: float(v) for g, v in zip(test.var_names, row, strict=True) if v}
            for row in test.X[:40].toarray()
        ]
        body = {"cells": cells, "genes": list(test.var_names)}
        r = httpx.post(f"{srv.url}/v1/annotate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        got = [c["predicted_label"] for c in r.json()["cells"]]
        assert got == list(labels[:40])
        listed = httpx.get(f"{srv.url}/v1/models", timeout=30).json()["models"]
        assert listed[0]["name"] == NAME and listed[0]["test_macro_f1"] is None
    hostile = tmp_path / "hostile.pkl"
    marker = tmp_path / "ran"
    hostile.write_bytes(
        b"cposix\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    )  # pickle protocol 0: os.system("touch ...")
    proc = subprocess.run(
        [sys.executable, "-m", "cellexplain", "models", "import-celltypist", str(hostile)],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "posix.system" in proc.stderr and "refused" in proc.stderr
    assert not marker.exists()
