"""Shared fixtures: the real bundled PBMC data, and models trained on it once per session.

The repository's folders are importable only as ``cellexplain.*``: pytest puts the repository
root on ``sys.path`` (for ``tests.*`` and ``benchmarks``), which would also make ``models``,
``service``, ``client`` and ``api`` importable by their bare names, as an installed package never
is; a stray ``import service...`` (or ``resources.files("service")``) would pass here and fail
for every user. The finder below refuses them, so the tests see what an install sees.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

# a quiet, deterministic test run on a 2-core machine
os.environ.setdefault("OMP_NUM_THREADS", "2")

BARE = ("models", "service", "client", "api")


class _BareNameBlocker(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> None:
        if fullname.split(".")[0] in BARE:
            raise ModuleNotFoundError(
                f"import cellexplain.{fullname}, not {fullname}: the installed package has no "
                f"top-level {fullname.split('.')[0]!r}",
                name=fullname,
            )
        return None


sys.meta_path.insert(0, _BareNameBlocker())


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
