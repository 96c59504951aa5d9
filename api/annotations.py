"""AnnData in, AnnData out: read expression from an AnnData and write annotations into it.

What lands where (scanpy's conventions, like ``sc.tl.*`` writing into the object):

* ``obs['cellexplain_label']``: predicted cell type, or ``Unassigned`` below the threshold
  (categoricals hold the classes that occur, in the model's order; their colours, one per
  class in every file of a model and grey for ``Unassigned``, in ``uns['..._colors']``)
* ``obs['cellexplain_predicted_label']``: the most probable type whatever its confidence
* ``obs['cellexplain_confidence']``: probability of the predicted type
* ``obs['cellexplain_unassigned_reason']``: why a cell is Unassigned (``low_confidence``,
  ``novel``, ``low_confidence_and_novel``; empty when it is not)
* ``obs['cellexplain_novelty']``: the share of known-type cells nearer to a known type
* ``obs['cellexplain_top_genes']``: the evidence for the explained class: its ``top_k`` largest
  positive attributions, ``;``-separated, largest first
* ``obs['cellexplain_genes_against']``: the evidence against it (most negative first)
* ``obsm['cellexplain_top_genes_attribution']``, ``obsm['cellexplain_genes_against_attribution']``:
  ``[n_cells, top_k]`` their values (NaN where a cell has fewer)
* ``obs['cellexplain_completeness_gap']``: with attributions, ``|sum(attributions) - (F(x) -
  F(x0))| / |F(x) - F(x0)|`` (how much of the explained logit's change they miss)
* ``obsm['cellexplain_attributions']``: ``[n_cells, n_model_genes]`` float32 attributions
  (with ``attributions`` other than ``none``); gene order in ``uns['cellexplain']['genes']``
* ``obsm['cellexplain_program_attributions']``: ``[n_cells, n_programs]`` (programs models)
* ``obsm['cellexplain_probabilities']``: ``[n_cells, n_classes]``; class order in ``uns``
* ``uns['cellexplain']``: model, version, attribution method, genes, classes, programs,
  thresholds, input kind, gene matching, warnings
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellexplain.api.errors import InvalidInputError, TooLargeError, brief
from cellexplain.api.schemas import AnnotateResponse, GeneAttribution, GeneMatching
from cellexplain.models.card import ModelCard
from cellexplain.models.data import select_matrix
from cellexplain.models.errors import DataError
from cellexplain.models.preprocess import sparse_structure_problem

PREFIX = "cellexplain"
#: the label of a cell whose best class is below the confidence threshold, or that is novel
#: the words of the answer's warning about cells that express none of the model's genes (a
#: file pipeline replaces the per-request warnings by one count over the file)
NO_MODEL_GENES = "express none of the model's genes"
UNASSIGNED = "Unassigned"
#: why a cell is Unassigned, by code (0: it is not; 1 + 2 = both)
UNASSIGNED_REASONS: tuple[str, ...] = ("", "low_confidence", "novel", "low_confidence_and_novel")


def expression(
    adata: ad.AnnData, gene_key: str | None = None, layer: str | None = None
) -> tuple[list[str], np.ndarray | sp.spmatrix]:
    """Gene names and the ``[n_cells, n_genes]`` matrix to annotate, as stored (dense or
    sparse, its own dtype: the core converts and checks it in row chunks); see
    :func:`cellexplain.models.data.select_matrix` for ``gene_key`` and ``layer``."""
    try:
        genes, X = select_matrix(adata, gene_key, layer)
    except DataError as e:
        raise InvalidInputError(str(e), e.field) from e
    if not (sp.issparse(X) or isinstance(X, np.ndarray)):
        raise InvalidInputError(
            f"the matrix in {layer or 'X'} is a {type(X).__name__}, not a dense or sparse array",
            "layer",
        )
    problem = sparse_structure_problem(X)
    if problem is not None:
        raise InvalidInputError(f"the matrix in {layer or 'X'} is malformed: {problem}", "file")
    return genes, X


def gene_map(genes: list[str], Xc: sp.csr_matrix, i: int) -> dict[str, float]:
    """Row ``i`` of a CSR matrix as ``{gene: value}``. A name ``genes`` holds twice gets the sum
    of its columns: a map has one value per key, and the server puts it in the name's first
    column, so per-cell totals (and so normalisation) stay those of the file."""
    row = slice(Xc.indptr[i], Xc.indptr[i + 1])
    out: dict[str, float] = {}
    for j, v in zip(Xc.indices[row].tolist(), Xc.data[row].tolist(), strict=True):
        g = genes[j]
        out[g] = out[g] + v if g in out else v
    return out


def signed_top_k(
    attr: np.ndarray, k: int, sign: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's ``k`` largest positive (``sign=1``) or most negative (``sign=-1``) values of
    ``attr`` ``[n, G]``: ``[n, k]`` column indices, most extreme first, their values (float32),
    and whether each is of that sign (a row with fewer has its other entries last, False)."""
    k = min(k, attr.shape[1])
    if k <= 0:
        empty = np.zeros((attr.shape[0], 0))
        return empty.astype(np.int64), empty.astype(np.float32), empty.astype(bool)
    idx = top_k_indices(attr, k, signed=sign)
    values = np.take_along_axis(attr, idx, 1).astype(np.float32)
    return idx, values, values * sign > 0


def top_k_indices(attr: np.ndarray, k: int, signed: int = 0) -> np.ndarray:
    """``[n, k]`` column indices of each row's ``k`` largest ``|attr|`` (``signed=1``: largest
    ``attr``; ``-1``: smallest), first first."""
    k = min(k, attr.shape[1])
    # numpy selects the smallest k far faster than the largest k
    neg = -np.abs(attr) if signed == 0 else -attr if signed > 0 else attr
    part = np.argpartition(neg, k - 1, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(neg, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def sparse_from_maps(
    cells: Iterable[Mapping[str, float]],
    genes: Sequence[str] | None = None,
    max_genes: int | None = None,
) -> tuple[list[str], sp.csr_matrix]:
    """One ``{gene: value}`` map per cell -> (genes, CSR ``[n_cells, n_genes]``); genes absent
    from a map are zero.

    With ``genes`` (all genes measured), the maps may only name those and the columns follow
    them; without, the columns are the genes named, in order of first appearance (at most
    ``max_genes``). Each cell becomes two small arrays at once, never a Python object per value.

    Raises:
        InvalidInputError: a map names a gene outside ``genes``.
        TooLargeError: the maps name more than ``max_genes`` distinct genes.
    """
    # a name given twice in ``genes`` keeps both columns (the aligner then sees what the dense
    # form shows it: a tie or an unused duplicate); a map's key goes to the first of them
    columns: dict[str, int] = {}
    for i, g in enumerate(genes or []):
        columns.setdefault(g, i)
    fixed = genes is not None
    width = len(genes) if genes is not None else 0
    indptr = [0]
    indices: list[np.ndarray] = []
    data: list[np.ndarray] = []
    for i, cell in enumerate(cells):
        cols = np.empty(len(cell), dtype=np.int64)
        for k, gene in enumerate(cell):
            j = columns.get(gene)
            if j is None:
                if fixed:
                    raise InvalidInputError(
                        f"cells[{i}] names gene {brief(gene)}, which is not in genes",
                        f"cells[{i}]",
                    )
                j = columns[gene] = width
                width += 1
                if max_genes is not None and j >= max_genes:
                    raise TooLargeError(
                        f"the cells name more than {max_genes} genes; the limit is {max_genes}",
                        "cells",
                    )
            cols[k] = j
        indices.append(cols)
        data.append(np.fromiter(cell.values(), dtype=np.float64, count=len(cell)))
        indptr.append(indptr[-1] + len(cell))
    X = sp.csr_matrix(
        (
            np.concatenate(data) if data else np.zeros(0),
            np.concatenate(indices) if indices else np.zeros(0, np.int64),
            np.asarray(indptr, dtype=np.int64),
        ),
        shape=(len(indptr) - 1, width),
    )
    return (list(genes) if genes is not None else list(columns)), X


@dataclass
class Annotations:
    """Per-cell results for ``n`` cells, in the form they take in an AnnData.

    String arrays are object arrays; ``None`` where not asked for.
    """

    label: np.ndarray  # [n] predicted type or Unassigned
    predicted_label: np.ndarray  # [n]
    confidence: np.ndarray  # [n] float32
    probabilities: np.ndarray | None = None  # [n, n_classes]
    explained_class: np.ndarray | None = None  # [n]
    attributions: np.ndarray | None = None  # [n, n_model_genes]
    top_genes: np.ndarray | None = None  # [n] "GENE1;GENE2;..." (for the explained class)
    program_attributions: np.ndarray | None = None  # [n, n_programs]
    completeness_gap: np.ndarray | None = None  # [n] float32
    novelty: np.ndarray | None = None  # [n] float32
    unassigned_reason: np.ndarray | None = None  # [n] "" or a reason
    genes_against: np.ndarray | None = None  # [n] "GENE1;GENE2;..."
    #: [n, top_k] float32 values of top_genes and genes_against (NaN where a cell has fewer)
    top_genes_attribution: np.ndarray | None = None
    genes_against_attribution: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.label)

    @staticmethod
    def concat(parts: Sequence[Annotations]) -> Annotations:
        def cat(name: str) -> np.ndarray | None:
            arrays = [getattr(p, name) for p in parts]
            return None if arrays[0] is None else np.concatenate(arrays)

        return Annotations(**{f.name: cat(f.name) for f in fields(Annotations)})  # type: ignore[arg-type]

    @classmethod
    def from_response(
        cls,
        res: AnnotateResponse,
        classes: Sequence[str],
        programs: Sequence[str],
        top_k: int = 0,
    ) -> Annotations:
        """From an API response (client side): probabilities (columns in ``classes`` order,
        matched by class name: a response's maps have no order of their own) and full
        attributions (and all program attributions) when the request asked for them; top genes
        from ``top_genes`` (``attributions='top_k'``) or, with full attributions, the ``top_k``
        largest."""
        cells = res.cells
        obj = lambda values: np.array(values, dtype=object)  # noqa: E731
        first = cells[0]
        probs = None
        if first.probabilities is not None:
            probs = np.empty((len(cells), len(classes)), dtype=np.float32)
            for i, c in enumerate(cells):
                p = c.probabilities or {}
                if set(p) != set(classes):
                    raise ValueError(
                        f"cell {c.id!r}: the response's probabilities name {sorted(p)}, not the "
                        f"model's classes {list(classes)}"
                    )
                probs[i] = [p[k] for k in classes]
        attr = None
        if first.attributions is not None:
            attr = np.array([c.attributions for c in cells], dtype=np.float32)
        top = top_values = against = against_values = None
        if first.top_genes is not None:
            top, top_values = _listed([c.top_genes or [] for c in cells], top_k)
            against, against_values = _listed([c.genes_against or [] for c in cells], top_k)
        elif attr is not None and top_k > 0 and res.attribution_genes is not None:
            genes = obj(res.attribution_genes)
            top, top_values = evidence(genes, *signed_top_k(attr, top_k, 1))
            against, against_values = evidence(genes, *signed_top_k(attr, top_k, -1))
        prog = None
        if first.program_attributions is not None and res.attribution_genes is not None:
            index = {p: j for j, p in enumerate(programs)}
            prog = np.zeros((len(cells), len(programs)), dtype=np.float32)
            for i, c in enumerate(cells):
                for pa in c.program_attributions or []:
                    prog[i, index[pa.program]] = pa.attribution
        return cls(
            label=obj([c.label for c in cells]),
            predicted_label=obj([c.predicted_label for c in cells]),
            confidence=np.array([c.confidence for c in cells], dtype=np.float32),
            probabilities=probs,
            explained_class=None
            if first.explained_class is None
            else obj([c.explained_class for c in cells]),
            attributions=attr,
            top_genes=top,
            program_attributions=prog,
            completeness_gap=None
            if first.completeness_gap is None
            else np.array([c.completeness_gap for c in cells], dtype=np.float32),
            novelty=None
            if first.novelty is None
            else np.array([c.novelty for c in cells], dtype=np.float32),
            unassigned_reason=obj([c.unassigned_reason or "" for c in cells]),
            genes_against=against,
            top_genes_attribution=top_values,
            genes_against_attribution=against_values,
        )


def evidence(
    genes: np.ndarray, idx: np.ndarray, values: np.ndarray, present: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Genes for (or against) a call as they land in ``obs`` and ``obsm``: ``[n]`` names
    ``;``-joined, and ``[n, k]`` float32 values, NaN where a cell has fewer than ``k``
    (``genes``: object array of the model's genes; the rest from :func:`signed_top_k`)."""
    names = genes[idx]
    if present.shape[1] < 2 or bool((present[:, :-1] >= present[:, 1:]).all()):
        # the usual shape (ranked: the present ones first): each row's first m names, joined
        # from plain lists (4x faster than a boolean mask per row)
        counts = present.sum(axis=1).tolist()
        rows = names.tolist()
        joined = np.array([";".join(r[:m]) for r, m in zip(rows, counts, strict=True)], object)
    else:
        joined = np.array(
            [";".join(row[ok]) for row, ok in zip(names, present, strict=True)], object
        )
    return joined, np.where(present, values, np.float32(np.nan)).astype(np.float32)


def _listed(
    lists: Sequence[Sequence[GeneAttribution]], top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`evidence` from a response's per-cell lists of ``{gene, attribution}``."""
    k = max([top_k, *map(len, lists)])
    values = np.full((len(lists), k), np.nan, dtype=np.float32)
    for i, entries in enumerate(lists):
        values[i, : len(entries)] = [e.attribution for e in entries]
    names = np.array([";".join(e.gene for e in entries) for entries in lists], dtype=object)
    return names, values


def annotation_info(
    card: ModelCard,
    threshold: float,
    input_kind: str,
    matching: GeneMatching,
    novelty_threshold: float | None = None,
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """What goes into ``uns['cellexplain']`` (``novelty_threshold``: absent for models without
    a novelty score)."""
    extra: dict[str, Any] = {"warnings": list(warnings)}
    if novelty_threshold is not None:
        extra["novelty_threshold"] = float(novelty_threshold)
    return {
        **extra,
        "model": card.name,
        "model_version": card.version,
        "attribution_method": card.attribution.method,
        "genes": list(card.genes),
        "classes": list(card.classes),
        "programs": list(card.gene_sets.programs) if card.gene_sets else [],
        "unassigned_threshold": float(threshold),
        "input_kind": input_kind,
        "gene_matching": matching.model_dump(),
    }


#: a class's colour in plots: the class's place among the model's classes picks it (the same
#: colour in every file of one model); matplotlib's tab20, then tab20b, as hex
PALETTE = (
    "#1f77b4", "#ff7f0e", "#279e68", "#d62728", "#aa40fc", "#8c564b", "#e377c2", "#b5bd61",
    "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2",
    "#dbdb8d", "#9edae5", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#5254a3",
)  # fmt: skip
#: Unassigned, in every plot: light grey
UNASSIGNED_COLOR = "#d3d3d3"


def _observed(values: np.ndarray, names: Sequence[str]) -> Any:
    """A categorical over the ``names`` that occur in ``values``, in their order: scanpy's
    plots and ``rank_genes_groups`` fail on empty categories."""
    present = set(pd.unique(np.asarray(values, dtype=object)))
    return pd.Categorical(values, categories=[c for c in names if c in present])


def label_colors(obs: Mapping[str, Any], classes: Sequence[str]) -> dict[str, list[str]]:
    """``uns['{column}_colors']`` for the label columns in ``obs`` (scanpy's convention: one
    colour per category, in order): each class its :data:`PALETTE` colour by its place among
    the model's classes, ``Unassigned`` grey."""
    place = {c: i for i, c in enumerate(classes)}
    colors = {}
    for name in ("label", "predicted_label", "explained_class", "majority_voting"):
        col = obs.get(f"{PREFIX}_{name}")
        if col is None or not isinstance(getattr(col, "dtype", None), pd.CategoricalDtype):
            continue
        categories = col.categories if isinstance(col, pd.Categorical) else col.cat.categories
        colors[f"{PREFIX}_{name}_colors"] = [
            UNASSIGNED_COLOR if c == UNASSIGNED else PALETTE[place.get(c, 0) % len(PALETTE)]
            for c in categories
        ]
    return colors


def obs_columns(ann: Annotations, classes: Sequence[str]) -> dict[str, Any]:
    """The ``obs`` columns of ``ann`` (categoricals over the model's classes that occur, and
    ``Unassigned`` where it does)."""
    cols: dict[str, Any] = {
        f"{PREFIX}_label": _observed(ann.label, [*classes, UNASSIGNED]),
        f"{PREFIX}_predicted_label": _observed(ann.predicted_label, classes),
        f"{PREFIX}_confidence": ann.confidence,
    }
    if ann.explained_class is not None:
        cols[f"{PREFIX}_explained_class"] = _observed(ann.explained_class, classes)
    if ann.unassigned_reason is not None:
        cols[f"{PREFIX}_unassigned_reason"] = pd.Categorical(
            ann.unassigned_reason, categories=list(UNASSIGNED_REASONS)
        )
    if ann.novelty is not None:
        cols[f"{PREFIX}_novelty"] = ann.novelty
    if ann.top_genes is not None:
        cols[f"{PREFIX}_top_genes"] = ann.top_genes  # object array of str (no fixed-width copy)
    if ann.genes_against is not None:
        cols[f"{PREFIX}_genes_against"] = ann.genes_against
    if ann.completeness_gap is not None:
        cols[f"{PREFIX}_completeness_gap"] = ann.completeness_gap
    return cols


def obsm_arrays(ann: Annotations) -> dict[str, np.ndarray]:
    """The ``obsm`` matrices of ``ann``."""
    arrays = {
        f"{PREFIX}_probabilities": ann.probabilities,
        f"{PREFIX}_attributions": ann.attributions,
        f"{PREFIX}_program_attributions": ann.program_attributions,
        f"{PREFIX}_top_genes_attribution": ann.top_genes_attribution,
        f"{PREFIX}_genes_against_attribution": ann.genes_against_attribution,
    }
    return {k: v for k, v in arrays.items() if v is not None}


def write_annotations(adata: ad.AnnData, ann: Annotations, info: dict[str, Any]) -> None:
    """Write annotations into an in-memory ``adata`` (see the module docstring)."""
    cols = obs_columns(ann, info["classes"])
    for name, col in cols.items():
        adata.obs[name] = col
    for name, arr in obsm_arrays(ann).items():
        adata.obsm[name] = arr
    adata.uns[PREFIX] = info
    adata.uns.update(label_colors(cols, info["classes"]))


def majority_vote(
    labels: np.ndarray, clusters: np.ndarray, novel: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell majority label of its cluster, as CellTypist's majority voting.

    Cells ``Unassigned`` for low confidence do not vote (a cluster of only ``Unassigned``
    stays so); cells flagged ``novel`` (``[n]`` bool) vote ``Unassigned``: being far from every
    known type is evidence, not doubt, and a cluster whose plurality is novel is a type the
    model does not know. Returns the voted label per cell and the share of the cluster's cells
    that carry it.
    """
    label = np.asarray(labels, dtype=object)
    is_novel = np.zeros(len(label), bool) if novel is None else np.asarray(novel, bool)
    frame = pd.DataFrame({"label": label, "cluster": pd.Categorical(clusters)})
    voting = frame[(frame["label"] != UNASSIGNED) | is_novel]
    counts = voting.groupby(["cluster", "label"], observed=True).size()
    sizes = frame.groupby("cluster", observed=True).size()
    winner: dict[Any, str] = {}
    share: dict[Any, float] = {}
    for cluster, size in sizes.items():
        if cluster in counts.index.get_level_values(0):
            c = counts.loc[cluster]
            winner[cluster] = str(c.idxmax())
            share[cluster] = float(c.max()) / float(size)
        else:
            winner[cluster] = UNASSIGNED
            share[cluster] = float((frame["cluster"] == cluster).sum()) / float(size)
    voted = frame["cluster"].map(winner).astype(object).to_numpy()
    shares = frame["cluster"].map(share).astype(np.float32).to_numpy()
    return voted, shares
