"""Shared fixtures: the real bundled PBMC data, and models trained on it once per session.

The package is imported as installed (``cellexplain.*``, mapped onto the repository's folders by
the editable install); pytest puts the repository root on ``sys.path`` only for ``tests.*``,
``benchmarks`` and ``load_tests``. ``tests/unit/test_layout.py`` refuses an import of a folder by
its bare name (``import service...``), which would work only from a checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

# a quiet, deterministic test run on a 2-core machine
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def pbmc():
    """scanpy's bundled pbmc68k_reduced (real 10x PBMCs; no download)."""
    from cellexplain.models.data import load_default_adata

    return load_default_adata()


@pytest.fixture(scope="session")
def pbmc_data():
    """The default training data as :class:`cellexplain.models.data.LabelledData`."""
    from cellexplain.models.data import load_labelled

    return load_labelled()


def train_small(data, out: Path, **overrides):
    """Train on real data with settings that keep a test fast (seconds)."""
    from cellexplain.models.attribution import AttributionSpec
    from cellexplain.models.train import TrainConfig, train

    spec = overrides.pop("attribution", AttributionSpec())
    cfg = TrainConfig(name=overrides.pop("name", "test-model"), attribution=spec, **overrides)
    return train(data, cfg, out, progress=False)


@pytest.fixture(scope="session")
def programs_model(pbmc_data, tmp_path_factory):
    """A programs model with 32-step IG, exported once for the session: (card, folder)."""
    out = tmp_path_factory.mktemp("programs")
    card = train_small(pbmc_data, out, arch="programs", name="pbmc-programs")
    return card, out


@pytest.fixture(scope="session")
def counts_h5ad(pbmc, tmp_path_factory) -> Path:
    """The PBMC cells as integer raw counts in an .h5ad (log1p undone, scaled by n_counts)."""
    import anndata as ad

    raw = pbmc.raw.to_adata()
    x = raw.X.toarray() if hasattr(raw.X, "toarray") else np.asarray(raw.X)
    counts = np.rint(np.expm1(x) * (pbmc.obs["n_counts"].to_numpy()[:, None] / 1e4))
    a = ad.AnnData(counts.astype(np.float32), obs=pbmc.obs[["bulk_labels"]].copy(), var=raw.var)
    path = tmp_path_factory.mktemp("h5ad") / "pbmc_counts.h5ad"
    a.write_h5ad(path)
    return path


def require(condition: bool, why: str) -> None:
    """Skip a test whose system tool (podman, promtool, ...) is missing, saying why; under CI
    (``.ci/run`` sets ``CI=true`` and installs them) a missing tool is a failure instead."""
    if not condition:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run this test: {why} (.ci/run installs what it needs)")
        pytest.skip(why)


def raw_cells(pbmc, n: int) -> tuple[list[str], np.ndarray]:
    """``n`` real PBMC cells as raw counts (the bundled cells repeated as needed): the genes
    and a dense float32 ``[n, n_genes]`` matrix."""
    raw = pbmc.raw.to_adata()
    reps = -(-n // raw.n_obs)
    return list(raw.var_names), np.tile(raw.X.toarray().astype(np.float32), (reps, 1))[:n]


def assert_error(r, status: int, field_re: str, message_re: str) -> None:
    """``r`` (an HTTP response of the /v1 API) is the error ``status`` whose field and message
    match the patterns."""
    import re

    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert re.search(field_re, err["field"] or ""), err
    assert re.search(message_re, err["message"]), err
