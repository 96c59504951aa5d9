"""Shared fixtures: the real bundled PBMC data, and models trained on it once per session.

The package is imported as installed (``cellexplain.*``, mapped onto the repository's folders by
the editable install); pytest puts the repository root on ``sys.path`` only for ``tests.*``,
``benchmarks`` and ``load_tests``. ``tests/unit/test_layout.py`` refuses an import of a folder by
its bare name (``import service...``), which would work only from a checkout.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
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


def shared_folder(tmp_path_factory, name: str) -> tuple[Path, Path]:
    """A folder that every pytest-xdist worker of this run shares (the workers' common temp
    root; the session's own without xdist), and the lock file that guards its making."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    return root / name, root / f"{name}.lock"


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a file; made if missing) across processes."""
    import fcntl

    with open(path, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield


def shared_model(request, tmp_path_factory, name: str, **settings) -> Path:
    """A model trained once for the run with ``train_small(..., **settings)`` into a folder
    every xdist worker shares (the first to ask trains it, the others wait on a lock)."""
    out, lock = shared_folder(tmp_path_factory, name)
    with locked(lock):
        if not (out / "model.json").is_file():
            train_small(request.getfixturevalue("pbmc_data"), out, name=name, **settings)
    return out


@pytest.fixture(scope="session")
def linear_model(request, tmp_path_factory) -> Path:
    """A linear model (its convex fit; exact attributions), exported once for the run: its
    folder."""
    return shared_model(request, tmp_path_factory, "pbmc-linear", arch="linear")


@pytest.fixture(scope="session")
def programs16_model(request, tmp_path_factory):
    """The programs model exported with float16 arithmetic inside: (card, folder)."""
    from cellexplain.models.card import ModelCard

    out = shared_model(
        request, tmp_path_factory, "pbmc-programs16", arch="programs", precision="float16"
    )
    return ModelCard.read(out), out


@pytest.fixture(scope="session")
def programs_model(request, tmp_path_factory):
    """A programs model with 32-step IG, exported once for the run (the first xdist worker to
    ask trains it, the others wait on a lock and read it): (card, folder)."""
    from cellexplain.models.card import ModelCard

    out = shared_model(request, tmp_path_factory, "pbmc-programs", arch="programs")
    return ModelCard.read(out), out


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


#: the test files that take longest (an image, servers, venvs: a minute or more each), run
#: first: pytest-xdist hands files to its workers in collection order, and a long file handed
#: out last would run on its own while the other workers sit idle
LONGEST_FIRST = (
    "test_pipeline.py",
    "test_faults.py",
    "test_lifecycle.py",
    "test_hostile.py",
    "test_cli.py",
    "test_benchmarks.py",
    "test_doors.py",
    "test_rest.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
