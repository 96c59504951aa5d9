"""The Open Inference Protocol (KServe V2 / Triton) as a protocol layer over the core.

Transport-independent: tensors in, tensors out. ``service/rest.py`` (``/v2`` JSON, with the
binary tensor extension) and ``service/grpc/servicers.py`` (``inference.GRPCInferenceService``)
only encode and decode these.

The model's tensors: input ``x`` FP32 ``[n, n_genes]`` (log1p-CP10k values of the model's genes,
in the card's order: no alignment or normalisation happens here) and optional ``target`` INT64
``[n]`` or ``[1]`` (class index to explain; -1 = the predicted class). Outputs: ``logits``,
``probabilities``, ``attributions``, ``explained_class``, ``labels`` (BYTES, ``Unassigned`` below
the card's threshold) and, for programs models, ``program_attributions``.
"""

from __future__ import annotations

import math
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cellexplain import __version__
from cellexplain.api.errors import InvalidInputError, brief
from cellexplain.service.core import Annotator, LoadedModel

SERVER_NAME = "cellexplain"
EXTENSIONS = ["binary_tensor_data"]
PLATFORM = "onnxruntime_onnx"
#: more outputs than a request may ask for (a model has at most 7): checked before the names
#: are read, at both doors
MAX_REQUESTED_OUTPUTS = 64


def check_output_count(n: int) -> None:
    """Refuse a request asking for more than :data:`MAX_REQUESTED_OUTPUTS` outputs, before any
    of their names is read (a 4 MB gRPC message holds two million empty ones)."""
    if n > MAX_REQUESTED_OUTPUTS:
        raise InvalidInputError(
            f"{n} outputs asked for; a model has at most 7 (GET the model's metadata for "
            "their names)",
            "outputs",
        )


#: OIP datatype -> numpy dtype (BYTES are object arrays of bytes)
DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(object),
}


@dataclass
class Tensor:
    """A named tensor; ``data`` has ``shape`` and the numpy dtype of ``datatype``."""

    name: str
    datatype: str
    shape: list[int]
    data: np.ndarray


def output_names(lm: LoadedModel) -> list[str]:
    names = ["logits", "probabilities", "attributions", "explained_class", "labels"]
    if lm.model.card.gene_sets is not None:
        names.append("program_attributions")
    for extra in ("completeness_gap", "novelty"):  # graphs exported since each was added
        if lm.model.has_output(extra):
            names.append(extra)
    return names


def server_metadata() -> dict[str, object]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS}


def model_metadata(lm: LoadedModel) -> dict[str, object]:
    """Name, versions, platform, inputs and outputs with datatypes and shapes (-1: any)."""
    card = lm.model.card
    g, c = len(card.genes), len(card.classes)
    shapes = {
        "logits": ("FP32", [-1, c]),
        "probabilities": ("FP32", [-1, c]),
        "attributions": ("FP32", [-1, g]),
        "explained_class": ("INT64", [-1]),
        "labels": ("BYTES", [-1]),
        "program_attributions": ("FP32", [-1, card.architecture.n_programs]),
        "completeness_gap": ("FP32", [-1]),
        "novelty": ("FP32", [-1]),
    }
    return {
        "name": lm.name,
        "versions": [card.version],
        "platform": PLATFORM,
        "inputs": [
            {"name": "x", "datatype": "FP32", "shape": [-1, g]},
            {"name": "target", "datatype": "INT64", "shape": [-1]},
        ],
        "outputs": [
            {"name": n, "datatype": shapes[n][0], "shape": shapes[n][1]} for n in output_names(lm)
        ],
    }


def check_version(lm: LoadedModel, version: str | None) -> None:
    if version and version != lm.model.card.version:
        raise InvalidInputError(
            f"model {lm.name} has version {lm.model.card.version}, not {brief(version)}", "version"
        )


#: the inputs a model takes, and the datatypes each is accepted in (x is cast to FP32, target
#: to INT64)
INPUT_DATATYPES = {"x": ("FP32", "FP64", "FP16"), "target": ("INT64", "INT32")}
#: dimensions of an input's shape (x is [n, n_genes], target [n]; [1, n] for a target is fine)
MAX_DIMS = 2


def check_declared(name: str, datatype: str) -> None:
    """Refuse an input the model does not take, or in a datatype it does not take (the rule
    both OIP codecs apply, before they read anything else of the input).

    Raises:
        InvalidInputError: naming the input and the problem.
    """
    if name not in INPUT_DATATYPES:
        raise InvalidInputError(
            f"unknown input {brief(name)}; the model takes x (FP32) and optional target (INT64)",
            "inputs",
        )
    if datatype not in INPUT_DATATYPES[name]:
        want = "FP32" if name == "x" else "INT64"
        raise InvalidInputError(f"input {name} must be {want}, got {brief(datatype)}", name)


def check_input(name: str, datatype: str, shape: Sequence[int], n_values: int | None) -> None:
    """Refuse an input the model does not take, in a datatype it does not take, with more than
    :data:`MAX_DIMS` dimensions or with a shape its ``n_values`` cannot fill: all from what
    the request declares, before any value is read.

    Raises:
        InvalidInputError: naming the input and the problem.
    """
    check_declared(name, datatype)
    if len(shape) > MAX_DIMS:
        raise InvalidInputError(
            f"input {name}: shape has {len(shape)} dimensions; at most {MAX_DIMS}", name
        )
    dims = [int(d) for d in shape]
    if any(d < 0 for d in dims):
        raise InvalidInputError(f"input {name}: negative dimension in shape {dims}", name)
    if n_values is not None and n_values != math.prod(dims):
        raise InvalidInputError(
            f"input {name}: shape {dims} needs {math.prod(dims)} values, got {n_values}", name
        )


def to_array(name: str, datatype: str, shape: Sequence[int], flat: object) -> np.ndarray:
    """Build the array of an input tensor from flat data (list or numpy), checking its size
    (shape products are Python integers: no overflow)."""
    if datatype not in DTYPES:
        raise InvalidInputError(
            f"input {brief(name)}: unknown datatype {brief(datatype)}", "inputs"
        )
    dims = [int(d) for d in shape]
    if len(dims) > MAX_DIMS:
        raise InvalidInputError(
            f"input {name}: shape has {len(dims)} dimensions; at most {MAX_DIMS}", name
        )
    if any(d < 0 for d in dims):
        raise InvalidInputError(f"input {name}: negative dimension in shape {dims}", name)
    expected = math.prod(dims)
    target = DTYPES[datatype]
    if (
        isinstance(flat, np.ndarray)
        and flat.dtype.kind in "iu"
        and target.kind in "iu"
        and flat.size
    ):
        info = np.iinfo(target)
        if int(flat.min()) < info.min or int(flat.max()) > info.max:
            raise InvalidInputError(f"input {name}: values out of the range of {datatype}", name)
    try:
        arr = np.asarray(flat, dtype=DTYPES[datatype])
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidInputError(f"input {name}: data is not {datatype}: {e}", name) from e
    if arr.size != expected:
        raise InvalidInputError(
            f"input {name}: shape {dims} needs {expected} values, got {arr.size}", name
        )
    # JSON numbers (float64) for an FP32/FP16 input; not raw bytes, which are not cast
    if (
        isinstance(flat, np.ndarray)
        and flat.dtype.kind == "f" == target.kind
        and flat.dtype.itemsize > target.itemsize
    ):
        _require_in_range(name, datatype, dims, flat, arr)
    return arr.reshape(dims)


def _require_in_range(
    name: str, datatype: str, dims: list[int], sent: np.ndarray, cast: np.ndarray
) -> None:
    """Refuse finite numbers (JSON's float64) that the cast to a narrower float datatype turned
    infinite: the client sent a finite value, not an infinite one."""
    overflow = np.isinf(cast) & np.isfinite(sent)
    if overflow.any():
        i = int(np.argmax(overflow))
        at = "".join(f"[{int(k)}]" for k in np.unravel_index(i, dims)) if dims else ""
        raise InvalidInputError(
            f"input {name}{at} is {float(sent[i]):g}, beyond {datatype}'s range", name
        )


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview) -> np.ndarray:
    """Decode raw little-endian tensor bytes (gRPC ``raw_input_contents``, REST binary data);
    numbers are read in place (the array is a read-only view of ``raw``)."""
    if datatype == "BYTES":
        items, pos = [], 0
        while pos < len(raw):
            if pos + 4 > len(raw):
                raise InvalidInputError(f"input {name}: truncated BYTES element", name)
            (n,) = struct.unpack_from("<I", raw, pos)
            items.append(bytes(raw[pos + 4 : pos + 4 + n]))
            pos += 4 + n
        return to_array(name, datatype, shape, np.array(items, dtype=object))
    dtype = DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInputError(
            f"input {brief(name)}: unknown datatype {brief(datatype)}", "inputs"
        )
    if len(raw) % dtype.itemsize:
        raise InvalidInputError(
            f"input {name}: {len(raw)} bytes is not a whole number of {datatype} values", name
        )
    return to_array(name, datatype, shape, np.frombuffer(raw, dtype=dtype.newbyteorder("<")))


def raw_view(t: Tensor) -> memoryview | bytes:
    """A tensor's raw little-endian bytes (BYTES: a 4-byte length before each element), as a
    flat byte view of the tensor's own array where it already is C-contiguous little-endian
    (no copy), else of a converted copy. Its length is the tensor's ``binary_data_size``."""
    if t.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in t.data.ravel())
    raw = np.ascontiguousarray(t.data, dtype=t.data.dtype.newbyteorder("<"))
    return raw.reshape(-1).view(np.uint8).data


async def infer(
    annotator: Annotator,
    model: str,
    version: str | None,
    inputs: Sequence[Tensor],
    requested: Sequence[str] | None,
) -> tuple[LoadedModel, list[Tensor]]:
    """Run an OIP inference request through the annotation core (and its batcher)."""
    lm = annotator.get(model)
    check_version(lm, version)
    by_name = {t.name: t for t in inputs}
    if len(by_name) != len(inputs):
        raise InvalidInputError("an input is given twice: send x (and target) once each", "inputs")
    unknown = set(by_name) - {"x", "target"}
    if unknown:
        raise InvalidInputError(
            f"unknown input(s) {sorted(unknown)}; the model takes x (FP32) and optional "
            "target (INT64)",
            "inputs",
        )
    if "x" not in by_name:
        raise InvalidInputError("input x is required (FP32 [n, n_genes])", "x")
    x = by_name["x"]
    if x.datatype not in ("FP32", "FP64", "FP16"):
        raise InvalidInputError(f"input x must be FP32, got {x.datatype}", "x")
    target = None
    if "target" in by_name:
        t = by_name["target"]
        if t.datatype not in ("INT64", "INT32"):
            raise InvalidInputError(f"input target must be INT64, got {t.datatype}", "target")
        target = t.data.astype(np.int64).ravel()
        if target.size not in (1, x.data.shape[0] if x.data.ndim else 0):
            raise InvalidInputError(
                f"input target must have 1 or n values, got {target.size}", "target"
            )
    available = output_names(lm)
    if requested:
        check_output_count(len(requested))
    names = list(requested) if requested else available
    twice = sorted(n for n, k in Counter(names).items() if k > 1)
    if twice:
        raise InvalidInputError(
            f"output(s) asked for twice: {', '.join(brief(n) for n in twice[:5])}", "outputs"
        )
    bad = [n for n in names if n not in available]
    if bad:
        raise InvalidInputError(
            f"unknown output(s) {', '.join(brief(b) for b in bad[:5])}; model {lm.name} has: "
            f"{', '.join(available)}",
            "outputs",
        )
    res = await annotator.infer(lm.name, x.data, target)  # checked as sent, then cast
    arrays = {
        "logits": res.logits,
        "probabilities": res.probabilities,
        "attributions": res.attributions,
        "explained_class": res.explained_class.astype(np.int64),
        "labels": np.array([s.encode() for s in res.labels], dtype=object),
        "program_attributions": res.program_attributions,
        "completeness_gap": res.completeness_gap,
        "novelty": res.novelty,
    }
    out = []
    for n in names:
        a = arrays[n]
        assert a is not None
        datatype = "BYTES" if n == "labels" else ("INT64" if a.dtype == np.int64 else "FP32")
        out.append(Tensor(n, datatype, list(a.shape), a))
    return lm, out
