"""Files of cells as labs get them, written the way their tools write them.

* 10x HDF5, Cell Ranger 3+ (``filtered_feature_bc_matrix.h5``): 10x's documented "Feature-Barcode
  Matrix HDF5" layout: ``/matrix`` holds a CSC matrix of features x barcodes (``data`` int32,
  ``indices``/``indptr`` int64, ``shape`` int32), ``barcodes`` and ``features/{id, name,
  feature_type, genome, _all_tag_keys}`` as fixed-length byte strings, gzip-compressed as Cell
  Ranger stores them, plus antibody-capture features (as Cell Ranger multi adds) that a gene
  expression reader drops;
* 10x HDF5, Cell Ranger 2 (``filtered_gene_bc_matrices_h5.h5``): one group per genome with
  ``barcodes``, ``genes``, ``gene_names``, ``data``, ``indices``, ``indptr``, ``shape``;
* 10x Matrix Market folders: Cell Ranger 3+ (``matrix.mtx.gz``, ``features.tsv.gz`` with the
  feature type column, ``barcodes.tsv.gz``) and Cell Ranger 2 (``matrix.mtx``, ``genes.tsv``,
  ``barcodes.tsv``), the matrix genes x cells in ``coordinate integer general`` form;
* ``.loom`` written by loompy (``loompy.create``, the format's reference writer); ``.zarr``
  by anndata; ``.csv``/``.tsv`` by pandas.

Each builder's output is checked by the tests through the real readers (scanpy's 10x readers,
anndata's Loom and Zarr readers), against the counts it was given.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

#: the antibody-capture features a Cell Ranger multi run adds to the gene expression ones
ANTIBODIES = ("CD3_TotalSeqB", "CD19_TotalSeqB")


def _strings(values: list[str]) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=f"S{max(len(v) for v in values)}")


def write_10x_h5(
    path: Path, counts: sp.csr_matrix, barcodes: list[str], ids: list[str], names: list[str]
) -> Path:
    """Cell Ranger 3+'s HDF5 of ``counts`` (cells x genes, integer), with antibody features."""
    n_cells = counts.shape[0]
    rng = np.random.default_rng(0)
    antibody = sp.csr_matrix(rng.poisson(20, (n_cells, len(ANTIBODIES))).astype(np.int32))
    full = sp.hstack([counts.astype(np.int32), antibody]).tocsr()
    csc = sp.csc_matrix(full.T)  # features x barcodes, stored by barcode (CSC of the transpose)
    csc.sort_indices()
    feature_ids = [*ids, *ANTIBODIES]
    feature_names = [*names, *(a.split("_")[0] for a in ANTIBODIES)]
    types = ["Gene Expression"] * len(ids) + ["Antibody Capture"] * len(ANTIBODIES)
    kw = {"compression": "gzip", "compression_opts": 4}
    with h5py.File(path, "w") as f:
        f.attrs["filetype"] = "matrix"
        f.attrs["library_ids"] = _strings(["sample1"])
        f.attrs["chemistry_description"] = "Single Cell 3' v3"
        f.attrs["software_version"] = "cellranger-7.1.0"
        m = f.create_group("matrix")
        m.create_dataset("barcodes", data=_strings(barcodes), **kw)
        m.create_dataset("data", data=csc.data.astype(np.int32), **kw)
        m.create_dataset("indices", data=csc.indices.astype(np.int64), **kw)
        m.create_dataset("indptr", data=csc.indptr.astype(np.int64), **kw)
        m.create_dataset("shape", data=np.array(csc.shape, dtype=np.int32), **kw)
        feats = m.create_group("features")
        feats.create_dataset("_all_tag_keys", data=_strings(["genome"]))
        feats.create_dataset("id", data=_strings(feature_ids), **kw)
        feats.create_dataset("name", data=_strings(feature_names), **kw)
        feats.create_dataset("feature_type", data=_strings(types), **kw)
        feats.create_dataset("genome", data=_strings(["GRCh38"] * len(feature_ids)), **kw)
    return path


def write_10x_h5_v2(
    path: Path, counts: sp.csr_matrix, barcodes: list[str], ids: list[str], names: list[str]
) -> Path:
    """Cell Ranger 2's HDF5: a group per genome (here ``GRCh38``)."""
    csc = sp.csc_matrix(counts.astype(np.int32).T)
    csc.sort_indices()
    with h5py.File(path, "w") as f:
        g = f.create_group("GRCh38")
        g.create_dataset("barcodes", data=_strings(barcodes))
        g.create_dataset("data", data=csc.data.astype(np.int32))
        g.create_dataset("indices", data=csc.indices.astype(np.int64))
        g.create_dataset("indptr", data=csc.indptr.astype(np.int64))
        g.create_dataset("shape", data=np.array(csc.shape, dtype=np.int32))
        g.create_dataset("genes", data=_strings(ids))
        g.create_dataset("gene_names", data=_strings(names))
    return path


def write_10x_mtx(
    folder: Path,
    counts: sp.csr_matrix,
    barcodes: list[str],
    ids: list[str],
    names: list[str],
    version: int = 3,
) -> Path:
    """A Cell Ranger Matrix Market folder: gzipped with features.tsv.gz (3+), plain with
    genes.tsv (2)."""
    folder.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if version >= 3 else open
    gz = ".gz" if version >= 3 else ""
    with opener(folder / f"matrix.mtx{gz}", "wb") as f:
        scipy.io.mmwrite(f, sp.coo_matrix(counts.astype(np.int64).T), field="integer")
    rows = (
        [f"{i}\t{n}\tGene Expression" for i, n in zip(ids, names, strict=True)]
        if version >= 3
        else [f"{i}\t{n}" for i, n in zip(ids, names, strict=True)]
    )
    features = "features.tsv" if version >= 3 else "genes.tsv"
    with opener(folder / f"{features}{gz}", "wt") as f:
        f.write("\n".join(rows) + "\n")
    with opener(folder / f"barcodes.tsv{gz}", "wt") as f:
        f.write("\n".join(barcodes) + "\n")
    return folder


def write_loom(path: Path, counts: sp.csr_matrix, barcodes: list[str], names: list[str]) -> Path:
    """A Loom file, by loompy: genes as rows (``Gene``), cells as columns (``CellID``)."""
    import loompy

    loompy.create(
        str(path),
        sp.coo_matrix(counts.T).astype(np.float32),
        row_attrs={"Gene": np.array(names)},
        col_attrs={"CellID": np.array(barcodes)},
    )
    return path


def write_table(path: Path, counts: sp.csr_matrix, barcodes: list[str], names: list[str],
                sep: str = ",", genes_as_rows: bool = False) -> Path:  # fmt: skip
    """A text table with names in the first row and column (cells x genes, or the transpose),
    gzipped when ``path`` ends with ``.gz``."""
    df = pd.DataFrame(counts.toarray().astype(np.int64), index=barcodes, columns=names)
    (df.T if genes_as_rows else df).to_csv(path, sep=sep)
    return path


def write_all(folder: Path, counts: sp.csr_matrix, barcodes: list[str], ids: list[str],
              names: list[str]) -> dict[str, Path]:  # fmt: skip
    """Every kind above, of the same cells: ``{kind: path}``."""
    folder.mkdir(parents=True, exist_ok=True)
    a = ad.AnnData(
        counts.astype(np.float32),
        obs=pd.DataFrame(index=barcodes),
        var=pd.DataFrame({"gene_ids": ids}, index=names),
    )
    a.write_zarr(folder / "cells.zarr")
    return {
        "10x_h5": write_10x_h5(folder / "filtered_feature_bc_matrix.h5", counts, barcodes, ids,
                               names),
        "10x_h5_v2": write_10x_h5_v2(folder / "filtered_gene_bc_matrices_h5.h5", counts,
                                     barcodes, ids, names),
        "10x_mtx": write_10x_mtx(folder / "filtered_feature_bc_matrix", counts, barcodes, ids,
                                 names),
        "10x_mtx_v2": write_10x_mtx(folder / "hg19", counts, barcodes, ids, names, version=2),
        "10x_mtx_file": write_10x_mtx(folder / "sample", counts, barcodes, ids, names)
        / "matrix.mtx.gz",
        "loom": write_loom(folder / "cells.loom", counts, barcodes, names),
        "zarr": folder / "cells.zarr",
        "csv": write_table(folder / "cells.csv", counts, barcodes, names),
        "tsv_gz": write_table(folder / "cells.tsv.gz", counts, barcodes, names, sep="\t"),
        "csv_genes_as_rows": write_table(folder / "genes_by_cells.csv", counts, barcodes, names,
                                         genes_as_rows=True),
    }  # fmt: skip
