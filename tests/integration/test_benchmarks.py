"""The GPU benchmark's steps, dry-run on the CPU provider (``--device cpu``), so that the script
a GPU machine runs from prepared artifacts keeps working where CI has no GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpu_bench")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "prepare", str(folder), "--max-epochs", "20"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return folder


def test_prepare_exports_every_graph_and_the_cells(prepared):
    from benchmarks.gpu import CELLS, GRAPHS, LAYERS, PREDICT_ONLY

    for name, _, _ in GRAPHS:
        for precision in ("float32", "float16"):
            assert (prepared / f"{name}-{precision}" / "model.onnx").is_file()
            assert (prepared / f"{name}-{precision}" / "model.json").is_file()
    assert (prepared / PREDICT_ONLY).is_file()
    X = np.load(prepared / CELLS)
    assert X.ndim == 2 and X.shape[1] == 765 and np.isfinite(X).all()
    assert len(np.load(prepared / LAYERS).files) % 2 == 0


def test_dry_run_checks_times_and_compares_with_captum(prepared, tmp_path):
    report = tmp_path / "gpu.md"
    out = subprocess.run(
        [
            *(sys.executable, "-m", "benchmarks.gpu", "run", str(prepared), "--device", "cpu"),
            *("--batches", "1", "64", "--min-seconds", "0.01", "--out", str(report)),
            *("--profile", str(tmp_path / "prof")),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    text = report.read_text()
    assert "FAILED" not in text
    assert text.count("IO binding gives the same outputs as run()") == 4
    assert "| IG 32 steps float16 |" in text and "| prediction only |" in text
    # torch + Captum on the same network: same attributions (rebuilt from layers.npz)
    rows = [ln for ln in text.splitlines() if ln.startswith("| IG 32 steps |")]
    assert len(rows) == 1
    error = float(rows[0].rstrip(" |").split("|")[-1])
    assert error < 1e-4
    assert "kernel time per call by provider" in text
    assert any((tmp_path / "prof").glob("ort_profile*.json"))


def benchmark(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` from the repository, which must succeed."""
    out = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_accuracy_benchmark_scores_ours_and_the_baseline_on_the_same_split():
    """The accuracy benchmark's own path (CellTypist left out: its venv needs the network)."""
    out = benchmark("benchmarks.accuracy", "--seeds", "1", "--archs", "linear", "--no-celltypist")
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| linear")]
    assert len(rows) == 2  # the scores, then the calibration
    accuracy, macro_f1 = (float(cell.split("±")[0]) for cell in rows[0].split("|")[2:4])
    assert 0.6 < accuracy <= 1 and 0.4 < macro_f1 <= 1
    uncalibrated, served, temperature = (float(c.split("+-")[0]) for c in rows[1].split("|")[2:5])
    assert 0 <= served <= 0.3 and 0 <= uncalibrated <= 0.3 and 0.05 < temperature < 20
    assert "| logistic regression (our baseline)" in out.stdout


def test_novelty_benchmark_tells_held_out_types_from_known_ones():
    """Its own path, on one split and one architecture (CellTypist left out: its venv)."""
    out = benchmark("benchmarks.novelty", "--seeds", "1", "--archs", "linear", "--no-celltypist")
    (row,) = [ln for ln in out.stdout.splitlines() if ln.startswith("| linear")]
    novelty, confidence = (float(cell.split("+-")[0]) for cell in row.split("|")[2:4])
    assert novelty > 0.85 and novelty > confidence + 0.2, row


def test_evidence_benchmark_deletes_the_served_genes_with_effect():
    out = benchmark("benchmarks.evidence", "--seeds", "1", "--archs", "linear", "--k", "5")
    auc = {
        cells[2].strip(): (float(cells[3]), float(cells[4]))
        for cells in (ln.split("|") for ln in out.stdout.splitlines())
        if len(cells) == 6 and cells[1].strip() == "linear"
    }
    # deleting the served evidence lowers the call's probability more than random genes do;
    # inserting it alone raises it more
    assert auc["served (top_genes)"][0] < auc["random"][0]
    assert auc["served (top_genes)"][1] > auc["random"][1]


def test_the_floor_server_reads_each_body_and_answers_the_bytes_it_is_given(tmp_path):
    """``benchmarks.bare_http`` (the serving benchmark's floor) is a real uvicorn server that
    answers whatever bytes it is given, with the OIP binary answer's headers, to bodies of any
    size."""
    import httpx

    from benchmarks.bare_http import bare_server

    answer = bytes(range(256)) * 4000
    with bare_server(answer, 17, 1, tmp_path) as (url, pid):
        assert pid > 0
        for body in (b"", b"x" * 3_000_000):
            r = httpx.post(url + "/v2/models/m/infer", content=body, timeout=60)
            assert r.status_code == 200
            assert r.content == answer
            assert r.headers["inference-header-content-length"] == "17"


def test_the_paired_comparison_is_per_split():
    """Differences are taken split by split: a model level on average but ahead on every
    split of a varying difficulty gets a large paired t."""
    from benchmarks.accuracy import paired_table

    ref = [0.60, 0.70, 0.80, 0.65]
    results = {
        "CellTypist 1.7.1": [(0.0, f) for f in ref],
        "ours": [(0.0, f + d) for f, d in zip(ref, [0.01, 0.02, 0.01, 0.02], strict=True)],
        "shuffled": [(0.0, f) for f in reversed(ref)],
    }
    rows = {r.split("|")[1].strip(): r for r in paired_table(results, "CellTypist 1.7.1")[4:]}
    ours = [c.strip() for c in rows["ours"].split("|")[2:6]]
    assert ours[0] == "+0.015 +- 0.006" and ours[1] == "4/4" and float(ours[2]) > 5
    shuffled = [c.strip() for c in rows["shuffled"].split("|")[2:6]]
    assert shuffled[0].startswith("+0.000") and float(shuffled[3]) > 0.9


def test_peer_serving_benchmark_drives_kserve_and_us_with_the_same_load(tmp_path):
    """``benchmarks.peer_serving``, briefly: our server and KServe's Python server (its own
    venv, onnxruntime as ours) answer the same tritonclient calls on the same graph, and the
    rows compare them (MLServer is left to the benchmark itself: one more venv to install)."""
    out_json = tmp_path / "peers.json"
    out = benchmark("benchmarks.peer_serving", "--peers", "kserve", "--cells", "64",
                    "--clients", "1", "--seconds", "1", "--threads", "1",
                    "--json", str(out_json))  # fmt: skip
    doors = [r["door"] for r in json.loads(out_json.read_text())["rows"]]
    for server in ("cellexplain", "kserve"):
        assert (
            f"{server} OIP REST /v2 (binary)" in doors and f"{server} OIP gRPC ModelInfer" in doors
        )
    assert out.stdout.count("x of ours") == 2
