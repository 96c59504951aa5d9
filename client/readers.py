"""Read the single-cell files labs have into AnnData, each with its format's kept reader.

=============================  =================================  ==========================
format                         reader                             install
=============================  =================================  ==========================
``.h5ad``                      anndata (``annotate``: h5py        base
                               chunks, never the whole matrix)
``.zarr`` (AnnData)            ``anndata.io.read_zarr``           base (anndata needs zarr)
10x HDF5 (Cell Ranger 3+, 2)   ``scanpy.read_10x_h5``             ``[formats]`` (scanpy)
10x Matrix Market folder/file  ``scanpy.read_10x_mtx``            ``[formats]`` (scanpy)
``.loom``                      ``anndata.io.read_loom``           ``[formats]`` (loompy)
CSV / TSV (``.gz`` too)        ``pandas.read_csv`` (C parser)     base
=============================  =================================  ==========================

scanpy's 10x readers are the ones scanpy users call (``sc.read_10x_h5``, ``sc.read_10x_mtx``):
they know both Cell Ranger layouts, keep gene IDs beside symbols, and drop non-expression
features (antibody capture) as Cell Ranger users expect. anndata's Loom reader is anndata's own,
on loompy (the format's reference library). Text tables go through pandas' C parser, which
anndata's ``read_csv`` (a Python loop per line) is not; the result is the same AnnData.

Every reader gives cells as rows, genes as columns, gene symbols as ``var_names`` where the file
has them (10x: IDs in ``var['gene_ids']``, chosen with ``gene_key='gene_ids'``), names made
unique as ``read_10x_mtx`` does (``TBCE``, ``TBCE-1``) so that a duplicated symbol never reads as
one gene twice.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellexplain.api.errors import InvalidInputError, brief
from cellexplain.api.formats import FORMATS, describe, detect, tenx_mtx_parts

#: the extra that installs the readers the base install lacks
FORMATS_EXTRA = "pip install 'cellexplain[formats]'"
#: what a message lists as readable
READABLE = ".h5ad, .zarr, 10x .h5, a 10x Matrix Market folder, .loom, .csv/.tsv"


def file_format(path: str | Path) -> str:
    """The format key of ``path`` (see :data:`cellexplain.api.formats.FORMATS`).

    Raises:
        InvalidInputError: not found, unreadable, or a format no reader here reads; the
            message says what it is and what is read.
    """
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"input file not found: {path}", "input")
    try:
        kind = detect(path)
    except OSError as e:
        damaged = "truncated" in str(e) or "signature" in str(e) or "Unable to" in str(e)
        hint = " (a damaged or incomplete copy? copy or download it again)" if damaged else ""
        raise InvalidInputError(f"cannot read {path}: {e.strerror or e}{hint}", "input") from e
    except Exception as e:  # a damaged HDF5 structure: h5py raises many kinds
        raise InvalidInputError(
            f"{path} is not a readable {path.suffix or 'file'}: {type(e).__name__}: "
            f"{brief(str(e), 300)}",
            "input",
        ) from e
    if kind is None or kind == "zip":
        if path.is_dir():
            what = "a folder that is neither an AnnData .zarr store nor a 10x Matrix Market folder"
        elif kind is None and path.suffix.lower() in (".h5ad", ".h5", ".loom"):
            what = f"not a readable {path.suffix} file (its content is of no format this reads)"
        else:
            what = describe(kind)
        raise InvalidInputError(f"{path} is {what}; readable: {READABLE}", "input")
    if kind == "mtx":
        raise InvalidInputError(
            f"{path} is a Matrix Market file with no gene names beside it: put it in a folder "
            "with features.tsv.gz (or genes.tsv) and barcodes.tsv.gz, as Cell Ranger writes "
            "them, and pass the folder",
            "input",
        )
    return kind


def read(
    path: str | Path,
    *,
    transpose: bool = False,
    genome: str | None = None,
    kind: str | None = None,
) -> ad.AnnData:
    """The AnnData of any readable single-cell file (see the module docstring), cells x genes.

    Args:
        path: a file, or a folder (``.zarr`` store, 10x Matrix Market folder).
        transpose: a text table holds genes as rows and cells as columns (other formats say
            their orientation themselves).
        genome: for a 10x HDF5 file of several genomes, the one to read.
        kind: its format when the caller has told it already (:func:`file_format`).

    Raises:
        InvalidInputError: the file is of no readable format, damaged, or needs a reader that
            is not installed (the message names the extra).
    """
    path = Path(path)
    kind = kind or file_format(path)
    if transpose and kind not in ("csv", "tsv"):
        raise InvalidInputError(
            f"--transpose is for text tables; {path} is {describe(kind)}, whose orientation "
            "the file says",
            "transpose",
        )
    if genome is not None and not kind.startswith("10x_h5"):
        raise InvalidInputError(f"--genome is for 10x HDF5 files; {path} is {describe(kind)}")
    try:
        with warnings.catch_warnings():  # duplicated names: made unique below, as the docs say
            warnings.filterwarnings("ignore", message=".*names are not unique")
            adata = _READERS[kind](path, transpose=transpose, genome=genome)
    except ImportError as e:
        raise InvalidInputError(
            f"reading {describe(kind)} needs {FORMATS[kind].reader}, not installed ({e.name}): "
            f"{FORMATS_EXTRA}",
            "input",
        ) from e
    except InvalidInputError:
        raise
    except Exception as e:  # each reader raises its own kinds for a damaged file
        raise InvalidInputError(
            f"{path} looks like {describe(kind)} but {FORMATS[kind].reader} cannot read it: "
            f"{type(e).__name__}: {brief(str(e), 300)}",
            "input",
        ) from e
    if adata.n_vars == 0:
        what = " (a 10x file whose features are all antibody or CRISPR captures?)"
        raise InvalidInputError(
            f"{path} holds no genes{what if kind.startswith('10x') else ''}: nothing to annotate",
            "input",
        )
    if kind not in ("h5ad", "zarr") and not adata.var_names.is_unique:
        adata.var_names_make_unique()
    return adata


def _h5ad(path: Path, **_: Any) -> ad.AnnData:
    return ad.read_h5ad(path)


def _zarr(path: Path, **_: Any) -> ad.AnnData:
    return ad.io.read_zarr(path)


def _tenx_h5(path: Path, *, genome: str | None, **_: Any) -> ad.AnnData:
    """scanpy's reader, told the genome when the file holds several (a "barnyard" reference:
    Cell Ranger prefixes each gene with its genome, ``GRCh38_CD3E``, which is taken off)."""
    import h5py
    import scanpy as sc

    with h5py.File(path, "r") as f:
        if "matrix" in f:
            raw = f["matrix/features/genome"][:] if "genome" in f["matrix/features"] else []
            genomes = sorted({g.decode() if isinstance(g, bytes) else str(g) for g in raw})
        else:  # Cell Ranger 2: a group per genome
            genomes = sorted(f.keys())
    if len(genomes) > 1 and genome is None:
        raise InvalidInputError(
            f"{path} holds {len(genomes)} genomes ({', '.join(genomes)}): pass --genome NAME "
            "(genome= in Python) to read one",
            "genome",
        )
    if genome is not None and genomes and genome not in genomes:
        raise InvalidInputError(
            f"{path} has no genome {genome!r}; it holds: {', '.join(genomes)}", "genome"
        )
    adata = sc.read_10x_h5(path, genome=genome)
    if genome is not None and len(genomes) > 1:
        prefix = re.compile(rf"^{re.escape(genome)}_+")
        adata.var_names = [prefix.sub("", str(g)) for g in adata.var_names]
        if "gene_ids" in adata.var:
            adata.var["gene_ids"] = [prefix.sub("", str(g)) for g in adata.var["gene_ids"]]
    return adata


def _tenx_mtx(path: Path, **_: Any) -> ad.AnnData:
    import scanpy as sc

    parts = tenx_mtx_parts(path)
    assert parts is not None  # detect() said so
    folder, prefix = parts
    return sc.read_10x_mtx(folder, prefix=prefix or None)


def _loom(path: Path, **_: Any) -> ad.AnnData:
    return ad.io.read_loom(path, sparse=True)


def _table(path: Path, *, transpose: bool, sep: str, **_: Any) -> ad.AnnData:
    df = pd.read_csv(path, sep=sep, index_col=0)
    if transpose:
        df = df.T
    if df.shape[1] == 0:
        raise InvalidInputError(f"{path} has no columns after its first (the row names)", "input")
    bad = [str(c) for c, t in df.dtypes.items() if not pd.api.types.is_numeric_dtype(t)]
    if bad:
        which = "row" if transpose else "column"
        raise InvalidInputError(
            f"{path}: {which} {brief(bad[0])} holds text, not numbers (of {len(bad)}): a table of "
            "cells (rows) x genes (columns) with names in the first row and column; genes as "
            "rows: --transpose",
            "input",
        )
    if not transpose and _barcodes(df.columns) and not _barcodes(df.index):
        raise InvalidInputError(
            f"{path}: its columns are named like cell barcodes (e.g. {brief(str(df.columns[0]))}) "
            "and its rows are not: genes as rows and cells as columns? pass --transpose",
            "transpose",
        )
    X = df.to_numpy(dtype=np.float32)
    return ad.AnnData(
        sp.csr_matrix(X) if np.count_nonzero(X) < X.size / 2 else X,
        obs=pd.DataFrame(index=df.index.astype(str)),
        var=pd.DataFrame(index=df.columns.astype(str)),
    )


#: a 10x cell barcode (16 bases, 14 for Cell Ranger 1), with an optional GEM-well suffix
_BARCODE = re.compile(r"^[ACGTN]{12,}(-\d+)?$")


def _barcodes(names: pd.Index) -> bool:
    """Most of ``names`` look like 10x cell barcodes."""
    sample = [str(n) for n in names[:200]]
    return bool(sample) and sum(bool(_BARCODE.match(n)) for n in sample) > len(sample) / 2


_READERS: dict[str, Any] = {
    "h5ad": _h5ad,
    "zarr": _zarr,
    "10x_h5": _tenx_h5,
    "10x_h5_v2": _tenx_h5,
    "10x_mtx": _tenx_mtx,
    "loom": _loom,
    "csv": lambda path, **kw: _table(path, sep=",", **kw),
    "tsv": lambda path, **kw: _table(path, sep="\t", **kw),
}


def default_output(path: str | Path, kind: str) -> Path:
    """Where ``annotate`` writes when no ``--out`` is given: beside the input, named after it,
    in its format where that is AnnData's own (``.zarr``), else ``.h5ad``:
    ``filtered_feature_bc_matrix.h5`` -> ``filtered_feature_bc_matrix.cellexplain.h5ad``."""
    path = Path(path).resolve()  # "." (run from inside the folder) has no name
    name = path.name
    for suffix in (".gz", ".h5ad", ".h5", ".zarr", ".loom", ".csv", ".tsv", ".txt", ".mtx"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    if kind == "10x_mtx" and not path.is_dir():  # matrix.mtx.gz: the folder names the sample
        path = path.parent
        name = path.name
    ext = ".zarr" if kind == "zarr" else ".h5ad"
    return path.with_name(f"{name or 'cells'}.cellexplain{ext}")
