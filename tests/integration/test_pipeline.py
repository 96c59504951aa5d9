"""`cellexplain annotate` and the Python client on real .h5ad files, against a real server and
in-process (--local)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import tritonclient.grpc  # noqa: F401  (our gRPC client must work beside Triton's)

from cellexplain.client.remote import AsyncClient, Client, ClientError, annotate
from tests.integration.servers import REPO, bentoml_server, free_port

pytestmark = pytest.mark.integration
MODEL = "pbmc-programs"


@pytest.fixture(scope="module")
def server(programs_home):
    with bentoml_server(programs_home, {"CELLEXPLAIN_MODELS": MODEL}) as srv:
        yield srv


@pytest.fixture(scope="module")
def files(pbmc, tmp_path_factory):
    """The bundled PBMCs as .h5ad in several forms: counts (sparse and dense), log1p in .raw."""
    d = tmp_path_factory.mktemp("files")
    raw = pbmc.raw.to_adata()
    x = raw.X.toarray()
    counts = np.rint(np.expm1(x) * (pbmc.obs["n_counts"].to_numpy()[:, None] / 1e4))
    obs = pbmc.obs[["bulk_labels", "louvain"]].copy()
    out = {}
    a = ad.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=raw.var[[]].copy())
    a.write_h5ad(out.setdefault("counts_sparse", d / "counts_sparse.h5ad"))
    a.X = counts.astype(np.float32)
    a.write_h5ad(out.setdefault("counts_dense", d / "counts_dense.h5ad"))
    pbmc.write_h5ad(out.setdefault("log1p_raw", d / "pbmc_raw.h5ad"))  # .raw: log1p, X: scaled
    n = ad.AnnData(x.astype(np.float32), obs=obs, var=raw.var[[]].copy())
    n.var["symbol"] = list(n.var_names)
    n.var_names = [f"g{i}" for i in range(n.n_vars)]
    n.write_h5ad(out.setdefault("log1p_gene_key", d / "log1p_gene_key.h5ad"))
    return out


def cli(*args: str, home: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    proc = subprocess.run(
        [sys.executable, "-m", "cellexplain", "annotate", *args, "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=REPO,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def read(path: Path) -> ad.AnnData:
    return ad.read_h5ad(path)


@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("counts_sparse", []),
        ("counts_dense", []),
        ("log1p_raw", ["--layer", "raw"]),
        ("log1p_gene_key", ["--gene-key", "symbol"]),
    ],
)
def test_remote_and_local_agree(kind, extra, files, server, programs_home, tmp_path):
    src = files[kind]
    before = src.read_bytes()
    remote, local = tmp_path / "remote.h5ad", tmp_path / "local.h5ad"
    out = cli(
        str(src),
        "--out",
        str(remote),
        "--url",
        server.url,
        "--chunk-size",
        "150",
        "--concurrency",
        "3",
        "--cluster-key",
        "louvain",
        *extra,
        home=programs_home,
    )
    assert "annotated 700 cells" in out.stdout
    cli(str(src), "--out", str(local), "--local", "--chunk-size", "256", *extra, home=programs_home)
    assert src.read_bytes() == before  # the input is never modified
    r, loc = read(remote), read(local)
    assert r.n_obs == 700 and list(r.obs_names) == list(loc.obs_names)
    for col in ("cellexplain_label", "cellexplain_predicted_label", "cellexplain_top_genes"):
        assert (r.obs[col].astype(str) == loc.obs[col].astype(str)).all(), col
    np.testing.assert_allclose(
        r.obs["cellexplain_confidence"], loc.obs["cellexplain_confidence"], rtol=1e-6
    )
    assert r.uns["cellexplain"]["input_kind"] == ("counts" if "counts" in kind else "log1p_cp10k")
    assert r.uns["cellexplain"]["gene_matching"]["n_found"] == 765
    assert len(r.obs["cellexplain_top_genes"].iloc[0].split(";")) == 10
    # majority voting over the given clusters: one label per cluster
    voted = r.obs.groupby("louvain", observed=True)["cellexplain_majority_voting"].nunique()
    assert (voted == 1).all()
    assert (
        (r.obs["cellexplain_majority_fraction"] > 0) & (r.obs["cellexplain_majority_fraction"] <= 1)
    ).all()
    # the original data and annotations are kept
    assert (r.obs["bulk_labels"] == loc.obs["bulk_labels"]).all()
    agree = r.obs["cellexplain_predicted_label"].astype(str) == r.obs["bulk_labels"].astype(str)
    assert agree.mean() > 0.8


def test_grpc_transport_and_full_attributions(files, server, programs_home, tmp_path):
    rest, grpc_out = tmp_path / "rest.h5ad", tmp_path / "grpc.h5ad"
    common = ["--url", server.url, "--attributions", "full", "--chunk-size", "200"]
    cli(str(files["counts_sparse"]), "--out", str(rest), *common, home=programs_home)
    cli(
        str(files["counts_sparse"]),
        "--out",
        str(grpc_out),
        *common,
        "--transport",
        "grpc",
        "--grpc",
        server.grpc,
        home=programs_home,
    )
    r, g = read(rest), read(grpc_out)
    assert r.obsm["cellexplain_attributions"].shape == (700, 765)
    assert r.obsm["cellexplain_program_attributions"].shape[0] == 700
    np.testing.assert_allclose(
        r.obsm["cellexplain_attributions"], g.obsm["cellexplain_attributions"], rtol=1e-5, atol=1e-7
    )
    assert (r.obs["cellexplain_label"] == g.obs["cellexplain_label"]).all()
    assert list(r.uns["cellexplain"]["genes"]) == list(read(files["counts_sparse"]).var_names)


def test_python_client_sync_and_async(files, server, tmp_path):
    cli_out = tmp_path / "cli.h5ad"
    adata = read(files["counts_sparse"])
    annotate(adata, url=server.url, chunk_size=300, attributions="full")
    assert adata.obsm["cellexplain_attributions"].shape == (700, 765)
    assert "cellexplain_label" in adata.obs and adata.uns["cellexplain"]["model"] == MODEL

    async def run():
        async with AsyncClient(server.url, transport="grpc", grpc_target=server.grpc) as c:
            other = read(files["counts_sparse"])
            await c.annotate(other, attributions="top_k", top_k=3, chunk_size=250)
            return other

    other = asyncio.run(run())
    assert (other.obs["cellexplain_label"] == adata.obs["cellexplain_label"]).all()
    assert all(len(t.split(";")) == 3 for t in other.obs["cellexplain_top_genes"])
    with Client(server.url) as c:
        assert [m.name for m in c.models().models] == [MODEL]
        with pytest.raises(ClientError) as e:
            c.annotate(read(files["counts_sparse"]), model="nope")
        assert e.value.status == 404 and "unknown model" in str(e.value)
    # gRPC needs no REST port (the model's card comes over GetModel), and its errors carry the
    # request field as REST's do
    with Client("http://127.0.0.1:9", transport="grpc", grpc_target=server.grpc) as c:
        alone = c.annotate(read(files["counts_sparse"]), chunk_size=350)
        assert (alone.obs["cellexplain_label"] == adata.obs["cellexplain_label"]).all()
        with pytest.raises(ClientError) as e:
            c.annotate(read(files["counts_sparse"]), model="nope")
        assert e.value.status == "NOT_FOUND" and e.value.field == "model"
    del cli_out


def test_client_retries_until_the_service_answers(server, tmp_path):
    """A real flaky front: a proxy that answers 503 to the first two requests, then forwards
    to the real server."""
    import http.server
    import urllib.request

    calls = {"n": 0}

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            calls["n"] += 1
            if calls["n"] <= 2:
                self.send_response(503)
                self.end_headers()
                return
            with urllib.request.urlopen(server.url + self.path) as r:
                body = r.read()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    port = free_port()
    proxy = http.server.HTTPServer(("127.0.0.1", port), Flaky)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        with Client(f"http://127.0.0.1:{port}", retries=3, backoff=0.05) as c:
            assert [m.name for m in c.models().models] == [MODEL]
        assert calls["n"] == 3
        calls["n"] = -10  # ten 503s in a row: more than the retries
        with (
            Client(f"http://127.0.0.1:{port}", retries=2, backoff=0.01) as c,
            pytest.raises(ClientError, match="unavailable after 3 attempts"),
        ):
            c.models()
    finally:
        proxy.shutdown()


def test_interrupted_run_leaves_no_output(files, programs_home, tmp_path):
    big = tmp_path / "big.h5ad"
    a = read(files["counts_sparse"])
    ad.concat([a] * 100, index_unique="-").write_h5ad(big)  # 70,000 cells
    out = tmp_path / "out.h5ad"
    out.write_text("an earlier result")
    env = {**os.environ, "BENTOML_HOME": str(programs_home), "BENTOML_DO_NOT_TRACK": "True"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cellexplain",
            "annotate",
            str(big),
            "--out",
            str(out),
            "--local",
            "--force",
            "--chunk-size",
            "50",
            "--concurrency",
            "1",
            "--attributions",
            "full",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.h5ad.partial-*")):  # wait until it is writing
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "no output written" in err
    assert out.read_text() == "an earlier result"  # not clobbered
    assert not list(tmp_path.glob(".out.h5ad.partial-*"))  # nothing half-written left


def test_a_bad_value_is_named_by_its_row_in_the_file(files, server, programs_home, tmp_path):
    """A negative count at row 25 of the file, sent in chunks of 10: every transport names that
    cell (by its row, or its id), not its place in the chunk."""
    a = read(files["counts_sparse"])[:40].copy()
    a.X = a.X.toarray()
    a.X[25, 3] = -2
    src = tmp_path / "neg.h5ad"
    a.write_h5ad(src)
    name = str(a.obs_names[25])
    for where in (["--local"], ["--url", server.url], ["--url", server.url, "--transport", "grpc",
                  "--grpc", server.grpc]):  # fmt: skip
        p = cli(str(src), "--out", str(tmp_path / "o.h5ad"), "--chunk-size", "10", *where,
                home=programs_home, check=False)  # fmt: skip
        assert p.returncode == 2, p.stderr
        assert name in p.stderr and "negative" in p.stderr, p.stderr
        if where == ["--local"]:
            assert "(row 25)" in p.stderr, p.stderr


def test_bad_files_get_clear_errors(files, programs_home, tmp_path):
    junk = tmp_path / "junk.h5ad"
    junk.write_text("not hdf5")
    p = cli(
        str(junk), "--out", str(tmp_path / "o.h5ad"), "--local", home=programs_home, check=False
    )
    assert p.returncode == 2 and "not a readable .h5ad" in p.stderr
    p = cli(
        str(files["counts_sparse"]),
        "--out",
        str(files["counts_sparse"]),
        "--local",
        home=programs_home,
        check=False,
    )
    assert p.returncode == 2 and "input is never modified" in p.stderr
    p = cli(
        str(files["counts_sparse"]),
        "--out",
        str(tmp_path / "o.h5ad"),
        "--local",
        "--layer",
        "spliced",
        home=programs_home,
        check=False,
    )
    assert p.returncode == 2 and "layer 'spliced' not found" in p.stderr
    p = cli(
        str(files["log1p_gene_key"]),
        "--out",
        str(tmp_path / "o.h5ad"),
        "--local",
        home=programs_home,
        check=False,
    )  # var names g0, g1, ...: no overlap without --gene-key
    assert p.returncode == 2 and "matches any of the model's 765 genes" in p.stderr
    csc = tmp_path / "csc.h5ad"
    a = read(files["counts_sparse"])
    a.X = sp.csc_matrix(a.X)
    a.write_h5ad(csc)
    # column-major (CSC) cannot be read a chunk of rows at a time: it is read whole, and
    # annotated like the same cells stored CSR
    cli(str(csc), "--out", str(tmp_path / "csc_out.h5ad"), "--local", home=programs_home)
    cli(str(files["counts_sparse"]), "--out", str(tmp_path / "csr_out.h5ad"), "--local",
        home=programs_home)  # fmt: skip
    got, want = (read(tmp_path / f"{k}_out.h5ad").obs["cellexplain_label"] for k in ("csc", "csr"))
    assert (got == want).all()
    scaled = cli(
        str(files["log1p_raw"]),
        "--out",
        str(tmp_path / "o.h5ad"),
        "--local",
        home=programs_home,
        check=False,
    )  # X holds z-scores
    assert scaled.returncode == 2 and "negative" in scaled.stderr
    assert "scaled data?" in scaled.stderr and "--layer raw" in scaled.stderr  # what to do
    assert not (tmp_path / "o.h5ad").exists()


def test_report_pictures(files, programs_home, tmp_path):
    from PIL import Image

    annotated = tmp_path / "annotated.h5ad"
    cli(
        str(files["counts_sparse"]),
        "--out",
        str(annotated),
        "--local",
        "--attributions",
        "full",
        home=programs_home,
    )
    env = {**os.environ, "BENTOML_HOME": str(programs_home)}
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "cellexplain", "report", *a],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    p = run(str(annotated), "--out", str(tmp_path / "report.html"))
    assert p.returncode == 0, p.stderr
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5
    assert "pbmc-programs" in page and "700" in page
    p = run(str(annotated), "--out", str(tmp_path / "png"), "--png")
    names = sorted(x.name for x in (tmp_path / "png").glob("*.png"))
    assert names == [
        "composition.png",
        "confidence.png",
        "genes.png",
        "heatmap.png",
        "programs.png",
    ]
    for name in names:
        with Image.open(tmp_path / "png" / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
            assert len(set(im.convert("L").getdata())) > 10  # a picture, not a blank
    # a top-k-only file still gets gene charts (from how often genes are among the top ones)
    topk = tmp_path / "topk.h5ad"
    cli(str(files["counts_sparse"]), "--out", str(topk), "--local", home=programs_home)
    p = run(str(topk), "--out", str(tmp_path / "png2"), "--png")
    assert p.returncode == 0 and (tmp_path / "png2" / "genes.png").is_file()
    # ... whose captions say they are shares of cells (not attributions), with n per type
    p = run(str(topk), "--out", str(tmp_path / "topk.html"))
    shares = (tmp_path / "topk.html").read_text()
    assert "share of the type" in shares and "Mean attribution" not in shares
    assert "(n: its cells)" in page and "mean attribution" in page.lower()
    p = run(str(files["counts_sparse"]), "--out", str(tmp_path / "x.html"))
    assert p.returncode == 2 and "annotate it first" in p.stderr


def test_malformed_sparse_input_is_refused_alike_by_every_transport(
    files, server, programs_home, tmp_path
):
    """Negative column indices: the gRPC transport used to send them as genes counted from the
    end (a 200, silently wrong) where --local and REST refused them."""
    from tests.integration.hostile_inputs import bad_sparse_indices

    a = read(files["counts_sparse"])[:30].copy()
    src = bad_sparse_indices(a, tmp_path / "neg-index.h5ad", -5)
    answers = []
    for where in (["--local"], ["--url", server.url], ["--url", server.url, "--transport", "grpc",
                  "--grpc", server.grpc]):  # fmt: skip
        out = tmp_path / "o.h5ad"
        p = cli(str(src), "--out", str(out), *where, home=programs_home, check=False)
        assert p.returncode == 2, (where, p.stdout, p.stderr)
        assert "malformed" in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert not out.exists() and not list(tmp_path.glob(".o.h5ad.partial-*"))
        answers.append(p.stderr)
    assert len(set(answers)) == 1, answers


def test_obsm_stored_as_a_dataset_is_one_line_and_leaves_no_partial_file(
    files, programs_home, tmp_path
):
    import h5py

    src = tmp_path / "obsm-dataset.h5ad"
    src.write_bytes(Path(files["counts_sparse"]).read_bytes())
    with h5py.File(src, "a") as f:
        del f["obsm"]
        f["obsm"] = np.zeros(3)
    p = cli(str(src), "--out", str(tmp_path / "o.h5ad"), "--local", home=programs_home, check=False)
    assert p.returncode == 2 and "obsm is stored as a Dataset" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["obsm-dataset.h5ad"]


@pytest.mark.parametrize("kind", ["external-link", "external-storage"])
def test_local_files_that_point_outside_are_refused_unless_allowed(
    files, programs_home, tmp_path, kind
):
    """An obs column whose data live in another file: the CLI copied that file's bytes into its
    output. Refused by default (as the upload door refuses it); --allow-external-data reads it."""
    from tests.integration import hostile_inputs as hostile

    secret = tmp_path / "secret.txt"
    secret.write_text("lab-notebook-secret " * 300)
    a = read(files["counts_sparse"])[:20].copy()
    src = tmp_path / "outside.h5ad"
    if kind == "external-link":
        other = tmp_path / "other.h5ad"
        a.write_h5ad(other)
        hostile.external_link(a, src, str(other))
        expected = "external link"
    else:
        hostile.external_storage(a, src, str(secret))
        expected = "external files"
    out = tmp_path / "o.h5ad"
    p = cli(str(src), "--out", str(out), "--local", home=programs_home, check=False)
    assert p.returncode == 2 and expected in p.stderr and "--allow-external-data" in p.stderr
    assert not out.exists() and "Traceback" not in p.stderr
    p = cli(str(src), "--out", str(out), "--local", "--allow-external-data", home=programs_home)
    assert out.exists()


@pytest.mark.parametrize("name", ["truncated", "zeroed-superblock-tail", "garbage-obs"])
def test_damaged_files_end_in_one_line_not_a_traceback(files, programs_home, tmp_path, name):
    import h5py

    src = tmp_path / f"{name}.h5ad"
    data = Path(files["counts_sparse"]).read_bytes()
    if name == "truncated":
        src.write_bytes(data[: len(data) // 2])
    elif name == "zeroed-superblock-tail":
        src.write_bytes(data[:64] + bytes(4096) + data[64 + 4096 :])
    else:
        src.write_bytes(data)
        with h5py.File(src, "a") as f:
            del f["obs"]
            f["obs"] = np.arange(5)
    out = tmp_path / "o.h5ad"
    p = cli(str(src), "--out", str(out), "--local", home=programs_home, check=False)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.startswith("error: ") and "Traceback" not in p.stderr, p.stderr
    assert not out.exists() and not list(tmp_path.glob(".o.h5ad.partial-*"))


def test_the_annotated_file_plots_in_scanpy_as_it_is(files, programs_home, tmp_path):
    """B and NK cells only: the label categoricals hold the types that occur (and Unassigned),
    their colours are in uns (Unassigned grey, each class its model-wide colour), and scanpy's
    plots and marker ranking run on the label column without any clean-up."""
    import matplotlib

    matplotlib.use("Agg")
    import scanpy as sc

    from cellexplain.api.annotations import PALETTE, UNASSIGNED_COLOR

    full = read(files["counts_sparse"])
    subset = full[full.obs["bulk_labels"].isin(["CD19+ B", "CD56+ NK"])].copy()
    src, out = tmp_path / "bnk.h5ad", tmp_path / "bnk.annotated.h5ad"
    subset.write_h5ad(src)
    cli(str(src), "--out", str(out), "--local", "--cluster-key", "louvain", home=programs_home)
    a = read(out)
    label = a.obs["cellexplain_label"]
    classes = list(a.uns["cellexplain"]["classes"])
    assert set(label.cat.categories) == set(label.astype(str))  # only what occurs
    assert len(label.cat.categories) < len(classes)
    colors = list(a.uns["cellexplain_label_colors"])
    for category, color in zip(label.cat.categories, colors, strict=True):
        want = UNASSIGNED_COLOR if category == "Unassigned" else PALETTE[classes.index(category)]
        assert color == want
    assert "cellexplain_majority_voting_colors" in a.uns
    sc.pp.normalize_total(a)
    sc.pp.log1p(a)
    keep = label.value_counts()
    a = a[a.obs["cellexplain_label"].isin(keep[keep >= 2].index)].copy()
    a.obs["cellexplain_label"] = a.obs["cellexplain_label"].cat.remove_unused_categories()
    sc.pl.dotplot(a, ["CD79A", "NKG7"], groupby="cellexplain_label", show=False)
    sc.pl.matrixplot(a, ["CD79A", "NKG7"], groupby="cellexplain_label", show=False)
    sc.tl.rank_genes_groups(a, "cellexplain_label", method="t-test")
    assert "names" in a.uns["rank_genes_groups"]
