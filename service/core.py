"""The annotation data plane: one core for every front door.

Validate the request, align genes, normalise, run the ONNX graph (through the batcher), make
the calls (``Unassigned`` below the threshold), count metrics, and return a :class:`Result` of
arrays. No transport code here: each front door's codec turns its request into genes + a matrix
+ :class:`~cellexplain.api.schemas.AnnotateOptions` and calls :meth:`Annotator.annotate` (the
Open Inference Protocol, whose input is the model's own: :meth:`Annotator.infer`), then renders
the result (:mod:`cellexplain.service.v1`, :mod:`cellexplain.service.oip`,
:mod:`cellexplain.service.anndata_io`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import scipy.sparse as sp

from cellexplain.api.annotations import NO_MODEL_GENES, UNASSIGNED, UNASSIGNED_REASONS
from cellexplain.api.errors import InvalidInputError, ModelNotFoundError, TooLargeError, brief
from cellexplain.api.schemas import (
    AnnotateOptions,
    GeneMatching,
    ModelDetail,
    ModelList,
    ModelSummary,
    RequestLimits,
)
from cellexplain.models.card import ModelCard
from cellexplain.models.errors import ArtifactError, PreprocessError, StoreError
from cellexplain.models.preprocess import (
    MAX_LOG1P_VALUE,
    TotalOverflowError,
    csr_row_totals,
    detect_input_kind,
    first_invalid,
    log1p_scaled,
    normalize_log1p,
    row_block,
    sparse_structure_problem,
)
from cellexplain.models.runtime import OnnxModel, Prediction, available_providers
from cellexplain.service import logs, metrics, ranking
from cellexplain.service.alignment import Alignment, GeneAligner
from cellexplain.service.batching import Batcher, Party
from cellexplain.service.settings import Settings, SettingsError

T = TypeVar("T")
log = logging.getLogger(__name__)

#: a request missing more than this share of the model's genes, or of their importance, is
#: answered with a warning. Measured on the default model (pbmc68k_reduced's own cells, labels
#: against the full-gene answer): random genes missing, 10% / 30% / 50% / 80% kept 99.9% /
#: 99.0% / 92% / 62% of the labels; the most important genes missing first, 10% / 20% / 30% of
#: the importance kept 99.9% / 91% / 80% (docs/attributions.md, "Missing genes")
WARN_MISSING_SHARE = 0.1


def missing_gene_warnings(matching: GeneMatching, imported: bool = False) -> list[str]:
    """The answer's warnings about the genes it was sent (none while under
    :data:`WARN_MISSING_SHARE` of the model's genes and of their importance are missing).
    ``imported``: a CellTypist model's missing genes read as their training mean, and it has
    no test scores of its own."""
    importance = matching.missing_importance
    if matching.missing_fraction <= WARN_MISSING_SHARE and (importance or 0) <= WARN_MISSING_SHARE:
        return []
    weight = "" if importance is None else f", {importance:.0%} of their importance"
    shown = ", ".join(matching.missing[:10]) + (", ..." if matching.n_missing > 10 else "")
    # a card without gene importance (exported before it) lists them in model order
    which = "missing" if importance is None else "most important missing"
    return [
        f"{matching.n_missing} of the model's {matching.n_model_genes} genes "
        f"({matching.missing_fraction:.0%}{weight}) are missing from the request and were "
        + (
            "read as their training mean (left out of the score, as CellTypist does): labels "
            "and attributions rest on fewer genes than the model was built on"
            if imported
            else "read as zero: labels and attributions are less reliable than the model's "
            "test scores"
        )
        + f" ({which}: {shown})"
    ]


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
    alignment: Alignment
    n_submitted: int
    input_kind: str
    #: what the answer should say about the input (read as asked, but it looks otherwise)
    warnings: list[str] = field(default_factory=list)


@dataclass
class Result:
    """What the core returns for ``n`` cells, as arrays; every front door renders it with its
    codec (:mod:`~cellexplain.service.v1` for the typed REST and gRPC APIs,
    :mod:`~cellexplain.service.oip` for the Open Inference Protocol,
    :func:`~cellexplain.service.anndata_io.to_annotations` for AnnData)."""

    model: LoadedModel
    options: AnnotateOptions
    cell_ids: list[str]
    best: np.ndarray  # [n] int: the most probable class
    confidence: np.ndarray  # [n] float32: its probability
    low_confidence: np.ndarray  # [n] bool: confidence < threshold
    novel: np.ndarray  # [n] bool: novelty >= novelty threshold (all False without a score)
    logits: np.ndarray  # [n, n_classes] float32
    probabilities: np.ndarray  # [n, n_classes] float32
    explained_class: np.ndarray  # [n] int: the class the attributions explain
    attributions: np.ndarray  # [n, n_model_genes] float32
    program_attributions: np.ndarray | None  # [n, n_programs] (programs models)
    #: [n] |sum(attributions) - (F(x) - F(x0))| / |F(x) - F(x0)|: IG's quadrature error per
    #: cell (None for graphs exported before it was added)
    completeness_gap: np.ndarray | None
    #: [n] share of known-type cells nearer to a known type (None for graphs without it)
    novelty: np.ndarray | None
    threshold: float
    novelty_threshold: float | None  # None: the model has no novelty score
    input_kind: str  # counts | log1p_cp10k
    matching: GeneMatching | None  # None where the input was the model's own (OIP)
    #: warnings about the input beside the gene matching's (see :attr:`warnings`)
    input_warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.cell_ids)

    @property
    def assigned(self) -> np.ndarray:
        """``[n]`` bool: labelled with their most probable class (confident, not novel)."""
        return ~(self.low_confidence | self.novel)

    @property
    def reason_code(self) -> np.ndarray:
        """``[n]`` int: why a cell is Unassigned, an index into
        :data:`~cellexplain.api.annotations.UNASSIGNED_REASONS` (0: it is not)."""
        return self.low_confidence.astype(np.int8) + 2 * self.novel.astype(np.int8)

    @property
    def warnings(self) -> list[str]:
        """What makes this answer less reliable than the model's test scores."""
        imported = self.card.origin is not None
        missing = [] if self.matching is None else missing_gene_warnings(self.matching, imported)
        return [*self.input_warnings, *missing]

    @property
    def card(self) -> ModelCard:
        return self.model.model.card

    @property
    def classes(self) -> list[str]:
        return self.model.classes

    @property
    def labels(self) -> np.ndarray:
        """``[n]`` object array: the class, or ``Unassigned`` below the threshold."""
        names = np.asarray([*self.classes, UNASSIGNED], dtype=object)
        return names[self.answer.label_code]

    @cached_property
    def answer(self) -> Answer:
        """What the answer holds for each cell, computed once: every codec serialises this."""
        return Answer.of(self)


@dataclass
class Answer:
    """A result's answer, shaped once by the options' rules; the codecs only serialise it
    (:mod:`~cellexplain.service.v1`: JSON and protobuf; :mod:`~cellexplain.service.anndata_io`:
    AnnData). Arrays are ``[n]`` or ``[n, k]``, float32 values."""

    #: the class index, or ``n_classes`` for Unassigned (below the threshold)
    label_code: np.ndarray
    #: attributions were asked for (``attributions`` is not ``none``)
    explained: bool
    #: programs models: program indices by |attribution| (the ``top_k`` with
    #: ``attributions='top_k'``, all with ``full``), their values, and the share of the free
    #: (non-program) units
    programs: np.ndarray | None
    program_values: np.ndarray | None
    free: np.ndarray | None
    #: the completeness gap per cell (with attributions, for graphs that compute it)
    gap: np.ndarray | None
    #: what the genes for and against are ranked from (see :attr:`top`)
    _attributions: np.ndarray = field(repr=False)
    _top_k: int = -1  # -1: no attributions asked for

    @classmethod
    def of(cls, res: Result) -> Answer:
        opts = res.options
        explained = opts.attributions != "none"
        label_code = np.where(res.assigned, res.best, len(res.classes))
        programs = program_values = free = None
        pa = res.program_attributions
        gene_sets = res.card.gene_sets
        if explained and pa is not None and gene_sets is not None and gene_sets.programs:
            programs = np.argsort(-np.abs(pa), axis=1, kind="stable")
            if opts.attributions == "top_k":
                programs = programs[:, : opts.top_k]
            program_values = np.take_along_axis(pa, programs, 1).astype(np.float32)
            free = (res.attributions.sum(1) - pa.sum(1)).astype(np.float32)
        gap = res.completeness_gap
        gap = gap.astype(np.float32) if explained and gap is not None else None
        top_k = opts.top_k if explained else -1
        return cls(
            label_code, explained, programs, program_values, free, gap, res.attributions, top_k
        )

    @cached_property
    def _ranked(self) -> tuple[ranking.Ranked, ranking.Ranked] | None:
        # ranked when first read: /v1 with attributions='full' sends the whole vector and never
        # reads it
        return None if self._top_k < 0 else ranking.rank(self._attributions, self._top_k)

    @property
    def _for(self) -> ranking.Ranked | None:
        return None if self._ranked is None else self._ranked[0]

    @property
    def _against(self) -> ranking.Ranked | None:
        return None if self._ranked is None else self._ranked[1]

    @property
    def top(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The evidence for the explained class (when attributions were asked for; ``k``
        is ``top_k``, 0 included): ``[n, k]`` gene indices of each cell's largest positive
        attributions, largest first, their values (float32), and which are there (``[n, k]``
        bool: a cell has fewer than ``k`` positive attributions; the absent ones come last)."""
        return self._for

    @property
    def against(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The evidence against it: the most negative attributions, most negative first (as
        :attr:`top`)."""
        return self._against


def _input_warnings(
    x: np.ndarray,
    kind: str,
    alignment: Alignment,
    where: Callable[[int, int], tuple[str, str]],
    trained_on: int,
) -> list[str]:
    """What the model input shows that makes answers say little: cells expressing none of the
    model's genes (empty droplets, or cells of another panel), and counts sent over the
    model's genes alone when its training cells' totals covered more genes (``trained_on``):
    normalised by totals over fewer genes, the values run high."""
    out = []
    empty = ~x.any(axis=1)
    if empty.any():
        first = where(int(np.argmax(empty)), 0)[0].rsplit(", gene", 1)[0]
        out.append(
            f"{int(empty.sum())} of {len(x)} cells {NO_MODEL_GENES} (the first: {first}): their "
            "answers carry no information about them (empty droplets?)"
        )
    subset = alignment.n_unused == 0 and alignment.n_duplicated == 0
    if kind == "counts" and subset and trained_on > len(alignment.take):
        out.append(
            "every gene sent is one of the model's: if the cells were subset to them, each "
            "cell's total (the normalisation's denominator) misses its other genes and the "
            f"values run high (cells then look novel; the model's training cells were "
            f"normalised over {trained_on} genes); send counts over all measured genes"
        )
    return out


def _overflow(row: int) -> InvalidInputError:
    return InvalidInputError(
        f"the counts of cell {row} sum to more than a float64 holds (values near 1e308?): "
        "send raw UMI counts",
        "cells",
    )


def _float64(X: np.ndarray | sp.spmatrix) -> np.ndarray | sp.csr_matrix:
    """A float64 copy (CSR stays CSR) of a block of rows."""
    if sp.issparse(X):
        return sp.csr_matrix(X, dtype=np.float64)
    return np.asarray(X, dtype=np.float64)


def _floating(X: np.ndarray | sp.spmatrix) -> np.ndarray | sp.csr_matrix:
    """A block of rows as floats: float32 and float64 as they are, integers as float64."""
    if np.dtype(X.dtype).kind == "f":
        return sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
    return _float64(X)


def _cell_value(
    genes: Sequence[str], cell_ids: Sequence[str] | None, i: int, j: int
) -> tuple[str, str]:
    """How a request names value ``[i][j]``: its position, the cell's id when given (a client
    sending chunks of a file sends ids, so the cell is found whatever the chunk), the gene."""
    cell = f"cell {brief(cell_ids[i])}, " if cell_ids is not None else ""
    return f"cells[{i}][{j}] ({cell}gene {brief(genes[j])})", f"cells[{i}][{j}]"


def _require_valid(
    X: np.ndarray | sp.csr_matrix,
    where: Callable[[int, int], tuple[str, str]],
    upper: float | None = None,
) -> None:
    """Raise a 400 naming the first NaN, infinite or negative value (or one above ``upper``);
    ``where(row, col)`` gives its description and the request field."""
    bad = first_invalid(X, upper)
    if bad is not None:
        row, col, what = bad
        text, field = where(row, col)
        rule = "finite and non-negative" if upper is None else f"from 0 to {upper:g}"
        hint = ""
        if what.startswith("negative"):  # the usual cause: a scaled matrix (sc.pp.scale)
            hint = (
                " (scaled data? send raw counts or log1p values: from an AnnData, its .raw "
                "(layer 'raw', --layer raw) or a counts layer)"
            )
        raise InvalidInputError(f"{text} is {what}: expression values must be {rule}{hint}", field)


def check_cell_count(n: int, limit: int) -> None:
    """The cell limit, the core's rule; codecs that must refuse a body before they allocate its
    matrix (a memory pre-check) call this same function.

    Raises:
        TooLargeError: more than ``limit`` cells (413, ``RESOURCE_EXHAUSTED``).
    """
    if n > limit:
        raise TooLargeError(
            f"{n} cells in one request; the limit is {limit} (split the request, or use "
            "the streaming gRPC API)",
            "cells",
        )


def resolve_models(settings: Settings) -> list[tuple[str, Path]]:
    """``(tag, folder)`` of every model the settings name (store tags, then folders), checked
    before anything loads: each exists and is intact, their names are distinct, the default
    is one of them.

    Raises:
        SettingsError: naming the variable at fault (the server stops with it, at start).
    """
    from cellexplain.models.store import get_model, verify_artifact

    sources: list[tuple[str, Path]] = []
    names: list[str] = []
    for tag in settings.models:
        try:
            stored = get_model(tag)
        except (StoreError, ArtifactError) as e:
            raise SettingsError(
                f"CELLEXPLAIN_MODELS: {e} (`cellexplain models list` shows the stored ones)"
            ) from None
        sources.append((stored.tag, stored.path))
        names.append(stored.card.name)
    for d in settings.model_dirs:
        try:
            card = verify_artifact(d)
        except (StoreError, ArtifactError) as e:
            raise SettingsError(f"CELLEXPLAIN_MODEL_DIRS: {e}") from None
        sources.append((f"dir:{d}", Path(d)))
        names.append(card.name)
    if not sources:
        raise SettingsError(
            "no models to serve: set CELLEXPLAIN_MODELS (store tags) or CELLEXPLAIN_MODEL_DIRS "
            "(artifact folders)"
        )
    if settings.model_name is not None:
        if len(sources) != 1:
            raise SettingsError(
                f"CELLEXPLAIN_MODEL_NAME={settings.model_name!r} names one model, but "
                f"{len(sources)} are served ({', '.join(names)}): serve one, or unset it"
            )
        names = [settings.model_name]
    twice = sorted(n for n, k in Counter(names).items() if k > 1)
    if twice:
        raise SettingsError(f"two served models are named {twice[0]!r}: serve one of them")
    if settings.default_model is not None and settings.default_model not in names:
        raise SettingsError(
            f"CELLEXPLAIN_DEFAULT_MODEL={settings.default_model!r} is not a served model; "
            f"served: {', '.join(names)}"
        )
    return sources


def _values_bytes(X: np.ndarray | sp.spmatrix) -> int:
    """Bytes of the values a request's matrix holds (its stored values when sparse)."""
    return int(X.data.nbytes if sp.issparse(X) else np.asarray(X).nbytes)


async def off_loop(size: int, fn: Callable[[], T]) -> T:
    """``fn()``, on a thread when it reads ``size`` >= :data:`~.offload.LARGE` bytes: checking
    and aligning a large request stays off the door's event loop, whose other calls (a refusal
    of a full queue, a health check) are then answered at once, not after it."""
    from cellexplain.service.offload import LARGE

    if size < LARGE:
        return fn()
    return await asyncio.to_thread(fn)


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
        providers = available_providers(
            settings.prefer_gpu, settings.tensorrt, settings.trt_cache_dir or None
        )
        threads = settings.onnxruntime_threads
        loaded: list[LoadedModel] = []
        for tag, path in resolve_models(settings):
            m = OnnxModel(
                path, providers=providers, intra_op_threads=threads, spinning=settings.ort_spinning
            )
            m.predict(np.zeros((2, len(m.genes)), np.float32))  # warm-up
            if settings.model_name is not None and settings.model_name != m.card.name:
                log.info(
                    "model %s answers as %s (CELLEXPLAIN_MODEL_NAME)",
                    m.card.name,
                    settings.model_name,
                )
                m.card = m.card.model_copy(update={"name": settings.model_name})
            name = m.card.name
            metrics.MODEL_INFO.labels(
                model=name, version=m.card.version, sha256=m.card.onnx.sha256
            ).set(1)
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
                        settings.queue_bound,
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
        """The served model ``name`` (default: the default model), which the call's log lines
        then name (:data:`~cellexplain.service.logs.MODEL`).

        Raises:
            ModelNotFoundError: no such model (404, ``NOT_FOUND``).
        """
        key = name or self.default
        if key not in self.models:
            logs.MODEL.set((key[:100], None))
            raise ModelNotFoundError(
                f"unknown model {brief(key)}; served models: {', '.join(sorted(self.models))}",
                "model",
            )
        lm = self.models[key]
        logs.MODEL.set((lm.name, lm.model.card.version))
        return lm

    def check_room(self, model: str | None, n: int) -> None:
        """Refuse a request of ``n`` cells for ``model`` (default: the default model) when its
        queue cannot take them now (:meth:`~.batching.Batcher.check_room`), for a door that
        reads a request's size and model before it parses the request. An unknown model or
        too many cells pass: the call's own checks name those.

        Raises:
            OverloadedError: the model's queue is full.
        """
        if 0 < n <= self.settings.max_cells_per_request:
            try:
                lm = self.get(model)
            except ModelNotFoundError:
                return
            lm.batcher.check_room(n)

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
                    test_macro_f1=None
                    if m.model.card.metrics is None
                    else m.model.card.metrics.model.macro_f1,
                    default=m.name == self.default,
                )
                for m in self.models.values()
            ]
        )

    def model_detail(self, name: str) -> ModelDetail:
        m = self.get(name)
        s = self.settings
        limits = RequestLimits(
            max_cells_per_request=s.max_cells_per_request,
            max_genes_per_request=s.max_genes_per_request,
            max_body_bytes=s.max_body_bytes,
        )
        return ModelDetail(tag=m.tag, providers=m.model.providers, card=m.model.card, limits=limits)

    # -- the data plane --------------------------------------------------------------------
    async def annotate(
        self,
        genes: Sequence[str],
        X: np.ndarray | sp.spmatrix,
        opts: AnnotateOptions,
        cell_ids: Sequence[str] | None = None,
        genes_field: str = "genes",
        where: Callable[[int, int], tuple[str, str]] | None = None,
        prepare_off_loop: bool = False,
        party: Party | None = None,
    ) -> Result:
        """Annotate ``X`` ``[n_cells, n_genes]`` (raw counts or log1p values, any numeric
        dtype, dense or sparse, columns named by ``genes``): the one core every typed front door
        calls (REST JSON, gRPC, uploads, ``--local``); each renders the :class:`Result` with
        its codec.

        ``genes_field`` names the request field holding the gene names in errors, and
        ``where(row, col)`` describes a bad value and names its field (default:
        ``cells[i][j]``). ``prepare_off_loop``: check, align and normalise a large matrix on a
        thread (:func:`off_loop`), for a door whose loop must stay free to refuse calls at
        once (gRPC, where the message is read before the call); a door that parsed its body
        on a thread already (REST JSON) keeps it on its loop: in another thread's malloc arena
        the step's peak memory adds to the parse's. ``party``: the request is one of a group
        (a stream's chunks) whose own queued cells do not make it "not alone" to the queue
        (:class:`~cellexplain.service.batching.Party`).

        Raises:
            ServiceError: bad input, unknown model, too many cells; the message names the field.
        """
        lm = self.get(opts.model)
        if opts.top_k > self.settings.max_top_k:
            raise InvalidInputError(
                f"top_k is {opts.top_k}; the limit is {self.settings.max_top_k}", "top_k"
            )
        n = X.shape[0]
        self._check_n_cells(n)
        # the cells count as queued from here: a full queue refuses before any preparation
        with lm.batcher.admit(n, party) as admission:
            ids = self._cell_ids(cell_ids, n)
            if where is None:
                where = partial(_cell_value, genes, cell_ids)
            prepare = partial(self._prepare, genes, X, opts, lm, genes_field, where)
            prep = await off_loop(_values_bytes(X) if prepare_off_loop else 0, prepare)
            target = np.full(n, self._target_index(opts.target, lm), dtype=np.int64)
            pred = await lm.batcher.predict(prep.x, target, admission)
        matching = self._matching(prep, lm.model.card)
        return self._result(lm, opts, ids, pred, prep.input_kind, matching, prep.warnings)

    async def infer(self, model: str, x: np.ndarray, target: np.ndarray | None = None) -> Result:
        """Run a model on its own input (``x`` ``[n, n_genes]``: log1p CP10k values of the
        model's genes, in card order; float16, float32 or float64, checked as sent, then run as
        float32), as the Open Inference Protocol does; no alignment or normalisation.
        ``target``: class index per cell (broadcast), ``-1`` = predicted."""
        lm = self.get(model)
        g = len(lm.model.genes)
        if x.ndim != 2 or x.shape[1] != g:
            raise InvalidInputError(f"input x must have shape [n, {g}], got {list(x.shape)}", "x")
        if x.shape[0] == 0:
            raise InvalidInputError("input x has no rows", "x")
        self._check_n_cells(x.shape[0])
        with lm.batcher.admit(x.shape[0]) as admission:  # before the checks, as annotate()
            # checked on the door's loop: the OIP REST door parsed its body on a thread already
            # (as annotate(): another thread's arena would add to the parse's peak)
            checked = self._infer_input(lm, x)
            pred = await lm.batcher.predict(checked, self._infer_target(lm, x, target), admission)
        opts = AnnotateOptions(model=lm.name, input="log1p_cp10k", attributions="full")
        ids = [str(i) for i in range(x.shape[0])]
        return self._result(lm, opts, ids, pred, "log1p_cp10k", None)

    @staticmethod
    def _infer_input(lm: LoadedModel, x: np.ndarray) -> np.ndarray:
        """``x`` checked (finite, 0 to MAX_LOG1P_VALUE) and as float32."""

        def where(i: int, j: int) -> tuple[str, str]:
            return f"x[{i}][{j}] (gene {lm.model.genes[j]!r})", "x"

        # the model's input is log1p CP10k, never above MAX_LOG1P_VALUE (as the typed API
        # checks): 1e38 in every gene turned the graph's outputs into NaN
        _require_valid(x, where, MAX_LOG1P_VALUE)
        return np.ascontiguousarray(x, dtype=np.float32)

    @staticmethod
    def _infer_target(lm: LoadedModel, x: np.ndarray, target: np.ndarray | None) -> np.ndarray:
        """The class index per cell (``-1``: predicted), ``target`` broadcast and checked."""
        if target is None:
            return np.full(x.shape[0], -1, dtype=np.int64)
        t = np.broadcast_to(np.asarray(target, dtype=np.int64).ravel(), (x.shape[0],)).copy()
        if np.any(t >= len(lm.classes)) or np.any(t < -1):
            raise InvalidInputError(
                f"target class index out of range: the model has {len(lm.classes)} classes "
                f"(0..{len(lm.classes) - 1}; -1 explains the predicted class)",
                "target",
            )
        return t

    def _result(
        self,
        lm: LoadedModel,
        opts: AnnotateOptions,
        cell_ids: list[str],
        pred: Prediction,
        input_kind: str,
        matching: GeneMatching | None,
        input_warnings: Sequence[str] = (),
    ) -> Result:
        """The graph's outputs with the calls made and counted in the metrics."""
        card = lm.model.card
        threshold = (
            card.unassigned_threshold
            if opts.unassigned_threshold is None
            else opts.unassigned_threshold
        )
        probs = pred.probabilities
        best = probs.argmax(axis=1)
        conf = probs[np.arange(len(best)), best]
        novelty_threshold: float | None = None
        novel = np.zeros(len(best), dtype=bool)
        if pred.novelty is not None and card.novelty is not None:
            novelty_threshold = (
                card.novelty.threshold if opts.novelty_threshold is None else opts.novelty_threshold
            )
            if novelty_threshold < 1:  # 1 turns it off (novelty reaches 1 exactly)
                novel = pred.novelty >= novelty_threshold
        res = Result(
            model=lm,
            options=opts,
            cell_ids=cell_ids,
            best=best,
            confidence=conf,
            low_confidence=conf < threshold,
            novel=novel,
            logits=pred.logits,
            probabilities=probs,
            explained_class=pred.explained_class,
            attributions=pred.attributions,
            program_attributions=pred.program_attributions,
            completeness_gap=pred.completeness_gap,
            novelty=pred.novelty,
            threshold=float(threshold),
            novelty_threshold=novelty_threshold,
            input_kind=input_kind,
            matching=matching,
            input_warnings=list(input_warnings),
        )
        self._count(res)
        return res

    def _prepare(
        self,
        genes: Sequence[str],
        X: np.ndarray | sp.spmatrix,
        opts: AnnotateOptions,
        lm: LoadedModel,
        genes_field: str,
        where: Callable[[int, int], tuple[str, str]],
    ) -> Prepared:
        """Validate an expression matrix and turn it into model input: check the limits, align
        genes, then check values, normalise and align in row chunks, so the float64 working
        copies stay ``O(chunk)`` whatever the request size."""
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
        alignment = lm.aligner.align(genes, genes_field)
        if sp.issparse(X) and X.format != "csr":  # type: ignore[union-attr]
            X = sp.csr_matrix(X)
        kind = opts.input
        warnings: list[str] = []
        if kind == "auto":
            head = _floating(row_block(X, 0, 2000))  # float32 stays float32: tests are exact
            _require_valid(head, where)
            try:
                kind = detect_input_kind(head).kind
            except PreprocessError as e:
                raise InvalidInputError(f"{e} (or set input explicitly)", "cells") from e
        elif kind == "counts":  # read as asked; said when the values look like log1p
            head = _floating(row_block(X, 0, 2000))  # float32 stays float32: tests are exact
            _require_valid(head, where)
            try:
                seen = detect_input_kind(head)
            except PreprocessError:
                seen = None
            if seen is not None and seen.kind == "log1p_cp10k":
                warnings.append(
                    f"input is 'counts', but the values look like log1p data ({seen.reason}): "
                    "they were normalised again as counts, which changes the answer; send "
                    "input='log1p_cp10k' (or 'auto') if they are log1p values"
                )
        # working copies hold a chunk's stored values: a dense row's width, a CSR row's entries
        per_row = X.nnz // max(n, 1) if sp.issparse(X) else X.shape[1]  # type: ignore[union-attr]
        step = max(1, min(s.max_batch_cells, CHUNK_VALUES // max(1, per_row)))

        def rows(a: int) -> np.ndarray:
            """Model input for rows ``a...a+step``: counts are summed per cell in float64; log1p
            values are checked and aligned in the precision they came in (float32 from the
            binary doors: no copy, and none either when the genes are the model's, in order)."""
            block = X if a == 0 and step >= n else row_block(X, a, a + step)
            if kind == "counts" and sp.issparse(block):  # only the model's genes normalised
                _require_valid(block, lambda i, j: where(a + i, j))
                return self._sparse_counts_input(block, alignment, a)
            chunk = _float64(block) if kind == "counts" else _floating(block)
            _require_valid(chunk, lambda i, j: where(a + i, j))
            return alignment.apply(self._normalise(chunk, kind, a))

        if n <= step:  # one chunk: its aligned values are the input
            x = np.ascontiguousarray(rows(0), dtype=np.float32)
        else:  # filled a chunk at a time: the working copies stay O(chunk)
            x = np.empty((n, len(alignment.take)), dtype=np.float32)
            for a in range(0, n, step):
                x[a : a + step] = rows(a)
        card = lm.model.card
        warnings += _input_warnings(
            x, kind, alignment, where, card.preprocessing.n_genes_in_training_data
        )
        missing = alignment.take < 0
        if card.origin is not None and missing.any():
            # an imported CellTypist model leaves a gene the request lacks out of its score:
            # it reads its training mean (standardised: 0). x is a fresh array here: an
            # alignment with missing genes always builds one
            x[:, missing] = np.asarray(card.origin.missing_fill, dtype=x.dtype)[missing]
        return Prepared(
            x=x, alignment=alignment, n_submitted=len(genes), input_kind=kind, warnings=warnings
        )

    # -- helpers ---------------------------------------------------------------------------
    def _matching(self, prep: Prepared, card: ModelCard) -> GeneMatching:
        al = prep.alignment
        missing, importance = al.missing, None
        if card.gene_importance is not None and len(card.gene_importance) == len(card.genes):
            weight = np.asarray(card.gene_importance)
            index = {g: i for i, g in enumerate(card.genes)}
            lost = np.array([weight[index[g]] for g in missing])
            missing = [missing[i] for i in np.argsort(-lost, kind="stable")]
            importance = float(lost.sum() / weight.sum()) if weight.sum() > 0 else 0.0
        return GeneMatching(
            n_model_genes=len(al.take),
            n_found=al.n_found,
            n_missing=len(al.missing),
            missing=missing[: self.settings.missing_genes_listed],
            n_submitted=prep.n_submitted,
            n_unused=al.n_unused,
            missing_fraction=al.missing_fraction,
            missing_importance=importance,
            n_case_insensitive=al.n_case_insensitive,
            n_previous_symbol=al.n_previous_symbol,
            n_duplicated=al.n_duplicated,
        )

    def _check_n_cells(self, n: int) -> None:
        check_cell_count(n, self.settings.max_cells_per_request)

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
    def _sparse_counts_input(X: sp.csr_matrix, alignment: Alignment, offset: int) -> np.ndarray:
        """Model input of a CSR block of counts: each cell's total over all its stored values,
        then only the model's genes gathered and normalised (a 10x cell stores ~1,800 of the
        ~33,000 genes; the model reads a few hundred): the values :meth:`_normalise` and
        ``alignment.apply`` give, bit for bit, without a float64 copy of the block."""
        if not X.has_canonical_format:  # a gene stored twice in a row is one value, summed
            X = X.copy()
            X.sum_duplicates()
        try:
            totals = csr_row_totals(X)
        except TotalOverflowError as e:
            raise _overflow(offset + e.row) from e
        return log1p_scaled(alignment.gather_counts(X), totals)

    @staticmethod
    def _normalise(
        X: np.ndarray | sp.csr_matrix, kind: str, offset: int
    ) -> np.ndarray | sp.csr_matrix:
        """Rows ``offset...`` of the request, as log1p CP10k (counts are normalised here)."""
        if kind == "counts":
            try:
                return normalize_log1p(X)
            except TotalOverflowError as e:
                raise _overflow(offset + e.row) from e
        vmax = float(X.max()) if X.shape[1] else 0.0
        if vmax > MAX_LOG1P_VALUE:
            raise InvalidInputError(
                f"input is 'log1p_cp10k' but values reach {vmax:g}, more than log1p data "
                "ever holds: are these raw counts (input='counts')?",
                "input",
            )
        return X

    @staticmethod
    def _count(res: Result) -> None:
        """Cells per label, Unassigned cells, confidences and the missing-gene fraction."""
        model = res.model.name
        labels, counts = np.unique(res.labels, return_counts=True)
        for label, k in zip(labels, counts, strict=True):
            metrics.CELLS.labels(model=model, label=str(label)).inc(int(k))
        reasons = np.bincount(res.reason_code, minlength=len(UNASSIGNED_REASONS))
        for reason, k in zip(UNASSIGNED_REASONS[1:], reasons[1:], strict=True):
            if k:
                metrics.UNASSIGNED.labels(model=model, reason=reason).inc(int(k))
        metrics.observe_many(metrics.CONFIDENCE.labels(model=model), res.confidence)
        if res.novelty is not None:
            metrics.observe_many(metrics.NOVELTY.labels(model=model), res.novelty)
        if res.completeness_gap is not None and res.options.attributions != "none":
            metrics.observe_many(metrics.COMPLETENESS_GAP.labels(model=model), res.completeness_gap)
        if res.matching is not None:
            metrics.MISSING_GENES.labels(model=model).observe(res.matching.missing_fraction)

    def close(self) -> None:
        for m in self.models.values():
            m.batcher.close()
