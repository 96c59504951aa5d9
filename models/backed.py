"""A training matrix read from its file a block of rows at a time (out-of-core training).

An atlas at a real 10x density stores ~1,800 values per cell: 250,000 cells are 460M values,
a million cells ~15 GB of CSR before any copy. :class:`FileMatrix` keeps such a matrix on disk
(an ``.h5ad`` or AnnData ``.zarr``, CSR or dense, read through anndata's ``sparse_dataset`` or
the array as stored) and hands out model input, ``log1p(CP10k)`` float32 CSR, for the rows
asked: each block of rows is read, checked (NaN, inf, negative values, malformed structure),
normalised over **all** of its cells' genes (:func:`~cellexplain.models.preprocess.csr_row_totals`)
and cut to the selected genes, then dropped. What stays in memory is the row pointer ``[n+1]``
and what the caller keeps; never the matrix.

It behaves as the CSR matrices training takes: ``X[rows]`` (rows in any order) gives a CSR of
those rows, ``X[:, genes]`` a view over those genes, ``X.shape``; and adds what streaming needs:
:meth:`FileMatrix.shuffled_batches` (an epoch in shuffled blocks) and :meth:`FileMatrix.take`.
The values are those of :func:`~cellexplain.models.preprocess.normalize_log1p` on the whole
matrix, bit for bit.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from cellexplain.models.errors import DataError
from cellexplain.models.preprocess import (
    TARGET_SUM,
    InputKind,
    TotalOverflowError,
    _scale,
    csr_row_totals,
    first_invalid,
    sparse_structure_problem,
)

#: stored values read at once (a block: ~32 MB as float32 values and int32 indices; ~2,200
#: cells at a real 10x density)
BLOCK_VALUES = 1 << 22
#: blocks whose cells are shuffled together in an epoch (~35 MB of model input at most, all
#: genes kept; the order of the groups and of the blocks is shuffled too)
SHUFFLE_BLOCKS = 8


def invalid_value(what: str, row: int, col: int, value: str) -> DataError:
    """The error for a value training cannot take, naming its cell and gene."""
    return DataError(
        f"{what}: cell {row}, gene {col} is {value}: expected raw counts or log1p-normalised "
        "values, which are finite and never negative"
    )


class FileMatrix:
    """``[n_cells, n_genes]`` model input (``log1p(CP10k)`` float32) of a matrix in a file.

    Args:
        matrix: the stored matrix: anndata's backed sparse dataset (CSR) or an h5py/zarr array.
        kind: what the file holds, ``counts`` (normalised here) or ``log1p_cp10k`` (kept).
        what: how errors name the matrix (``"data.h5ad: X"``).
        columns: the genes (column indices of the file) to give, in this order; ``None``: all.
    """

    def __init__(
        self,
        matrix: Any,
        kind: InputKind,
        what: str,
        columns: np.ndarray | None = None,
        _indptr: np.ndarray | None = None,
        _column_counts: np.ndarray | None = None,
    ) -> None:
        self.matrix = matrix
        self.kind = kind
        self.what = what
        self.sparse = not hasattr(matrix, "dtype") or hasattr(matrix, "format")
        n_rows, self.n_file_genes = (int(s) for s in matrix.shape)
        if self.sparse:
            if getattr(matrix, "format", "csr") != "csr":
                stored = int(matrix.group["data"].shape[0])
                raise DataError(
                    f"{what} is stored column by column ({matrix.format.upper()}) with "
                    f"{stored:,} values: too many to read whole, and streaming reads rows. "
                    "Re-save it by rows, where memory allows: adata.X = adata.X.tocsr(); "
                    "adata.write_h5ad(...)"
                )
            indptr = np.asarray(
                matrix.group["indptr"][...] if _indptr is None else _indptr, dtype=np.int64
            )
            if indptr.ndim != 1 or len(indptr) != n_rows + 1 or indptr[0] != 0:
                raise DataError(f"{what}: indptr has {len(indptr)} entries for {n_rows} rows")
            if (np.diff(indptr) < 0).any():
                raise DataError(f"{what}: indptr decreases (a malformed CSR matrix)")
            if int(indptr[-1]) != int(matrix.group["data"].shape[0]):
                raise DataError(
                    f"{what}: indptr ends at {int(indptr[-1])} but {matrix.group['data'].shape[0]}"
                    " values are stored (a malformed CSR matrix)"
                )
            self.indptr = indptr
        else:
            self.indptr = np.arange(n_rows + 1, dtype=np.int64) * self.n_file_genes
        self.columns = None if columns is None else np.asarray(columns, dtype=np.int64)
        self._colmap: np.ndarray | None = None
        if self.columns is not None:
            self._colmap = np.full(self.n_file_genes, -1, dtype=np.int64)
            self._colmap[self.columns] = np.arange(len(self.columns))
        self.column_counts = _column_counts
        #: show a progress bar over the passes that read many blocks (:meth:`chunks`, and
        #: :meth:`take` when given a ``what``)
        self.progress = False
        self.shape = (n_rows, self.n_file_genes if self.columns is None else len(self.columns))
        self.ndim = 2
        self.blocks = self._block_bounds()

    # -- what training sees -------------------------------------------------------------------
    @property
    def stored_values(self) -> int:
        """Values the model input stores (of the selected genes, when counted by :meth:`scan`;
        else of every gene, as the file stores them)."""
        if self.column_counts is not None:
            counts = self.column_counts
            return int((counts if self.columns is None else counts[self.columns]).sum())
        return int(self.indptr[-1])

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, tuple):
            rows, cols = key
            if not (isinstance(rows, slice) and rows == slice(None)):
                raise TypeError("FileMatrix takes X[rows] or X[:, genes]")
            cols = np.arange(self.shape[1])[cols]
            base = cols if self.columns is None else self.columns[cols]
            view = FileMatrix(
                self.matrix, self.kind, self.what, base, self.indptr, self.column_counts
            )
            view.progress = self.progress
            return view
        return self.take(np.asarray(key, dtype=np.int64))

    def take(self, rows: np.ndarray, what: str | None = None) -> sp.csr_matrix:
        """Model input of ``rows`` (any order, repeats allowed) as float32 CSR
        ``[len(rows), n_genes]``, reading only the blocks that hold them (with :attr:`progress`
        and ``what``, under a progress bar of that name)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        if rows.min() < 0 or rows.max() >= self.shape[0]:
            raise IndexError(f"row index out of range for {self.shape[0]} rows")
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        spans = self._bar(self._spans(sorted_rows), what, len(rows))
        parts = [self._rows(a, b, sel) for a, b, sel in spans]
        out = sp.vstack(parts, format="csr", dtype=np.float32)
        if not (order == np.arange(len(order))).all():
            back = np.empty_like(order)
            back[order] = np.arange(len(order))
            out = out[back]
        return out

    def chunks(self, rows: np.ndarray, what: str = "read") -> Iterator[sp.csr_matrix]:
        """Model input of ``rows`` (sorted), a block of the file at a time (with
        :attr:`progress`, under a progress bar named ``what``)."""
        rows = np.asarray(rows, dtype=np.int64)
        for a, b, sel in self._bar(self._spans(rows), what, len(rows)):
            yield self._rows(a, b, sel)

    def _bar(
        self, spans: Iterator[tuple[int, int, np.ndarray]], what: str | None, total: int
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """``spans`` under a progress bar of the ``total`` cells they read (when shown)."""
        if not self.progress or what is None:
            yield from spans
            return
        from tqdm.auto import tqdm

        with tqdm(total=total, desc=what, unit="cell", unit_scale=True) as bar:
            for a, b, sel in spans:
                yield a, b, sel
                bar.update(len(sel))

    def shuffled_batches(
        self, rows: np.ndarray, batch_size: int, rng: np.random.Generator
    ) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """One epoch over ``rows`` (sorted) in mini-batches of ``batch_size``: the blocks of the
        file in a random order, :data:`SHUFFLE_BLOCKS` at a time, their cells shuffled together
        (the next group is read in a thread while the caller trains). Yields (rows of the
        file, their model input as CSR); every row once."""
        rows = np.asarray(rows, dtype=np.int64)
        order = rng.permutation(len(self.blocks))
        groups = [np.sort(order[i : i + SHUFFLE_BLOCKS])
                  for i in range(0, len(order), SHUFFLE_BLOCKS)]  # fmt: skip

        def load(group: np.ndarray) -> tuple[np.ndarray, sp.csr_matrix]:
            idx, parts = [], []
            for k in group:
                a, b = self.blocks[k]
                sel = rows[np.searchsorted(rows, a) : np.searchsorted(rows, b)]
                if len(sel):
                    idx.append(sel)
                    parts.append(self._rows(a, b, sel))
            if not idx:
                return np.zeros(0, np.int64), sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
            return np.concatenate(idx), sp.vstack(parts, format="csr", dtype=np.float32)

        carry_idx = np.zeros(0, np.int64)
        carry = sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(load, groups[0]) if groups else None
            for g in range(len(groups)):
                assert pending is not None
                idx, X = pending.result()
                pending = pool.submit(load, groups[g + 1]) if g + 1 < len(groups) else None
                if len(carry_idx):
                    idx = np.concatenate([carry_idx, idx])
                    X = sp.vstack([carry, X], format="csr", dtype=np.float32)
                perm = rng.permutation(len(idx))
                whole = len(perm) - len(perm) % batch_size
                for s in range(0, whole, batch_size):
                    p = perm[s : s + batch_size]
                    yield idx[p], X[p]
                carry_idx, carry = idx[perm[whole:]], X[perm[whole:]]
        if len(carry_idx):
            yield carry_idx, carry

    def scan(self, progress: Callable[[int], object] | None = None) -> bytes:
        """One pass over the file: every block checked, each gene's stored values counted
        (:attr:`column_counts`), and the sha256 of the matrix as stored (its values, column
        indices and row pointer, each hashed as it streams by; for a dense matrix, its bytes),
        the digest :func:`~cellexplain.models.data.matrix_digest` gives the same matrix in
        memory. ``progress`` is called with the rows of each block read."""
        hashes = [hashlib.sha256() for _ in range(2 if self.sparse else 1)]
        counts = np.zeros(self.n_file_genes, dtype=np.int64)
        for a, b in self.blocks:
            raw = self._raw(a, b, hashes)
            if self.sparse:
                counts += np.bincount(raw.indices, minlength=self.n_file_genes)
            else:
                counts += np.count_nonzero(raw, axis=0)
            if self.kind == "counts":  # a total past float64 is refused here, not mid-training
                self._totals(sp.csr_matrix(raw), np.arange(a, b))
            if progress is not None:
                progress(b - a)
        self.column_counts = counts
        if not self.sparse:
            return hashes[0].digest()
        indptr = hashlib.sha256(np.ascontiguousarray(self._file_indptr()).tobytes())
        return hashlib.sha256(b"".join(h.digest() for h in (*hashes, indptr))).digest()

    def raw_rows(self, a: int, b: int) -> Any:
        """Rows ``a...b`` as stored (checked), for input detection."""
        return self._raw(a, min(b, self.shape[0]))

    # -- reading ------------------------------------------------------------------------------
    def _block_bounds(self) -> list[tuple[int, int]]:
        n = self.shape[0]
        if n == 0:
            return []
        starts = [0]
        per_row = max(self.n_file_genes, 1)
        while starts[-1] < n:
            a = starts[-1]
            if self.sparse:
                end = self.indptr[a] + BLOCK_VALUES
                b = int(np.searchsorted(self.indptr, end, side="right")) - 1
            else:
                b = a + BLOCK_VALUES // per_row
            starts.append(min(n, max(b, a + 1)))
        return list(itertools.pairwise(starts))

    def _spans(self, sorted_rows: np.ndarray) -> Iterator[tuple[int, int, np.ndarray]]:
        """(first row, end row, rows) per block that holds some of ``sorted_rows``, the span
        cut to the rows asked."""
        if len(sorted_rows) == 0:
            return
        starts = np.array([a for a, _ in self.blocks], dtype=np.int64)
        which = np.searchsorted(starts, sorted_rows, side="right") - 1
        cuts = np.flatnonzero(np.diff(which)) + 1
        for sel in np.split(sorted_rows, cuts):
            yield int(sel[0]), int(sel[-1]) + 1, sel

    def _file_indptr(self) -> np.ndarray:
        return np.asarray(self.matrix.group["indptr"][...])

    def _raw(self, a: int, b: int, digests: list[Any] | None = None) -> Any:
        """Rows ``a...b`` as stored: CSR (its structure checked) or a dense array, values
        checked (numeric, finite, not negative; counts: each cell's total finite). With
        ``digests``, the arrays as the file stores them are hashed into them (values and
        indices; a dense block's bytes)."""
        try:
            if self.sparse:
                s, e = int(self.indptr[a]), int(self.indptr[b])
                g = self.matrix.group
                data, indices = g["data"][s:e], g["indices"][s:e]
                if digests is not None:  # before scipy, which may narrow the index type
                    digests[0].update(np.ascontiguousarray(data).tobytes())
                    digests[1].update(np.ascontiguousarray(indices).tobytes())
                X: Any = sp.csr_matrix(
                    (data, indices, self.indptr[a : b + 1] - s), shape=(b - a, self.n_file_genes)
                )
            else:
                X = np.asarray(self.matrix[a:b])
                if digests is not None:
                    digests[0].update(np.ascontiguousarray(X).tobytes())
        except Exception as e:  # h5py/zarr raise many kinds for a damaged file
            raise DataError(f"{self.what}: rows {a}-{b - 1} cannot be read: {e}") from e
        values = X.data if self.sparse else X
        if values.dtype.kind not in "fiu":
            raise DataError(f"{self.what} is not numeric (dtype {values.dtype})")
        if self.sparse:
            problem = sparse_structure_problem(X)
            if problem is not None:
                bad_index = (X.indices < 0) | (X.indices >= self.n_file_genes)
                first = int(np.searchsorted(X.indptr, np.argmax(bad_index), "right")) - 1
                where = f"at cell {a + first}" if bad_index.any() else f"in rows {a}-{b - 1}"
                raise DataError(f"{self.what} is malformed {where}: {problem}")
        bad = first_invalid(X)
        if bad is not None:
            row, col, what = bad
            raise invalid_value(self.what, a + row, col, what)
        return X

    def _totals(self, raw: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
        """Each cell's total over all its genes; a total past float64 names its cell (``rows``:
        the file's rows of ``raw``)."""
        try:
            return csr_row_totals(raw)
        except TotalOverflowError as e:
            raise DataError(str(TotalOverflowError(int(rows[e.row])))) from e

    def _rows(self, a: int, b: int, sel: np.ndarray) -> sp.csr_matrix:
        """Model input of rows ``sel`` (sorted, within ``a...b``), read as one span."""
        raw = self._raw(a, b)
        if not self.sparse:
            raw = sp.csr_matrix(raw)
        local = sel - a
        if len(local) != b - a:
            raw = raw[local]
        return self._model_input(raw, sel)

    def _model_input(self, raw: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
        """Normalise (counts: over all of each cell's genes, as
        :func:`~cellexplain.models.preprocess.normalize_log1p`) and keep the selected genes."""
        if self.kind == "counts" and not raw.has_canonical_format:
            raw = raw.copy()  # a gene stored twice in a row is one value, summed (as in memory)
            raw.sum_duplicates()
        indptr, indices, values = raw.indptr, raw.indices, raw.data
        if self._colmap is not None:
            new_col = self._colmap[indices]
            keep = new_col >= 0
            running = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
            kept_per_row = running[indptr[1:]] - running[indptr[:-1]]
            out_indptr = running[indptr]
            out_indices = new_col[keep].astype(np.int32)
            out_values = values[keep]
        else:
            out_indptr, out_indices, out_values = indptr, indices, values
            kept_per_row = np.diff(indptr)
        if self.kind == "counts":
            totals = self._totals(raw, rows)
            per_value = np.repeat(totals, kept_per_row)
            out_values = np.log1p(_scale(out_values.astype(np.float64), per_value, TARGET_SUM))
        return sp.csr_matrix(
            (out_values.astype(np.float32, copy=False), out_indices, out_indptr),
            shape=(raw.shape[0], self.shape[1]),
        )


def open_store(path: Path) -> Any:
    """An ``.h5ad`` (h5py File) or AnnData ``.zarr`` (zarr group), opened read-only."""
    if Path(path).is_dir():
        import zarr

        return zarr.open(str(path), mode="r")
    import h5py

    return h5py.File(path, "r")


def open_matrix(store: Any, mpath: str) -> Any:
    """The matrix at ``mpath`` of an opened store, not read: anndata's backed sparse dataset,
    or the array."""
    from anndata.io import sparse_dataset

    node = store[mpath]
    if node.attrs.get("encoding-type", "") in ("csr_matrix", "csc_matrix"):
        return sparse_dataset(node)
    return node
