"""The GPU path: the CUDA (and TensorRT) providers with IO binding, and float16 on the GPU.

These run only where onnxruntime-gpu sees a GPU (`make install-gpu` on a CUDA machine);
elsewhere they skip, saying why. The same checks on the CPU are in tests/unit/test_runtime.py.

On a GPU machine without the training stack (torch, scanpy), point ``CELLEXPLAIN_GPU_ARTIFACTS``
at a folder made elsewhere by ``python -m benchmarks.gpu prepare DIR``: the tests then load its
graphs and cells instead of training.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from cellexplain.models.card import FLOAT16_RTOL, ModelCard
from cellexplain.models.runtime import OnnxModel, available_providers

PREPARED = os.environ.get("CELLEXPLAIN_GPU_ARTIFACTS")

pytestmark = pytest.mark.gpu


def require_cuda() -> None:
    """Skip (before any model is trained or loaded) where onnxruntime has no CUDA provider."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no CUDA provider: onnxruntime-gpu is not installed (CPU-only machine)")


def cuda_model(artifact, **kw) -> OnnxModel:
    require_cuda()
    m = OnnxModel(artifact, providers=available_providers(prefer_gpu=True), **kw)
    if m.providers[0] != "CUDAExecutionProvider":
        pytest.skip("onnxruntime-gpu is installed but no GPU is visible")
    return m


@pytest.fixture(scope="module")
def cells(request):
    if PREPARED:
        X = np.load(Path(PREPARED) / "cells.npy")
    else:
        pbmc = request.getfixturevalue("pbmc")
        X = np.asarray(pbmc.raw.X.toarray(), dtype=np.float32)
    return np.tile(X, (-(-8400 // len(X)), 1))  # 8,400+ cells: several GPU-sized batches


@pytest.fixture(scope="module")
def artifact(request) -> Path:
    """A float32 programs model with 32-step IG."""
    require_cuda()
    if PREPARED:
        return Path(PREPARED) / "ig32-float32"
    return request.getfixturevalue("programs_model")[1]


@pytest.fixture(scope="module")
def artifact16(request) -> tuple[ModelCard, Path]:
    """Its float16 twin (card, folder)."""
    require_cuda()
    if PREPARED:
        folder = Path(PREPARED) / "ig32-float16"
        return ModelCard.read(folder), folder
    return request.getfixturevalue("programs16_model")


def test_cuda_matches_the_cpu_with_and_without_io_binding(artifact, cells):
    gpu = cuda_model(artifact)
    cpu = OnnxModel(artifact, providers=["CPUExecutionProvider"])
    g, c = gpu.predict(cells, batch_size=8192), cpu.predict(cells)
    assert (g.probabilities.argmax(1) == c.probabilities.argmax(1)).mean() >= 0.999
    # float32 on the GPU is float32 (no TF32): as close to the CPU as summation order allows
    np.testing.assert_allclose(g.probabilities, c.probabilities, atol=1e-5)
    scale = np.abs(c.attributions).max(1, keepdims=True)
    assert np.max(np.abs(g.attributions - c.attributions) / scale) < 1e-3
    # the per-cell completeness gap is computed in the graph: the same on the GPU (a sum over
    # the genes in another order moves it by float32 rounding only)
    assert g.completeness_gap is not None and c.completeness_gap is not None
    np.testing.assert_allclose(g.completeness_gap, c.completeness_gap, rtol=1e-2, atol=1e-4)
    bound = cuda_model(artifact, io_binding=True).predict(cells, batch_size=4096)
    np.testing.assert_array_equal(
        bound.attributions, gpu.predict(cells, batch_size=4096).attributions
    )


def test_float16_on_the_gpu_stays_within_its_recorded_error(artifact, artifact16, cells):
    gpu32 = cuda_model(artifact)
    card16, folder16 = artifact16
    gpu16 = cuda_model(folder16)
    a, b = gpu16.predict(cells, batch_size=8192), gpu32.predict(cells, batch_size=8192)
    rel = np.abs(a.attributions - b.attributions).sum(1) / np.abs(b.attributions).sum(1)
    assert card16.checks.float16 is not None
    # the card records the error measured on the CPU at export; the GPU's float16 kernels
    # accumulate differently (2x that on an H200), so the bound is the export's own policy
    assert np.quantile(rel, 0.99) < FLOAT16_RTOL
    assert (a.probabilities.argmax(1) == b.probabilities.argmax(1)).mean() >= 0.99
    # float16 arithmetic shows in the gap (computed in float32 from its outputs), within reason
    assert a.completeness_gap is not None and np.isfinite(a.completeness_gap).all()
    assert float(np.median(a.completeness_gap)) < 0.05


def test_tensorrt_caches_its_engines(artifact, cells, tmp_path):
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("no TensorRT provider in this onnxruntime build")
    providers = available_providers(prefer_gpu=True, tensorrt=True, trt_cache_dir=tmp_path)
    m = OnnxModel(artifact, providers=providers)
    if m.providers[0] != "TensorrtExecutionProvider":
        pytest.skip("TensorRT provider present but not usable here (libraries or GPU missing)")
    m.predict(cells[:1024])
    assert any(tmp_path.iterdir()), "no engine written to the cache"
