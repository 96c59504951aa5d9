"""The one normalisation recipe, shared by training and serving.

A model consumes ``log1p(counts per 10,000)`` values of its own genes. Counts are normalised over
**all** genes of a cell (the whole submitted transcriptome) before the model's genes are taken, so
the same cell gives the same model input whether it arrives with 765 genes or 30,000.

Nothing here imports torch: the serving path uses this module as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import numpy as np
import scipy.sparse as sp

from cellexplain.models.errors import PreprocessError

InputKind = Literal["counts", "log1p_cp10k"]

#: counts per cell after normalisation (scanpy's ``normalize_total(target_sum=1e4)``)
TARGET_SUM = 1e4
#: log1p(1e6) ~ 13.8: a log1p-normalised matrix never gets near this
MAX_LOG1P_VALUE = 15.0

#: a dense ``numpy.ndarray`` or a scipy sparse matrix, ``[n_cells, n_genes]``
Matrix: TypeAlias = Any


@dataclass(frozen=True)
class Detection:
    """What :func:`detect_input_kind` found, with the evidence for it."""

    kind: InputKind
    reason: str


def _values(X: Matrix) -> np.ndarray:
    """The stored values of a dense or sparse matrix, flattened (zeros of sparse omitted)."""
    if sp.issparse(X):
        return np.asarray(X.data)
    return np.asarray(X).ravel()


def sparse_structure_problem(X: Matrix) -> str | None:
    """What is wrong with the arrays of a CSR/CSC matrix (``None`` when nothing): scipy's C
    code trusts ``indptr`` and ``indices``, so a file whose column indices point past the matrix
    would make it read or write outside its memory. Checked before any scipy operation on
    data from a file; O(non-zeros)."""
    if not sp.issparse(X) or X.format not in ("csr", "csc"):
        return None
    major, minor = X.shape if X.format == "csr" else X.shape[::-1]
    indptr, indices = np.asarray(X.indptr), np.asarray(X.indices)
    what = "rows" if X.format == "csr" else "columns"
    if indptr.ndim != 1 or len(indptr) != major + 1:
        return f"indptr has {len(indptr)} entries for {major} {what} (needs {major + 1})"
    if len(indices) != len(X.data) or int(indptr[0]) != 0 or int(indptr[-1]) != len(indices):
        return (
            f"indptr runs from {int(indptr[0])} to {int(indptr[-1])} over {len(indices)} "
            f"indices and {len(X.data)} values"
        )
    if major and bool((np.diff(indptr) < 0).any()):
        return "indptr decreases"
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= minor):
        return (
            f"indices run from {int(indices.min())} to {int(indices.max())}, outside 0..{minor - 1}"
        )
    return None


def first_invalid(X: Matrix, upper: float | None = None) -> tuple[int, int, str] | None:
    """Row, column and description of the first NaN, infinite or negative value of ``X``
    (dense or sparse), or of one above ``upper`` when given, or ``None`` when all values are
    valid."""
    if sp.issparse(X):
        Xc = sp.csr_matrix(X)
        v = np.asarray(Xc.data)
    else:
        Xc = None
        v = np.asarray(X).ravel()
    if v.size == 0:
        return None
    # the common case (all valid) in two reductions, without a temporary array per test: a NaN
    # makes min() and max() NaN, so both comparisons are then False
    if v.dtype.kind in "fiu":
        low, high = v.min(), v.max()
        if low >= 0 and (high < np.inf if upper is None else high <= upper):
            return None
    bad = ~np.isfinite(v) | (v < 0)
    if upper is not None:
        bad |= v > upper
    if not bad.any():
        return None
    i = int(np.argmax(bad))
    x = float(v[i])
    if np.isnan(x):
        what = "NaN"
    elif np.isinf(x):
        what = "infinite"
    elif x < 0:
        what = f"negative ({x:g})"
    else:
        what = f"{x!r}, above {upper:g}"  # in full: 15.000000953674316, not 15
    if Xc is None:
        row, col = divmod(i, X.shape[1])
    else:
        row = int(np.searchsorted(Xc.indptr, i, side="right") - 1)
        col = int(Xc.indices[i])
    return row, col, what


def check_finite_nonnegative(X: Matrix, what: str = "expression matrix") -> None:
    """Raise :class:`PreprocessError` if ``X`` holds NaN, inf or negative values."""
    v = _values(X)
    if v.size == 0:
        return
    if not np.issubdtype(v.dtype, np.number):
        raise PreprocessError(f"{what} is not numeric (dtype {v.dtype})")
    if v.dtype.kind in "fiu" and v.min() >= 0 and v.max() < np.inf:  # all valid: 2 reductions
        return  # (a NaN makes both NaN, so both tests fail)
    bad_nan = np.isnan(v)
    if bad_nan.any():
        raise PreprocessError(f"{what} contains {int(bad_nan.sum())} NaN value(s)")
    bad_inf = np.isinf(v)
    if bad_inf.any():
        raise PreprocessError(f"{what} contains {int(bad_inf.sum())} infinite value(s)")
    neg = v < 0
    if neg.any():
        raise PreprocessError(
            f"{what} contains {int(neg.sum())} negative value(s) (min {float(v.min()):.4g}); "
            "expected raw counts or log1p-normalised values, which are never negative"
        )


def row_block(X: Matrix, a: int, b: int) -> Matrix:
    """Rows ``a...b`` of ``X``; of a CSR matrix, a view on its arrays (scipy's slicing copies
    every stored value of the rows: a quarter of the preparation of a 10x file's cells)."""
    if not isinstance(X, sp.csr_matrix):
        return X[a:b]
    b = min(b, X.shape[0])
    s, e = int(X.indptr[a]), int(X.indptr[b])
    return sp.csr_matrix(
        (X.data[s:e], X.indices[s:e], X.indptr[a : b + 1] - s), shape=(b - a, X.shape[1])
    )


def detect_input_kind(X: Matrix, max_rows: int = 2000) -> Detection:
    """Tell raw counts from log1p(CP10k) values.

    Args:
        X: ``[n_cells, n_genes]`` expression matrix, dense or sparse.
        max_rows: how many leading rows to inspect (detection is a property of the whole matrix;
            a sample is enough and keeps this cheap on big files).

    Returns:
        ``counts`` when every inspected value is a non-negative integer, ``log1p_cp10k`` when the
        values are non-integer and within the range of log1p-normalised data.

    Raises:
        PreprocessError: NaN/inf/negative values, or non-integer values too large to be log1p
            data (e.g. CPM or TPM, which must be converted by the caller).
    """
    sample = row_block(X, 0, max_rows)
    v = _values(sample)
    if v.size == 0:
        return Detection("counts", "all inspected values are zero")
    numeric = v.dtype.kind in "fiu"
    # one pass each; a NaN makes both NaN, and the test fails
    if not numeric or not (v.min() >= 0 and (vmax := float(v.max())) < np.inf):
        check_finite_nonnegative(sample)  # raises, naming the problem
        vmax = float(v.max())
    if vmax == 0:
        return Detection("counts", "all inspected values are zero")
    if v.dtype.kind in "iu" or bool((np.trunc(v) == v).all()):  # 25x faster than np.mod
        return Detection("counts", f"all inspected values are non-negative integers (max {vmax:g})")
    if vmax <= MAX_LOG1P_VALUE:
        return Detection(
            "log1p_cp10k", f"non-integer values with max {vmax:.3g} <= {MAX_LOG1P_VALUE:g}"
        )
    raise PreprocessError(
        f"values are non-integer with max {vmax:.4g}: neither raw counts nor log1p-normalised "
        "data (CPM/TPM or scaled data?). Provide raw counts or log1p(CP10k) values"
    )


class TotalOverflowError(PreprocessError):
    """A cell's counts sum to more than float64 holds (``row`` is the cell's row)."""

    def __init__(self, row: int) -> None:
        super().__init__(
            f"the counts of cell {row} sum to more than a float64 holds (values near 1e308?): "
            "they cannot be normalised; send raw UMI counts"
        )
        self.row = row


def _check_totals(totals: np.ndarray) -> None:
    bad = ~np.isfinite(totals)
    if bad.any():
        raise TotalOverflowError(int(np.argmax(bad)))


def _scale(values: np.ndarray, totals: np.ndarray, target_sum: float) -> np.ndarray:
    """``values / totals * target_sum`` (``totals`` broadcast to ``values``; 0 where a total is
    0), as one multiplication by ``target_sum / totals``, except for totals so small (subnormal,
    below ~1e-304) that the factor overflows: those are divided first, which stays finite."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        factor = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        out = values * factor
        overflow = np.isinf(factor)
        if overflow.any():
            rows = np.broadcast_to(overflow, out.shape)
            out[rows] = (values / totals)[rows] * target_sum
    return out


#: stored values per block of the CSR normalisation (float64 working copies: 8 MiB each)
NORMALIZE_BLOCK = 1 << 20


def csr_row_totals(Xc: sp.csr_matrix) -> np.ndarray:
    """Each row's sum over its stored values, accumulated in float64 (a cell's total over every
    measured gene): numpy's ``add.reduceat`` over the values as stored, no float64 copy.

    Raises:
        TotalOverflowError: a row sums to infinity."""
    indptr = np.asarray(Xc.indptr)
    totals = np.zeros(Xc.shape[0])
    stored = np.diff(indptr) > 0  # reduceat would give an empty row its next row's first value
    if stored.any():
        with np.errstate(over="ignore"):  # an infinite total is refused just below
            totals[stored] = np.add.reduceat(Xc.data, indptr[:-1][stored], dtype=np.float64)
    _check_totals(totals)
    return totals


def log1p_scaled(
    counts: np.ndarray, totals: np.ndarray, target_sum: float = TARGET_SUM
) -> np.ndarray:
    """``log1p(counts / total * target_sum)`` as float32, for ``counts`` ``[n, k]`` (float64:
    some of each cell's genes) and ``totals`` ``[n]`` (each cell's total over all its genes): the
    values :func:`normalize_log1p` gives those genes, bit for bit."""
    return np.log1p(_scale(counts, totals[:, None], target_sum)).astype(np.float32)


def _normalize_csr(Xc: sp.csr_matrix, target_sum: float) -> sp.csr_matrix:
    """:func:`normalize_log1p` of a CSR matrix in blocks of rows: the result's float32 values
    beside the input's, sharing its index arrays; float64 arithmetic a block at a time. A
    million-cell file's normalisation holds one more value array, not three copies."""
    if not Xc.has_canonical_format:  # a gene stored twice in a row is one value, summed
        Xc = Xc.copy()
        Xc.sum_duplicates()
    indptr, values = Xc.indptr, Xc.data
    n = Xc.shape[0]
    lengths = np.diff(indptr)
    totals = csr_row_totals(Xc)
    out = np.empty(len(values), dtype=np.float32)
    rows_per_block = max(1, int(NORMALIZE_BLOCK // max(1.0, len(values) / max(n, 1))))
    for a in range(0, n, rows_per_block):
        b = min(n, a + rows_per_block)
        s, e = int(indptr[a]), int(indptr[b])
        per_value = np.repeat(totals[a:b], lengths[a:b])
        out[s:e] = np.log1p(_scale(values[s:e].astype(np.float64), per_value, target_sum))
    return sp.csr_matrix((out, Xc.indices, indptr), shape=Xc.shape)


def normalize_log1p(X: Matrix, target_sum: float = TARGET_SUM) -> np.ndarray | sp.csr_matrix:
    """Normalise counts to ``log1p(counts / total * target_sum)`` per cell.

    Args:
        X: ``[n_cells, n_genes]`` raw counts over **all** measured genes of each cell.
        target_sum: counts per cell after scaling (10,000).

    Returns:
        float32 matrix of the same shape (sparse stays CSR). Cells with no counts stay all zero.

    Raises:
        TotalOverflowError: a cell's counts sum to infinity (it would silently become empty).
    """
    if sp.issparse(X):
        return _normalize_csr(sp.csr_matrix(X), target_sum)
    Xd = np.asarray(X, dtype=np.float64)
    totals = Xd.sum(axis=1, keepdims=True)
    _check_totals(totals.ravel())
    return np.log1p(_scale(Xd, totals, target_sum)).astype(np.float32)


def to_model_input(X: Matrix, kind: InputKind, target_sum: float = TARGET_SUM) -> Matrix:
    """Bring ``X`` (all genes of each cell) to the model's space, ``log1p_cp10k``.

    Counts are normalised here; log1p-normalised values pass through unchanged.
    """
    if kind == "counts":
        return normalize_log1p(X, target_sum)
    if kind == "log1p_cp10k":
        return X
    raise PreprocessError(f"unknown input kind {kind!r}; expected 'counts' or 'log1p_cp10k'")


def gene_mean_var(
    X: Matrix, rows: np.ndarray | None = None, chunk: int = 16384
) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene mean and (population) variance ``[n_genes]`` float64 over ``rows`` of ``X``
    (all rows by default), in one streaming pass over row chunks: never more than ``chunk``
    rows at once (of a matrix streamed from disk, its blocks), whatever the matrix's size."""
    idx = np.arange(X.shape[0]) if rows is None else np.asarray(rows)
    n_genes = X.shape[1]
    total = np.zeros(n_genes)
    squares = np.zeros(n_genes)
    blocks = (
        X.chunks(idx, "gene statistics")
        if hasattr(X, "chunks")
        else (X[idx[start : start + chunk]] for start in range(0, len(idx), chunk))
    )
    for block in blocks:
        if sp.issparse(block):
            b = sp.csr_matrix(block)
            v = np.asarray(b.data, dtype=np.float64)
            total += np.bincount(b.indices, weights=v, minlength=n_genes)
            squares += np.bincount(b.indices, weights=v * v, minlength=n_genes)
        else:
            b64 = np.asarray(block, dtype=np.float64)
            total += b64.sum(axis=0)
            squares += np.square(b64).sum(axis=0)
    n = max(len(idx), 1)
    mean = total / n
    return mean, np.maximum(squares / n - mean**2, 0.0)


def select_variable_genes(X: Matrix, n_top: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Indices (sorted) of the ``n_top`` genes with the highest variance of log1p values.

    Args:
        X: ``[n_cells, n_genes]`` log1p-normalised values.
        n_top: number of genes to keep; all genes when ``n_top >= n_genes``.
        rows: the cells to compute the variance over (default: all), without copying them.
    """
    n_genes = X.shape[1]
    if n_top >= n_genes:
        return np.arange(n_genes)
    _, var = gene_mean_var(X, rows)
    # stable tie-break on index so selection is deterministic
    order = np.lexsort((np.arange(n_genes), -var))
    return np.sort(order[:n_top])
