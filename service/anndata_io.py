"""AnnData in, AnnData out: read expression from an AnnData and write annotations into it.

What lands where (scanpy's conventions, like ``sc.tl.*`` writing into the object):

* ``obs['cellexplain_label']``: predicted cell type, or ``Unassigned`` below the threshold
* ``obs['cellexplain_predicted_label']``: the most probable type whatever its confidence
* ``obs['cellexplain_confidence']``: probability of the predicted type
* ``obs['cellexplain_top_genes']``: the ``top_k`` genes by |attribution|, ``;``-separated
* ``obsm['cellexplain_attributions']``: ``[n_cells, n_model_genes]`` float32 attributions
  (with ``attributions`` other than ``none``); gene order in ``uns['cellexplain']['genes']``
* ``obsm['cellexplain_program_attributions']``: ``[n_cells, n_programs]`` (programs models)
* ``obsm['cellexplain_probabilities']``: ``[n_cells, n_classes]``; class order in ``uns``
* ``uns['cellexplain']``: model, version, attribution method, genes, classes, programs,
  threshold, input kind, gene matching
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from models.card import ModelCard
from models.data import select_matrix
from models.errors import DataError
from models.runtime import Prediction
from service.errors import InvalidInputError
from service.schemas import AnnotateOptions, GeneMatching

PREFIX = "cellexplain"


def expression(
    adata: ad.AnnData, gene_key: str | None = None, layer: str | None = None
) -> tuple[list[str], np.ndarray | sp.csr_matrix]:
    """Gene names and the ``[n_cells, n_genes]`` float64 matrix to annotate (dense or CSR);
    see :func:`models.data.select_matrix` for ``gene_key`` and ``layer``."""
    try:
        genes, X = select_matrix(adata, gene_key, layer)
    except DataError as e:
        raise InvalidInputError(str(e), e.field) from e
    if sp.issparse(X):
        return genes, sp.csr_matrix(X, dtype=np.float64)
    return genes, np.asarray(X, dtype=np.float64)


def read_h5ad_bytes(data: bytes) -> ad.AnnData:
    """Parse an uploaded ``.h5ad`` (read fully into memory; the caller bounds its size)."""
    if not data:
        raise InvalidInputError("the uploaded file is empty", "file")
    fd, name = tempfile.mkstemp(suffix=".h5ad")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            adata = ad.read_h5ad(name)
        except Exception as e:  # h5py and anndata raise many kinds for a bad file
            raise InvalidInputError(
                f"the uploaded file is not a readable .h5ad: {type(e).__name__}: {e}", "file"
            ) from e
    finally:
        os.unlink(name)
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InvalidInputError(
            f"the uploaded file has {adata.n_obs} cells x {adata.n_vars} genes", "file"
        )
    return adata


def to_h5ad_bytes(adata: ad.AnnData) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "annotated.h5ad"
        adata.write_h5ad(path)
        return path.read_bytes()


def write_annotations(
    adata: ad.AnnData,
    card: ModelCard,
    pred: Prediction,
    best: np.ndarray,
    conf: np.ndarray,
    assigned: np.ndarray,
    opts: AnnotateOptions,
    threshold: float,
    input_kind: str,
    matching: GeneMatching,
) -> None:
    """Write one model's calls and explanations into ``adata`` (see the module docstring)."""
    from service.core import UNASSIGNED, top_k_indices

    classes = np.asarray(card.classes, dtype=object)
    predicted = classes[best]
    labels = np.where(assigned, predicted, UNASSIGNED)
    obs = adata.obs
    obs[f"{PREFIX}_label"] = pd.Categorical(labels, categories=[*card.classes, UNASSIGNED])
    obs[f"{PREFIX}_predicted_label"] = pd.Categorical(predicted, categories=card.classes)
    obs[f"{PREFIX}_confidence"] = conf.astype(np.float32)
    obsm = adata.obsm
    obsm[f"{PREFIX}_probabilities"] = pred.probabilities.astype(np.float32)
    if opts.attributions != "none":
        obs[f"{PREFIX}_explained_class"] = pd.Categorical(
            classes[pred.explained_class], categories=card.classes
        )
        obsm[f"{PREFIX}_attributions"] = pred.attributions.astype(np.float32)
        if opts.top_k > 0:
            genes = np.asarray(card.genes, dtype=object)
            top = top_k_indices(pred.attributions, opts.top_k)
            obs[f"{PREFIX}_top_genes"] = [";".join(genes[row]) for row in top]
        if pred.program_attributions is not None:
            obsm[f"{PREFIX}_program_attributions"] = pred.program_attributions.astype(np.float32)
    adata.uns[PREFIX] = {
        "model": card.name,
        "model_version": card.version,
        "attribution_method": card.attribution.method,
        "genes": list(card.genes),
        "classes": list(card.classes),
        "programs": list(card.gene_sets.programs) if card.gene_sets else [],
        "unassigned_threshold": float(threshold),
        "input_kind": input_kind,
        "gene_matching": {
            k: (list(v) if isinstance(v, list) else v) for k, v in matching.model_dump().items()
        },
    }
