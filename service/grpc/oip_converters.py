"""Open Inference Protocol (``inference.*``) messages <-> :class:`cellexplain.service.oip.Tensor`.

Server side only: the generated ``grpc_predict_v2_pb2`` registers the ``inference.*`` protobuf
names, as Triton's ``tritonclient`` does, so the two cannot share a process.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cellexplain.api.codegen import load
from cellexplain.api.errors import InvalidInputError, brief
from cellexplain.service import oip, protowire
from cellexplain.service.oip import Tensor, from_raw, raw_view, to_array

oip_pb = load("grpc_predict_v2_pb2")
#: ModelInferResponse.raw_output_contents (grpc_predict_v2.proto)
_RAW_OUTPUT_CONTENTS = oip_pb.ModelInferResponse.DESCRIPTOR.fields_by_name[
    "raw_output_contents"
].number

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
        if raw and t.HasField("contents"):
            raise InvalidInputError(
                f"input {brief(t.name)} has contents while the request sends "
                "raw_input_contents: use one or the other",
                "raw_input_contents",
            )
        if raw:
            oip.check_input(t.name, t.datatype, shape, None)
            data = from_raw(t.name, t.datatype, shape, raw[i])
        else:
            field = _CONTENTS.get(t.datatype)
            if field is None:
                raise InvalidInputError(
                    f"input {t.name}: unsupported datatype {t.datatype}", t.name
                )
            others = sorted(
                f for f in set(_CONTENTS.values()) if f != field and len(getattr(t.contents, f))
            )
            if others:  # they would be ignored, silently
                raise InvalidInputError(
                    f"input {t.name} is {t.datatype}, whose values go in contents.{field}, but "
                    f"it also sends contents.{others[0]}",
                    t.name,
                )
            values = getattr(t.contents, field)
            # checked from what the message declares before a value becomes a Python object
            oip.check_input(t.name, t.datatype, shape, len(values))
            flat = (
                list(values)
                if t.datatype == "BYTES"
                else np.fromiter(values, dtype=oip.DTYPES[t.datatype], count=len(values))
            )
            data = to_array(t.name, t.datatype, shape, flat)
        tensors.append(Tensor(t.name, t.datatype, shape, data))
    return tensors


def infer_response(model: str, version: str, request_id: str, outputs: list[Tensor]) -> bytes:
    """A serialised ``ModelInferResponse`` with every output in ``raw_output_contents`` (as
    Triton does): the small message built as usual, then each output's bytes appended as a
    ``raw_output_contents`` field straight from its array (one copy, where a message object
    copies each output three times on the way to the wire). The bytes are those
    ``SerializeToString`` gives for the same message."""
    res = oip_pb.ModelInferResponse(model_name=model, model_version=version, id=request_id)
    for t in outputs:
        res.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
    parts: list[bytes | memoryview] = [res.SerializeToString()]
    for t in outputs:
        blob = raw_view(t)
        parts += [protowire.length_prefix(_RAW_OUTPUT_CONTENTS, len(blob)), blob]
    return b"".join(parts)


#: how often each field of a ModelInferRequest may occur, all the way down (a model takes 2
#: inputs of at most 2 dimensions, in packed contents: one field each)
_INFER_BOUNDS = protowire.Bounds.of(
    oip_pb.ModelInferRequest.DESCRIPTOR,
    {
        "inputs": 8,
        "raw_input_contents": 8,
        "outputs": oip.MAX_REQUESTED_OUTPUTS,
        "InferInputTensor.shape": 8,
        "bytes_contents": 8,
    },
    repeated=64,
)


def check_infer_wire(data: bytes) -> None:
    """Count a ``ModelInferRequest``'s fields in its wire bytes, at every level, before
    protobuf makes an object of each (twenty million empty inputs are 40 MB and 2.7 GB once
    parsed; 33 million empty ``bytes_contents`` in one input, 66 MB and +1.1 GB): at most 8
    inputs, raw contents, shape dimensions and bytes elements, 64 of any other list (outputs,
    parameters), 4 of a field that is not a list, 64 fields a message does not define.

    Raises:
        InvalidInputError: a field past its bound (named by its place in the message), or
            bytes that are not a message.
    """
    try:
        _INFER_BOUNDS.check(data)
    except protowire.TooManyFieldsError as e:
        what = e.path if e.number is not None else f"fields {e.path} does not define"
        raise InvalidInputError(
            f"the request holds more than {e.bound} {what}; a model takes x and target",
            e.path.split(".")[0] or "request",
        ) from None
    except ValueError as e:
        raise InvalidInputError(
            f"the request message is not a valid protobuf for this method ({e})", "request"
        ) from e
