"""The onnxruntime side of a model: provider choice, IO binding, and the float16 export."""

from __future__ import annotations

import re

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


def test_float16_export_is_checked_and_recorded(pbmc_data, programs_model, cells, tmp_path):
    card32, artifact32 = programs_model
    card16 = train_small(pbmc_data, tmp_path, arch="programs", precision="float16")
    assert card32.onnx.precision == "float32" and card32.checks.float16 is None
    assert card16.onnx.precision == "float16"
    fp16 = card16.checks.float16
    assert fp16 is not None and card16.checks.passed
    assert fp16.label_agreement >= 0.99 and fp16.attributions_rel_error_p99 < 2e-2
    assert 0 < fp16.attributions_rel_error_median <= fp16.attributions_rel_error_max
    # half-precision weights inside, float32 at the edges
    graph = onnx.load(tmp_path / "model.onnx").graph
    weights = [i for i in graph.initializer if i.name.startswith("W")]
    assert weights and all(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    m16 = OnnxModel(tmp_path, providers=["CPUExecutionProvider"])
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


_HEAP_PROBE = """
import json, sys
import numpy as np, psutil
from cellexplain.service import allocator
applied = allocator.tune(trim_every_s=0)
rss = lambda: psutil.Process().memory_info().rss / 2**20
before = rss()
blocks, pins = [], []
for _ in range(40):  # 120 MB of batch-sized buffers, each followed by a small long-lived one
    blocks.append(np.ones(3 << 20, np.uint8))
    pins.append(np.ones(4096, np.uint8))
del blocks
freed = rss()
released = allocator.trim()
print(json.dumps({"applied": applied, "before": before, "freed": freed, "trimmed": rss(),
                  "released": released}))
"""


def test_the_worker_allocator_reuses_batch_buffers_and_gives_them_back():
    """A worker keeps batch-sized buffers on the heap (no page faults per request: they stay
    resident once freed) and the trim gives that memory back to the system."""
    import json
    import platform
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout)
    if platform.libc_ver()[0] != "glibc":
        assert r == {**r, "applied": False, "released": False}
        return
    assert r["applied"]
    assert r["freed"] - r["before"] > 100, r  # freed, yet resident: reused by the next request
    assert r["released"] and r["freed"] - r["trimmed"] > 100, r  # trimmed: back to the system


def test_the_container_cpu_limit_is_read_from_cgroup_v2_then_v1(tmp_path):
    from cellexplain.service.settings import cgroup_cpu_limit

    v2, q, p = tmp_path / "cpu.max", tmp_path / "quota", tmp_path / "period"
    assert cgroup_cpu_limit(v2, q, p) is None  # no files: not in a limited container
    v2.write_text("250000 100000\n")
    assert cgroup_cpu_limit(v2, q, p) == 2.5
    v2.write_text("max 100000\n")
    assert cgroup_cpu_limit(v2, q, p) is None
    v2.unlink()
    q.write_text("50000\n")
    p.write_text("100000\n")
    assert cgroup_cpu_limit(v2, q, p) == 0.5
    q.write_text("-1\n")
    assert cgroup_cpu_limit(v2, q, p) is None


def test_workers_and_threads_follow_the_usable_cpus(monkeypatch):
    """workers=0 starts a worker per usable CPU (at most MAX_AUTO_WORKERS), and onnxruntime's
    threads share the CPUs among the workers; explicit values win."""
    from cellexplain.service import settings as s

    for cpus, workers, threads in [(1, 1, 1), (2, 2, 1), (3, 3, 1), (16, 4, 4)]:
        monkeypatch.setattr(s, "usable_cpus", lambda cpus=cpus: cpus)
        auto = s.Settings()
        assert (auto.n_workers, auto.onnxruntime_threads) == (workers, threads)
    monkeypatch.setattr(s, "usable_cpus", lambda: 8)
    one = s.Settings.from_env({"CELLEXPLAIN_WORKERS": "1"})
    assert (one.n_workers, one.onnxruntime_threads) == (1, 8)
    fixed = s.Settings.from_env({"CELLEXPLAIN_WORKERS": "2", "CELLEXPLAIN_INTRA_OP_THREADS": "3"})
    assert (fixed.n_workers, fixed.onnxruntime_threads) == (2, 3)
    assert s.Settings().uses_gpu is False  # this machine: the CPU provider
    monkeypatch.setattr(s.Settings, "uses_gpu", property(lambda self: True))
    on_gpu = s.Settings()  # one process feeds the GPU, with every CPU for onnxruntime
    assert (on_gpu.n_workers, on_gpu.onnxruntime_threads) == (1, 8)


def test_usable_cpus_is_bounded_by_the_affinity_mask():
    import os

    from cellexplain.service.settings import usable_cpus

    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


def test_bad_settings_name_their_variable_and_value():
    from cellexplain.service.settings import Settings, SettingsError

    for env, expected in [
        ({"CELLEXPLAIN_WORKERS": "-1"}, "CELLEXPLAIN_WORKERS='-1': Input should be greater"),
        (
            {"CELLEXPLAIN_MALLOC_TRIM_S": "nan"},
            "CELLEXPLAIN_MALLOC_TRIM_S='nan': Input should be a finite",
        ),
        ({"CELLEXPLAIN_REQUEST_TIMEOUT_S": "inf"}, "CELLEXPLAIN_REQUEST_TIMEOUT_S='inf'"),
        ({"CELLEXPLAIN_WORKRES": "2"}, "'CELLEXPLAIN_WORKRES' is not a setting"),
    ]:
        with pytest.raises(SettingsError, match=re.escape(expected)):
            Settings.from_env(env)


def test_a_cgroup_period_of_zero_means_no_limit(tmp_path):
    from cellexplain.service.settings import cgroup_cpu_limit

    v2 = tmp_path / "cpu.max"
    v2.write_text("100000 0\n")
    assert cgroup_cpu_limit(v2, tmp_path / "q", tmp_path / "p") is None


def test_settings_report_every_problem_at_once_and_refuse_what_would_pass_silently():
    from cellexplain.service.settings import Settings, SettingsError

    with pytest.raises(SettingsError) as e:
        Settings.from_env(
            {"CELLEXPLAIN_FOO": "1", "CELLEXPLAIN_BAR": "2", "CELLEXPLAIN_WORKERS": "x"}
        )
    text = str(e.value)
    assert "\n" not in text
    for part in ("'CELLEXPLAIN_FOO' is not a setting", "'CELLEXPLAIN_BAR' is not a setting"):
        assert part in text
    assert "CELLEXPLAIN_WORKERS='x'" in text
    for env in (
        {"CELLEXPLAIN_API_KEYS": " , "},  # an empty Secret: not "authentication off"
        {"CELLEXPLAIN_GRPC_PORT": "70000"},
        {"CELLEXPLAIN_HTTP_PORT": "0"},
        {"CELLEXPLAIN_MALLOC_TRIM_S": "1e-300"},  # a busy loop of trimming
    ):
        with pytest.raises(SettingsError, match=re.escape(next(iter(env)))):
            Settings.from_env(env)
    assert Settings.from_env({"CELLEXPLAIN_MODELS": ""}).models == []  # only model dirs


def test_models_are_resolved_before_anything_loads(tmp_path, programs_model):
    """Missing or clashing models name the variable at fault (the server's deployment hook
    stops with it, instead of workers restarting without end)."""
    from cellexplain.service.core import resolve_models
    from cellexplain.service.settings import Settings, SettingsError

    for settings, expected in [
        (Settings(models=[], model_dirs=[]), "no models to serve"),
        (Settings(models=[], model_dirs=[str(tmp_path)]), "CELLEXPLAIN_MODEL_DIRS:"),
    ]:
        with pytest.raises(SettingsError, match=expected):
            resolve_models(settings)
    _, folder = programs_model
    one = Settings(models=[], model_dirs=[str(folder)])
    assert resolve_models(one) == [(f"dir:{folder}", folder)]
    with pytest.raises(SettingsError, match="two served models are named"):
        resolve_models(Settings(models=[], model_dirs=[str(folder), str(folder)]))
    with pytest.raises(SettingsError, match="CELLEXPLAIN_DEFAULT_MODEL='nope' is not a served"):
        resolve_models(Settings(models=[], model_dirs=[str(folder)], default_model="nope"))


def test_service_links_a_kubelet_injects_are_not_settings():
    """A Service named cellexplain (or cellexplain-anything) gives every pod of its namespace
    CELLEXPLAIN_SERVICE_HOST, CELLEXPLAIN_PORT_3000_TCP_PROTO, ...: they must never stop the
    server (every replica crash-looped on them), while a typo still does."""
    from cellexplain.service.settings import Settings, SettingsError
    from tests.kubelet import service_link_env

    def svc(name: str, *ports: tuple[str, int]) -> dict:
        return {
            "metadata": {"name": name},
            "spec": {"ports": [{"name": n, "port": p} for n, p in ports]},
        }

    services = [
        svc("cellexplain", ("http", 3000), ("grpc", 50051)),
        svc("cellexplain-gpu", ("http", 3000)),
        # a Service whose links take the names of settings: CELLEXPLAIN_HTTP_PORT=tcp://...
        svc("cellexplain-http", ("web", 8080)),
        svc("cellexplain-grpc", ("grpc-port", 50051)),
        svc("cellexplain-max-body", ("metrics", 9090)),
    ]
    links = service_link_env(services)
    links["CELLEXPLAIN_V6_PORT"] = "tcp://[fd00::a]:3000"  # an IPv6 cluster's link
    assert links["CELLEXPLAIN_PORT_3000_TCP_PROTO"] == "tcp"
    assert links["CELLEXPLAIN_HTTP_PORT"].startswith("tcp://")
    assert links["CELLEXPLAIN_SERVICE_PORT_GRPC"] == "50051"
    settings = Settings.from_env({**links, "CELLEXPLAIN_WORKERS": "2"})
    assert (settings.http_port, settings.grpc_port, settings.workers) == (3000, 50051, 2)
    # the settings of the same names still work, and a link does not hide a set one
    both = Settings.from_env({**links, "CELLEXPLAIN_HTTP_PORT": "8000"})
    assert both.http_port == 8000
    # what only looks like a link is still checked
    for env, expected in [
        ({"CELLEXPLAIN_HTTP_PORT": "http://x:1"}, "CELLEXPLAIN_HTTP_PORT='http://x:1'"),
        ({"CELLEXPLAIN_MAX_BODY_BYTE": "1"}, "'CELLEXPLAIN_MAX_BODY_BYTE' is not a setting"),
        ({"CELLEXPLAIN_GRPC_PORTS": "1"}, "'CELLEXPLAIN_GRPC_PORTS' is not a setting"),
        # typos shaped like links, with values no kubelet writes (a link's X_PORT is a URL)
        ({"CELLEXPLAIN_GRCP_PORT": "50052"}, "'CELLEXPLAIN_GRCP_PORT' is not a setting"),
        ({"CELLEXPLAIN_PORT": "3000"}, "'CELLEXPLAIN_PORT' is not a setting"),
        ({"CELLEXPLAIN_SERVICE_HOST": "localhost"}, "'CELLEXPLAIN_SERVICE_HOST' is not a"),
    ]:
        with pytest.raises(SettingsError, match=re.escape(expected)):
            Settings.from_env({**links, **env})
