"""`bentoml build` of the CPU and GPU Bentos (real builds, locked requirements), the generated
Dockerfiles checked (no Docker engine here), and the exported Bento holding the served models.

That the Bento installs in a fresh venv, away from the repository, and serves is tested where it
runs: tests/integration/test_pod.py makes it into the image (its install.sh in the image's own
venv) and serves every door from that."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.integration.servers import REPO

pytestmark = [pytest.mark.integration, pytest.mark.deploy]

NOT_AT_SERVING_TIME = ("torch", "captum", "scanpy", "scikit-learn", "onnx")


def requirement_names(path: Path) -> list[str]:
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return [re.split(r"[<>=!~\[ ;]", ln)[0].lower() for ln in lines if ln and ln[0] not in "#-"]


def test_requirement_files_follow_pyproject():
    """The images' requirements are the base install plus the `serve` extra, nothing else
    (no torch, grpcio-tools or matplotlib)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["serve"]
    cpu = (REPO / "service" / "requirements.txt").read_text().split("\n")
    gpu = (REPO / "service" / "requirements-gpu.txt").read_text().split("\n")
    cpu_reqs = [ln for ln in cpu if ln and not ln.startswith("#")]
    gpu_reqs = [ln for ln in gpu if ln and not ln.startswith("#")]
    assert sorted(cpu_reqs) == sorted(deps)
    # the GPU image's onnxruntime-gpu is capped to the CUDA 12 builds (see requirements-gpu.txt)
    assert "onnxruntime-gpu>=1.20,<1.27" in gpu_reqs
    assert sorted(gpu_reqs) == sorted(
        d.replace("onnxruntime>=1.20", "onnxruntime-gpu>=1.20,<1.27") for d in deps
    )


def bentoml(home: Path, *args: str) -> str:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    out = subprocess.run(
        [sys.executable, "-m", "bentoml", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def built(bentos):
    """The run's Bentos (tests/integration/conftest.py): (home, {"cpu"|"gpu": folder})."""
    return bentos


def test_dockerfiles(built):
    _, folders = built
    deployment = yaml.safe_load((REPO / "deploy" / "base" / "deployment.yaml").read_text())
    uid = deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    bases = {}
    for variant, folder in folders.items():
        dockerfile = (folder / "env" / "docker" / "Dockerfile").read_text()
        bases[variant] = re.search(r"^FROM (\S+)", dockerfile, re.M).group(1)  # type: ignore[union-attr]
        assert re.search(r"^USER bentoml$", dockerfile, re.M)  # not root
        # the Kubernetes securityContext runs as the image's own user
        assert f"ARG BENTO_USER_UID={uid}" in dockerfile
        assert "ENV CELLEXPLAIN_MODELS=$CELLEXPLAIN_MODELS" in dockerfile
    assert bases["cpu"].startswith("python:3.11")
    # CUDA 12 in the image: onnxruntime-gpu must be a CUDA 12 build (< 1.27 on PyPI)
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", bases["gpu"])


def test_locked_requirements_have_no_training_stack(built):
    _, folders = built
    for variant, folder in folders.items():
        names = requirement_names(folder / "env" / "python" / "requirements.txt")
        assert "bentoml" in names and "grpcio" in names
        for pkg in NOT_AT_SERVING_TIME:
            assert pkg not in names, f"{variant} Bento would install {pkg}"
        ort = "onnxruntime-gpu" if variant == "gpu" else "onnxruntime"
        other = "onnxruntime" if variant == "gpu" else "onnxruntime-gpu"
        assert ort in names and other not in names
    gpu_lines = (folders["gpu"] / "env" / "python" / "requirements.txt").read_text().splitlines()
    (line,) = [ln for ln in gpu_lines if ln.lower().startswith("onnxruntime-gpu")]
    pinned = re.search(r"==\s*1\.(\d+)", line)
    assert int(pinned.group(1)) < 27 if pinned else "<1.27" in line, line  # a CUDA 12 build


def test_bento_sources_and_exported_models(built, tmp_path):
    home, folders = built
    src = folders["cpu"] / "src"
    # the code is the wheel's: no package of ours in src/ to shadow or drift from it
    assert not (src / "service").exists() and not (src / "models").exists()
    assert not (src / "tests").exists() and not (src / "artifacts").exists()
    from cellexplain import __version__ as version

    for folder in folders.values():
        (wheel,) = (folder / "env" / "python" / "wheels").glob("cellexplain-*.whl")
        assert wheel.name == f"cellexplain-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert "cellexplain/api/_generated/cellexplain_v1_pb2.py" in names  # compiled at build time
    # one import name: nothing a project's own models/ or service/ folder could shadow
    assert {n.split("/")[0] for n in names} == {"cellexplain", f"cellexplain-{version}.dist-info"}
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(f"cellexplain-{version}.dist-info/METADATA").decode()
    base = [
        line.split(":", 1)[1].strip()
        for line in meta.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    heavy = ("grpcio-tools", "onnxruntime", "bentoml", "torch", "matplotlib", "fastapi")
    assert base and not [r for r in base if r.startswith(heavy)], base
    assert {
        "cellexplain/service/rest.py",
        "cellexplain/models/data.py",
        "cellexplain/service/resources/hgnc_previous_symbols.csv.gz",
    } <= names
    # the exported archive carries the served model: ONNX + JSON card, nothing pickled
    archive = tmp_path / "cellexplain.bento"
    bentoml(home, "export", f"cellexplain:{folders['cpu'].name}", str(archive))
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    model_files = {Path(n).name for n in names if n.startswith("./models/pbmc-programs/")}
    assert {"model.onnx", "model.json"} <= model_files
    assert not [n for n in names if n.endswith((".pkl", ".pt", ".pth", ".joblib"))]
