"""The AnnData door of the server: an uploaded ``.h5ad`` read after
:mod:`cellexplain.service.h5ad_check` has walked it, a :class:`~cellexplain.service.core.Result`
written into it (the layout is :mod:`cellexplain.api.annotations`'), the answer streamed back
from disk."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, BinaryIO

import anndata as ad
import numpy as np

from cellexplain.api.annotations import (
    UNASSIGNED_REASONS,
    Annotations,
    annotation_info,
    evidence,
    write_annotations,
)
from cellexplain.api.errors import InvalidInputError, brief, caused_by, disk_full, from_exception
from cellexplain.service.core import Result
from cellexplain.service.h5ad_check import Limits, check_h5ad


def read_h5ad_upload(path: str | Path, limits: Limits) -> ad.AnnData:
    """Read an uploaded ``.h5ad`` after :func:`cellexplain.service.h5ad_check.check_h5ad` has
    found it self-contained and within ``limits``."""
    check_h5ad(path, limits)
    try:
        with warnings.catch_warnings():
            # names repeated in var are the aligner's business (counted, or refused with both
            # columns named); anndata's own warning would only reach the server log
            warnings.filterwarnings("ignore", message="Variable names are not unique")
            warnings.filterwarnings("ignore", message="Observation names are not unique")
            adata = ad.read_h5ad(path)
    except Exception as e:  # h5py and anndata raise many kinds for a bad file
        raise InvalidInputError(
            f"the uploaded file is not a readable .h5ad: {type(e).__name__}: {brief(str(e), 300)}",
            "file",
        ) from e
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InvalidInputError(
            f"the uploaded file has {adata.n_obs} cells x {adata.n_vars} genes", "file"
        )
    return adata


def write_h5ad(adata: ad.AnnData, path: Path) -> None:
    """Write the annotated ``adata`` to ``path``.

    Raises:
        InvalidInputError: the upload holds something anndata reads but cannot write back.
        InsufficientStorageError: the disk is full (507).
    """
    try:
        adata.write_h5ad(path)
    except Exception as e:  # what came from the upload cannot be written back as it is
        full = caused_by(e, disk_full)  # anndata wraps h5py's errors, h5py the disk's
        if full is not None:
            raise from_exception(full) from e
        raise _unwritable(e) from e


def _unwritable(e: Exception) -> InvalidInputError:
    return InvalidInputError(
        f"the annotated file cannot be written: the upload holds content anndata cannot "
        f"write back ({type(e).__name__}: {brief(str(e), 200)})",
        "file",
    )


def open_result(path: Path) -> BinaryIO:
    """``path`` opened for reading, already unlinked: the answer is streamed from disk, and the
    file goes away when it is closed (or dropped)."""
    f = path.open("rb")
    path.unlink()
    return f


def to_annotations(res: Result) -> Annotations:
    """A result as it lands in an AnnData (the same rule as a client's
    :meth:`~cellexplain.api.annotations.Annotations.from_response`), from its answer
    (:attr:`~cellexplain.service.core.Result.answer`): top genes with attributions (``top_k``
    or ``full``), the attribution matrices with ``attributions='full'`` only, probabilities
    always."""
    answer = res.answer
    full = res.options.attributions == "full"
    classes = np.asarray(res.classes, dtype=object)
    top = top_values = against = against_values = None
    if answer.top is not None and answer.against is not None and res.options.top_k > 0:
        genes = np.asarray(res.card.genes, dtype=object)
        top, top_values = evidence(genes, *answer.top)
        against, against_values = evidence(genes, *answer.against)
    prog = res.program_attributions
    return Annotations(
        label=res.labels,
        predicted_label=classes[res.best],
        confidence=res.confidence.astype(np.float32),
        probabilities=res.probabilities.astype(np.float32),
        explained_class=classes[res.explained_class] if answer.explained else None,
        attributions=res.attributions.astype(np.float32) if full else None,
        top_genes=top,
        program_attributions=prog.astype(np.float32) if full and prog is not None else None,
        completeness_gap=answer.gap,
        novelty=None if res.novelty is None else res.novelty.astype(np.float32),
        unassigned_reason=np.asarray(UNASSIGNED_REASONS, dtype=object)[res.reason_code],
        genes_against=against,
        top_genes_attribution=top_values,
        genes_against_attribution=against_values,
    )


def info(res: Result) -> dict[str, Any]:
    """``uns['cellexplain']`` for a result."""
    assert res.matching is not None
    return annotation_info(
        res.card, res.threshold, res.input_kind, res.matching, res.novelty_threshold, res.warnings
    )


def write_result(adata: ad.AnnData, res: Result) -> ad.AnnData:
    """Write a result into ``adata`` (its cells, in order) and return it."""
    write_annotations(adata, to_annotations(res), info(res))
    return adata
