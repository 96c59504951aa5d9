"""Out-of-core training: a matrix streamed from its file gives the values, fingerprint and
checks of the same matrix read whole, every training row once per epoch, and a model."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp

import cellexplain.models.backed as backed
import cellexplain.models.train as train_mod
from cellexplain.models.backed import FileMatrix
from cellexplain.models.data import load_labelled
from cellexplain.models.errors import DataError
from cellexplain.models.train import TrainConfig, fit


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of ~40 PBMCs, so that a 700-cell file has many."""
    monkeypatch.setattr(backed, "BLOCK_VALUES", 12_000)
    monkeypatch.setattr(backed, "SHUFFLE_BLOCKS", 3)


@pytest.fixture(scope="module")
def csr_counts(counts_h5ad, tmp_path_factory):
    """The PBMC counts as CSR, with a row stored non-canonically (a gene twice, out of order)
    and an empty cell."""
    a = ad.read_h5ad(counts_h5ad)
    X = sp.csr_matrix(a.X)
    X.data[X.indptr[5] : X.indptr[6]] = 0  # cell 5 has no counts (stored zeros)
    X.eliminate_zeros()
    data, indices, indptr = X.data.copy(), X.indices.copy(), X.indptr.copy()
    s, e = indptr[10], indptr[11]
    indices[s:e] = indices[s:e][::-1]  # out of order
    indices[s] = indices[s + 1]  # a gene stored twice in cell 10
    X = sp.csr_matrix((data, indices, indptr), shape=X.shape)
    assert not X.has_canonical_format
    b = ad.AnnData(X, obs=a.obs, var=a.var)
    path = tmp_path_factory.mktemp("backed") / "csr.h5ad"
    b.write_h5ad(path)
    return path


@pytest.mark.parametrize("kind", ["csr", "dense", "zarr", "log1p"])
def test_streamed_matrix_is_the_matrix_read_whole(kind, csr_counts, counts_h5ad, tmp_path):
    path = {"csr": csr_counts, "dense": counts_h5ad}.get(kind)
    if kind == "zarr":
        path = tmp_path / "c.zarr"
        ad.read_h5ad(csr_counts).write_zarr(path)
    elif kind == "log1p":
        a = ad.read_h5ad(counts_h5ad)
        a.X = np.log1p(a.X / a.X.sum(1, keepdims=True) * 1e4).astype(np.float32)
        path = tmp_path / "log1p.h5ad"
        a.write_h5ad(path)
    whole = load_labelled(path, "bulk_labels", stream=False)
    streamed = load_labelled(path, "bulk_labels", stream=True)
    X = streamed.X
    assert isinstance(X, FileMatrix) and len(X.blocks) > 10
    assert streamed.sha256 == whole.sha256
    assert streamed.detection == whole.detection
    assert X.shape == whole.X.shape
    rows = np.array([699, 10, 5, 0, 10, 350, 41, 40])  # any order, repeats
    expect = whole.X[rows]
    expect = expect.toarray() if sp.issparse(expect) else expect
    np.testing.assert_array_equal(X[rows].toarray(), expect)  # bit for bit
    genes = np.array([3, 100, 7, 764])
    cut = whole.X[:, genes][rows]
    cut = cut.toarray() if sp.issparse(cut) else cut
    np.testing.assert_array_equal(X[:, genes][rows].toarray(), cut)
    assert X[:, genes][:, [1, 2]].take(rows).shape == (len(rows), 2)
    # the stored values the selected genes hold, counted in the check pass
    nnz = (whole.X[:, genes] != 0).sum() if kind != "log1p" else None
    if kind == "csr":
        assert X[:, genes].stored_values == nnz


def test_an_epoch_gives_every_training_row_once_shuffled(csr_counts):
    streamed = load_labelled(csr_counts, "bulk_labels", stream=True)
    whole = load_labelled(csr_counts, "bulk_labels", stream=False)
    rows = np.arange(3, 700, 2)
    seen = []
    for r, Xb in streamed.X.shuffled_batches(rows, 32, np.random.default_rng(0)):
        assert len(r) <= 32 and Xb.shape == (len(r), 765)
        np.testing.assert_array_equal(Xb.toarray(), whole.X[r].toarray())
        seen.append(r)
    order = np.concatenate(seen)
    assert sorted(order.tolist()) == rows.tolist()
    assert sum(len(r) < 32 for r in seen) <= 1  # partial batches carried over, not per group
    assert not (np.diff(order) > 0).all()  # not the file order
    again = np.concatenate(
        [r for r, _ in streamed.X.shuffled_batches(rows, 32, np.random.default_rng(1))]
    )
    assert not (again == order).all()  # another epoch, another order


def _with(path, tmp_path, edit):
    out = tmp_path / "edited.h5ad"
    out.write_bytes(path.read_bytes())
    with h5py.File(out, "r+") as f:
        edit(f["X"])
    return out


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda g: g["data"].__setitem__(g["indptr"][600] + 2, np.nan),
         r"cell 600, gene \d+ is NaN"),
        (lambda g: g["data"].__setitem__(g["indptr"][650], -3.0),
         r"cell 650, gene \d+ is negative \(-3\)"),
        (lambda g: g["indices"].__setitem__(g["indptr"][500] + 1, 5000),
         r"malformed at cell 500: indices run from 0 to 5000"),
        (lambda g: g["indptr"].__setitem__(300, g["indptr"][299] - 1), r"indptr decreases"),
        (lambda g: g["data"].__setitem__(g["indptr"][420], 1e308),
         r"counts of cell 420 sum to more"),
    ],
)  # fmt: skip
def test_bad_values_in_any_block_are_named(edit, message, csr_counts, tmp_path):
    def edit64(g):  # float64 values, so that 1e308 fits one and two overflow a total
        data = g["data"][...].astype(np.float64)
        del g["data"]
        g["data"] = data
        edit(g)
        if "1e308" in message or "counts of cell" in message:
            g["data"][g["indptr"][420] + 1] = 1e308

    with pytest.raises(DataError, match=message):
        load_labelled(_with(csr_counts, tmp_path, edit64), "bulk_labels", stream=True)
    if "indptr" not in message:  # read whole, the same problem is named (scipy never sees it)
        with pytest.raises(DataError, match=message.split(":")[-1].split(",")[-1]):
            load_labelled(_with(csr_counts, tmp_path, edit64), "bulk_labels", stream=False)


def test_int64_indices_hash_as_stored(csr_counts, tmp_path):
    def widen(g):
        indices = g["indices"][...].astype(np.int64)
        del g["indices"]
        g["indices"] = indices

    path = _with(csr_counts, tmp_path, widen)
    whole = load_labelled(path, "bulk_labels", stream=False)
    assert load_labelled(path, "bulk_labels", stream=True).sha256 == whole.sha256
    assert whole.sha256 != load_labelled(csr_counts, "bulk_labels", stream=False).sha256


def test_a_big_csc_file_is_refused_not_read_whole(csr_counts, tmp_path, monkeypatch):
    import cellexplain.models.data as data_mod

    a = ad.read_h5ad(csr_counts)
    a.X = sp.csc_matrix(a.X)
    path = tmp_path / "csc.h5ad"
    a.write_h5ad(path)
    assert load_labelled(path, "bulk_labels").X.shape == (700, 765)  # small: read whole
    monkeypatch.setattr(data_mod, "IN_MEMORY_VALUES", 1000)
    with pytest.raises(DataError, match=r"column by column \(CSC\) with [\d,]+ values.*tocsr"):
        load_labelled(path, "bulk_labels")


def test_what_fits_in_memory_trains_as_read_whole(csr_counts):
    cfg = TrainConfig(arch="mlp", max_epochs=6, patience=6, n_top_genes=300, refit=False)
    a = fit(load_labelled(csr_counts, "bulk_labels", stream=False), cfg, progress=False)
    b = fit(load_labelled(csr_counts, "bulk_labels", stream=True), cfg, progress=False)
    for (k, v), w in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        torch_equal = bool((v == w).all())
        assert torch_equal, k
    assert a.card_fields["training_data"].sha256 == b.card_fields["training_data"].sha256


def test_a_streamed_matrix_trains_a_model(csr_counts, monkeypatch):
    monkeypatch.setattr(train_mod, "IN_MEMORY_VALUES", 0)  # too big for memory: stream
    monkeypatch.setattr(train_mod, "STREAM_VAL_CELLS", 60)
    data = load_labelled(csr_counts, "bulk_labels", stream=True)
    cfg = TrainConfig(arch="mlp", max_epochs=40, patience=8, n_top_genes=500)
    f = fit(data, cfg, progress=False)
    m = f.card_fields["metrics"]
    # as good as the logistic-regression baseline on the same test cells, give or take
    assert m.model.macro_f1 > m.logistic_regression.macro_f1 - 0.1
    assert m.model.macro_f1 > 0.45
    assert "early stopping on 60 of the 140 validation cells (a stratified" in m.how_obtained
    assert f.card_fields["split"].refit_cells == 700
    assert f.test_x.shape[1] == 500
