"""The Kubernetes manifests in deploy/: validated offline against the Kubernetes schemas."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

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


def test_service_monitor_scrapes_the_metrics_port():
    (path,) = base_resources(core=False)
    monitor = load(path)
    assert monitor["kind"] == "ServiceMonitor"
    svc = load(DEPLOY / "base" / "service.yaml")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    assert monitor["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]


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
    assert container["livenessProbe"]["grpc"]["port"] == 50051
    assert pod["terminationGracePeriodSeconds"] >= 30
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
    # the patch merged by hand (the one field kustomize changes) still validates
    merged = copy.deepcopy(base)
    target = merged["spec"]["template"]["spec"]["containers"][0]
    target["image"] = container["image"]
    target["resources"]["limits"].update(container["resources"]["limits"])
    merged["spec"]["template"]["spec"]["tolerations"] = patch["spec"]["template"]["spec"][
        "tolerations"
    ]
    kubernetes_validate.validate(merged, K8S_VERSION, strict=True)
