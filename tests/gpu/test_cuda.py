"""The GPU path: the CUDA (and TensorRT) providers with IO binding, and float16 on the GPU.

These run only where onnxruntime-gpu sees a GPU (`make install-gpu` on a CUDA machine);
elsewhere they skip, saying why. The same checks on the CPU are in tests/unit/test_runtime.py.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from models.runtime import OnnxModel, available_providers
from tests.conftest import train_small

pytestmark = pytest.mark.gpu


def cuda_model(artifact, **kw) -> OnnxModel:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA provider: onnxruntime-gpu is not installed (CPU-only machine)")
    m = OnnxModel(artifact, providers=available_providers(prefer_gpu=True), **kw)
    if m.providers[0] != "CUDAExecutionProvider":
        pytest.skip("onnxruntime-gpu is installed but no GPU is visible")
    return m


@pytest.fixture(scope="module")
def cells(pbmc):
    X = np.asarray(pbmc.raw.X.toarray(), dtype=np.float32)
    return np.tile(X, (12, 1))  # 8,400 cells: several GPU-sized batches


def test_cuda_matches_the_cpu_with_io_binding(programs_model, cells):
    _, artifact = programs_model
    gpu = cuda_model(artifact)
    assert gpu.io_binding  # on by default on a GPU provider
    cpu = OnnxModel(artifact, providers=["CPUExecutionProvider"])
    g, c = gpu.predict(cells, batch_size=8192), cpu.predict(cells)
    assert (g.probabilities.argmax(1) == c.probabilities.argmax(1)).mean() >= 0.999
    np.testing.assert_allclose(g.probabilities, c.probabilities, atol=1e-5)
    scale = np.abs(c.attributions).max(1, keepdims=True)
    assert np.max(np.abs(g.attributions - c.attributions) / scale) < 1e-3


def test_float16_on_the_gpu_stays_within_its_recorded_error(
    pbmc_data, programs_model, cells, tmp_path
):
    _, artifact = programs_model
    gpu32 = cuda_model(artifact)
    card16 = train_small(pbmc_data, tmp_path, arch="programs", precision="float16")
    gpu16 = cuda_model(tmp_path)
    a, b = gpu16.predict(cells, batch_size=8192), gpu32.predict(cells, batch_size=8192)
    rel = np.abs(a.attributions - b.attributions).sum(1) / np.abs(b.attributions).sum(1)
    assert card16.checks.float16 is not None
    assert np.quantile(rel, 0.99) < 2 * max(card16.checks.float16.attributions_rel_error_p99, 1e-3)
    assert (a.probabilities.argmax(1) == b.probabilities.argmax(1)).mean() >= 0.99


def test_tensorrt_caches_its_engines(programs_model, cells, tmp_path):
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no TensorRT provider in this onnxruntime build")
    _, artifact = programs_model
    providers = available_providers(prefer_gpu=True, tensorrt=True, trt_cache_dir=tmp_path)
    m = OnnxModel(artifact, providers=providers)
    if m.providers[0] != "TensorrtExecutionProvider":
        pytest.skip("TensorRT provider present but not usable here (libraries or GPU missing)")
    m.predict(cells[:1024])
    assert any(tmp_path.iterdir()), "no engine written to the cache"
