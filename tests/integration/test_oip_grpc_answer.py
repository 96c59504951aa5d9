"""The OIP gRPC answer written as bytes (:mod:`cellexplain.service.grpc.oip_converters`) against
protobuf's own serialisation, in a subprocess."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

_OIP_GRPC_ANSWER_CHECK = """
import numpy as np
from cellexplain.service.grpc.oip_converters import infer_response, oip_pb
from cellexplain.service.oip import Tensor

rng = np.random.default_rng(0)
probs = rng.random((7, 5), dtype=np.float32)
tensors = [
    Tensor("probabilities", "FP32", [7, 5], probs),
    Tensor("attributions", "FP32", [5, 7], probs.T),  # not C-contiguous
    Tensor("logits", "FP32", [7, 5], probs.astype(">f4")),  # big-endian
    Tensor("explained_class", "INT64", [7], np.arange(7, dtype=np.int64)),
    Tensor("labels", "BYTES", [3], np.array([b"B cell", b"", b"NK \\xce\\xb3"], dtype=object)),
    Tensor("completeness_gap", "FP32", [0], np.zeros(0, np.float32)),
]
expected = oip_pb.ModelInferResponse(model_name="m", model_version="3", id="r1")
for t in tensors:
    expected.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
    data = t.data
    if t.datatype == "BYTES":
        raw = b"".join(len(b).to_bytes(4, "little") + b for b in data)
    else:
        raw = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).tobytes()
    expected.raw_output_contents.append(raw)
got = infer_response("m", "3", "r1", tensors)
assert got == expected.SerializeToString(), "bytes differ"
back = oip_pb.ModelInferResponse.FromString(got)
assert [o.name for o in back.outputs] == [t.name for t in tensors]
assert np.array_equal(np.frombuffer(back.raw_output_contents[1], "<f4").reshape(5, 7), probs.T)
print("ok")
"""


def test_the_oip_grpc_answer_is_the_message_serialised():
    """The OIP gRPC answer written as bytes (a small message, then each output's raw bytes) is
    byte for byte what protobuf serialises for the same message: non-contiguous, big-endian,
    integer, BYTES and empty outputs. In a subprocess: the generated OIP module and Triton's
    client register the same protobuf names, which one process cannot hold twice."""
    done = subprocess.run(
        [sys.executable, "-c", _OIP_GRPC_ANSWER_CHECK], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"
