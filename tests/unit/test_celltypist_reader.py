"""CellTypist models read without executing the pickle (models/celltypist.py): the arrays
scikit-learn pickled, exactly; anything else named in a pickle is refused and never runs."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from cellexplain.models.celltypist import CellTypistModelError, read_celltypist

sklearn = pytest.importorskip("sklearn", reason="the train extra (scikit-learn) is not installed")


def write_model(path: Path, n_classes: int) -> tuple[object, object, np.ndarray]:
    """A model pickled as CellTypist's ``Model.write`` pickles one: ``{"Model": classifier with
    ``features``, "Scaler_": scaler, "description": {...}}``, on log1p-like data."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    X = np.log1p(rng.poisson(1.0, (300, 40))).astype(np.float64)
    y = np.array([f"type {i % n_classes}" for i in range(300)], dtype=object)
    X[y == "type 1", :5] += 2
    scaler = StandardScaler().fit(X)
    clf = LogisticRegression(max_iter=500).fit(np.clip(scaler.transform(X), None, 10), y)
    clf.features = np.array([f"GENE{j}" for j in range(40)], dtype=object)
    description = {"date": "2026-12-06", "details": "test", "number_celltypes": n_classes}
    with path.open("wb") as f:
        pickle.dump({"Model": clf, "Scaler_": scaler, "description": description}, f)
    return clf, scaler, X


@pytest.mark.parametrize("n_classes", [2, 4])
def test_the_arrays_scikit_learn_pickled_come_back_exactly(tmp_path, n_classes):
    clf, scaler, X = write_model(tmp_path / "m.pkl", n_classes)
    m = read_celltypist(tmp_path / "m.pkl")
    assert m.classes == list(clf.classes_) and m.features == list(clf.features)
    np.testing.assert_array_equal(m.mean, scaler.mean_)
    np.testing.assert_array_equal(m.scale, scaler.scale_)
    # CellTypist's decision: clip((x - mean) / scale, max=10) @ coef.T + intercept
    z = np.minimum((X - m.mean) / m.scale, 10)
    want = clf.decision_function(z)
    if n_classes == 2:  # CellTypist scores a binary model as (-s, s)
        want = np.column_stack([-want, want])
    np.testing.assert_allclose(z @ m.coef.T + m.intercept, want, rtol=1e-12, atol=1e-12)
    assert m.estimator == "LogisticRegression" and m.description["details"] == "test"


class _Payload:
    """Pickles as a call to os.system: what a hostile .pkl does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_naming_anything_else_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.pkl"
    hostile.write_bytes(pickle.dumps({"Model": _Payload(marker), "Scaler_": None}))
    with pytest.raises(CellTypistModelError, match=r"names posix\.system.*refused"):
        read_celltypist(hostile)
    assert not marker.exists()
    evil = tmp_path / "eval.pkl"
    evil.write_bytes(b"cbuiltins\neval\n(S'1+1'\ntR.")  # protocol 0: eval('1+1')
    with pytest.raises(CellTypistModelError, match=r"names builtins\.eval"):
        read_celltypist(evil)
    # an allowed name used another way: numpy's _reconstruct on something else than ndarray
    odd = tmp_path / "odd.pkl"
    odd.write_bytes(b"cnumpy.core.multiarray\n_reconstruct\n(cnumpy\ndtype\nS'f8'\ntR(tR.")
    with pytest.raises(CellTypistModelError):
        read_celltypist(odd)
    with pytest.raises(CellTypistModelError, match="not a readable CellTypist model"):
        (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
        read_celltypist(tmp_path / "junk.pkl")
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps({"weights": [1.0, 2.0]}))
    with pytest.raises(CellTypistModelError, match="not of a CellTypist model"):
        read_celltypist(plain)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_a_clipped_linear_graph_computes_celltypists_decision_and_exact_attributions(
    tmp_path, dtype
):
    """build_graph's input_clip: CellTypist's clip((x - mean) / scale, max=10) before the
    layer; attributions coef_t x (z - z0) for the mean baseline (z0 = 0), complete."""
    import onnxruntime as ort

    from cellexplain.models.attribution import AttributionSpec, build_graph

    clf, _, X = write_model(tmp_path / "m.pkl", 4)
    m = read_celltypist(tmp_path / "m.pkl")
    X[:5, 0] = 40.0  # far above the clip for gene 0
    z = np.minimum((X - m.mean) / m.scale, 10)
    assert (z[:5, 0] == 10).all()
    graph = build_graph(
        [(m.coef, m.intercept)], AttributionSpec(baseline="mean"), m.mean, dtype=dtype,
        input_clip=(m.mean, m.scale, 10.0),
    )  # fmt: skip
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, attr, explained = sess.run(
        ["logits", "attributions", "explained_class"], {"x": X.astype(dtype)}
    )
    want = clf.decision_function(z)
    tol = 1e-9 if dtype == np.float64 else 2e-4
    np.testing.assert_allclose(logits, want, atol=tol, rtol=0)
    np.testing.assert_array_equal(explained, want.argmax(axis=1))
    np.testing.assert_allclose(attr, m.coef[explained] * z, atol=tol, rtol=0)
    rise = logits[np.arange(len(X)), explained] - m.intercept[explained]  # F(x) - F(baseline)
    np.testing.assert_allclose(attr.sum(axis=1), rise, atol=10 * tol, rtol=0)


def test_an_sgd_model_and_hostile_descriptions(tmp_path):
    """CellTypist's use_SGD / mini_batch models pickle scikit-learn's loss object: read as an
    inert stand-in. A description nesting a list in itself, or sharing one list so that it
    expands exponentially (a few KB that would become 2^40 values), is refused at once."""
    from sklearn.linear_model import SGDClassifier
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(1)
    X = np.log1p(rng.poisson(1.0, (200, 30))).astype(np.float64)
    y = np.array([f"t{i % 3}" for i in range(200)], dtype=object)
    scaler = StandardScaler().fit(X)
    clf = SGDClassifier(loss="log_loss", random_state=0).fit(scaler.transform(X), y)
    clf.features = np.array([f"G{j}" for j in range(30)], dtype=object)
    path = tmp_path / "sgd.pkl"
    path.write_bytes(pickle.dumps({"Model": clf, "Scaler_": scaler, "description": {}}))
    m = read_celltypist(path)
    assert m.estimator == "SGDClassifier"
    np.testing.assert_array_equal(m.coef, clf.coef_)
    loop: list = []
    loop.append(loop)
    laughs: list = ["ha"]
    for _ in range(40):
        laughs = [laughs, laughs]
    for name, description in (("loop", {"loop": loop}), ("laughs", {"x": laughs})):
        bomb = tmp_path / f"{name}.pkl"
        obj = {"Model": clf, "Scaler_": scaler, "description": description}
        bomb.write_bytes(pickle.dumps(obj))
        with pytest.raises(CellTypistModelError, match="description is nested deeper"):
            read_celltypist(bomb)


def test_an_imported_models_missing_genes_are_said_to_read_as_the_mean():
    from cellexplain.api.schemas import GeneMatching
    from cellexplain.service.core import missing_gene_warnings

    matching = GeneMatching(n_model_genes=100, n_found=70, n_missing=30, missing=["A", "B"],
                            n_submitted=70, n_unused=0, missing_fraction=0.3)  # fmt: skip
    (trained,) = missing_gene_warnings(matching)
    (imported,) = missing_gene_warnings(matching, imported=True)
    assert "read as zero" in trained and "test scores" in trained
    assert "read as their training mean" in imported and "test scores" not in imported


def test_a_pickle_setting_attributes_on_the_readers_stand_ins_touches_only_its_own_read(tmp_path):
    """BUILD on a class find_class returned sets attributes on it: the reader hands each read
    its own stand-ins, so the next read is untouched."""
    from cellexplain.models import celltypist

    tamper = tmp_path / "tamper.pkl"
    tamper.write_bytes(b"cnumpy\nndarray\n(N(dS'tampered'\nI1\nstb.")  # setattr(ndarray, ...)
    with pytest.raises(CellTypistModelError, match="not of a CellTypist model"):
        read_celltypist(tamper)
    assert not hasattr(celltypist._NdarrayClass, "tampered")
    clf, _, _ = write_model(tmp_path / "m.pkl", 3)
    assert read_celltypist(tmp_path / "m.pkl").classes == list(clf.classes_)
