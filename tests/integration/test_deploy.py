"""The Kubernetes manifests in deploy/: validated offline against the Kubernetes schemas."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S_VERSION = "1.30.0"


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def base_resources(core: bool) -> list[Path]:
    """The base's resources: core Kubernetes kinds, or the CRDs (no core schema)."""
    kustomization = load(DEPLOY / "base" / "kustomization.yaml")
    paths = [DEPLOY / "base" / name for name in kustomization["resources"]]
    return [p for p in paths if ("." not in load(p)["apiVersion"].split("/")[0]) == core]


@pytest.mark.parametrize("path", base_resources(core=True), ids=lambda p: p.name)
def test_base_validates_strictly(path):
    kubernetes_validate.validate(load(path), K8S_VERSION, strict=True)


def settings_env() -> dict[str, str]:
    """deploy/base/settings.env, which the base's configMapGenerator makes the ConfigMap."""
    lines = (DEPLOY / "base" / "settings.env").read_text().splitlines()
    pairs = [ln.split("=", 1) for ln in lines if ln.strip() and not ln.startswith("#")]
    return {k: v for k, v in pairs}


def custom_resource(kind: str) -> dict:
    (doc,) = [d for d in map(load, base_resources(core=False)) if d["kind"] == kind]
    return doc


def test_service_monitor_scrapes_the_metrics_port():
    monitor = custom_resource("ServiceMonitor")
    svc = load(DEPLOY / "base" / "service.yaml")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]


def test_alert_rules_use_metrics_the_service_exports():
    """Every cellexplain_* series an alert reads is one the service declares (a renamed metric
    would otherwise leave an alert silently empty)."""
    import prometheus_client

    from cellexplain.service import metrics  # noqa: F401  (registers the metrics)

    declared = set()
    for family in prometheus_client.REGISTRY.collect():
        if family.name.startswith("cellexplain_"):
            declared |= {family.name, f"{family.name}_total"}
            declared |= {f"{family.name}_{s}" for s in ("sum", "count", "bucket")}
    groups = custom_resource("PrometheusRule")["spec"]["groups"]
    every = [r for g in groups for r in g["rules"]]
    rules = [r for r in every if "alert" in r]
    assert {r["alert"] for r in rules} >= {
        "CellexplainRestErrors",
        "CellexplainGrpcErrors",
        "CellexplainWorkersMissing",
        "CellexplainSlowRequests",
    }
    used = {m for r in every for m in re.findall(r"\b(cellexplain_\w+)", r["expr"])}
    assert used and used <= declared, used - declared
    assert "cellexplain_queued_cells" in used  # the autoscaling signal's recording rule
    for r in rules:
        assert r["for"] and r["labels"]["severity"] in {"page", "warn"}


def test_drain_budget_fits_the_grace_period():
    """preStop pause + the drain (HTTP and gRPC side by side) + the exit margin end before
    SIGKILL; uvicorn's graceful timeout is the same grace; requests in flight can finish."""
    from cellexplain.service.shutdown import EXIT_MARGIN_S

    pod = load(DEPLOY / "base" / "deployment.yaml")["spec"]["template"]["spec"]
    settings = settings_env()
    (container,) = pod["containers"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = float(settings["CELLEXPLAIN_SHUTDOWN_GRACE_S"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + EXIT_MARGIN_S
    args = container["args"]
    assert args[0] == "serve"
    assert float(args[args.index("--timeout-graceful-shutdown") + 1]) == grace
    assert grace >= float(settings["CELLEXPLAIN_REQUEST_TIMEOUT_S"])


def test_validation_can_fail():
    broken = copy.deepcopy(load(DEPLOY / "base" / "deployment.yaml"))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    typo = copy.deepcopy(load(DEPLOY / "base" / "deployment.yaml"))
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSION, strict=True)


def test_deployment_hardening_and_probes():
    dep = load(DEPLOY / "base" / "deployment.yaml")
    pod = dep["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {p["containerPort"] for p in container["ports"]} == {3000, 50051}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # liveness on HTTP: it holds with CELLEXPLAIN_GRPC_ENABLED=false (gRPC health would fail)
    assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    for kind in ("startup", "readiness", "liveness"):  # a loaded worker answers within these
        assert container[f"{kind}Probe"]["timeoutSeconds"] >= 5
    assert pod["terminationGracePeriodSeconds"] >= 30
    assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    svc = load(DEPLOY / "base" / "service.yaml")
    grpc_port = next(p for p in svc["spec"]["ports"] if p["name"] == "grpc")
    assert grpc_port["appProtocol"] == "kubernetes.io/h2c"


def test_gpu_overlay_patches_the_base_deployment():
    patch = load(DEPLOY / "overlays" / "gpu" / "gpu.yaml")
    base = load(DEPLOY / "base" / "deployment.yaml")
    assert (patch["kind"], patch["metadata"]["name"]) == ("Deployment", base["metadata"]["name"])
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container["name"] == base["spec"]["template"]["spec"]["containers"][0]["name"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # the patch merged by hand still validates (the image's name is the release component's)
    merged = copy.deepcopy(base)
    target = merged["spec"]["template"]["spec"]["containers"][0]
    target["resources"]["limits"].update(container["resources"]["limits"])
    merged["spec"]["template"]["spec"]["tolerations"] = patch["spec"]["template"]["spec"][
        "tolerations"
    ]
    kubernetes_validate.validate(merged, K8S_VERSION, strict=True)


def kustomize_command() -> list[str] | None:
    """`kustomize build` or `kubectl kustomize`, whichever is on PATH."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render(overlay: str) -> list[dict]:
    """The objects ``deploy/overlays/OVERLAY`` (or ``deploy/OVERLAY`` when it has a slash or
    is not an overlay) applies."""
    cmd = kustomize_command()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl is installed: overlays not rendered")
    folder = DEPLOY / "overlays" / overlay
    if not folder.is_dir():
        folder = DEPLOY / overlay
    out = subprocess.run([*cmd, str(folder)], capture_output=True, text=True, check=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_overlays_render_and_validate(overlay):
    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "PrometheusRule",
            "Service",
            "ServiceMonitor",
        ]
    )
    for doc in docs:
        if "." not in doc["apiVersion"].split("/")[0]:  # core kinds (not the CRD)
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    assert ("nvidia.com/gpu" in limits) == (overlay == "gpu")
    # the ConfigMap the Deployment reads is the one rendered (kustomize may rename it)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    refs = [e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e]
    assert cm["metadata"]["name"] in refs
    # GPUs get larger onnxruntime calls
    assert cm["data"]["CELLEXPLAIN_MAX_BATCH_CELLS"] == ("8192" if overlay == "gpu" else "1024")


def test_sized_the_same_on_any_node():
    """Guaranteed QoS (requests = limits), and workers x onnxruntime threads set explicitly to
    the CPU limit: nothing follows the node's core count."""
    from tests.kubelet import cpu_quantity, quantity_bytes

    for overlay in ("cpu", "gpu"):
        docs = render(overlay)
        (dep,) = [d for d in docs if d["kind"] == "Deployment"]
        (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
        pod = dep["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        res = container["resources"]
        for r in ("cpu", "memory"):
            assert res["requests"][r] == res["limits"][r], (overlay, r)
        workers = int(cm["data"]["CELLEXPLAIN_WORKERS"])
        threads = int(cm["data"]["CELLEXPLAIN_INTRA_OP_THREADS"])
        assert workers >= 1 and threads >= 1
        if overlay == "cpu":
            assert workers * threads == cpu_quantity(res["limits"]["cpu"])
        # /tmp holds every upload being read and answered: ~3x its size each (measured: a
        # 480 MiB upload peaked at 1,441 MiB), one at a time per worker
        data = cm["data"]
        (tmp,) = [v for v in pod["volumes"] if v["name"] == "tmp"]
        uploads = workers * int(data.get("CELLEXPLAIN_MAX_CONCURRENT_UPLOADS", "1"))
        upload = int(data["CELLEXPLAIN_MAX_H5AD_BYTES"])
        assert quantity_bytes(tmp["emptyDir"]["sizeLimit"]) >= uploads * 3 * upload
        # memory: each worker (~0.4 GB with the default model) and its upload readers
        reader = int(data.get("CELLEXPLAIN_UPLOAD_MEMORY_BYTES", str(2 * 2**30)))
        need = workers * (0.4e9 + reader * int(data.get("CELLEXPLAIN_MAX_CONCURRENT_UPLOADS", "1")))
        assert quantity_bytes(res["limits"]["memory"]) >= need, (overlay, need)
        # the image carries a tag, never `latest` (make pin writes the Bento's)
        image = container["image"]
        assert ":" in image and not image.endswith(":latest"), image


def test_disruptions_one_at_a_time_and_ingress_to_the_serving_ports_only():
    strategy = load(DEPLOY / "base" / "deployment.yaml")["spec"]["strategy"]["rollingUpdate"]
    assert strategy == {"maxSurge": 1, "maxUnavailable": 0}  # one pod at a time, any scale
    pdb = load(DEPLOY / "base" / "pdb.yaml")
    assert pdb["spec"] == {**pdb["spec"], "maxUnavailable": 1} and "minAvailable" not in pdb["spec"]
    policy = load(DEPLOY / "base" / "networkpolicy.yaml")["spec"]
    assert sorted(policy["policyTypes"]) == ["Egress", "Ingress"] and policy["egress"] == []
    (rule,) = policy["ingress"]
    dep = load(DEPLOY / "base" / "deployment.yaml")
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    assert {p["port"] for p in rule["ports"]} == {p["containerPort"] for p in container["ports"]}


def test_pin_names_the_image_tag_and_the_model_version(tmp_path, monkeypatch):
    """deploy/pin.py's Component: the Bento's version as the image tag and a pod label, the
    models by name:version in CELLEXPLAIN_MODELS; rendered through the overlay."""
    import importlib.util
    import shutil as sh

    spec = importlib.util.spec_from_file_location("pin", DEPLOY / "pin.py")
    pin = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(pin)  # type: ignore[union-attr]
    deploy = tmp_path / "deploy"
    sh.copytree(DEPLOY, deploy)
    monkeypatch.setattr(
        pin,
        "bento_models",
        lambda tag: ("cellexplain", "v7abc", ["pbmc-programs:0123abcd"], tag.endswith("gpu")),
    )
    # a CPU Bento never lands in the gpu overlay, nor a GPU one in the cpu overlay
    with pytest.raises(SystemExit, match=r"is a CPU Bento.*make pin OVERLAY=gpu"):
        pin.write(deploy / "overlays" / "gpu", "cellexplain:v7abc")
    with pytest.raises(SystemExit, match="is a GPU Bento"):
        pin.write(deploy / "overlays" / "cpu", "cellexplain-gpu:v7gpu")
    pin.write(deploy / "overlays" / "cpu", "cellexplain:v7abc", "registry.example/lab/cellexplain")
    cmd = kustomize_command()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl is installed: overlays not rendered")
    out = subprocess.run(
        [*cmd, str(deploy / "overlays" / "cpu")], capture_output=True, text=True, check=True
    )
    docs = list(yaml.safe_load_all(out.stdout))
    (dep,) = [d for d in docs if d and d["kind"] == "Deployment"]
    (cm,) = [d for d in docs if d and d["kind"] == "ConfigMap"]
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == (
        "registry.example/lab/cellexplain:v7abc"
    )
    assert dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"] == "v7abc"
    assert "app.kubernetes.io/version" not in dep["spec"]["selector"]["matchLabels"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["CELLEXPLAIN_MODELS"] == "pbmc-programs:0123abcd"  # beside the image
    assert "CELLEXPLAIN_MODELS" not in cm["data"]


# -- KServe (deploy/kserve) -----------------------------------------------------------------


def kserve_files() -> list[Path]:
    kustomization = load(DEPLOY / "kserve" / "kustomization.yaml")
    return [DEPLOY / "kserve" / name for name in kustomization["resources"]]


def test_kserve_objects_validate_against_kserves_typed_api(tmp_path):
    """The ServingRuntime and InferenceService, strictly against the typed models of the
    ``kserve`` package (0.21, in its own venv): unknown fields, wrong types, missing required
    fields and values outside an enum are errors; the check is shown to fail on each."""
    from benchmarks.peers import peer_python

    python = peer_python("kserve")
    check = Path(__file__).resolve().parents[1] / "kserve_typed.py"

    def problems(*paths: Path) -> list[str]:
        out = subprocess.run(
            [str(python), str(check), *map(str, paths)], capture_output=True, text=True
        )
        assert out.returncode in (0, 1), out.stderr[-3000:]
        return json.loads(out.stdout)

    assert problems(*render_kserve_files(tmp_path)) == []
    runtime, isvc = (load(p) for p in kserve_files())
    broken = copy.deepcopy(runtime)
    broken["spec"]["supportedModelFormats"][0]["autoSelct"] = True  # a typo
    broken["spec"]["containers"][0]["ports"][0]["containerPort"] = "8080"
    del broken["spec"]["containers"][0]["name"]
    bad_isvc = copy.deepcopy(isvc)
    bad_isvc["spec"]["predictor"]["model"]["storageURI"] = "pvc://x"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all([broken, bad_isvc]))
    found = "\n".join(problems(bad))
    assert "autoSelct: unknown field of V1alpha1SupportedModelFormat" in found
    assert "containerPort: expected int" in found
    assert "name" in found and "V1Container" in found
    assert "storageURI: unknown field of V1beta1ModelSpec" in found


def render_kserve_files(tmp_path: Path) -> list[Path]:
    """deploy/kserve rendered by kustomize (the image tag set), one file per object."""
    paths = []
    for i, doc in enumerate(render("kserve")):
        paths.append(tmp_path / f"{i}-{doc['kind']}.yaml")
        paths[-1].write_text(yaml.safe_dump(doc))
    return paths


def test_kserve_runtime_is_the_service_kserve_expects():
    """What KServe's controller makes of the objects (tests/kubelet.kserve_predictor): a
    container that validates as core Kubernetes, whose CELLEXPLAIN_* settings are valid and
    serve the mounted folder under the InferenceService's name, OIP REST on the first port
    (8080, KServe's default) and gRPC on the port named h2c, probes on the OIP health routes,
    the runtime picked by the InferenceService's model format, Prometheus told the port."""
    from cellexplain.service.settings import Settings
    from tests.kubelet import KSERVE_MODEL_PATH, kserve_predictor

    docs = render("kserve")
    (runtime,) = [d for d in docs if d["kind"] == "ServingRuntime"]
    (isvc,) = [d for d in docs if d["kind"] == "InferenceService"]
    assert runtime["spec"]["containers"][0]["image"] == "cellexplain:unpinned-run-make-pin"
    spec, container, service = kserve_predictor(runtime, isvc)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    env = {e["name"]: e["value"] for e in container["env"]}
    settings = Settings.from_env(env)
    name = isvc["metadata"]["name"]
    assert settings.model_name == name and settings.models == []
    assert settings.model_dirs == [KSERVE_MODEL_PATH]
    http, grpc_port = container["ports"]
    assert http["containerPort"] == settings.http_port == 8080
    assert "h2c" in grpc_port["name"] and grpc_port["containerPort"] == settings.grpc_port
    assert service["spec"]["ports"][1]["appProtocol"] == "kubernetes.io/h2c"
    for probe, path in [
        ("startupProbe", "/v2/health/ready"),
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
    ]:
        assert container[probe]["httpGet"] == {"path": path, "port": 8080}, probe
    fmt = isvc["spec"]["predictor"]["model"]["modelFormat"]
    assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    assert {"name": fmt["name"], "version": fmt["version"]} in [
        {"name": f["name"], "version": f["version"]}
        for f in runtime["spec"]["supportedModelFormats"]
    ]
    assert {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == str(settings.http_port)
    # the same hardening as the Deployment: read-only root, no capabilities, /tmp a volume
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] != 0
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert "/tmp" in mounts and mounts[KSERVE_MODEL_PATH]["readOnly"]


# -- autoscaling on the queue (deploy/base/hpa.yaml, deploy/autoscaling) ---------------------

AUTOSCALING = DEPLOY / "autoscaling"
#: the Prometheus adapter's config, as its loader reads it (yaml.UnmarshalStrict into
#: pkg/config: MetricsDiscoveryConfig, DiscoveryRule, ResourceMapping, NameMapping)
ADAPTER_FIELDS = {
    "": {"rules", "resourceRules", "externalRules"},
    "rule": {"seriesQuery", "seriesFilters", "resources", "name", "metricsQuery"},
    "resources": {"template", "overrides", "namespaced"},
    "override": {"group", "resource"},
    "name": {"matches", "as"},
}


def adapter_rules() -> dict:
    return load(AUTOSCALING / "prometheus-adapter-rules.yaml")


def test_adapter_rule_is_read_strictly_and_serves_the_recording_rule():
    config = adapter_rules()
    assert set(config) <= ADAPTER_FIELDS[""]
    (rule,) = config["rules"]
    assert set(rule) <= ADAPTER_FIELDS["rule"]
    assert set(rule["resources"]) <= ADAPTER_FIELDS["resources"]
    for override in rule["resources"]["overrides"].values():
        assert set(override) <= ADAPTER_FIELDS["override"] and "resource" in override
    assert set(rule["name"]) <= ADAPTER_FIELDS["name"]
    # it reads the recording rule the PrometheusRule ships, per pod and namespace
    recorded = {
        r["record"]
        for g in custom_resource("PrometheusRule")["spec"]["groups"]
        for r in g["rules"]
        if "record" in r
    }
    (series,) = re.findall(r"^([\w:]+)\{", rule["seriesQuery"])
    assert series in recorded
    assert re.fullmatch(rule["name"]["matches"], series)
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    for key in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert key in rule["metricsQuery"]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_hpa_scales_on_the_queue_and_the_gpu_overlay_never_on_cpu(overlay):
    docs = render(overlay)
    (hpa,) = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    kinds = [m["type"] for m in hpa["spec"]["metrics"]]
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    (queue,) = pods
    assert queue["metric"]["name"] == adapter_rules()["rules"][0]["name"]["as"]
    assert queue["target"]["type"] == "AverageValue"
    target = int(queue["target"]["averageValue"])
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    batch = int(cm["data"]["CELLEXPLAIN_MAX_BATCH_CELLS"])
    workers = int(cm["data"]["CELLEXPLAIN_WORKERS"])
    # well under what a pod queues before it refuses (32 batches per worker by default)
    assert 0 < target <= 32 * batch * workers / 8
    if overlay == "gpu":
        assert kinds == ["Pods"]  # CPU says nothing of a GPU pod's backlog
    else:
        assert kinds == ["Pods", "Resource"]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


#: what the KEDA ScaledObject may hold (keda.sh/v1alpha1, the fields this repository uses and
#: their siblings, from KEDA's CRD): a typo is an unknown field
KEDA_FIELDS = {
    "spec": {
        "scaleTargetRef",
        "minReplicaCount",
        "maxReplicaCount",
        "pollingInterval",
        "cooldownPeriod",
        "idleReplicaCount",
        "initialCooldownPeriod",
        "advanced",
        "triggers",
        "fallback",
    },
    "trigger": {"type", "metadata", "metricType", "name", "authenticationRef", "useCachedMetrics"},
    "prometheus": {
        "serverAddress",
        "query",
        "queryParameters",
        "threshold",
        "activationThreshold",
        "namespace",
        "customHeaders",
        "ignoreNullValues",
        "unsafeSsl",
        "awsRegion",
        "timeout",
        "identityOwner",
    },
}


def test_keda_component_replaces_the_hpa_with_a_scaled_object_on_the_same_signal(tmp_path):
    """An overlay with the KEDA component renders a ScaledObject and no HPA (two autoscalers on
    one Deployment fight), querying the same recording rule at the same per-pod target."""
    cmd = kustomize_command()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl is installed: overlays not rendered")
    deploy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, deploy)
    overlay = deploy / "overlays" / "cpu" / "kustomization.yaml"
    k = load(overlay)
    k["components"] = [*k.get("components", []), "../../autoscaling/keda"]
    overlay.write_text(yaml.safe_dump(k))
    out = subprocess.run([*cmd, str(overlay.parent)], capture_output=True, text=True, check=True)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = [d["kind"] for d in docs]
    assert "HorizontalPodAutoscaler" not in kinds and kinds.count("ScaledObject") == 1
    (so,) = [d for d in docs if d["kind"] == "ScaledObject"]
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert set(so["spec"]) <= KEDA_FIELDS["spec"]
    assert so["spec"]["scaleTargetRef"] == {"name": dep["metadata"]["name"]}
    (trigger,) = so["spec"]["triggers"]
    assert set(trigger) <= KEDA_FIELDS["trigger"] and trigger["type"] == "prometheus"
    assert set(trigger["metadata"]) <= KEDA_FIELDS["prometheus"]
    assert trigger["metricType"] == "AverageValue"
    assert "cellexplain:queued_cells:avg1m" in trigger["metadata"]["query"]
    hpa = load(DEPLOY / "base" / "hpa.yaml")
    (queue,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert trigger["metadata"]["threshold"] == queue["target"]["averageValue"]
    assert so["spec"]["minReplicaCount"] == hpa["spec"]["minReplicas"]
