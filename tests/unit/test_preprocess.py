from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from cellexplain.models.errors import PreprocessError
from cellexplain.models.preprocess import (
    detect_input_kind,
    normalize_log1p,
    select_variable_genes,
    to_model_input,
)


def test_detects_counts_and_log1p(pbmc):
    raw = pbmc.raw.X
    assert detect_input_kind(raw).kind == "log1p_cp10k"
    counts = sp.csr_matrix(np.rint(np.expm1(raw.toarray()) * 3))
    det = detect_input_kind(counts)
    assert det.kind == "counts"
    assert "integer" in det.reason


def test_rejects_values_that_are_neither(pbmc):
    cpm = np.expm1(pbmc.raw.X.toarray()) * 100.0 + 0.5  # non-integer, far above log range
    with pytest.raises(PreprocessError, match="neither raw counts nor log1p"):
        detect_input_kind(cpm)


@pytest.mark.parametrize(
    ("value", "word"), [(np.nan, "NaN"), (np.inf, "infinite"), (-1.0, "negative")]
)
def test_bad_values_are_named(value, word):
    x = np.ones((3, 4), dtype=np.float32)
    x[1, 2] = value
    with pytest.raises(PreprocessError, match=word):
        detect_input_kind(x)


def test_normalize_matches_scanpy_and_keeps_sparsity():
    import anndata as ad
    import scanpy as sc

    rng = np.random.default_rng(0)
    counts = rng.poisson(0.5, size=(50, 200)).astype(np.float32)
    counts[3] = 0  # a cell with no counts stays all-zero instead of dividing by zero
    ref = ad.AnnData(counts.copy())
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    dense = normalize_log1p(counts)
    np.testing.assert_allclose(dense, ref.X, rtol=1e-5, atol=1e-6)
    assert not dense[3].any()
    sparse = normalize_log1p(sp.csr_matrix(counts))
    assert sp.issparse(sparse)
    np.testing.assert_allclose(sparse.toarray(), dense, rtol=1e-6, atol=1e-6)


def test_normalisation_uses_all_genes_before_selection():
    counts = np.array([[10.0, 30.0, 60.0]])
    full = normalize_log1p(counts)[:, :2]
    subset_first = normalize_log1p(counts[:, :2])
    assert not np.allclose(full, subset_first)
    np.testing.assert_allclose(np.expm1(full), [[1000.0, 3000.0]], rtol=1e-5)


def test_log1p_input_passes_through_and_unknown_kind_fails():
    x = np.array([[0.5, 1.0]], dtype=np.float32)
    assert to_model_input(x, "log1p_cp10k") is x
    with pytest.raises(PreprocessError, match="unknown input kind"):
        to_model_input(x, "tpm")  # type: ignore[arg-type]


def test_variable_gene_selection_is_deterministic_and_dense_sparse_agree():
    rng = np.random.default_rng(1)
    x = np.log1p(rng.poisson(1.0, size=(100, 40)) * rng.uniform(0.1, 5, size=40)).astype(np.float32)
    top = select_variable_genes(x, 10)
    assert len(top) == 10 and np.all(np.diff(top) > 0)
    np.testing.assert_array_equal(top, select_variable_genes(sp.csr_matrix(x), 10))
    expected = np.sort(np.argsort(-x.var(axis=0), kind="stable")[:10])
    np.testing.assert_array_equal(top, expected)
    np.testing.assert_array_equal(select_variable_genes(x, 100), np.arange(40))


def test_sparse_normalisation_in_blocks_equals_the_dense_one(monkeypatch):
    """The CSR path works a block of rows at a time (and sums a gene stored twice in a row,
    as a dense matrix would); same values as the dense path."""
    import cellexplain.models.preprocess as pre

    rng = np.random.default_rng(1)
    dense = rng.poisson(0.7, size=(500, 60)).astype(np.float32)
    dense[7] = 0  # an empty cell stays empty
    X = sp.csr_matrix(dense)
    # the same matrix with one value split over two entries of its row (not canonical)
    rows, cols = X.nonzero()
    vals = np.asarray(X[rows, cols]).ravel()
    half = vals[0] / 2
    twice = sp.csr_matrix(
        (np.r_[vals[1:], half, half], (np.r_[rows[1:], rows[0], rows[0]],
                                       np.r_[cols[1:], cols[0], cols[0]])),
        shape=X.shape,
    )  # fmt: skip
    monkeypatch.setattr(pre, "NORMALIZE_BLOCK", 97)  # many blocks
    want = pre.normalize_log1p(dense)
    for m in (X, twice):
        got = pre.normalize_log1p(m)
        assert sp.issparse(got) and got.dtype == np.float32
        np.testing.assert_allclose(got.toarray(), want, rtol=1e-6, atol=1e-7)


def test_subnormal_totals_normalise_like_any_other():
    """A cell whose counts sum to a subnormal number (1e-310) made 1e4 / total infinite and the
    cell NaN (NaN probabilities in a 200 answer); dividing first stays finite. Dense and sparse
    agree, and such a cell reads as the same cell at a normal scale."""
    X = np.array([[1e-310, 3e-310, 0.0], [1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    for out in (normalize_log1p(X), normalize_log1p(sp.csr_matrix(X)).toarray()):
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out[0], out[1], rtol=1e-6)
        assert not out[2].any()
