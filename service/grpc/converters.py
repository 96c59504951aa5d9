"""Protobuf messages <-> the core's types (no annotation logic here)."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
from pydantic import ValidationError

from service.core import sparse_from_maps
from service.errors import InvalidInputError
from service.grpc.codegen import load
from service.oip import Tensor, from_raw, to_array
from service.schemas import AnnotateOptions, AnnotateResponse

pb = load("cellexplain_v1_pb2")
oip_pb = load("grpc_predict_v2_pb2")

_INPUT = {0: "auto", 1: "counts", 2: "log1p_cp10k"}
_ATTRIBUTIONS = {0: "top_k", 1: "full", 2: "none"}


def options(msg: Any) -> AnnotateOptions:
    """``cellexplain.v1.AnnotateOptions`` -> :class:`AnnotateOptions` (defaults as REST)."""
    try:
        return AnnotateOptions(
            model=msg.model or None,
            input=_INPUT.get(msg.input, "auto"),  # type: ignore[arg-type]
            top_k=msg.top_k if msg.HasField("top_k") else 10,
            attributions=_ATTRIBUTIONS.get(msg.attributions, "top_k"),  # type: ignore[arg-type]
            target=msg.target or "predicted",
            return_probabilities=msg.return_probabilities,
            unassigned_threshold=(
                msg.unassigned_threshold if msg.HasField("unassigned_threshold") else None
            ),
        )
    except ValidationError as e:
        first = e.errors()[0]
        field = "options." + ".".join(str(p) for p in first["loc"])
        raise InvalidInputError(f"{field}: {first['msg']}", field) from e


def matrix(msg: Any, genes: list[str]) -> tuple[list[str], np.ndarray | sp.csr_matrix, str]:
    """The genes, ``[n_cells, n_genes]`` matrix and genes field of an ``AnnotateRequest``."""
    which = msg.WhichOneof("cells")
    if which == "sparse":
        if msg.genes:
            raise InvalidInputError("genes must be empty with sparse cells", "genes")
        sparse_genes, Xs = sparse_from_maps([dict(c.values) for c in msg.sparse.cells])
        return sparse_genes, Xs, "sparse"
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
    return genes, X.astype(np.float64), "genes"


def annotate_response(res: AnnotateResponse) -> Any:
    """:class:`AnnotateResponse` -> ``cellexplain.v1.AnnotateResponse``."""
    gm = res.gene_matching
    out = pb.AnnotateResponse(
        model=res.model,
        model_version=res.model_version,
        input_kind=res.input_kind,
        attribution_method=res.attribution_method,
        unassigned_threshold=res.unassigned_threshold,
        gene_matching=pb.GeneMatching(**gm.model_dump()),
        attribution_genes=res.attribution_genes or [],
    )
    for c in res.cells:
        cell = out.cells.add(
            id=c.id,
            label=c.label,
            predicted_label=c.predicted_label,
            confidence=c.confidence,
            explained_class=c.explained_class or "",
            attributions=c.attributions or [],
        )
        if c.probabilities:
            cell.probabilities.update(c.probabilities)
        for t in c.top_genes or []:
            cell.top_genes.add(gene=t.gene, attribution=t.attribution)
        for p in c.program_attributions or []:
            cell.program_attributions.add(program=p.program, attribution=p.attribution)
        if c.free_units_attribution is not None:
            cell.free_units_attribution = c.free_units_attribution
    return out


# -- Open Inference Protocol -------------------------------------------------------------------
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def infer_inputs(req: Any) -> list[Tensor]:
    """Tensors of a ``ModelInferRequest`` (``raw_input_contents`` or typed ``contents``)."""
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise InvalidInputError(
            f"{len(raw)} raw_input_contents for {len(req.inputs)} inputs", "raw_input_contents"
        )
    tensors = []
    for i, t in enumerate(req.inputs):
        shape = [int(d) for d in t.shape]
        if raw:
            data = from_raw(t.name, t.datatype, shape, raw[i])
        else:
            field = _CONTENTS.get(t.datatype)
            if field is None:
                raise InvalidInputError(
                    f"input {t.name}: unsupported datatype {t.datatype}", t.name
                )
            data = to_array(t.name, t.datatype, shape, list(getattr(t.contents, field)))
        tensors.append(Tensor(t.name, t.datatype, shape, data))
    return tensors


def infer_response(model: str, version: str, request_id: str, outputs: list[Tensor]) -> Any:
    """A ``ModelInferResponse`` with every output in ``raw_output_contents`` (as Triton does)."""
    from service.oip import to_raw

    res = oip_pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for t in outputs:
        res.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        res.raw_output_contents.append(to_raw(t))
    return res
