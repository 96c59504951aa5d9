"""The ``cellexplain`` command line, run as a real process, with a real BentoML model store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.servers import REPO

pytestmark = pytest.mark.integration


def run_cli(
    *args: str, home: Path, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    proc = subprocess.run(
        [sys.executable, "-m", "cellexplain", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bentoml_home")


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("art") / "cli-linear"
    proc = run_cli(
        "train",
        "--arch",
        "linear",
        "--max-epochs",
        "25",
        "--name",
        "cli-linear",
        "--out",
        str(out),
        "--import",
        "-q",
        home=store,
    )
    assert "input detected as log1p_cp10k" in proc.stdout
    assert "macro-F1" in proc.stdout and "logistic regression" in proc.stdout
    assert "imported into the BentoML store as cli-linear:" in proc.stdout
    return out


def test_train_import_list_show(trained, store):
    assert (trained / "model.onnx").is_file() and (trained / "model.json").is_file()
    listed = run_cli("models", "list", home=store).stdout
    assert "cli-linear:" in listed and "linear" in listed
    card = json.loads(run_cli("models", "show", "cli-linear", "--json", home=store).stdout)
    brief = run_cli("models", "show", "cli-linear", home=store).stdout
    assert len(brief.splitlines()) < 20 and "macro-F1" in brief and "--json" in brief
    assert card["name"] == "cli-linear"
    assert (
        card["onnx"]["sha256"] == json.loads((trained / "model.json").read_text())["onnx"]["sha256"]
    )
    # the store holds only the ONNX graph and the JSON card: nothing to unpickle
    stored = [p for p in (store / "models" / "cli-linear").rglob("*") if p.is_file()]
    names = {p.name for p in stored}
    assert {"model.onnx", "model.json"} <= names
    assert not any(n.endswith((".pkl", ".pickle", ".pt", ".pth")) for n in names)


def test_tampered_store_model_is_refused(trained, store, tmp_path):
    tag = run_cli("models", "import", str(trained), "--name", "cli-tampered", home=store)
    assert tag.stdout.startswith("cli-tampered:")
    onnx_file = next((store / "models" / "cli-tampered").rglob("model.onnx"))
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    proc = run_cli("models", "show", "cli-tampered", home=store, check=False)
    assert proc.returncode == 2
    assert "sha256" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--data", "missing.h5ad", "--label-key", "x"], "data file not found"),
        (["train", "--data", "missing.h5ad"], "--label-key is required"),
        (["train", "--name", "Bad Name!"], "invalid model name"),
        (["train", "--arch", "mlp", "--steps", "0"], "n_steps must be >= 1"),
        (["train", "--max-epochs", "0"], "must be at least 1, got 0"),
        (["train", "--patience", "-1"], "must be at least 1, got -1"),
        (["train", "--n-top-genes", "-5"], "must be at least 1, got -5"),
        (["train", "--min-cells-per-class", "1"], "must be at least 2, got 1"),
        (["train", "--n-free", "-1"], "must be at least 0, got -1"),
        (["train", "--dropout", "2"], "must be in [0, 1), got 2.0"),
        (["train", "--arch", "linear", "--l2", "0"], "finite number above 0, got 0.0"),
        (["train", "--arch", "mlp", "--l2", "0.1"], "--l2 is for --arch linear, not mlp"),
        (["train", "--data", "docs", "--label-key", "x"], "docs is a folder, not an .h5ad"),
        (["train", "--data", "README.md", "--label-key", "x"], "not an .h5ad file (not HDF5)"),
        (["train", "--gene-sets", "x.gmt"], "gene-set file not found: x.gmt"),
        (["train", "--arch", "mlp", "--gene-sets", "x.gmt"], "--gene-sets is for --arch programs"),
        (["train", "--out", "README.md"], "README.md exists and is not a folder"),
        (["train", "--out", "README.md/model"], "cannot write README.md/model"),
        (["models", "import", "."], "is not a model artifact"),
        (["models", "show", "no-such-model"], "not in the BentoML store"),
    ],
)
def test_errors_are_clear(args, message, store):
    """A mistake is one line, exit 2; those of `train` are told before torch is imported (the
    training stack is not loaded: a second, not ten) and before any cell is read."""
    proc = run_cli(*args, home=store, check=False, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_client_package_loads_its_clients_when_first_named():
    """`cellexplain --version` and usage errors load no anndata; the clients are still there,
    listed by dir()."""
    probe = (
        "import sys, cellexplain.client as c\n"
        "assert 'anndata' not in sys.modules and 'httpx' not in sys.modules\n"
        "assert {'Client', 'AsyncClient', 'ClientError', 'annotate'} <= set(dir(c))\n"
        "from cellexplain.client import Client\n"
        "assert Client.__module__ == 'cellexplain.client.remote' and 'anndata' in sys.modules\n"
        "try:\n    c.NoSuch\nexcept AttributeError:\n    print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_compare_prints_a_table(store):
    proc = run_cli("compare", "--archs", "linear", "--seeds", "1", "--max-epochs", "10", home=store)
    assert "| linear |" in proc.stdout
    assert "| logistic regression (baseline) |" in proc.stdout


def test_the_newcomers_path_after_make_serve(tmp_path):
    """`make default-model` (what `make serve` runs first), then the README's commands from a
    plain shell that sets nothing: the CLI finds the model make stored."""
    env = {k: v for k, v in os.environ.items() if k != "BENTOML_HOME"}
    env |= {"HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "True"}
    make = subprocess.run(
        ["make", "-s", "default-model"], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert make.returncode == 0, make.stdout + make.stderr
    cli = [str(REPO / ".venv" / "bin" / "cellexplain")]
    listed = subprocess.run([*cli, "models", "list"], env=env, capture_output=True, text=True)
    assert listed.returncode == 0 and "pbmc-programs" in listed.stdout, listed.stderr
    import anndata as ad
    import numpy as np
    import scanpy as sc

    pbmc = sc.datasets.pbmc68k_reduced()
    raw = pbmc.raw.to_adata()[:50]
    counts = np.rint(np.expm1(raw.X.toarray()) * 3).astype(np.float32)
    src = tmp_path / "cells.h5ad"
    ad.AnnData(counts, var=raw.var).write_h5ad(src)
    out = tmp_path / "cells.annotated.h5ad"
    run = subprocess.run(
        [*cli, "annotate", str(src), "--out", str(out), "--local"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert ad.read_h5ad(out).obs["cellexplain_label"].notna().all()
    for stream in (run.stdout, run.stderr, listed.stderr):
        assert "Traceback" not in stream and "Warning" not in stream, stream


def test_a_labs_model_takes_its_own_name_and_never_replaces_a_tag_unasked(store, pbmc, tmp_path):
    """Trained on a lab's file, a model is named from the file, the label key and the
    architecture (not the demo's pbmc-ARCH, which the default server serves); a second model
    under a stored name is refused without --force, added as its latest with it; delete
    removes a version, or a name's every version only when asked."""
    data = tmp_path / "Lung Atlas.h5ad"
    pbmc.raw.to_adata().write_h5ad(data)
    common = ["--arch", "linear", "--data", str(data), "--import", "-q"]
    first = run_cli("train", *common, "--label-key", "bulk_labels", "--out", str(tmp_path / "a"),
                    home=store)  # fmt: skip
    assert "imported into the BentoML store as lung-atlas-bulk_labels-linear:" in first.stdout
    # another model (another L2) under the same name: refused, the store unchanged
    again = [*common, "--label-key", "bulk_labels", "--l2", "0.1", "--out", str(tmp_path / "b")]
    refused = run_cli("train", *again, home=store, check=False)
    assert refused.returncode == 2 and "--force" in refused.stderr
    assert "already holds lung-atlas-bulk_labels-linear" in refused.stderr
    listed = run_cli("models", "list", home=store).stdout
    assert listed.count("lung-atlas-bulk_labels-linear:") == 1
    forced = run_cli("train", *again, "--force", home=store)
    second = forced.stdout.split("imported into the BentoML store as ")[1].split()[0]
    listed = run_cli("models", "list", home=store).stdout
    assert listed.count("lung-atlas-bulk_labels-linear:") == 2
    card = json.loads(
        run_cli("models", "show", "lung-atlas-bulk_labels-linear", "--json", home=store).stdout
    )
    assert card["architecture"]["l2"] == 0.1  # the latest is the forced one
    # delete: a bare name is every version, only when asked
    bare = run_cli("models", "delete", "lung-atlas-bulk_labels-linear", home=store, check=False)
    assert bare.returncode == 2 and "--all-versions" in bare.stderr
    assert run_cli("models", "delete", second, home=store).stdout.strip() == f"deleted {second}"
    listed = run_cli("models", "list", home=store).stdout
    assert listed.count("lung-atlas-bulk_labels-linear:") == 1
    out = run_cli("models", "delete", "lung-atlas-bulk_labels-linear", "--all-versions",
                  home=store).stdout  # fmt: skip
    assert out.count("deleted ") == 1
    assert "lung-atlas-bulk_labels-linear" not in run_cli("models", "list", home=store).stdout
    missing = run_cli("models", "delete", "nope:123", home=store, check=False)
    assert missing.returncode == 2 and "not in the BentoML store" in missing.stderr
