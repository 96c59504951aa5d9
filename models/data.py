"""Read labelled AnnData for training, with clear errors for unusable data."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellexplain.models.errors import DataError, PreprocessError
from cellexplain.models.preprocess import (
    Detection,
    Matrix,
    check_finite_nonnegative,
    detect_input_kind,
    to_model_input,
)

log = logging.getLogger(__name__)

DEFAULT_SOURCE = "scanpy:pbmc68k_reduced"
DEFAULT_LABEL_KEY = "bulk_labels"


@dataclass
class LabelledData:
    """Normalised expression and labels, ready for gene selection and splitting.

    Attributes:
        X: ``[n_cells, n_genes]`` log1p(CP10k) values over all genes (dense or CSR, float32).
        genes: gene names, ``[n_genes]`` (unique).
        labels: ``[n_cells]`` label strings.
        detection: whether the input held counts or log1p values, and why.
    """

    X: Matrix
    genes: list[str]
    labels: np.ndarray
    detection: Detection
    source: str
    label_key: str
    layer: str
    gene_key: str | None
    sha256: str


def load_default_adata() -> ad.AnnData:
    """scanpy's bundled ``pbmc68k_reduced`` (700 PBMCs, 765 genes in ``.raw``; no download)."""
    import scanpy as sc

    return sc.datasets.pbmc68k_reduced()


def fingerprint(X: Matrix, genes: list[str], labels: np.ndarray) -> str:
    """sha256 over the matrix values, gene names and labels."""
    h = hashlib.sha256()
    if sp.issparse(X):
        Xc = sp.csr_matrix(X)
        for arr in (Xc.data, Xc.indices, Xc.indptr):
            h.update(np.ascontiguousarray(arr).tobytes())
    else:
        h.update(np.ascontiguousarray(X).tobytes())
    h.update("\n".join(genes).encode())
    h.update("\n".join(map(str, labels)).encode())
    return h.hexdigest()


def select_matrix(
    adata: ad.AnnData, gene_key: str | None = None, layer: str | None = None
) -> tuple[list[str], Matrix]:
    """The gene names and the ``[n_cells, n_genes]`` matrix of ``adata`` to use.

    Args:
        gene_key: ``var`` column holding gene names (default: ``var_names``).
        layer: ``"raw"`` for ``adata.raw``, a name in ``adata.layers``, or ``None`` for ``X``.

    Raises:
        DataError: no ``.raw``, unknown layer or gene key, or no matrix (``field`` names which).
    """
    if layer == "raw":
        if adata.raw is None:
            raise DataError("layer 'raw' was asked for, but the AnnData has no .raw", "layer")
        X, var, var_names = adata.raw.X, adata.raw.var, adata.raw.var_names
    elif layer is not None:
        if layer not in adata.layers:
            have = ", ".join(adata.layers.keys()) or "(none)"
            raise DataError(f"layer {layer!r} not found; layers are: {have} (or 'raw')", "layer")
        X, var, var_names = adata.layers[layer], adata.var, adata.var_names
    else:
        X, var, var_names = adata.X, adata.var, adata.var_names
    if X is None:
        raise DataError(f"the AnnData has no matrix in {layer or 'X'}", "layer")
    if gene_key is not None:
        if gene_key not in var.columns:
            cols = ", ".join(map(str, var.columns[:20])) or "(none)"
            raise DataError(
                f"gene key {gene_key!r} not found in var; var columns are: {cols}", "gene_key"
            )
        return [str(g) for g in var[gene_key]], X
    return [str(g) for g in var_names], X


def load_labelled(
    data: str | Path | None = None,
    label_key: str | None = None,
    gene_key: str | None = None,
    layer: str | None = None,
) -> LabelledData:
    """Read a labelled ``.h5ad`` (default: scanpy's ``pbmc68k_reduced``) and normalise it.

    Args:
        data: path of an ``.h5ad`` file; ``None`` for the bundled PBMC data.
        label_key: ``obs`` column with the cell-type labels (default ``bulk_labels``).
        gene_key: ``var`` column with gene symbols (default: ``var_names``).
        layer: ``"raw"`` for ``adata.raw``, a name in ``adata.layers``, or ``None`` for ``X``
            (the default data uses ``raw``).

    Raises:
        DataError: missing file, label column, layer or gene key; NaN/inf/negative values;
            duplicated gene names; unlabelled cells.
    """
    if data is None:
        adata = load_default_adata()
        source = DEFAULT_SOURCE
        layer = "raw" if layer is None else layer
    else:
        path = Path(data)
        if not path.is_file():
            raise DataError(f"data file not found: {path}")
        try:
            adata = ad.read_h5ad(path)
        except Exception as e:  # h5py/anndata raise many kinds for a bad file
            raise DataError(f"cannot read {path} as .h5ad: {e}") from e
        source = str(path)
    label_key = label_key or DEFAULT_LABEL_KEY
    if label_key not in adata.obs.columns:
        cols = ", ".join(map(str, adata.obs.columns[:20])) or "(none)"
        raise DataError(f"label column {label_key!r} not found in obs; obs columns are: {cols}")

    layer_name = layer or "X"
    genes, X = select_matrix(adata, gene_key, layer)
    dup = pd.Index(genes)[pd.Index(genes).duplicated()].unique()
    if len(dup):
        raise DataError(
            f"{len(dup)} duplicated gene name(s), e.g. {', '.join(dup[:5])}; make them unique "
            "or choose another --gene-key"
        )

    labels_raw = adata.obs[label_key]
    missing = labels_raw.isna().to_numpy()
    if missing.any():
        raise DataError(f"{int(missing.sum())} cell(s) have no label in obs[{label_key!r}]")
    labels = labels_raw.astype(str).to_numpy()

    X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
    try:
        check_finite_nonnegative(X, f"matrix {layer_name}")
        detection = detect_input_kind(X)
        log.info("input detected as %s: %s", detection.kind, detection.reason)
        Xn = to_model_input(X, detection.kind)
    except PreprocessError as e:
        raise DataError(f"matrix {layer_name}: {e}") from e
    Xn = sp.csr_matrix(Xn, dtype=np.float32) if sp.issparse(Xn) else np.asarray(Xn, np.float32)
    return LabelledData(
        X=Xn,
        genes=genes,
        labels=labels,
        detection=detection,
        source=source,
        label_key=label_key,
        layer=layer_name,
        gene_key=gene_key,
        sha256=fingerprint(X, genes, labels),
    )
