"""The real image, started the way a kubelet starts the rendered manifests.

The Bento is built, made into an OCI image by ``deploy/image/build.sh`` (podman; a Debian base
from Debian packages, no registry), the cpu overlay is pinned to it (``deploy/pin.py``) and
rendered (``kubectl kustomize``), and the Deployment's container is run by podman as a kubelet
would (``tests/kubelet.py``): its args, the environment from the ConfigMap, a Secret and the
Service links of the namespace (given even though the pod turns them off: a pod without the
flag gets them), the pod's user, read-only root, dropped capabilities, CPU and memory limits,
``/tmp`` at its size limit, the probes at their periods and thresholds, the preStop hook then
SIGTERM. Requests go through the published ports (REST, gRPC, OIP) and are compared with the
same cells annotated in-process.

Needs podman, runc and debootstrap (``.ci/run`` installs them) and root; elsewhere the module is
skipped, saying why, except under CI, where that is a failure.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import yaml

from cellexplain.api.codegen import load
from cellexplain.api.schemas import AnnotateOptions
from cellexplain.models.preprocess import normalize_log1p
from tests.conftest import raw_cells, require
from tests.integration.servers import REPO
from tests.kubelet import (
    KSERVE_MODEL_VOLUME,
    PodContainer,
    kserve_predictor,
    pod_env,
    podman_base,
    quantity_bytes,
)

pytestmark = [pytest.mark.integration, pytest.mark.deploy]
pb = load("cellexplain_v1_pb2")
pb_grpc = load("cellexplain_v1_pb2_grpc")
KEY = "pod-test-key-0123456789"
N_CELLS = 300


@pytest.fixture(scope="module")
def image(bentos) -> Iterator[tuple[str, str]]:
    """(image, bento tag): the run's Bento of the repo's bentofile, made into an image."""
    require(sys.platform == "linux" and os.geteuid() == 0, "building the base image needs root")
    for tool in ("podman", "debootstrap", "kubectl"):
        require(shutil.which(tool) is not None, f"{tool} is not installed")
    home, folders = bentos
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    bin_dir = Path(sys.executable).parent

    def run(*cmd: str, timeout: float = 900) -> str:
        out = subprocess.run(
            cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert out.returncode == 0, f"{cmd}:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
        return out.stdout

    bento = f"cellexplain:{folders['cpu'].name}"
    env |= {"BENTOML": str(bin_dir / "bentoml"), "PYTHON": sys.executable}
    built = run("deploy/image/build.sh", bento).strip().splitlines()[-1]
    assert built == f"localhost/{bento}"
    yield built, bento
    # each run's image is ~0.6 GB of its own: not left behind (the base stays, for the next)
    rmi = subprocess.run(
        [*podman_base(), "rmi", "--force", built], capture_output=True, text=True, timeout=120
    )
    if rmi.returncode != 0:
        warnings.warn(f"could not remove {built}: {rmi.stderr[-500:]}", stacklevel=1)


@pytest.fixture(scope="module")
def manifests(image, bentos, tmp_path_factory) -> dict[str, dict]:
    """The cpu overlay pinned to the image (deploy/pin.py) and rendered: {kind: object}."""
    built, bento = image
    deploy = tmp_path_factory.mktemp("deploy") / "deploy"
    shutil.copytree(REPO / "deploy", deploy)
    env = {**os.environ, "BENTOML_HOME": str(bentos[0])}
    pin = [sys.executable, str(deploy / "pin.py"), str(deploy / "overlays" / "cpu"), bento]
    subprocess.run([*pin, "--image", built.split(":")[0]], env=env, check=True, timeout=120)
    out = subprocess.run(
        ["kubectl", "kustomize", str(deploy / "overlays" / "cpu")],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return {d["kind"]: d for d in docs}


@pytest.fixture(scope="module")
def pod(image, manifests, tmp_path_factory):
    dep = manifests["Deployment"]
    spec = dep["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    cm = manifests["ConfigMap"]
    env = pod_env(
        spec,
        container,
        {cm["metadata"]["name"]: cm["data"]},
        {"cellexplain-secrets": {"CELLEXPLAIN_API_KEYS": KEY}},
        [manifests["Service"]],
        force_service_links=True,
    )
    c = PodContainer(container["image"], spec, container, env, tmp_path_factory.mktemp("pod"))
    c.start()
    try:
        c.started_in = c.wait_started()  # type: ignore[attr-defined]
        c.watch()
        yield c
    finally:
        c.remove()


@pytest.fixture(scope="module")
def cells(pbmc):
    return raw_cells(pbmc, N_CELLS)


@pytest.fixture(scope="module")
def in_process(programs_model):
    """The same model served in this process (the service's own core)."""
    from cellexplain.service.core import Annotator
    from cellexplain.service.settings import Settings

    _, artifact = programs_model
    settings = Settings(models=[], model_dirs=[str(artifact)], workers=1)
    annotator = Annotator.from_settings(settings)
    yield annotator
    annotator.close()


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


def test_the_pod_starts_under_a_kubelets_environment(pod, manifests, image):
    # what the kubelet gave it, the Service links included
    for var in ("CELLEXPLAIN_SERVICE_HOST", "CELLEXPLAIN_PORT_3000_TCP_PROTO", "KUBERNETES_PORT"):
        assert var in pod.env, var
    assert manifests["Deployment"]["spec"]["template"]["spec"]["enableServiceLinks"] is False
    assert pod.state() == "running" and pod.started_in < 120
    # as the pod's user, on a read-only root, with /tmp at its size limit
    facts = json.loads(
        pod.exec_python(
            "import json, os, errno\n"
            "def writable(p):\n"
            "    try:\n"
            "        open(p, 'w').close(); return True\n"
            "    except OSError as e:\n"
            "        return e.errno\n"
            "import cellexplain.service.rest as rest, importlib.metadata as md\n"
            "dist = md.distribution('cellexplain')\n"
            "print(json.dumps({'uid': os.getuid(), 'home': writable('/home/bentoml/x'),"
            " 'tmp': writable('/tmp/x'), 'code': rest.__file__,"
            " 'direct_url': dist.read_text('direct_url.json')}))"
        )
    )
    # the service runs from the image's own venv, where the Bento's install.sh put the wheel
    # the run built from its sdist (not an editable install, nothing of the repository)
    assert facts["code"].startswith("/app/.venv/lib/python3"), facts["code"]
    assert "editable" not in (facts["direct_url"] or ""), facts["direct_url"]
    sc = manifests["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    assert facts["uid"] == sc["runAsUser"]
    assert facts["home"] == 30 and facts["tmp"] is True  # EROFS: read-only
    # the workers the ConfigMap sets, all alive; the model the pin names, at its version
    metrics = httpx.get(f"http://127.0.0.1:{pod.port('http')}/metrics", timeout=10).text
    workers = manifests["ConfigMap"]["data"]["CELLEXPLAIN_WORKERS"]
    assert f"cellexplain_workers_live {float(workers)}" in metrics
    assert f"cellexplain_workers_expected {float(workers)}" in metrics
    models = httpx.get(
        f"http://127.0.0.1:{pod.port('http')}/v1/models", headers=_auth(), timeout=10
    ).json()["models"]
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    (pinned,) = [e["value"] for e in container["env"] if e["name"] == "CELLEXPLAIN_MODELS"]
    assert [m["tag"] for m in models] == [pinned] and ":" in pinned
    built, bento = image
    assert manifests["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"] == built
    assert (
        manifests["Deployment"]["spec"]["template"]["metadata"]["labels"][
            "app.kubernetes.io/version"
        ]
        == bento.split(":")[1]
    )


def test_every_door_answers_as_in_process(pod, cells, in_process):
    genes, X = cells
    url = f"http://127.0.0.1:{pod.port('http')}"
    opts = AnnotateOptions(top_k=5, return_probabilities=True)
    from cellexplain.service import v1

    lm = in_process.get(None)
    idx = [genes.index(g) for g in lm.model.genes]
    x = np.asarray(normalize_log1p(X)[:, idx], dtype=np.float32)

    async def both():  # one event loop: the model's batcher lives on it
        return await in_process.annotate(genes, X, opts), await in_process.infer(lm.name, x)

    annotated, inferred = asyncio.run(both())
    ref = json.loads(v1.json_bytes(annotated))
    ref_labels = [c["label"] for c in ref["cells"]]
    assert len(set(ref_labels)) > 3  # real cells, several types
    body = {"genes": genes, "cells": X.tolist(), "top_k": 5, "return_probabilities": True}
    assert httpx.post(f"{url}/v1/annotate", json=body, timeout=60).status_code == 401
    r = httpx.post(f"{url}/v1/annotate", json=body, headers=_auth(), timeout=120)
    assert r.status_code == 200, r.text[:500]
    rest = r.json()
    assert [c["label"] for c in rest["cells"]] == ref_labels
    for got, want in zip(rest["cells"], ref["cells"], strict=True):
        assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-5)
        assert [g["gene"] for g in got["top_genes"]][:3] == [g["gene"] for g in want["top_genes"]][
            :3
        ]
    # typed gRPC, with the key as metadata
    req = pb.AnnotateRequest(
        options=pb.AnnotateOptions(top_k=5),
        genes=genes,
        dense=pb.DenseMatrix(n_cells=len(X), raw_le_float32=X.astype("<f4").tobytes()),
    )
    with grpc.insecure_channel(f"127.0.0.1:{pod.port('grpc')}") as ch:
        res = pb_grpc.CellExplainStub(ch).Annotate(
            req, timeout=120, metadata=[("authorization", f"Bearer {KEY}")]
        )
    assert [c.label for c in res.cells] == ref_labels
    conf = np.array([c.confidence for c in res.cells])
    np.testing.assert_allclose(conf, [c["confidence"] for c in ref["cells"]], atol=1e-5)
    # the Open Inference Protocol on the model's own input
    want = inferred.probabilities
    infer = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                         "data": x.ravel().tolist()}],
             "outputs": [{"name": "probabilities"}]}  # fmt: skip
    r = httpx.post(f"{url}/v2/models/{lm.name}/infer", json=infer, headers=_auth(), timeout=120)
    assert r.status_code == 200, r.text[:500]
    (out,) = r.json()["outputs"]
    got = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_an_upload_through_the_pod_stays_within_its_tmp(pod, counts_h5ad, tmp_path):
    """An .h5ad upload is spooled, read by its child process and answered from /tmp, the one
    writable place (an emptyDir on disk): answered in full, and /tmp's use stays within the
    sizeLimit past which the kubelet would evict the pod."""
    import anndata as ad

    url = f"http://127.0.0.1:{pod.port('http')}"
    with open(counts_h5ad, "rb") as f:
        r = httpx.post(
            f"{url}/v1/annotate/h5ad",
            files={"file": ("cells.h5ad", f)},
            data={"top_k": "3"},
            headers=_auth(),
            timeout=180,
        )
    assert r.status_code == 200, r.text[:500]
    out = tmp_path / "annotated.h5ad"
    out.write_bytes(r.content)
    annotated = ad.read_h5ad(out)
    assert annotated.n_obs == ad.read_h5ad(counts_h5ad, backed="r").n_obs
    assert annotated.obs["cellexplain_label"].nunique() > 3
    pod.measure_volumes()
    (tmp,) = [v for v in pod.pod["volumes"] if v["name"] == "tmp"]
    limit = quantity_bytes(tmp["emptyDir"]["sizeLimit"])
    assert 0 < pod.volume_peak["tmp"] < limit, pod.volume_peak


def test_a_killed_worker_fails_the_probes_and_a_restart_heals(pod):
    """kill -9 one worker inside the container (no replacement in an image): readiness fails
    at once and liveness fails its threshold in a row, as the kubelet would see it; the
    kubelet then restarts the container, which comes back with every worker."""
    container = pod.container
    top = pod.podman("top", pod.name, "pid", "args").stdout.splitlines()[1:]
    victims = [int(line.split()[0]) for line in top if "_bentoml_impl.worker.service" in line]
    assert len(victims) == 2, top
    killed_at = time.monotonic()
    pod.exec_python(f"import os, signal; os.kill({victims[0]}, signal.SIGKILL)")
    live = container["livenessProbe"]
    ready = container["readinessProbe"]
    window = live["periodSeconds"] * (live["failureThreshold"] + 1) + 10
    while pod.failed_in_a_row("liveness", killed_at) < live["failureThreshold"]:
        assert time.monotonic() - killed_at < window, pod.probes[-6:]
        time.sleep(0.5)
    assert pod.failed_in_a_row("readiness", killed_at) >= ready.get("failureThreshold", 3)
    metrics = httpx.get(f"http://127.0.0.1:{pod.port('http')}/metrics", timeout=10).text
    assert "cellexplain_workers_live 1.0" in metrics
    # the kubelet's restart: the container stopped within its grace and started again
    pod.unwatch()
    grace = pod.pod["terminationGracePeriodSeconds"]
    restart = pod.podman("restart", "--time", str(grace), pod.name, timeout=grace + 60)
    assert restart.returncode == 0, restart.stderr
    pod.wait_started()
    back = time.monotonic()
    pod.watch()
    time.sleep(ready["periodSeconds"] + 1)
    assert pod.failed_in_a_row("readiness", back) == 0
    metrics = httpx.get(f"http://127.0.0.1:{pod.port('http')}/metrics", timeout=10).text
    assert "cellexplain_workers_live 2.0" in metrics


def test_sigterm_after_prestop_answers_every_request_in_flight(pod, cells):
    """The kubelet's way out: preStop, SIGTERM with REST and gRPC requests in flight, every
    one answered in full, the container gone with exit code 0 within the grace period."""
    genes, X = cells
    # 6,000 cells: seconds of IG on the pod's 2 CPUs; whole counts, so that three bodies (23 MB
    # each, not 43 with the float digits) fit one worker's in-flight budget (2 x 64 MiB): a
    # worker past it rightly answers 503 before any SIGTERM
    X = np.rint(np.tile(X, (20, 1)))
    url = f"http://127.0.0.1:{pod.port('http')}"
    # everything encoded and connected beforehand: the threads only send (encoding 6,000
    # rows of JSON holds the GIL for seconds, and a request that reaches the server after
    # SIGTERM is rightly refused)
    body = json.dumps({"genes": genes, "cells": X.tolist(), "top_k": 5}).encode()
    req = pb.AnnotateRequest(
        genes=genes,
        dense=pb.DenseMatrix(n_cells=len(X), raw_le_float32=X.astype("<f4").tobytes()),
    )
    results: list[tuple[str, object, float]] = []
    started = threading.Barrier(6)
    headers = {**_auth(), "content-type": "application/json"}
    channels = [grpc.insecure_channel(f"127.0.0.1:{pod.port('grpc')}") for _ in range(2)]
    for ch in channels:
        grpc.channel_ready_future(ch).result(timeout=30)

    def rest() -> None:
        with httpx.Client(timeout=120) as client:
            client.get(f"{url}/livez")  # connected
            started.wait()
            try:
                r = client.post(f"{url}/v1/annotate", content=body, headers=headers)
                res: object = (r.status_code, len(r.json().get("cells", [])))
            except httpx.HTTPError as e:
                res = repr(e)
        results.append(("rest", res, time.monotonic()))

    def grpc_call(ch: grpc.Channel) -> None:
        stub = pb_grpc.CellExplainStub(ch)
        started.wait()
        try:
            res = stub.Annotate(req, timeout=120, metadata=[("x-api-key", KEY)])
            out: object = ("OK", len(res.cells))
        except grpc.RpcError as e:
            out = (str(e.code()), e.details())
        results.append(("grpc", out, time.monotonic()))

    threads = [threading.Thread(target=rest) for _ in range(3)]
    threads += [threading.Thread(target=grpc_call, args=(ch,)) for ch in channels]

    def in_flight() -> None:
        for t in threads:
            t.start()
        started.wait(30)
        time.sleep(1.0)  # every request received (not merely sent) when SIGTERM comes

    pod.unwatch()
    total, after_sigterm = pod.terminate(before_sigterm=in_flight)
    sigterm_at = time.monotonic() - after_sigterm
    for t in threads:
        t.join(timeout=120)
    for ch in channels:
        ch.close()
    n = len(X)
    answers = sorted((door, str(res)) for door, res, _ in results)
    timing = [(door, str(res)[:200], round(at - sigterm_at, 2)) for door, res, at in results]
    assert answers == [("grpc", str(("OK", n)))] * 2 + [("rest", str((200, n)))] * 3, timing
    assert sum(at > sigterm_at for _, _, at in results) >= 2, timing  # the drain was real
    assert pod.exit_code() == 0, pod.logs()[-3000:]
    assert total < pod.pod["terminationGracePeriodSeconds"]


def test_an_arbitrary_uid_in_group_0_starts(image, manifests, tmp_path):
    """OpenShift's restricted policy runs a pod under a UID of its own choosing, in group 0:
    the image must serve with it (nothing in it needs writing, all of it readable)."""
    dep = manifests["Deployment"]
    spec = json.loads(json.dumps(dep["spec"]["template"]["spec"]))
    spec["securityContext"] = {**spec["securityContext"], "runAsUser": 1000650000, "runAsGroup": 0}
    spec["securityContext"].pop("fsGroup", None)
    (container,) = spec["containers"]
    cm = manifests["ConfigMap"]
    env = pod_env(spec, container, {cm["metadata"]["name"]: cm["data"]}, {}, [])
    c = PodContainer(container["image"], spec, container, env, tmp_path)
    c.start()
    try:
        c.wait_started()
        uid = c.exec_python("import os; print(os.getuid(), os.getgid())").split()
        assert uid == ["1000650000", "0"]
    finally:
        c.remove()


# -- as a KServe ServingRuntime -------------------------------------------------------------


def kserve_objects(name: str) -> tuple[dict, dict]:
    """deploy/kserve's ServingRuntime and InferenceService, the latter renamed ``name``."""
    runtime = yaml.safe_load((REPO / "deploy" / "kserve" / "servingruntime.yaml").read_text())
    isvc = yaml.safe_load((REPO / "deploy" / "kserve" / "inferenceservice.yaml").read_text())
    isvc["metadata"]["name"] = name
    return runtime, isvc


def kserve_container(image, name: str, model_dir: Path, workdir: Path) -> PodContainer:
    """The predictor pod KServe's controller makes for deploy/kserve's objects (RawDeployment),
    the InferenceService named ``name``, with ``model_dir`` where the storage initializer puts
    the model (/mnt/models) and the Service links of the predictor's Service."""
    runtime, isvc = kserve_objects(name)
    spec, container, service = kserve_predictor(runtime, isvc)
    container["image"] = image[0]
    env = pod_env(spec, container, {}, {}, [service], force_service_links=True)
    c = PodContainer(image[0], spec, container, env, workdir)
    c.prefill[KSERVE_MODEL_VOLUME] = model_dir
    return c


def test_kserve_serves_the_mounted_model_under_the_inference_service_name(
    image, programs_model, cells, in_process, tmp_path
):
    """Started as KServe starts the runtime: its args and env with {{.Name}} filled, the model
    folder at /mnt/models (read-only), the predictor Service's links in the environment
    (CELLEXPLAIN_PREDICTOR_*: the InferenceService is named cellexplain). It answers to that
    name on OIP REST (8080) and gRPC (h2c, 8081) through tritonclient, as in-process; the card's
    own name is unknown there; the probes' routes answer with their status codes."""
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp
    from tritonclient.utils import InferenceServerException

    card, folder = programs_model
    c = kserve_container(image, "cellexplain", folder, tmp_path)
    assert "CELLEXPLAIN_PREDICTOR_SERVICE_HOST" in c.env
    c.start()
    try:
        c.wait_started()
        http = f"127.0.0.1:{c.port('http1')}"
        for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/cellexplain/ready"):
            assert httpx.get(f"http://{http}{path}", timeout=10).status_code == 200, path
        r = httpx.get(f"http://{http}/v2/models/{card.name}/ready", timeout=10)
        assert r.status_code == 404 and "served models: cellexplain" in r.text
        metrics = httpx.get(f"http://{http}/metrics", timeout=10).text
        info = f'model="cellexplain",sha256="{card.onnx.sha256}",version="{card.version}"'
        assert f"cellexplain_model_info{{{info}}} 1.0" in metrics

        genes, X = cells
        lm = in_process.get(None)
        idx = [genes.index(g) for g in lm.model.genes]
        x = np.asarray(normalize_log1p(X)[:, idx], dtype=np.float32)
        want = asyncio.run(in_process.infer(lm.name, x))
        for mod, client in (
            (thttp, thttp.InferenceServerClient(http)),
            (tgrpc, tgrpc.InferenceServerClient(f"127.0.0.1:{c.port('h2c')}")),
        ):
            assert client.is_server_ready() and client.is_model_ready("cellexplain")
            try:  # tritonclient's HTTP client says False to a 404, its gRPC one raises
                assert not client.is_model_ready(card.name)
            except InferenceServerException as e:
                assert "NOT_FOUND" in str(e) and "served models: cellexplain" in str(e)
            inp = mod.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            outs = [mod.InferRequestedOutput(n) for n in ("probabilities", "attributions")]
            res = client.infer("cellexplain", [inp], outputs=outs)
            np.testing.assert_allclose(res.as_numpy("probabilities"), want.probabilities, atol=1e-5)
            np.testing.assert_allclose(res.as_numpy("attributions"), want.attributions, atol=1e-5)
        # the model volume is read-only to the server, as KServe mounts it
        wrote = c.podman("exec", c.name, "python3", "-c", "open('/mnt/models/x', 'w')")
        assert wrote.returncode != 0 and "Read-only file system" in wrote.stderr
    finally:
        c.remove()


def test_kserve_refuses_a_model_whose_onnx_does_not_match_its_card(image, programs_model, tmp_path):
    """A model folder whose model.onnx is not the file its card names (sha256) stops the
    server at start, saying so, before it answers anything: the pod never gets ready."""
    _, folder = programs_model
    bad = tmp_path / "model"
    shutil.copytree(folder, bad)
    onnx = bad / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[-1] ^= 0xFF
    onnx.write_bytes(bytes(data))
    c = kserve_container(image, "pbmc", bad, tmp_path)
    c.start()
    try:
        with pytest.raises(AssertionError, match="sha256"):
            c.wait_started()
    finally:
        c.remove()
