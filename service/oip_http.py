"""HTTP/JSON encoding of Open Inference Protocol requests and responses.

Supports the binary tensor data extension (what Triton's ``tritonclient.http`` sends by
default): a JSON header of ``Inference-Header-Content-Length`` bytes, then raw tensor bytes for
the inputs whose parameters give a ``binary_data_size``; outputs asked for with
``binary_data: true`` come back the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import simdjson

from cellexplain.api.errors import InvalidInputError, brief
from cellexplain.service import jsonbody, oip
from cellexplain.service.oip import Tensor, from_raw, raw_view, to_array

HEADER_LENGTH = "inference-header-content-length"


@dataclass
class HttpInferRequest:
    id: str | None
    inputs: list[Tensor]
    requested: list[str] | None
    #: each requested output's own ``binary_data`` parameter, where it gives one
    binary_outputs: dict[str, bool]
    #: the request's ``binary_data_output`` parameter: outputs without their own choice
    binary_default: bool

    def binary(self, name: str) -> bool:
        """Whether output ``name`` is sent as binary data (its own choice, else the request's,
        as the binary tensor extension says)."""
        return self.binary_outputs.get(name, self.binary_default)


#: dimensions an input tensor may have, and the largest dimension (OIP shapes are int64)
MAX_DIMS = 8
MAX_DIM = 2**31 - 1


def json_size(header_length: str | None, body_size: int) -> int | None:
    """The JSON part's size given by ``Inference-Header-Content-Length`` (``None``: no header,
    the body is all JSON).

    Raises:
        InvalidInputError: not a number of bytes, or more than the body holds.
    """
    if header_length is None:
        return None
    # digits only, and few enough for int() (a 5,000-digit header would exceed its limit)
    if not (header_length.isascii() and header_length.isdigit() and len(header_length) <= 18):
        raise InvalidInputError(
            f"Inference-Header-Content-Length must be a number of bytes, got "
            f"{brief(header_length)}",
            "headers",
        )
    n = int(header_length)
    if n > body_size:
        raise InvalidInputError(
            f"Inference-Header-Content-Length {n} does not fit a body of {body_size} bytes",
            "headers",
        )
    return n


def decode(
    body: bytes | bytearray, header_length: str | None, max_cells: int = 1 << 30
) -> HttpInferRequest:
    """Parse an inference request body (JSON, or JSON header + binary tensors).

    The JSON is read with simdjson and tensor ``data`` copied straight into arrays
    (:mod:`cellexplain.service.jsonbody`), so a body never becomes a Python object per value;
    every field is type-checked (a wrong type anywhere is a 400, never a 500).
    """
    n = json_size(header_length, len(body))
    # the binary part is read in place (a view of the body, not a copy of its megabytes)
    head, binary = (body, memoryview(b"")) if n is None else (body[:n], memoryview(body)[n:])
    jsonbody.check_containers(head, max_cells)
    req, non_json = jsonbody.parse(head)
    if not isinstance(req, simdjson.Object):
        raise InvalidInputError("request must be an object with an 'inputs' list", "inputs")
    jsonbody.unique_keys(req, "")  # a field given twice would be read once, silently
    if not isinstance(req.get("inputs"), simdjson.Array):
        raise InvalidInputError("request must be an object with an 'inputs' list", "inputs")
    top = jsonbody.scalar_fields(req, {"id"})
    request_id = top.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInputError("id must be a string", "id")
    params = _parameters(req, "parameters")
    inputs = []
    pos = 0
    for i, spec in enumerate(req["inputs"]):  # type: ignore[arg-type]
        where = f"inputs[{i}]"
        if not isinstance(spec, simdjson.Object):
            raise InvalidInputError(f"{where} must be an object", where)
        jsonbody.unique_keys(spec, where)
        fields = jsonbody.scalar_fields(spec, {"name", "datatype"}, f"{where}.")
        name, datatype = fields.get("name"), fields.get("datatype")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidInputError(f"{where} needs a string name and datatype", where)
        oip.check_declared(name, datatype)  # the OIP layer's rule, before the shape is read
        shape = _shape(spec.get("shape"), name)
        size = _parameters(spec, f"{where}.parameters").get("binary_data_size")
        if size is not None:
            if "data" in spec:
                raise InvalidInputError(
                    f"input {name} has both data and binary_data_size: send one of them", name
                )
            if type(size) is not int or size < 0 or pos + size > len(binary):
                raise InvalidInputError(
                    f"input {name}: binary_data_size {brief(size)} exceeds the binary data sent",
                    name,
                )
            data = from_raw(name, datatype, shape, binary[pos : pos + size])
            pos += size
        else:
            if "data" not in spec:
                raise InvalidInputError(f"input {name} has neither data nor binary data", name)
            numbers = _numbers(spec["data"], datatype, name)
            if non_json:  # NaN/Infinity literals, read as sentinel numbers: back before any cast
                numbers = _restore_non_json(numbers, name)
            data = to_array(name, datatype, shape, numbers)
        inputs.append(Tensor(name, datatype, list(shape), data))
    if pos != len(binary):
        raise InvalidInputError(
            f"{len(binary) - pos} bytes of binary data follow the inputs' binary_data_size "
            f"({pos} bytes in all): check Inference-Header-Content-Length and the sizes",
            "inputs",
        )
    requested = None
    binary_outputs: dict[str, bool] = {}
    if "outputs" in req and req["outputs"] is not None:
        outputs = req["outputs"]
        if not isinstance(outputs, simdjson.Array):
            raise InvalidInputError("outputs must be a list", "outputs")
        oip.check_output_count(len(outputs))
        requested = []
        for j, o in enumerate(outputs):
            if isinstance(o, simdjson.Object):
                jsonbody.unique_keys(o, f"outputs[{j}]")
            name = o.get("name") if isinstance(o, simdjson.Object) else None
            if not isinstance(name, str):
                raise InvalidInputError(
                    "each output must be an object with a string name", "outputs"
                )
            requested.append(name)
            own = _parameters(o, f"outputs[{j}].parameters")
            if "binary_data" in own:
                wants = own["binary_data"]
                if not isinstance(wants, bool):
                    raise InvalidInputError(
                        f"outputs[{j}].parameters.binary_data must be true or false", "outputs"
                    )
                binary_outputs[name] = wants
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidInputError("parameters.binary_data_output must be true or false", "parameters")
    return HttpInferRequest(
        id=request_id,
        inputs=inputs,
        requested=requested,
        binary_outputs=binary_outputs,
        binary_default=binary_default,
    )


def _parameters(obj: Any, where: str) -> dict[str, Any]:
    """The scalar values of ``obj``'s ``parameters`` object (absent or null: empty), ``where``
    naming it in errors; any other JSON type, or a parameter that is an array or object, is a
    400."""
    value = obj.get("parameters") if isinstance(obj, simdjson.Object) else None
    if value is None:
        return {}
    if not isinstance(value, simdjson.Object):
        raise InvalidInputError(f"{where} must be an object", where)
    out: dict[str, Any] = {}
    for k in jsonbody.unique_keys(value, where):
        v = value[k]
        if isinstance(v, simdjson.Array | simdjson.Object):
            raise InvalidInputError(
                f"{where}.{brief(k)} must be a string, number or boolean", where
            )
        out[k] = v
    return out


def _shape(value: Any, name: str) -> list[int]:
    if not isinstance(value, simdjson.Array) or len(value) > MAX_DIMS:
        raise InvalidInputError(
            f"input {name}: shape must be a list of at most {MAX_DIMS} integers", name
        )
    dims = value.as_list()
    if not all(type(d) is int and 0 <= d <= MAX_DIM for d in dims):
        raise InvalidInputError(
            f"input {name}: shape {brief(dims)} must hold integers from 0 to {MAX_DIM}", name
        )
    return dims  # type: ignore[return-value]


def _restore_non_json(numbers: np.ndarray, name: str) -> np.ndarray:
    """``numbers`` (float64 or int64, as read) with the sentinels of a body that held NaN or
    Infinity literals turned back into them, before any cast to the input's datatype (a cast to
    float32 would turn the infinity sentinel into -0.0). Integers cannot hold them: the NaN
    sentinel, -9, is refused in an integer input of such a body."""
    if numbers.dtype.kind == "f":
        restored = numbers.copy()  # read from the parser's buffer: read-only
        jsonbody.restore_non_json(restored)
        return restored
    if jsonbody.may_hold_nan(numbers):
        raise InvalidInputError(
            f"input {name} holds NaN, or -9, which a body with NaN literals cannot tell apart "
            "from it: send integers only",
            name,
        )
    return numbers


def _numbers(value: Any, datatype: str, name: str) -> np.ndarray:
    """Tensor ``data`` (a flat or nested JSON array of numbers) as a flat array."""
    if not isinstance(value, simdjson.Array):
        value_type = "a number" if type(value) in (int, float) else "not a list"
        raise InvalidInputError(
            f"input {name}: data must be a list of numbers ({value_type})", name
        )
    integer = datatype.startswith("INT")
    try:
        raw = value.as_buffer(of_type="i" if integer else "d")
    except (TypeError, ValueError, OverflowError) as e:
        kind = "integers within int64" if integer else "numbers"
        raise InvalidInputError(f"input {name}: data must hold {kind} only", name) from e
    return np.frombuffer(raw, dtype=np.int64 if integer else np.float64)


def encode(
    model: str, version: str, req: HttpInferRequest, outputs: list[Tensor]
) -> tuple[bytes, dict[str, str]]:
    """The response body and extra headers (binary outputs after a JSON header). Binary
    outputs are written once, straight into the body's buffer."""
    blobs: list[memoryview | bytes] = []
    out_json: list[dict[str, Any]] = []
    for t in outputs:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if req.binary(t.name):
            blob = raw_view(t)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        elif t.datatype == "BYTES":
            entry["data"] = [b.decode() for b in t.data.ravel()]
        else:  # written by orjson from the array itself: no Python number per value
            entry["data"] = np.ascontiguousarray(t.data.ravel())
        out_json.append(entry)
    body: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": out_json}
    if req.id is not None:
        body["id"] = req.id
    head = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, {"content-type": "application/json"}
    return b"".join([head, *blobs]), {  # one copy: join takes the arrays' buffers
        "content-type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(head)),
    }
