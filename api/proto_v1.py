"""The ``cellexplain.v1`` protobuf codec, both ways: requests (clients encode, the server
decodes into genes + a matrix + options) and responses (the server encodes the rendering of
:mod:`cellexplain.service.v1`, clients decode into
:class:`~cellexplain.api.schemas.AnnotateResponse`).

The Open Inference Protocol's messages are in :mod:`cellexplain.service.grpc.oip_converters`,
imported by the server only: clients that also load Triton's ``tritonclient`` (which registers
the same ``inference.*`` protobuf names) can use this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
from pydantic import ValidationError

from cellexplain.api.annotations import gene_map, sparse_from_maps
from cellexplain.api.codegen import load
from cellexplain.api.errors import InvalidInputError, validation_failure
from cellexplain.api.schemas import DEFAULTS, AnnotateOptions, AnnotateResponse

pb = load("cellexplain_v1_pb2")

_INPUT = {0: "auto", 1: "counts", 2: "log1p_cp10k"}
_ATTRIBUTIONS = {0: "top_k", 1: "full", 2: "none"}


def _enum(value: int, names: dict[int, str], field: str) -> str:
    """An enum value the proto defines (proto3 lets any int32 through the wire)."""
    if value not in names:
        known = ", ".join(f"{k} ({v})" for k, v in names.items())
        raise InvalidInputError(f"options.{field}: unknown value {value}; one of {known}", field)
    return names[value]


def decimal(value: float) -> float:
    """A protobuf ``float`` (float32) as the decimal it was written from: 0.95, not
    0.949999988 (the shortest text that reads back as the same float32)."""
    return float(str(np.float32(value)))


def options(msg: Any) -> AnnotateOptions:
    """``cellexplain.v1.AnnotateOptions`` -> :class:`AnnotateOptions`: the proto's zero values
    are the schema's defaults (``DEFAULTS``), as a JSON body that leaves the option out."""
    input_kind = _enum(msg.input, _INPUT, "input")
    attributions = _enum(msg.attributions, _ATTRIBUTIONS, "attributions")
    try:
        return AnnotateOptions(
            model=msg.model or None,
            input=input_kind,  # type: ignore[arg-type]
            top_k=msg.top_k if msg.HasField("top_k") else DEFAULTS.top_k,
            attributions=attributions,  # type: ignore[arg-type]
            target=msg.target or DEFAULTS.target,
            return_probabilities=msg.return_probabilities,
            unassigned_threshold=(
                decimal(msg.unassigned_threshold) if msg.HasField("unassigned_threshold") else None
            ),
            novelty_threshold=(
                decimal(msg.novelty_threshold) if msg.HasField("novelty_threshold") else None
            ),
        )
    except ValidationError as e:
        err = validation_failure(e.errors())
        raise InvalidInputError(f"options.{err.message}", f"options.{err.field}") from e


def matrix(msg: Any, genes: list[str]) -> tuple[list[str], np.ndarray | sp.csr_matrix, str]:
    """The genes, ``[n_cells, n_genes]`` matrix and genes field of an ``AnnotateRequest``."""
    which = msg.WhichOneof("cells")
    if which == "sparse":
        sparse_genes, Xs = sparse_from_maps(
            (dict(c.values) for c in msg.sparse.cells), genes or None
        )
        return sparse_genes, Xs, "genes" if genes else "sparse"
    if which != "dense":
        raise InvalidInputError("send cells as dense or sparse", "cells")
    if not genes:
        raise InvalidInputError("genes is empty: send the gene of each column", "genes")
    d = msg.dense
    n, g = int(d.n_cells), len(genes)
    kind = d.WhichOneof("data")
    if kind == "raw_le_float32":
        raw = d.raw_le_float32
        if len(raw) != n * g * 4:
            raise InvalidInputError(
                f"dense.raw_le_float32 has {len(raw)} bytes; n_cells x genes x 4 = {n * g * 4}",
                "dense",
            )
        X = np.frombuffer(raw, dtype="<f4").reshape(n, g)
    else:
        values = d.values.values if kind == "values" else []
        if len(values) != n * g:
            raise InvalidInputError(
                f"dense.values has {len(values)} values; n_cells x genes = {n} x {g} = {n * g}",
                "dense",
            )
        X = np.asarray(values, dtype=np.float32).reshape(n, g)
    return genes, X, "genes"


def response_from_proto(msg: Any) -> AnnotateResponse:
    """``cellexplain.v1.AnnotateResponse`` -> :class:`AnnotateResponse` (client side)."""
    from cellexplain.api.schemas import (
        CellAnnotation,
        GeneAttribution,
        GeneMatching,
        ProgramAttribution,
    )

    def pairs(entries: Any, listed: bool) -> list[GeneAttribution] | None:
        # with attributions='top_k' both lists are there, empty ones too (which protobuf
        # cannot tell from absent): a cell with an explained class and no full vector
        found = [GeneAttribution(gene=g.gene, attribution=g.attribution) for g in entries]
        return found if listed or found else None

    cells = []
    for c in msg.cells:
        listed = bool(c.explained_class) and not c.attributions
        cells.append(
            CellAnnotation(
                id=c.id,
                label=c.label,
                predicted_label=c.predicted_label,
                confidence=c.confidence,
                explained_class=c.explained_class or None,
                probabilities=dict(c.probabilities) or None,
                top_genes=pairs(c.top_genes, listed),
                genes_against=pairs(c.genes_against, listed),
                attributions=list(c.attributions) or None,
                program_attributions=[
                    ProgramAttribution(program=p.program, attribution=p.attribution)
                    for p in c.program_attributions
                ]
                or None,
                free_units_attribution=(
                    c.free_units_attribution if c.HasField("free_units_attribution") else None
                ),
                completeness_gap=c.completeness_gap if c.HasField("completeness_gap") else None,
                novelty=c.novelty if c.HasField("novelty") else None,
                unassigned_reason=c.unassigned_reason or None,
            )
        )
    gm = msg.gene_matching
    matching = {name: getattr(gm, name) for name in GeneMatching.model_fields}
    matching["missing"] = list(matching["missing"])
    matching["missing_importance"] = (
        gm.missing_importance if gm.HasField("missing_importance") else None
    )
    return AnnotateResponse(
        model=msg.model,
        model_version=msg.model_version,
        input_kind=msg.input_kind,
        attribution_method=msg.attribution_method,
        unassigned_threshold=decimal(msg.unassigned_threshold),
        novelty_threshold=(
            decimal(msg.novelty_threshold) if msg.HasField("novelty_threshold") else None
        ),
        gene_matching=GeneMatching(**matching),
        attribution_genes=list(msg.attribution_genes) or None,
        warnings=list(msg.warnings),
        cells=cells,
    )


def request_to_proto(
    genes: list[str],
    X: np.ndarray | sp.csr_matrix,
    opts: AnnotateOptions,
    cell_ids: list[str] | None = None,
) -> Any:
    """An ``AnnotateRequest`` for a matrix (client side): dense as raw float32, CSR as maps."""
    input_codes = {v: k for k, v in _INPUT.items()}
    attr_codes = {v: k for k, v in _ATTRIBUTIONS.items()}
    o = pb.AnnotateOptions(
        model=opts.model or "",
        input=input_codes[opts.input],
        top_k=opts.top_k,
        attributions=attr_codes[opts.attributions],
        target=opts.target,
        return_probabilities=opts.return_probabilities,
    )
    if opts.unassigned_threshold is not None:
        o.unassigned_threshold = opts.unassigned_threshold
    if opts.novelty_threshold is not None:
        o.novelty_threshold = opts.novelty_threshold
    req = pb.AnnotateRequest(options=o, cell_ids=cell_ids or [])
    req.genes.extend(genes)
    if sp.issparse(X):
        Xc = sp.csr_matrix(X)
        cells = req.sparse.cells
        for i in range(Xc.shape[0]):
            cells.add().values.update(gene_map(genes, Xc, i))
    else:
        req.dense.n_cells = X.shape[0]
        req.dense.raw_le_float32 = np.ascontiguousarray(X, dtype="<f4").tobytes()
    return req
