"""What a pipeline gets from `pip install cellexplain`: the client and the `cellexplain` command,
without the server's or training's dependencies, in a fresh venv made from the wheel (never the
project's editable install), against a real server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from cellexplain.client.cli import EXTRAS
from tests.integration.servers import bentoml_server
from tests.lab_files import write_10x_h5

pytestmark = [pytest.mark.integration, pytest.mark.deploy]

#: what the base install must not bring: every module the CLI maps to an extra, and the
#: build-only protobuf compiler
NOT_INSTALLED = sorted({*EXTRAS, "grpc_tools"})


#: the Pythons the client supports (README, "Python versions"); the server needs 3.11+
CLIENT_PYTHONS = ("3.10", "3.11", "3.12", "3.13")


@pytest.fixture(scope="module")
def wheel(bentos) -> Path:
    """The project's wheel as the run built it from its sdist (the one its Bentos carry)."""
    _, folders = bentos
    (path,) = (folders["cpu"] / "env" / "python" / "wheels").glob("cellexplain-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A venv with the wheel and its base dependencies only (from the package index)."""
    tmp = tmp_path_factory.mktemp("client-venv")
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    install = subprocess.run(
        # --no-compile: the same files, without byte-compiling every installed module (half
        # the install's time); Python compiles what it imports
        [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-compile",
         str(wheel)],
        capture_output=True, text=True, timeout=1200,
        env={**clean_env(env_dir, Path.home()), "PIP_CACHE_DIR": os.environ.get(
            "PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))},
    )  # fmt: skip
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    return env_dir


@pytest.mark.parametrize("version", CLIENT_PYTHONS)
def test_the_base_install_resolves_on_each_client_python(wheel, version, tmp_path):
    """pip resolves the wheel's base dependencies from the package index for that Python
    (binary wheels only, as a lab's pip would pick them); this machine runs the suite on its
    own Python, so the others are checked by resolution and by mypy (`make typecheck`)."""
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
         "--only-binary=:all:", "--python-version", version, "--report", str(report),
         str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    chosen = {i["metadata"]["name"].lower() for i in json.loads(report.read_text())["install"]}
    assert {"cellexplain", "numpy", "anndata", "grpcio", "protobuf", "httpx"} <= chosen
    assert not chosen & {"onnxruntime", "bentoml", "torch"}, chosen


def clean_env(venv: Path, home: Path) -> dict[str, str]:
    return {
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "VIRTUAL_ENV": str(venv),
        "BENTOML_DO_NOT_TRACK": "True",
    }


def run(venv: Path, home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        list(args), env=clean_env(venv, home), cwd=home, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_the_base_install_has_no_server_or_training_stack(venv, tmp_path):
    python = str(venv / "bin" / "python")
    probe = (
        "import importlib.util, json; "
        f"print(json.dumps([m for m in {NOT_INSTALLED!r} if importlib.util.find_spec(m)]))"
    )
    assert run(venv, tmp_path, python, "-c", probe).stdout.strip() == "[]"
    # one import name, no top-level models/service a project of its own could shadow
    for bare in ("models", "service", "client", "api"):
        proc = run(venv, tmp_path, python, "-c", f"import {bare}", check=False)
        assert proc.returncode != 0, bare
    run(venv, tmp_path, python, "-c", "import cellexplain.client, cellexplain.api.proto_v1")
    version = run(venv, tmp_path, str(venv / "bin" / "cellexplain"), "--version").stdout
    assert version.startswith("cellexplain 0"), version


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (["annotate", "x.h5ad", "--out", "y.h5ad", "--local"], "serve"),
        (["train", "--arch", "linear", "--out", "m"], "train"),
        (["models", "show", "pbmc-programs"], "serve"),
        # a Cell Ranger file needs scanpy's reader: said before any request is sent
        (["annotate", "x.h5", "--url", "http://127.0.0.1:9"], "formats"),
    ],
)
def test_commands_of_an_extra_say_which_to_install(venv, tmp_path, args, extra, pbmc):
    if args[1] == "x.h5ad":
        ad.AnnData(np.ones((2, 3), np.float32)).write_h5ad(tmp_path / "x.h5ad")
    if args[1] == "x.h5":
        counts = sp.csr_matrix(np.ones((2, 3), np.float32))
        write_10x_h5(tmp_path / "x.h5", counts, ["a-1", "b-1"], ["E1", "E2", "E3"], ["A", "B", "C"])
    proc = run(venv, tmp_path, str(venv / "bin" / "cellexplain"), *args, check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"pip install 'cellexplain[{extra}]'" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_client_annotates_through_a_real_server_on_both_transports(
    venv, tmp_path, programs_home, pbmc
):
    """The installed command against the server the project runs, on REST and gRPC: the same
    labels as the server's own `--local` core gives."""
    raw = pbmc.raw.to_adata()[:120]
    counts = np.rint(np.expm1(raw.X.toarray()) * 3).astype(np.float32)
    src = tmp_path / "cells.h5ad"
    ad.AnnData(counts, var=raw.var).write_h5ad(src)
    cli = str(venv / "bin" / "cellexplain")
    with bentoml_server(programs_home, {"CELLEXPLAIN_MODELS": "pbmc-programs"}) as srv:
        labels = {}
        for transport in ("rest", "grpc"):
            out = tmp_path / f"{transport}.h5ad"
            run(venv, tmp_path, cli, "annotate", str(src), "--out", str(out), "--url", srv.url,
                "--transport", transport, "--grpc", srv.grpc, "-q")  # fmt: skip
            labels[transport] = ad.read_h5ad(out).obs["cellexplain_label"].astype(str).tolist()
        url, listed = srv.url, run(venv, tmp_path, cli, "models", "list", "--url", srv.url).stdout
    local = tmp_path / "local.h5ad"
    env = {**os.environ, "BENTOML_HOME": str(programs_home), "BENTOML_DO_NOT_TRACK": "True"}
    subprocess.run(
        [sys.executable, "-m", "cellexplain", "annotate", str(src), "--out", str(local), "--local",
         "-q"],
        env=env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    want = ad.read_h5ad(local).obs["cellexplain_label"].astype(str).tolist()
    assert labels["rest"] == labels["grpc"] == want
    # no model store without the serve extra: `models list` lists what the service serves
    assert f"served by {url}" in listed and "pbmc-programs:" in listed
