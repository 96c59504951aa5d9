"""The upload check (:mod:`cellexplain.service.h5ad_check`) in-process, on real ``.h5ad`` files
written by anndata and then edited with h5py as an attacker would: what passes, what is refused,
and that each refusal names the HDF5 path inside the upload."""

from __future__ import annotations

import pytest

from cellexplain.api.errors import InvalidInputError, TooLargeError
from cellexplain.service.h5ad_check import Limits, check_h5ad
from tests.integration import hostile_inputs as hostile

LIMITS = Limits(max_cells=100, max_genes=50, max_bytes=10 << 20)
GENES = [f"G{i}" for i in range(30)]


@pytest.fixture
def base():
    return hostile.small_adata(GENES, n_cells=20)


def test_a_file_anndata_wrote_passes_and_its_size_is_declared(base, tmp_path):
    path = tmp_path / "ok.h5ad"
    base.write_h5ad(path)
    declared = check_h5ad(path, LIMITS)
    assert (declared.n_cells, declared.n_genes) == (20, 30)
    assert 0 < declared.nbytes < LIMITS.max_bytes and declared.objects > 5


@pytest.mark.parametrize(
    ("build", "where"),
    [
        (lambda b, p: hostile.external_storage(b, p, "/etc/hostname"), "/uns/leak"),
        (lambda b, p: hostile.external_link(b, p, "/etc/hostname"), "/uns/x"),
        (lambda b, p: hostile.soft_link(b, p), "/uns/x"),
        (lambda b, p: hostile.virtual_dataset(b, p, "/etc/hostname"), "/uns/v"),
        (lambda b, p: hostile.reference_dataset(b, p), "/uns/r"),
    ],
    ids=["external-storage", "external-link", "soft-link", "virtual", "reference"],
)
def test_objects_pointing_outside_the_file_are_refused_by_path(base, tmp_path, build, where):
    path = build(base, tmp_path / "bad.h5ad")
    with pytest.raises(InvalidInputError) as e:
        check_h5ad(path, LIMITS)
    assert where in e.value.message, e.value.message
    assert "/etc/hostname" not in e.value.message  # nothing about the server's files


def test_more_cells_or_genes_than_a_request_may_have_are_refused(tmp_path):
    many_cells = hostile.small_adata(GENES, n_cells=101)
    path = tmp_path / "cells.h5ad"
    many_cells.write_h5ad(path)
    with pytest.raises(TooLargeError, match="101"):
        check_h5ad(path, LIMITS)
    wide = hostile.small_adata([f"G{i}" for i in range(51)], n_cells=5)
    wide.write_h5ad(path)
    with pytest.raises(TooLargeError, match="51"):
        check_h5ad(path, LIMITS)


def test_a_file_that_is_not_hdf5_is_a_400(tmp_path):
    path = tmp_path / "x.h5ad"
    path.write_bytes(b"not an HDF5 file at all")
    with pytest.raises(InvalidInputError):
        check_h5ad(path, LIMITS)


def test_a_group_of_too_many_objects_is_refused_before_it_is_walked(base, tmp_path):
    """12,000 scalars in one group: refused from the group's link count, naming the group."""
    import time

    path = hostile.many_scalars(base, tmp_path / "many.h5ad", 12_000)
    t0 = time.perf_counter()
    with pytest.raises(InvalidInputError) as e:
        check_h5ad(path, LIMITS)
    took = time.perf_counter() - t0
    assert "'/uns/many' holds 12000 objects" in e.value.message, e.value.message
    print(f"refused in {took * 1e3:.1f} ms")


def test_objects_spread_over_groups_are_counted_as_they_are_walked(base, tmp_path, monkeypatch):
    """No group over the cap, the file over it: refused at the first object past the cap."""
    from cellexplain.service import h5ad_check

    base.write_h5ad(tmp_path / "ok.h5ad")
    walked = check_h5ad(tmp_path / "ok.h5ad", LIMITS).objects
    monkeypatch.setattr(h5ad_check, "MAX_OBJECTS", walked + 5)
    path = hostile.many_scalars(base, tmp_path / "some.h5ad", 8)  # 9 more objects, one group
    with pytest.raises(InvalidInputError) as e:
        check_h5ad(path, LIMITS)
    assert f"past the {walked + 5}th object: too many objects" in e.value.message, e.value.message


def test_what_scanpy_writes_after_its_preprocessing_passes(tmp_path, pbmc):
    """A lab's file after the usual sc.pp steps (log1p writes uns['log1p']['base'] = None,
    which anndata stores as a null dataspace marked 'null'), written by anndata, passes;
    an unmarked null dataspace still does not."""
    import h5py
    import numpy as np
    import scanpy as sc

    adata = pbmc.raw.to_adata()[:200].copy()
    adata.X = np.rint(np.expm1(adata.X.toarray()))  # counts, as a lab starts
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    sc.pp.highly_variable_genes(adata, n_top_genes=200)
    sc.pp.pca(adata, n_comps=20)
    sc.pp.neighbors(adata)
    assert adata.uns["log1p"] == {"base": None}
    path = tmp_path / "scanpy.h5ad"
    adata.write_h5ad(path)
    limits = Limits(max_cells=1000, max_genes=1000, max_bytes=100 << 20)
    declared = check_h5ad(path, limits)
    assert (declared.n_cells, declared.n_genes) == (200, 765)
    with h5py.File(path, "a") as f:
        f["uns"].create_dataset("empty", data=h5py.Empty("f4"))
    with pytest.raises(InvalidInputError, match="null dataspace") as e:
        check_h5ad(path, limits)
    assert "/uns/empty" in e.value.message
