"""The server's settings (:mod:`cellexplain.service.settings`): read from the environment, the
container's CPUs, errors that name their variable, Service links a kubelet injects."""

from __future__ import annotations

import re

import pytest


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


def test_one_model_answers_to_the_name_it_is_served_as(programs_model):
    """KServe passes the InferenceService's name ({{.Name}}): CELLEXPLAIN_MODEL_NAME renames
    the one served model everywhere (routing, listings, answers); the card's name is no
    longer an alias, and a second model makes the name ambiguous."""
    from cellexplain.service.core import Annotator, ModelNotFoundError, resolve_models
    from cellexplain.service.settings import Settings, SettingsError

    _, folder = programs_model
    with pytest.raises(SettingsError, match="CELLEXPLAIN_MODEL_NAME='isvc' names one model"):
        resolve_models(
            Settings(models=["pbmc-programs"], model_dirs=[str(folder)], model_name="isvc")
        )
    with pytest.raises(SettingsError, match="CELLEXPLAIN_DEFAULT_MODEL"):
        resolve_models(
            Settings(
                models=[],
                model_dirs=[str(folder)],
                model_name="isvc",
                default_model="pbmc-programs",
            )
        )
    for bad in ("", "has space", "-lead", "x" * 254):
        with pytest.raises(SettingsError, match="CELLEXPLAIN_MODEL_NAME"):
            Settings.from_env({"CELLEXPLAIN_MODEL_NAME": bad})
    annotator = Annotator.from_settings(
        Settings(models=[], model_dirs=[str(folder)], model_name="pbmc-isvc", workers=1)
    )
    try:
        lm = annotator.get("pbmc-isvc")
        assert annotator.get(None) is lm and lm.model.card.name == "pbmc-isvc"
        assert [m.name for m in annotator.list_models().models] == ["pbmc-isvc"]
        with pytest.raises(ModelNotFoundError, match="served models: pbmc-isvc"):
            annotator.get("pbmc-programs")
    finally:
        annotator.close()


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
