"""Hostile inputs, generated (no network, no files from elsewhere): ``.h5ad`` files that point
outside themselves or lie about their size, and JSON bodies shaped to blow up a parser.

Shared by the hostile-input tests (tests/integration/test_hostile.py); each builder documents
what it attacks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp

ARRAY_ATTRS = {"encoding-type": "array", "encoding-version": "0.2.0"}


def small_adata(genes: list[str], n_cells: int = 20, seed: int = 0) -> ad.AnnData:
    """Raw counts of ``n_cells`` cells over ``genes`` (CSR), as a lab's file would hold."""
    rng = np.random.default_rng(seed)
    X = sp.random(n_cells, len(genes), density=0.2, format="csr", random_state=rng)
    X.data = np.ceil(X.data * 20).astype(np.float32)
    a = ad.AnnData(X.astype(np.float32))
    a.var_names = genes
    a.obs_names = [f"cell{i}" for i in range(n_cells)]
    return a


def _variant(base: ad.AnnData, path: Path, edit: Callable[[h5py.File], None]) -> Path:
    base.write_h5ad(path)
    with h5py.File(path, "a") as f:
        edit(f)
    return path


def external_storage(base: ad.AnnData, path: Path, target: str) -> Path:
    """The issue's reproduction: an ``uns`` array whose raw data is another file on the
    server (``external=``), dressed as an AnnData array so that anndata reads it."""

    def edit(f: h5py.File) -> None:
        d = f["uns"].create_dataset(
            "leak", shape=(4096,), dtype="u1", external=[(target, 0, h5py.h5f.UNLIMITED)]
        )
        d.attrs.update(ARRAY_ATTRS)

    return _variant(base, path, edit)


def external_link(base: ad.AnnData, path: Path, target: str) -> Path:
    return _variant(base, path, lambda f: f["uns"].__setitem__("x", h5py.ExternalLink(target, "/")))


def soft_link(base: ad.AnnData, path: Path) -> Path:
    return _variant(base, path, lambda f: f["uns"].__setitem__("x", h5py.SoftLink("/X")))


def virtual_dataset(base: ad.AnnData, path: Path, target: str) -> Path:
    def edit(f: h5py.File) -> None:
        layout = h5py.VirtualLayout(shape=(16,), dtype="u1")
        layout[:] = h5py.VirtualSource(target, "data", shape=(16,))
        d = f["uns"].create_virtual_dataset("v", layout)
        d.attrs.update(ARRAY_ATTRS)

    return _variant(base, path, edit)


def reference_dataset(base: ad.AnnData, path: Path) -> Path:
    def edit(f: h5py.File) -> None:
        d = f["uns"].create_dataset("r", data=np.array([f["X"].ref], dtype=h5py.ref_dtype))
        d.attrs.update(ARRAY_ATTRS)

    return _variant(base, path, edit)


def reference_attribute(base: ad.AnnData, path: Path) -> Path:
    """How anndata < 0.7 stored categories: an object reference in an attribute."""
    return _variant(base, path, lambda f: f["obs"].attrs.__setitem__("categories", f["X"].ref))


def opaque_obs_column(base: ad.AnnData, path: Path) -> Path:
    """An ``obs`` column of HDF5 opaque bytes (numpy void)."""

    def edit(f: h5py.File) -> None:
        n = f["obs"][f["obs"].attrs["_index"]].shape[0]
        d = f["obs"].create_dataset("blob", data=np.array([np.void(b"abcd")] * n))
        d.attrs.update(ARRAY_ATTRS)
        f["obs"].attrs["column-order"] = ["blob"]

    return _variant(base, path, edit)


def unknown_filter(base: ad.AnnData, path: Path) -> Path:
    """A dataset compressed with a plugin filter (32001, Blosc): reading it would make HDF5
    look for and load a shared library. Written with the filter optional, so it is recorded
    even though no plugin is installed here."""

    def edit(f: h5py.File) -> None:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((16,))
        dcpl.set_filter(32001, h5py.h5z.FLAG_OPTIONAL, (2, 2, 4, 64))
        space = h5py.h5s.create_simple((64,))
        h5py.h5d.create(f["uns"].id, b"packed", h5py.h5t.STD_U8LE, space, dcpl=dcpl)

    return _variant(base, path, edit)


def hard_link_cycle(base: ad.AnnData, path: Path) -> Path:
    return _variant(base, path, lambda f: f["uns"].__setitem__("loop", f["uns"]))


def string_matrix(base: ad.AnnData, path: Path) -> Path:
    """``X`` of fixed-length byte strings (``S``): HDF5-valid, not a matrix of numbers."""

    def edit(f: h5py.File) -> None:
        n, g = base.shape
        del f["X"]
        d = f.create_dataset("X", data=np.full((n, g), b"12", dtype="S2"))
        d.attrs.update(ARRAY_ATTRS)

    return _variant(base, path, edit)


def huge_dense_matrix(base: ad.AnnData, path: Path, n_cells: int = 200_000) -> Path:
    """The decompression bomb: ``X`` declared dense ``[n_cells, n_genes]`` float32, all zeros
    (gzip turns it into a few MB), with matching obs."""
    g = base.n_vars
    empty = ad.AnnData(
        sp.csr_matrix((n_cells, g), dtype=np.float32),
        var=base.var.copy(),
    )
    empty.obs_names = [f"c{i}" for i in range(n_cells)]
    empty.write_h5ad(path)
    with h5py.File(path, "a") as f:
        del f["X"]
        d = f.create_dataset(
            "X", shape=(n_cells, g), dtype="f4", chunks=(1024, g), compression="gzip"
        )
        d.attrs.update(ARRAY_ATTRS)
    return path


def one_value_rows(n_bytes: int) -> bytes:
    """``{"genes": ["CD3E"], "cells": [[0],[0],...]}`` of about ``n_bytes``: a Python object
    per 4 bytes to a generic parser."""
    n = max(1, (n_bytes - 40) // 4)
    return b'{"genes":["CD3E"],"cells":[' + b",".join([b"[0]"] * n) + b"]}"


def dense_zeros(genes: list[str], n_cells: int) -> bytes:
    """Dense rows of ``0`` over ``genes``: the most values per byte JSON allows (2 bytes)."""
    row = b"[" + b",".join([b"0"] * len(genes)) + b"]"
    names = b",".join(b'"' + g.encode() + b'"' for g in genes)
    return (
        b'{"genes":['
        + names
        + b'],"attributions":"none","cells":['
        + b",".join([row] * n_cells)
        + b"]}"
    )


def sparse_maps(genes: list[str], n_cells: int, per_cell: int) -> bytes:
    """``{gene: 1}`` maps, ``per_cell`` entries each."""
    cell = b"{" + b",".join(b'"' + g.encode() + b'":1' for g in genes[:per_cell]) + b"}"
    return b'{"attributions":"none","cells":[' + b",".join([cell] * n_cells) + b"]}"


def deep_nesting(depth: int) -> bytes:
    return b'{"genes":["CD3E"],"cells":' + b"[" * depth + b"]" * depth + b"}"


def bad_sparse_indices(base: ad.AnnData, path: Path, value: int) -> Path:
    """CSR whose column indices point outside the matrix (scipy's C code trusts them)."""

    def edit(f: h5py.File) -> None:
        idx = f["X"]["indices"]
        idx[: min(5, idx.shape[0])] = value

    return _variant(base, path, edit)


def decreasing_indptr(base: ad.AnnData, path: Path) -> Path:
    def edit(f: h5py.File) -> None:
        ptr = f["X"]["indptr"]
        values = ptr[:]
        values[1], values[2] = values[2], values[1] - 1
        ptr[:] = values

    return _variant(base, path, edit)


def time_datatype(base: ad.AnnData, path: Path) -> Path:
    """A dataset of HDF5's time type, which numpy (and anndata) has no equivalent for."""

    def edit(f: h5py.File) -> None:
        space = h5py.h5s.create_simple((4,))
        h5py.h5d.create(f["uns"].id, b"when", h5py.h5t.UNIX_D32LE.copy(), space)

    return _variant(base, path, edit)


def non_utf8_name(base: ad.AnnData, path: Path) -> Path:
    return _variant(base, path, lambda f: h5py.h5g.create(f["uns"].id, b"\xff\xfe"))


def null_dataspace(base: ad.AnnData, path: Path) -> Path:
    def edit(f: h5py.File) -> None:
        d = f["uns"].create_dataset("empty", data=h5py.Empty("f4"))
        d.attrs.update(ARRAY_ATTRS)

    return _variant(base, path, edit)


def legacy_sparse(path: Path, genes: list[str], n_cells: int) -> Path:
    """The layout of anndata < 0.7: ``X`` a group with ``h5sparse_shape``, ``obs``/``var``
    compound datasets; ``n_cells`` declared, one value each."""
    g = len(genes)
    with h5py.File(path, "w") as f:
        X = f.create_group("X")
        X.attrs["h5sparse_format"] = "csr"
        X.attrs["h5sparse_shape"] = np.array([n_cells, g])
        X.create_dataset("data", data=np.full(n_cells, 5, np.float32), compression="gzip")
        X.create_dataset(
            "indices", data=(np.arange(n_cells) % g).astype(np.int32), compression="gzip"
        )
        X.create_dataset("indptr", data=np.arange(n_cells + 1, dtype=np.int64), compression="gzip")
        obs = np.zeros(n_cells, dtype=[("index", "S12")])
        obs["index"] = [b"c%d" % i for i in range(n_cells)]
        f.create_dataset("obs", data=obs, compression="gzip")
        var = np.zeros(g, dtype=[("index", "S32")])
        var["index"] = [x.encode() for x in genes]
        f.create_dataset("var", data=var, compression="gzip")
    return path


def nan_rows(genes: list[str], n_bytes: int, max_rows: int) -> bytes:
    """Dense rows of ``NaN``: not JSON, but what Python's json module writes."""
    row = b"[" + b",".join([b"NaN"] * len(genes)) + b"]"
    names = b",".join(b'"' + g.encode() + b'"' for g in genes)
    n = min(max_rows, max(1, (n_bytes - len(names) - 64) // (len(row) + 1)))
    return b'{"genes":[' + names + b'],"cells":[' + b",".join([row] * n) + b"]}"


def double_deflate(base: ad.AnnData, path: Path, inflated_bytes: int) -> Path:
    """An ``uns`` array of 1,024 bytes declared (well within every declared-size limit) with two
    deflate filters, whose one chunk on disk is ``deflate(deflate(inflated_bytes zeros))``: a few
    KB in the file, but HDF5's deflate filter grows its buffer until the stream ends, so reading
    it needs ``inflated_bytes`` of memory whatever the dataset declares."""
    import zlib

    inner = zlib.compressobj(9)
    block = bytes(1 << 20)
    parts = [inner.compress(block) for _ in range(inflated_bytes >> 20)]
    once = b"".join(parts) + inner.flush()
    twice = zlib.compress(once, 9)

    def edit(f: h5py.File) -> None:
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_chunk((1024,))
        dcpl.set_deflate(9)
        dcpl.set_deflate(9)
        space = h5py.h5s.create_simple((1024,))
        dsid = h5py.h5d.create(f["uns"].id, b"bomb", h5py.h5t.STD_U8LE, space, dcpl=dcpl)
        d = h5py.Dataset(dsid)
        d.id.write_direct_chunk((0,), twice, filter_mask=0)
        d.attrs.update(ARRAY_ATTRS)

    return _variant(base, path, edit)


def many_scalars(base: ad.AnnData, path: Path, n: int) -> Path:
    """``n`` scalar datasets in ``uns``: each costs anndata ~2 ms to read (45,000 took 90 s
    under the old 50,000-object cap)."""

    def edit(f: h5py.File) -> None:
        g = f["uns"].create_group("many")
        g.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        for i in range(n):
            d = g.create_dataset(f"k{i}", data=np.int64(i))
            d.attrs.update({"encoding-type": "numeric-scalar", "encoding-version": "0.2.0"})

    return _variant(base, path, edit)


def shared_heap_strings(base: ad.AnnData, path: Path, where: str, length: int) -> Path:
    """Every element of a string array (``"obs_names"``, or ``"uns"``: an array of as many
    strings as cells) pointing at one heap string of ``length`` characters (the first one's): a
    small file whose strings are ``n x length`` characters once read (an outside tester's 1.2 MB
    file made a 1 GB answer and a 3.2 GB worker; moved into ``uns``, 950 MB written to TMPDIR
    before a refusal)."""
    a = base.copy()
    n = a.n_obs
    big = "x" * length
    if where == "obs_names":
        a.obs_names = [big] + [f"c{i}" for i in range(1, n)]
        dataset = "obs/_index"
    else:
        a.uns["notes"] = np.array([big] + [f"n{i}" for i in range(1, n)], dtype=object)
        dataset = "uns/notes"
    a.write_h5ad(path)
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset()
    with open(path, "r+b") as fh:  # each element is a 16-byte (length, heap, index) reference
        fh.seek(offset)
        first = fh.read(16)
        fh.seek(offset)
        fh.write(first * n)
    return path
