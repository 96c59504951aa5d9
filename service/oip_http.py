"""HTTP/JSON encoding of Open Inference Protocol requests and responses.

Supports the binary tensor data extension (what Triton's ``tritonclient.http`` sends by
default): a JSON header of ``Inference-Header-Content-Length`` bytes, then raw tensor bytes for
the inputs whose parameters give a ``binary_data_size``; outputs asked for with
``binary_data: true`` come back the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.errors import InvalidInputError
from service.oip import Tensor, from_raw, to_array, to_raw

HEADER_LENGTH = "inference-header-content-length"


@dataclass
class HttpInferRequest:
    id: str | None
    inputs: list[Tensor]
    requested: list[str] | None
    binary_outputs: set[str]
    binary_default: bool


def decode(body: bytes, header_length: str | None) -> HttpInferRequest:
    """Parse an inference request body (JSON, or JSON header + binary tensors)."""
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise InvalidInputError(
                f"Inference-Header-Content-Length {header_length!r} does not fit a body of "
                f"{len(body)} bytes",
                "headers",
            )
        n = int(header_length)
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    try:
        req = json.loads(head)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidInputError(f"request is not valid JSON: {e}", "body") from e
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise InvalidInputError("request must be an object with an 'inputs' list", "inputs")
    inputs = []
    pos = 0
    for i, spec in enumerate(req["inputs"]):
        if not isinstance(spec, dict):
            raise InvalidInputError(f"inputs[{i}] must be an object", f"inputs[{i}]")
        try:
            name, datatype, shape = str(spec["name"]), str(spec["datatype"]), spec["shape"]
        except KeyError as e:
            raise InvalidInputError(f"inputs[{i}] lacks {e.args[0]!r}", f"inputs[{i}]") from e
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise InvalidInputError(f"inputs[{i}].shape must be a list of integers", name)
        size = (spec.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or pos + size > len(binary):
                raise InvalidInputError(
                    f"input {name}: binary_data_size {size} exceeds the binary data sent", name
                )
            data = from_raw(name, datatype, shape, binary[pos : pos + size])
            pos += size
        else:
            if "data" not in spec:
                raise InvalidInputError(f"input {name} has neither data nor binary data", name)
            flat = spec["data"]
            if datatype == "BYTES":
                flat = np.array(
                    [
                        s.encode() if isinstance(s, str) else s
                        for s in np.ravel(np.array(flat, dtype=object))
                    ],
                    dtype=object,
                )
            data = to_array(name, datatype, shape, flat)
        inputs.append(Tensor(name, datatype, list(shape), data))
    params = req.get("parameters") or {}
    outputs = req.get("outputs")
    requested = None
    binary_outputs: set[str] = set()
    if outputs is not None:
        if not isinstance(outputs, list):
            raise InvalidInputError("outputs must be a list", "outputs")
        requested = []
        for o in outputs:
            if not isinstance(o, dict) or "name" not in o:
                raise InvalidInputError("each output must be an object with a name", "outputs")
            requested.append(str(o["name"]))
            if (o.get("parameters") or {}).get("binary_data"):
                binary_outputs.add(str(o["name"]))
    return HttpInferRequest(
        id=req.get("id"),
        inputs=inputs,
        requested=requested,
        binary_outputs=binary_outputs,
        binary_default=bool(params.get("binary_data_output", False)),
    )


def encode(
    model: str, version: str, req: HttpInferRequest, outputs: list[Tensor]
) -> tuple[bytes, dict[str, str]]:
    """The response body and extra headers (binary outputs after a JSON header)."""
    blobs: list[bytes] = []
    out_json: list[dict[str, Any]] = []
    for t in outputs:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if t.name in req.binary_outputs or (req.binary_default and req.requested is None):
            raw = to_raw(t)
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif t.datatype == "BYTES":
            entry["data"] = [b.decode() for b in t.data.ravel()]
        else:
            entry["data"] = t.data.ravel().tolist()
        out_json.append(entry)
    body: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": out_json}
    if req.id is not None:
        body["id"] = req.id
    head = json.dumps(body).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {
        "content-type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }
