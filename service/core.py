"""The annotation data plane: one core for every front door.

Validate the request, align genes, normalise, run the ONNX graph (through the batcher), label
low-confidence cells ``Unassigned``, rank attributions, count metrics. No transport code here:
REST (``service/jsonbody.py`` reads its bodies), gRPC and the CLI turn their requests into
genes + a matrix + :class:`~service.schemas.AnnotateOptions` and call
:meth:`Annotator.annotate_payload` (or :meth:`Annotator.annotate_matrix`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from anndata import AnnData

from models.errors import PreprocessError
from models.preprocess import (
    MAX_LOG1P_VALUE,
    TotalOverflowError,
    detect_input_kind,
    first_invalid,
    normalize_log1p,
    sparse_structure_problem,
)
from models.runtime import OnnxModel, Prediction, available_providers
from service import anndata_io, metrics
from service.alignment import Alignment, GeneAligner
from service.batching import Batcher
from service.errors import InvalidInputError, ModelNotFoundError, TooLargeError, brief
from service.schemas import (
    AnnotateOptions,
    AnnotateResponse,
    GeneMatching,
    ModelDetail,
    ModelList,
    ModelSummary,
)
from service.settings import Settings

log = logging.getLogger(__name__)

UNASSIGNED = "Unassigned"
#: values per chunk of rows checked and normalised at once (8 MiB as float64, 3 working copies)
CHUNK_VALUES = 1 << 20


@dataclass
class LoadedModel:
    """A served model: the verified ONNX session, its gene aligner and its batcher."""

    name: str
    tag: str
    model: OnnxModel
    aligner: GeneAligner
    batcher: Batcher

    @property
    def classes(self) -> list[str]:
        return self.model.classes


@dataclass
class Prepared:
    """A validated request, ready for the graph."""

    x: np.ndarray  # [n, n_model_genes] float32, log1p CP10k
    target: np.ndarray  # [n] int64, -1 = predicted
    cell_ids: list[str]
    alignment: Alignment
    n_submitted: int
    input_kind: str


def top_k_indices(attr: np.ndarray, k: int) -> np.ndarray:
    """``[n, k]`` column indices of each row's ``k`` largest ``|attr|``, largest first."""
    k = min(k, attr.shape[1])
    part = np.argpartition(-np.abs(attr), k - 1, axis=1)[:, :k]
    order = np.argsort(-np.abs(np.take_along_axis(attr, part, axis=1)), axis=1)
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


def _float64(X: np.ndarray | sp.spmatrix) -> np.ndarray | sp.csr_matrix:
    """A float64 copy (CSR stays CSR) of a block of rows."""
    if sp.issparse(X):
        return sp.csr_matrix(X, dtype=np.float64)
    return np.asarray(X, dtype=np.float64)


def _require_valid(
    X: np.ndarray | sp.csr_matrix, where: Callable[[int, int], tuple[str, str]]
) -> None:
    """Raise a 400 naming the first NaN, infinite or negative value; ``where(row, col)`` gives
    its description and the request field."""
    bad = first_invalid(X)
    if bad is not None:
        row, col, what = bad
        text, field = where(row, col)
        raise InvalidInputError(
            f"{text} is {what}: expression values must be finite and non-negative", field
        )


class Annotator:
    """Holds the served models and annotates requests against them."""

    def __init__(self, settings: Settings, models: Sequence[LoadedModel]) -> None:
        if not models:
            raise ValueError("no models to serve")
        self.settings = settings
        self.models = {m.name: m for m in models}
        self.default = settings.default_model or models[0].name
        if self.default not in self.models:
            raise ValueError(f"default model {self.default!r} is not among {list(self.models)}")

    # -- loading ---------------------------------------------------------------------------
    @classmethod
    def from_settings(cls, settings: Settings) -> Annotator:
        """Load every model the settings name (store tags, then folders) and warm them up."""
        from models.store import get_model

        providers = available_providers(
            settings.prefer_gpu, settings.tensorrt, settings.trt_cache_dir or None
        )
        # share the cores between worker processes instead of oversubscribing them
        threads = settings.intra_op_threads or max(1, (os.cpu_count() or 1) // settings.workers)
        loaded: list[LoadedModel] = []
        sources: list[tuple[str, Path]] = []
        for tag in settings.models:
            stored = get_model(tag)
            sources.append((stored.tag, stored.path))
        for d in settings.model_dirs:
            sources.append((f"dir:{d}", Path(d)))
        for tag, path in sources:
            m = OnnxModel(
                path, providers=providers, intra_op_threads=threads, spinning=settings.ort_spinning
            )
            m.predict(np.zeros((2, len(m.genes)), np.float32))  # warm-up
            name = m.card.name
            if any(lm.name == name for lm in loaded):
                raise ValueError(f"two served models are named {name!r}")
            loaded.append(
                LoadedModel(
                    name,
                    tag,
                    m,
                    GeneAligner(m.genes),
                    Batcher(
                        name,
                        m,
                        settings.max_batch_cells,
                        settings.max_batch_latency_ms / 1000.0,
                        settings.request_timeout_s,
                    ),
                )
            )
            log.info(
                "serving %s (%s) on %s with %d onnxruntime threads",
                name,
                tag,
                m.providers[0],
                threads,
            )
        return cls(settings, loaded)

    def get(self, name: str | None) -> LoadedModel:
        key = name or self.default
        if key not in self.models:
            raise ModelNotFoundError(
                f"unknown model {brief(key)}; served models: {', '.join(sorted(self.models))}",
                "model",
            )
        return self.models[key]

    # -- model metadata --------------------------------------------------------------------
    def list_models(self) -> ModelList:
        return ModelList(
            models=[
                ModelSummary(
                    name=m.name,
                    tag=m.tag,
                    architecture=m.model.card.architecture.kind,
                    n_genes=len(m.model.genes),
                    classes=m.classes,
                    attribution_method=m.model.card.attribution.method,
                    test_macro_f1=m.model.card.metrics.model.macro_f1,
                    default=m.name == self.default,
                )
                for m in self.models.values()
            ]
        )

    def model_detail(self, name: str) -> ModelDetail:
        m = self.get(name)
        return ModelDetail(tag=m.tag, providers=m.model.providers, card=m.model.card)

    # -- the data plane --------------------------------------------------------------------
    def prepare_matrix(
        self,
        genes: Sequence[str],
        X: np.ndarray | sp.spmatrix,
        opts: AnnotateOptions,
        lm: LoadedModel,
        cell_ids: list[str],
        genes_field: str = "genes",
        where: Callable[[int, int], tuple[str, str]] | None = None,
    ) -> Prepared:
        """Validate an expression matrix ``[n_cells, n_genes]`` (raw counts or log1p values,
        any numeric dtype, dense or sparse) and turn it into model input: check the limits, align
        genes, then check values, normalise and align in row chunks, so the float64 working
        copies stay ``O(chunk)`` whatever the request size.

        ``where(row, col)`` describes a bad value and names its field (default: ``cells[i][j]``).
        """
        s = self.settings
        n = X.shape[0]
        if n == 0:
            raise InvalidInputError("cells is empty: send at least one cell", "cells")
        self._check_n_cells(n)
        if len(genes) > s.max_genes_per_request:
            raise TooLargeError(
                f"{len(genes)} genes in one request; the limit is {s.max_genes_per_request}",
                genes_field,
            )
        problem = sparse_structure_problem(X)
        if problem is not None:
            raise InvalidInputError(f"the sparse matrix is malformed: {problem}", "cells")
        if len(genes) != X.shape[1]:
            raise InvalidInputError(
                f"{len(genes)} gene names for a matrix of {X.shape[1]} columns", genes_field
            )
        if np.dtype(X.dtype).kind not in "biuf":
            raise InvalidInputError(
                f"the expression values are not numbers (dtype {X.dtype}): send raw counts or "
                "log1p values",
                "cells",
            )
        if where is None:
            where = lambda i, j: (f"cells[{i}][{j}] (gene {brief(genes[j])})", f"cells[{i}][{j}]")  # noqa: E731
        alignment = lm.aligner.align(genes, genes_field)
        if sp.issparse(X) and X.format != "csr":  # type: ignore[union-attr]
            X = sp.csr_matrix(X)
        kind = opts.input
        if kind == "auto":
            head = _float64(X[: min(n, 2000)])
            _require_valid(head, where)
            try:
                kind = detect_input_kind(head).kind
            except PreprocessError as e:
                raise InvalidInputError(f"{e} (or set input explicitly)", "cells") from e
        x = np.empty((n, len(alignment.take)), dtype=np.float32)
        step = max(1, min(s.max_batch_cells, CHUNK_VALUES // max(1, X.shape[1])))
        for a in range(0, n, step):
            chunk = _float64(X[a : a + step])
            _require_valid(chunk, lambda i, j, a=a: where(a + i, j))  # type: ignore[misc]
            x[a : a + step] = alignment.apply(self._normalise(chunk, kind, a))
        return Prepared(
            x=x,
            target=np.full(n, self._target_index(opts.target, lm), dtype=np.int64),
            cell_ids=cell_ids,
            alignment=alignment,
            n_submitted=len(genes),
            input_kind=kind,
        )

    async def annotate_payload(
        self,
        genes: Sequence[str],
        X: np.ndarray | sp.csr_matrix,
        opts: AnnotateOptions,
        cell_ids: Sequence[str] | None = None,
        genes_field: str = "genes",
        arrays: bool = False,
    ) -> dict[str, Any]:
        """:meth:`annotate_matrix` as plain values (see :meth:`payload`), for front doors that
        serialise it themselves (REST to JSON, gRPC to protobuf)."""
        prediction = await self._run(genes, X, opts, cell_ids, genes_field)
        return self.payload(opts, *prediction, arrays=arrays)

    async def annotate_matrix(
        self,
        genes: Sequence[str],
        X: np.ndarray | sp.csr_matrix,
        opts: AnnotateOptions,
        cell_ids: Sequence[str] | None = None,
        genes_field: str = "genes",
    ) -> AnnotateResponse:
        """Annotate ``X`` ``[n_cells, n_genes]`` (raw counts or log1p values, dense or CSR,
        columns named by ``genes``): the one core every front door calls.

        Raises:
            ServiceError: bad input, unknown model, too many cells; the message names the field.
        """
        payload = await self.annotate_payload(genes, X, opts, cell_ids, genes_field)
        return AnnotateResponse.model_validate(payload)

    async def _run(
        self,
        genes: Sequence[str],
        X: np.ndarray | sp.csr_matrix,
        opts: AnnotateOptions,
        cell_ids: Sequence[str] | None,
        genes_field: str,
    ) -> tuple[LoadedModel, Prepared, Prediction]:
        """Validate, align, normalise and run the graph (through the batcher)."""
        lm = self.get(opts.model)
        self._check_options(opts, lm)
        n = X.shape[0]
        prep = self.prepare_matrix(genes, X, opts, lm, self._cell_ids(cell_ids, n), genes_field)
        pred = await lm.batcher.predict(prep.x, prep.target)
        return lm, prep, pred

    async def infer(
        self, model: str, x: np.ndarray, target: np.ndarray | None = None
    ) -> tuple[LoadedModel, Prediction, list[str]]:
        """Run a model on its own input (``x`` ``[n, n_genes]``: log1p CP10k values of the
        model's genes, in card order), as the Open Inference Protocol does; no alignment or
        normalisation. Returns the model, the graph outputs and the labels (``Unassigned``
        below the card's threshold)."""
        lm = self.get(model)
        g = len(lm.model.genes)
        if x.ndim != 2 or x.shape[1] != g:
            raise InvalidInputError(f"input x must have shape [n, {g}], got {list(x.shape)}", "x")
        if x.shape[0] == 0:
            raise InvalidInputError("input x has no rows", "x")
        self._check_n_cells(x.shape[0])
        _require_valid(x, lambda i, j: (f"x[{i}][{j}] (gene {lm.model.genes[j]!r})", "x"))
        if target is None:
            t = np.full(x.shape[0], -1, dtype=np.int64)
        else:
            t = np.broadcast_to(np.asarray(target, dtype=np.int64).ravel(), (x.shape[0],)).copy()
            if np.any(t >= len(lm.classes)):
                raise InvalidInputError(
                    f"target class index out of range: the model has {len(lm.classes)} classes",
                    "target",
                )
        pred = await lm.batcher.predict(np.ascontiguousarray(x, dtype=np.float32), t)
        best, conf, assigned = self._calls(pred, lm.model.card.unassigned_threshold)
        labels = list(self._labels(lm, best, assigned))
        self._count(lm.name, 0.0, lm.classes, best, conf, assigned)
        return lm, pred, labels

    async def annotate_anndata(
        self,
        adata: AnnData,
        opts: AnnotateOptions,
        gene_key: str | None = None,
        layer: str | None = None,
    ) -> AnnData:
        """Annotate every cell of ``adata`` and write the results into it (see
        :func:`service.anndata_io.write_annotations` for what lands where)."""
        lm = self.get(opts.model)
        self._check_options(opts, lm)
        genes, X = anndata_io.expression(adata, gene_key, layer)
        names = adata.obs_names

        def where(r: int, c: int) -> tuple[str, str]:
            return f"cell {brief(names[r])} (row {r}), gene {brief(genes[c])}", "file"

        prep = self.prepare_matrix(genes, X, opts, lm, [str(i) for i in names], "var_names", where)
        pred = await lm.batcher.predict(prep.x, prep.target)
        threshold = self._threshold(opts, lm)
        best, conf, assigned = self._calls(pred, threshold)
        self._count(lm.name, prep.alignment.missing_fraction, lm.classes, best, conf, assigned)
        card = lm.model.card
        ann = anndata_io.Annotations.from_prediction(
            card, pred, self._labels(lm, best, assigned), best, conf, opts
        )
        info = anndata_io.annotation_info(card, threshold, prep.input_kind, self._matching(prep))
        anndata_io.write_annotations(adata, ann, info)
        return adata

    def payload(
        self,
        req: AnnotateOptions,
        lm: LoadedModel,
        prep: Prepared,
        pred: Prediction,
        arrays: bool = False,
    ) -> dict[str, Any]:
        """Labels, confidence, thresholding, ranked attributions, and metrics, as the fields of
        :class:`AnnotateResponse` in plain JSON-ready values, unvalidated (``None`` fields left
        out): REST serialises them straight to bytes and gRPC to protobuf, skipping ~20 pydantic
        objects per cell. The integration tests check they validate and round-trip.

        With ``arrays``, full attribution vectors stay float32 numpy rows (views), for a
        serialiser that writes them without a Python float per value (REST: orjson)."""
        t0 = time.perf_counter()
        card = lm.model.card
        classes = lm.classes
        threshold = self._threshold(req, lm)
        n = len(prep.cell_ids)
        probs = pred.probabilities
        best, conf, assigned = self._calls(pred, threshold)
        genes = lm.model.genes
        attr = pred.attributions
        top_idx: np.ndarray | None = None
        if req.attributions == "top_k" and req.top_k > 0:
            top_idx = top_k_indices(attr, req.top_k)
        programs = card.gene_sets.programs if card.gene_sets is not None else None
        # plain dicts, validated into the response in one pydantic-core call at the end: far
        # faster than building a model object per cell and per gene in Python
        explain = req.attributions != "none"
        conf_l = conf.tolist()
        expl_l = pred.explained_class.tolist()
        top_vals = None if top_idx is None else np.take_along_axis(attr, top_idx, 1).tolist()
        with_programs = explain and programs is not None and pred.program_attributions is not None
        if with_programs:
            pa_all = pred.program_attributions
            assert pa_all is not None and programs is not None
            p_order = np.argsort(-np.abs(pa_all), axis=1)
            if req.attributions == "top_k":
                p_order = p_order[:, : req.top_k]
            p_vals = np.take_along_axis(pa_all, p_order, 1).tolist()
            free = (attr.sum(1) - pa_all.sum(1)).tolist()
        cells: list[dict[str, object]] = []
        for i in range(n):
            label = classes[best[i]]
            fields: dict[str, object] = {
                "id": prep.cell_ids[i],
                "label": label if assigned[i] else UNASSIGNED,
                "predicted_label": label,
                "confidence": conf_l[i],
            }
            if explain:
                fields["explained_class"] = classes[expl_l[i]]
            if req.return_probabilities:
                fields["probabilities"] = dict(zip(classes, probs[i].tolist(), strict=True))
            if top_idx is not None and top_vals is not None:
                fields["top_genes"] = [
                    {"gene": genes[j], "attribution": v}
                    for j, v in zip(top_idx[i].tolist(), top_vals[i], strict=True)
                ]
            elif req.attributions == "full":
                fields["attributions"] = attr[i] if arrays else attr[i].tolist()
            if with_programs:
                assert programs is not None
                fields["program_attributions"] = [
                    {"program": programs[j], "attribution": v}
                    for j, v in zip(p_order[i].tolist(), p_vals[i], strict=True)
                ]
                fields["free_units_attribution"] = free[i]
            cells.append(fields)
        self._count(lm.name, prep.alignment.missing_fraction, classes, best, conf, assigned)
        metrics.ATTRIBUTION_SECONDS.labels(model=lm.name).observe(time.perf_counter() - t0)
        out: dict[str, Any] = {
            "model": lm.name,
            "model_version": card.version,
            "input_kind": prep.input_kind,
            "attribution_method": card.attribution.method,
            "unassigned_threshold": threshold,
            "gene_matching": self._matching(prep).model_dump(),
        }
        if req.attributions == "full":
            out["attribution_genes"] = list(genes)
        out["cells"] = cells
        return out

    # -- helpers ---------------------------------------------------------------------------
    def _matching(self, prep: Prepared) -> GeneMatching:
        al = prep.alignment
        return GeneMatching(
            n_model_genes=len(al.take),
            n_found=al.n_found,
            n_missing=len(al.missing),
            missing=al.missing[: self.settings.missing_genes_listed],
            n_submitted=prep.n_submitted,
            n_unused=al.n_unused,
            missing_fraction=al.missing_fraction,
            n_case_insensitive=al.n_case_insensitive,
            n_previous_symbol=al.n_previous_symbol,
            n_duplicated=al.n_duplicated,
        )

    @staticmethod
    def _threshold(opts: AnnotateOptions, lm: LoadedModel) -> float:
        if opts.unassigned_threshold is None:
            return lm.model.card.unassigned_threshold
        return opts.unassigned_threshold

    @staticmethod
    def _labels(lm: LoadedModel, best: np.ndarray, assigned: np.ndarray) -> np.ndarray:
        """Object array of labels: the class, or ``Unassigned`` where not ``assigned``."""
        return np.where(assigned, np.asarray(lm.classes, dtype=object)[best], UNASSIGNED)

    @staticmethod
    def _calls(pred: Prediction, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predicted class index, its probability, and whether it clears the threshold."""
        best = pred.probabilities.argmax(axis=1)
        conf = pred.probabilities[np.arange(len(best)), best]
        return best, conf, conf >= threshold

    def _check_n_cells(self, n: int) -> None:
        limit = self.settings.max_cells_per_request
        if n > limit:
            raise TooLargeError(
                f"{n} cells in one request; the limit is {limit} (split the request, or use "
                "the streaming gRPC API)",
                "cells",
            )

    def _check_options(self, req: AnnotateOptions, lm: LoadedModel) -> None:
        if req.top_k > self.settings.max_top_k:
            raise InvalidInputError(
                f"top_k is {req.top_k}; the limit is {self.settings.max_top_k}", "top_k"
            )

    @staticmethod
    def _target_index(target: str, lm: LoadedModel) -> int:
        if target == "predicted":
            return -1
        if target in lm.classes:
            return lm.classes.index(target)
        folded = [c.casefold() for c in lm.classes]
        if target.casefold() in folded:
            return folded.index(target.casefold())
        raise InvalidInputError(
            f"target {brief(target)} is not a class of model {lm.name}; use 'predicted' or one of: "
            + ", ".join(lm.classes),
            "target",
        )

    @staticmethod
    def _cell_ids(ids: Sequence[str] | None, n: int) -> list[str]:
        if ids is None:
            return [str(i) for i in range(n)]
        if len(ids) != n:
            raise InvalidInputError(f"cell_ids has {len(ids)} ids for {n} cells", "cell_ids")
        return list(ids)

    @staticmethod
    def _normalise(
        X: np.ndarray | sp.csr_matrix, kind: str, offset: int
    ) -> np.ndarray | sp.csr_matrix:
        """Rows ``offset...`` of the request, as log1p CP10k (counts are normalised here)."""
        if kind == "counts":
            try:
                return normalize_log1p(X)
            except TotalOverflowError as e:
                raise InvalidInputError(
                    f"the counts of cell {offset + e.row} sum to more than a float64 holds "
                    "(values near 1e308?): send raw UMI counts",
                    "cells",
                ) from e
        vmax = float(X.max()) if X.shape[1] else 0.0
        if vmax > MAX_LOG1P_VALUE:
            raise InvalidInputError(
                f"input is 'log1p_cp10k' but values reach {vmax:g}, more than log1p data "
                "ever holds: are these raw counts (input='counts')?",
                "input",
            )
        return X

    def _count(
        self,
        model: str,
        missing_fraction: float,
        classes: list[str],
        best: np.ndarray,
        conf: np.ndarray,
        assigned: np.ndarray,
    ) -> None:
        labels, counts = np.unique(
            np.where(assigned, np.asarray(classes, dtype=object)[best], UNASSIGNED),
            return_counts=True,
        )
        for label, c in zip(labels, counts, strict=True):
            metrics.CELLS.labels(model=model, label=str(label)).inc(int(c))
        unassigned = int((~assigned).sum())
        if unassigned:
            metrics.UNASSIGNED.labels(model=model).inc(unassigned)
        metrics.observe_many(metrics.CONFIDENCE.labels(model=model), conf)
        metrics.MISSING_GENES.labels(model=model).observe(missing_fraction)

    def close(self) -> None:
        for m in self.models.values():
            m.batcher.close()
