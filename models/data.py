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

from cellexplain.models.backed import invalid_value
from cellexplain.models.errors import DataError, PreprocessError
from cellexplain.models.preprocess import (
    Detection,
    Matrix,
    _values,
    check_finite_nonnegative,
    detect_input_kind,
    first_invalid,
    sparse_structure_problem,
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


def matrix_digest(X: Matrix) -> bytes:
    """sha256 of a matrix as stored: of a sparse one (as CSR), the digests of its values,
    column indices and row pointer; of a dense one, its bytes. A streamed file's
    :meth:`~cellexplain.models.backed.FileMatrix.scan` gives the same digest."""
    if sp.issparse(X):
        Xc = sp.csr_matrix(X)
        parts = (hashlib.sha256(np.ascontiguousarray(a).tobytes()).digest()
                 for a in (Xc.data, Xc.indices, Xc.indptr))  # fmt: skip
        return hashlib.sha256(b"".join(parts)).digest()
    return hashlib.sha256(np.ascontiguousarray(X).tobytes()).digest()


def fingerprint(
    X: Matrix, genes: list[str], labels: np.ndarray, digest: bytes | None = None
) -> str:
    """sha256 over the matrix (:func:`matrix_digest`, or ``digest`` when already known), the
    gene names and the labels."""
    h = hashlib.sha256()
    h.update(matrix_digest(X) if digest is None else digest)
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
    return _gene_names(var, var_names, gene_key), X


def _gene_names(var: pd.DataFrame, var_names: pd.Index, gene_key: str | None) -> list[str]:
    """The genes' names: ``var[gene_key]``, or the var index ``var_names``."""
    if gene_key is None:
        return [str(g) for g in var_names]
    if gene_key not in var.columns:
        cols = ", ".join(map(str, var.columns[:20])) or "(none)"
        raise DataError(
            f"gene key {gene_key!r} not found in var; var columns are: {cols}", "gene_key"
        )
    return [str(g) for g in var[gene_key]]


#: stored values above which a training file streams from disk (a
#: :class:`~cellexplain.models.backed.FileMatrix`) instead of being read whole: ~35,000 cells at
#: a real 10x density. Read whole, a matrix peaks at ~20 bytes per stored value (the file's
#: arrays, the normalised values, the scaled copy of a batch), so 64M values is ~1.3 GB
IN_MEMORY_VALUES = 64_000_000


def _location(layer: str | None) -> tuple[str, str]:
    """Where a matrix and its genes are stored in an AnnData file: (matrix, var)."""
    if layer == "raw":
        return "raw/X", "raw/var"
    if layer is not None:
        return f"layers/{layer}", "var"
    return "X", "var"


def stored_values(path: Path, layer: str | None = None) -> int:
    """Values stored in an ``.h5ad``/``.zarr`` file's matrix (CSR or CSC: its non-zeros; dense:
    all), read from its metadata; 0 when it cannot tell (not readable: the caller's reader says
    why)."""
    from cellexplain.models.backed import open_store

    try:
        store = open_store(path)
    except Exception:
        return 0
    try:
        node = store[_location(layer)[0]]
        if node.attrs.get("encoding-type", "") in ("csr_matrix", "csc_matrix"):
            return int(node["data"].shape[0])
        if hasattr(node, "shape") and len(node.shape) == 2:
            return int(np.prod(node.shape))
        return 0
    except Exception:
        return 0
    finally:
        if hasattr(store, "close"):
            store.close()


def _checked_genes(genes: list[str]) -> list[str]:
    dup = pd.Index(genes)[pd.Index(genes).duplicated()].unique()
    if len(dup):
        raise DataError(
            f"{len(dup)} duplicated gene name(s), e.g. {', '.join(dup[:5])}; make them unique "
            "or choose another --gene-key"
        )
    return genes


def _labels(obs: pd.DataFrame, label_key: str) -> np.ndarray:
    if label_key not in obs.columns:
        cols = ", ".join(map(str, obs.columns[:20])) or "(none)"
        raise DataError(f"label column {label_key!r} not found in obs; obs columns are: {cols}")
    labels_raw = obs[label_key]
    missing = labels_raw.isna().to_numpy()
    if missing.any():
        raise DataError(f"{int(missing.sum())} cell(s) have no label in obs[{label_key!r}]")
    return labels_raw.astype(str).to_numpy()


def load_labelled(
    data: str | Path | None = None,
    label_key: str | None = None,
    gene_key: str | None = None,
    layer: str | None = None,
    stream: bool | None = None,
    progress: bool = False,
) -> LabelledData:
    """Read a labelled ``.h5ad`` or AnnData ``.zarr`` (default: scanpy's ``pbmc68k_reduced``)
    and normalise it.

    Args:
        data: path of an ``.h5ad`` file or ``.zarr`` folder; ``None`` for the bundled PBMC data.
        label_key: ``obs`` column with the cell-type labels (default ``bulk_labels``).
        gene_key: ``var`` column with gene symbols (default: ``var_names``).
        layer: ``"raw"`` for ``adata.raw``, a name in ``adata.layers``, or ``None`` for ``X``
            (the default data uses ``raw``).
        stream: keep the matrix on disk (``X`` is then a
            :class:`~cellexplain.models.backed.FileMatrix`, read a block of rows at a time,
            checked in one pass here); ``None``: when it stores more than
            :data:`IN_MEMORY_VALUES` values (a CSR or dense matrix).
        progress: a progress bar over the streamed file's check.

    Raises:
        DataError: missing file, label column, layer or gene key; NaN/inf/negative values;
            duplicated gene names; unlabelled cells.
    """
    label_key = label_key or DEFAULT_LABEL_KEY
    if data is None:
        adata = load_default_adata()
        source = DEFAULT_SOURCE
        layer = "raw" if layer is None else layer
    else:
        path = Path(data)
        if not path.exists():
            raise DataError(f"data file not found: {path}")
        if stream is None:
            stream = stored_values(path, layer) > IN_MEMORY_VALUES
        if stream:
            return _load_streamed(path, label_key, gene_key, layer, progress)
        try:
            adata = ad.io.read_zarr(path) if path.is_dir() else ad.read_h5ad(path)
        except Exception as e:  # h5py/anndata raise many kinds for a bad file
            raise DataError(f"cannot read {path} as .h5ad: {e}") from e
        source = str(path)
    labels = _labels(adata.obs, label_key)
    layer_name = layer or "X"
    genes, X = select_matrix(adata, gene_key, layer)
    _checked_genes(genes)
    problem = sparse_structure_problem(X)  # before scipy touches the arrays
    if problem is not None:
        raise DataError(f"matrix {layer or 'X'} is malformed: {problem}")

    X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
    numeric = _values(X).dtype.kind in "fiu"
    if numeric and (bad := first_invalid(X)) is not None:
        raise invalid_value(f"matrix {layer_name}", *bad)
    try:
        if not numeric:  # first_invalid took the numeric ones: this names the dtype
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


def _load_streamed(
    path: Path, label_key: str, gene_key: str | None, layer: str | None, progress: bool
) -> LabelledData:
    """:func:`load_labelled` with the matrix left on disk: ``obs`` and ``var`` read, the
    matrix checked, counted and fingerprinted in one pass of blocks."""
    from anndata.io import read_elem
    from tqdm.auto import tqdm

    from cellexplain.models.backed import FileMatrix, open_matrix, open_store

    mpath, vpath = _location(layer)
    try:
        store = open_store(path)
    except Exception as e:
        raise DataError(f"cannot read {path} as .h5ad: {e}") from e
    if mpath not in store:
        if layer == "raw":
            raise DataError("layer 'raw' was asked for, but the AnnData has no .raw", "layer")
        if layer is not None:
            have = (", ".join(store["layers"].keys()) if "layers" in store else "") or "(none)"
            raise DataError(f"layer {layer!r} not found; layers are: {have} (or 'raw')", "layer")
        raise DataError(f"the AnnData has no matrix in {mpath}", "layer")
    try:
        obs, var = read_elem(store["obs"]), read_elem(store[vpath])
        matrix = open_matrix(store, mpath)
    except Exception as e:
        raise DataError(f"cannot read {path} as .h5ad: {e}") from e
    labels = _labels(obs, label_key)
    genes = _checked_genes(_gene_names(var, var.index, gene_key))
    layer_name = layer or "X"
    X = FileMatrix(matrix, "counts", f"matrix {layer_name}")
    if X.shape != (len(labels), len(genes)):
        raise DataError(
            f"{path}: {mpath} is {X.shape[0]} x {X.shape[1]} but obs has {len(labels)} cells "
            f"and {vpath} {len(genes)} genes"
        )
    try:
        detection = detect_input_kind(X.raw_rows(0, 2000))
    except PreprocessError as e:
        raise DataError(f"matrix {layer_name}: {e}") from e
    X.kind = detection.kind
    X.progress = progress
    log.info("input detected as %s: %s", detection.kind, detection.reason)
    with tqdm(total=X.shape[0], desc=f"check {path.name}", unit="cell", unit_scale=True,
              disable=not progress) as bar:  # fmt: skip
        digest = X.scan(bar.update)
    log.info(
        "%s streams from disk: %d cells x %d genes, %d stored values",
        path, X.shape[0], X.shape[1], X.stored_values,
    )  # fmt: skip
    return LabelledData(
        X=X,
        genes=genes,
        labels=labels,
        detection=detection,
        source=str(path),
        label_key=label_key,
        layer=layer_name,
        gene_key=gene_key,
        sha256=fingerprint(None, genes, labels, digest),
    )
