"""The novelty score on real cells: its arithmetic against a direct Mahalanobis computation,
the graph against numpy, the cross-fitted calibration on unseen cells of known types, and the
detection of a cell type held out of the reference."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split

from cellexplain.models import novelty as nv
from cellexplain.models.attribution import AttributionSpec, build_graph
from cellexplain.models.data import load_labelled
from cellexplain.models.train import dense


@pytest.fixture(scope="module")
def cells():
    data = load_labelled()
    labels = np.asarray(data.labels).astype(str)
    return dense(data.X).astype(np.float64), labels


def split(labels: np.ndarray, held_out: str | None = None, seed: int = 0):
    known = np.flatnonzero(labels != held_out)
    train, test = train_test_split(known, test_size=0.3, stratify=labels[known], random_state=seed)
    classes = sorted(set(labels[train]))
    return train, test, np.searchsorted(classes, labels[train])


def test_distances_are_mahalanobis_to_the_nearest_class_mean(cells):
    X, labels = cells
    train, test, y = split(labels)
    ref = nv.fit_reference(X[train], y, n_components=8)
    # the same quantities, computed directly: standardise, clip, project on the top principal
    # components, and measure under the inverse of the within-class covariance (plus ridge)
    z = np.clip((X[train] - X[train].mean(0)) / np.maximum(X[train].std(0), nv.MIN_SCALE), -10, 10)
    _, _, vt = np.linalg.svd(z - z.mean(0), full_matrices=False)
    scores = (z - z.mean(0)) @ vt[:8].T
    means = np.stack([scores[y == c].mean(0) for c in range(y.max() + 1)])
    within = scores - means[y]
    inv = np.linalg.inv(within.T @ within / len(within) + nv.RIDGE * np.eye(8))
    zt = np.clip((X[test] - X[train].mean(0)) / np.maximum(X[train].std(0), nv.MIN_SCALE), -10, 10)
    st = (zt - z.mean(0)) @ vt[:8].T
    want = np.min([np.einsum("ij,jk,ik->i", st - m, inv, st - m) for m in means], axis=0)
    np.testing.assert_allclose(nv.distances(ref, X[test]), want, rtol=1e-8)
    # novelty is the share of calibration distances below
    d = nv.distances(ref, X[test])
    np.testing.assert_array_equal(
        nv.novelty(ref, X[test]), [(ref.calibration < v).mean() for v in d]
    )


def test_the_graph_computes_what_numpy_does(cells):
    X, labels = cells
    train, test, y = split(labels)
    ref = nv.fit_reference(X[train], y)
    rng = np.random.default_rng(0)
    layers = [(rng.normal(size=(4, X.shape[1])), np.zeros(4))]
    want = nv.novelty(ref, X[test])
    for dtype, tolerance in ((np.float64, 0.0), (np.float32, 2 / len(ref.calibration))):
        graph = build_graph(
            layers, AttributionSpec(), np.zeros(X.shape[1]), dtype=dtype, novelty=ref
        )
        session = ort.InferenceSession(
            graph.SerializeToString(), providers=["CPUExecutionProvider"]
        )
        (got,) = session.run(["novelty"], {"x": X[test].astype(dtype)})
        assert np.max(np.abs(got - want)) <= tolerance + 1e-12
    # the float16 graph computes novelty from its float32 input, in float32
    graph = build_graph(
        layers, AttributionSpec(), np.zeros(X.shape[1]), dtype=np.float16, novelty=ref
    )
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(["novelty"], {"x": X[test].astype(np.float32)})
    assert got.dtype == np.float32 and np.max(np.abs(got - want)) <= 2 / len(ref.calibration)


def test_the_calibration_holds_on_new_cells_of_known_types(cells):
    """Cross-fitted, the calibration is that of cells the reference has not seen: unseen cells
    of the known types are flagged at about 1 - threshold."""
    X, labels = cells
    flagged = []
    for seed in range(3):
        train, test, y = split(labels, seed=seed)
        ref = nv.fit_reference(X[train], y, seed=seed)
        assert ref.n_calibration == len(train)
        flagged.append(nv.novelty(ref, X[test]))
    nov = np.concatenate(flagged)
    for threshold in (0.8, 0.9, 0.95):
        share = float((nov >= threshold).mean())
        assert abs(share - (1 - threshold)) < 0.06, (threshold, share)


@pytest.mark.parametrize("held_out", ["CD19+ B", "CD56+ NK"])
def test_a_cell_type_held_out_of_the_reference_is_novel(cells, held_out):
    X, labels = cells
    train, test, y = split(labels, held_out)
    ref = nv.fit_reference(X[train], y)
    unseen = np.flatnonzero(labels == held_out)
    nov = nv.novelty(ref, X[np.concatenate([test, unseen])])
    truth = np.r_[np.zeros(len(test)), np.ones(len(unseen))]
    assert roc_auc_score(truth, nov) > 0.8  # benchmarks.novelty: 0.83-0.99 for these
    # at the default threshold, most known cells are not flagged and many unseen ones are
    assert (nov[: len(test)] >= nv.DEFAULT_THRESHOLD).mean() < 0.06
    assert (nov[len(test) :] >= nv.DEFAULT_THRESHOLD).mean() > 0.3


@pytest.mark.parametrize("shape", [(300, 40), (40, 300)])
def test_top_components_span_the_svds(shape):
    """Both Gram routes (genes x genes for many cells, cells x cells for many genes) give the
    leading right singular vectors, up to sign."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=shape) * np.linspace(3, 0.1, shape[1])  # distinct variances
    z -= z.mean(0)
    pcs = nv._top_components(z, 6)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    np.testing.assert_allclose(np.abs(pcs.T @ vt[:6].T), np.eye(6), atol=1e-8)
