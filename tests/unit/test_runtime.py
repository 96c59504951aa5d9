"""The onnxruntime side of a model: provider choice, IO binding, and the float16 export."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cellexplain.models.runtime import OnnxModel, available_providers, provider_name
from tests.conftest import train_small


@pytest.fixture(scope="module")
def cells(pbmc):
    return np.asarray(pbmc.raw.X.toarray(), dtype=np.float32)


def test_providers_fall_back_to_the_cpu():
    names = [provider_name(p) for p in available_providers()]
    assert names[-1] == "CPUExecutionProvider"
    assert [provider_name(p) for p in available_providers(prefer_gpu=False)] == [
        "CPUExecutionProvider"
    ]
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        # asking for TensorRT where it is not installed is not an error: CUDA/CPU serve
        assert "TensorrtExecutionProvider" not in [
            provider_name(p) for p in available_providers(tensorrt=True)
        ]


def test_io_binding_gives_the_same_outputs(programs_model, cells):
    _, artifact = programs_model
    plain = OnnxModel(artifact, providers=["CPUExecutionProvider"], io_binding=False)
    bound = OnnxModel(artifact, providers=["CPUExecutionProvider"], io_binding=True)
    assert not plain.io_binding and bound.io_binding
    a, b = plain.predict(cells[:300], batch_size=128), bound.predict(cells[:300], batch_size=128)
    for name in ("logits", "probabilities", "attributions", "explained_class"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    np.testing.assert_array_equal(a.program_attributions, b.program_attributions)
    # an explicit class to explain (not bindable: the same answer through run())
    t = np.arange(300) % len(plain.classes)
    np.testing.assert_array_equal(
        plain.predict(cells[:300], t).attributions, bound.predict(cells[:300], t).attributions
    )


def test_float16_export_is_checked_and_recorded(programs_model, programs16_model, cells):
    card32, artifact32 = programs_model
    card16, folder16 = programs16_model
    assert card32.onnx.precision == "float32" and card32.checks.float16 is None
    assert card16.onnx.precision == "float16"
    fp16 = card16.checks.float16
    assert fp16 is not None and card16.checks.passed
    assert fp16.label_agreement >= 0.99 and fp16.attributions_rel_error_p99 < 2e-2
    assert 0 < fp16.attributions_rel_error_median <= fp16.attributions_rel_error_max
    # half-precision weights inside, float32 at the edges
    graph = onnx.load(folder16 / "model.onnx").graph
    weights = [i for i in graph.initializer if i.name.startswith("W")]
    assert weights and all(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    m16 = OnnxModel(folder16, providers=["CPUExecutionProvider"])
    m32 = OnnxModel(artifact32, providers=["CPUExecutionProvider"])
    p16, p32 = m16.predict(cells), m32.predict(cells)
    assert p16.attributions.dtype == np.float32
    # the same seed and data train the same weights: the two graphs differ by rounding only
    agree = (p16.probabilities.argmax(1) == p32.probabilities.argmax(1)).mean()
    assert agree >= 0.99
    rel = np.abs(p16.attributions - p32.attributions).sum(1) / np.abs(p32.attributions).sum(1)
    assert np.quantile(rel, 0.99) < 2e-2


def test_float16_deeplift_has_no_nan(pbmc_data, cells, tmp_path):
    """DeepLIFT divides by pre-activation differences; in float16 its guard must not round to 0."""
    from cellexplain.models.attribution import AttributionSpec

    spec = AttributionSpec(method="deeplift")
    card = train_small(pbmc_data, tmp_path, arch="mlp", attribution=spec, precision="float16")
    assert card.checks.passed and card.checks.float16 is not None
    pred = OnnxModel(tmp_path, providers=["CPUExecutionProvider"]).predict(cells)
    assert np.isfinite(pred.attributions).all()


def test_sessions_can_sleep_instead_of_spinning(programs_model, cells):
    """The service's sessions (CELLEXPLAIN_ORT_SPINNING=false, the default) set onnxruntime's
    allow_spinning entry to 0 and answer exactly as spinning ones do."""
    from cellexplain.service.settings import Settings

    _, artifact = programs_model
    assert Settings().ort_spinning is False
    quiet = OnnxModel(artifact, providers=["CPUExecutionProvider"], spinning=False)
    options = quiet.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    spinning = OnnxModel(artifact, providers=["CPUExecutionProvider"])
    a, b = quiet.predict(cells[:200]), spinning.predict(cells[:200])
    np.testing.assert_array_equal(a.attributions, b.attributions)
