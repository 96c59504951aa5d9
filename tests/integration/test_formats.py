"""The files labs have (10x HDF5 and Matrix Market, Loom, Zarr, CSV/TSV; tests/lab_files.py
writes them as their tools do), read by their real readers, annotated by the CLI, the pipeline
and the Python client like the same cells in an .h5ad; the upload door names what it does not
read; chunks sized by the server's announced limits."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import httpx
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cellexplain.api.errors import InvalidInputError
from cellexplain.api.formats import detect
from cellexplain.api.schemas import AnnotateOptions
from cellexplain.client.pipeline import LocalBackend, annotate_file
from cellexplain.client.readers import default_output, read
from cellexplain.client.remote import AsyncClient, Client, ClientError
from tests.integration.servers import REPO, bentoml_server
from tests.lab_files import ANTIBODIES, write_all

pytestmark = pytest.mark.integration
GENCODE = REPO / "service" / "resources" / "gencode_v44_human_gene_id2name.csv.gz"
#: the server's body limit here: small, so that chunk sizing is tested on small files
BODY_BYTES = 2 * 1024**2
DETECTED = {
    "10x_mtx_v2": "10x_mtx",
    "10x_mtx_file": "10x_mtx",
    "tsv_gz": "tsv",
    "csv_genes_as_rows": "csv",
}


@pytest.fixture(scope="module")
def lab(pbmc, tmp_path_factory):
    """The bundled PBMCs as raw counts in every format, genes with their GENCODE IDs (made-up
    IDs for the 65 symbols GENCODE v44 no longer lists), plus the same cells as an .h5ad."""
    raw = pbmc.raw.to_adata()
    counts = np.rint(np.expm1(raw.X.toarray()) * (pbmc.obs["n_counts"].to_numpy()[:, None] / 1e4))
    counts = sp.csr_matrix(counts.astype(np.float32))
    names = [str(g) for g in raw.var_names]
    table = pd.read_csv(GENCODE).drop_duplicates("gene_name").set_index("gene_name")["gene_id"]
    ids = [table.get(g, f"ENSG99{i:09d}") for i, g in enumerate(names)]
    barcodes = [str(b) for b in pbmc.obs_names]
    d = tmp_path_factory.mktemp("lab")
    files = write_all(d, counts, barcodes, ids, names)
    h5ad = d / "same_cells.h5ad"
    ad.AnnData(counts, obs=pd.DataFrame(index=barcodes), var=pd.DataFrame(index=names)).write_h5ad(
        h5ad
    )
    return {
        "files": files,
        "counts": counts,
        "names": names,
        "ids": ids,
        "barcodes": barcodes,
        "h5ad": h5ad,
        "dir": d,
    }


@pytest.mark.parametrize(
    "kind", [*DETECTED, "10x_h5", "10x_h5_v2", "10x_mtx", "loom", "zarr", "csv"]
)
def test_every_format_reads_back_its_counts_through_its_real_reader(lab, kind):
    path = lab["files"][kind]
    assert detect(path) == DETECTED.get(kind, kind)
    a = read(path, transpose=kind == "csv_genes_as_rows")
    X = a.X.toarray() if sp.issparse(a.X) else np.asarray(a.X)
    np.testing.assert_array_equal(X, lab["counts"].toarray())
    assert list(a.obs_names) == lab["barcodes"]
    assert [str(g) for g in a.var_names] == lab["names"]  # the antibodies dropped (10x)
    assert not set(ANTIBODIES) & set(a.var_names)
    if kind.startswith("10x"):
        assert list(a.var["gene_ids"]) == lab["ids"]


def _labels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    a = ad.read_h5ad(path) if path.suffix == ".h5ad" else ad.read_zarr(path)
    return a.obs["cellexplain_label"].to_numpy(), a.obs["cellexplain_confidence"].to_numpy()


@pytest.fixture(scope="module")
def local(programs_model):
    from cellexplain.service.core import Annotator
    from cellexplain.service.settings import Settings

    _, artifact = programs_model
    return Annotator.from_settings(Settings(models=[], model_dirs=[str(artifact)], workers=1))


@pytest.fixture(scope="module")
def reference(local, lab):
    out = lab["dir"] / "reference.cellexplain.h5ad"
    opts = AnnotateOptions()
    asyncio.run(annotate_file(LocalBackend(local), lab["h5ad"], out, opts, progress=False))
    return _labels(out)


@pytest.mark.parametrize(
    "kind",
    [
        "10x_h5",
        "10x_h5_v2",
        "10x_mtx",
        "10x_mtx_file",
        "loom",
        "zarr",
        "tsv_gz",
        "csv_genes_as_rows",
    ],
)
def test_every_format_annotates_like_the_same_cells_in_an_h5ad(local, lab, reference, kind):
    src = lab["files"][kind]
    out = default_output(src, detect(src) or "")
    out.unlink(missing_ok=True)
    stats = asyncio.run(
        annotate_file(
            LocalBackend(local),
            src,
            None,
            AnnotateOptions(),
            progress=False,
            transpose=kind == "csv_genes_as_rows",
        )
    )
    assert stats.output == out and out.exists()
    assert out.parent == (src.parent.parent if kind == "10x_mtx_file" else src.parent)
    assert out.suffix == (".zarr" if kind == "zarr" else ".h5ad")
    labels, confidence = _labels(out)
    np.testing.assert_array_equal(labels, reference[0])
    np.testing.assert_allclose(confidence, reference[1], atol=1e-6)
    kept = ad.read_zarr(out) if out.suffix == ".zarr" else ad.read_h5ad(out)  # the input, kept
    np.testing.assert_array_equal(
        kept.X.toarray() if sp.issparse(kept.X) else kept.X, lab["counts"].toarray()
    )
    assert "cellexplain_top_genes_attribution" in kept.obsm
    assert list(kept.uns["cellexplain_label_colors"])


def test_cli_reads_a_cell_ranger_h5_by_symbols_or_ids_and_converts_it(
    lab, programs_model, reference, tmp_path
):
    _, artifact = programs_model
    src = lab["files"]["10x_h5"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cellexplain", *args],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )

    by_ids = tmp_path / "by_ids.h5ad"
    proc = run(
        "annotate",
        str(src),
        "--local",
        "--model-dir",
        str(artifact),
        "--gene-key",
        "gene_ids",
        "--out",
        str(by_ids),
        "-q",
    )
    assert proc.returncode == 0, proc.stderr
    labels, _ = _labels(by_ids)
    # the 65 genes with made-up IDs are missing (the rest matched through GENCODE's IDs)
    assert (labels == reference[0]).mean() > 0.85
    info = ad.read_h5ad(by_ids).uns["cellexplain"]["gene_matching"]
    assert info["n_found"] == 700 and info["n_missing"] == 65, info
    converted = tmp_path / "converted.h5ad"
    proc = run("convert", str(src), str(converted))
    assert proc.returncode == 0, proc.stderr
    assert "700 cells x 765 genes" in proc.stdout
    a = ad.read_h5ad(converted)
    np.testing.assert_array_equal(a.X.toarray(), lab["counts"].toarray())
    proc = run("convert", str(src), str(converted))
    assert proc.returncode == 2 and "--force" in proc.stderr


def test_unreadable_inputs_say_what_they_are_and_what_is_read(lab, tmp_path, monkeypatch):
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(InvalidInputError, match=r"neither an AnnData \.zarr store nor a 10x"):
        read(empty)
    lone = tmp_path / "counts.mtx"
    lone.write_bytes((lab["files"]["10x_mtx_v2"] / "matrix.mtx").read_bytes())
    with pytest.raises(InvalidInputError, match=r"no gene names beside it.*features\.tsv\.gz"):
        read(lone)
    with pytest.raises(InvalidInputError, match="--transpose is for text tables"):
        read(lab["files"]["10x_h5"], transpose=True)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(InvalidInputError, match=r"not a readable \.h5 file.*readable: \.h5ad"):
        read(junk)
    monkeypatch.setitem(sys.modules, "scanpy", None)  # a client-only install: no scanpy
    with pytest.raises(InvalidInputError, match=r"scanpy.read_10x_h5, not installed.*\[formats\]"):
        read(lab["files"]["10x_h5"])


def test_a_genes_by_cells_table_read_as_cells_says_transpose(local, lab, tmp_path):
    with pytest.raises(InvalidInputError, match="--transpose"):
        asyncio.run(
            annotate_file(
                LocalBackend(local),
                lab["files"]["csv_genes_as_rows"],
                tmp_path / "o.h5ad",
                AnnotateOptions(),
                progress=False,
            )
        )
    assert not (tmp_path / "o.h5ad").exists()


@pytest.fixture(scope="module")
def small_server(programs_home):
    env = {"CELLEXPLAIN_MODELS": "pbmc-programs", "CELLEXPLAIN_MAX_BODY_BYTES": str(BODY_BYTES)}
    with bentoml_server(programs_home, env) as srv:
        yield srv


@pytest.mark.parametrize("kind", ["10x_h5", "10x_h5_v2", "loom", "csv", "10x_mtx_file"])
def test_the_upload_door_names_other_formats_and_the_command_that_reads_them(
    small_server, lab, kind
):
    path = lab["files"][kind]
    with path.open("rb") as f:
        r = httpx.post(
            f"{small_server.url}/v1/annotate/h5ad", files={"file": (path.name, f)}, timeout=60
        )
    assert r.status_code == 415, r.text
    err = r.json()["error"]
    assert err["type"] == "unsupported_format" and err["field"] == "file"
    assert "this door reads .h5ad only" in err["message"]
    assert "cellexplain annotate FILE --url" in err["message"]
    name = {"loom": "Loom", "csv": "comma-separated", "10x_mtx_file": "Matrix Market"}
    assert name.get(kind, "10x Genomics HDF5") in err["message"]


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_wide_dense_cells_need_no_chunk_flag(small_server, local, lab, tmp_path, transport):
    """700 dense cells x 6,000 genes are ~4x the server's 2 MiB body limit as JSON: chunks are
    sized from the limit the server announces; a --chunk-size that does not fit is refused by
    the server with a message naming the flag."""
    rng = np.random.default_rng(1)
    pad = rng.poisson(0.05, (700, 6000 - 765)).astype(np.float32)
    X = np.hstack([lab["counts"].toarray(), pad])
    genes = lab["names"] + [f"PAD{i}" for i in range(pad.shape[1])]
    src = tmp_path / "dense.h5ad"
    ad.AnnData(
        X, obs=pd.DataFrame(index=lab["barcodes"]), var=pd.DataFrame(index=genes)
    ).write_h5ad(src)

    async def run(out: Path, chunk_size: int | None) -> None:
        async with AsyncClient(
            small_server.url, transport=transport, grpc_target=small_server.grpc
        ) as client:
            detail = await client.model()
            assert detail.limits is not None and detail.limits.max_body_bytes == BODY_BYTES
            await annotate_file(
                client, src, out, AnnotateOptions(), progress=False, chunk_size=chunk_size
            )

    out = tmp_path / f"dense_{transport}.h5ad"
    asyncio.run(run(out, None))
    labels, _ = _labels(out)
    here = tmp_path / "dense_local.h5ad"
    asyncio.run(annotate_file(LocalBackend(local), src, here, AnnotateOptions(), progress=False))
    np.testing.assert_array_equal(labels, _labels(here)[0])
    with pytest.raises(ClientError, match="lower --chunk-size"):
        asyncio.run(run(tmp_path / "too_big.h5ad", 700))
    assert not (tmp_path / "too_big.h5ad").exists()
    # the Python client sizes its requests the same way
    a = ad.AnnData(X[:300], var=pd.DataFrame(index=genes))
    with Client(small_server.url, transport=transport, grpc_target=small_server.grpc) as c:
        c.annotate(a)
    np.testing.assert_array_equal(a.obs["cellexplain_label"].to_numpy(), labels[:300])


def test_models_list_asks_a_running_service(small_server):
    """A client-only install has no model store: `models list --url` (its default there)
    lists what the service serves."""
    proc = subprocess.run(
        [sys.executable, "-m", "cellexplain", "models", "list", "--url", small_server.url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"served by {small_server.url}" in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("pbmc-programs:"))
    assert "programs" in line and line.rstrip().endswith("yes")


def test_lab_file_pitfalls_get_one_line_each(lab, local, tmp_path, monkeypatch):
    """What an outside tester ran into: a barnyard (two-genome) 10x file, antibody-only
    features, a genes x cells table passed to convert, running from inside a 10x folder, and
    empty droplets."""
    from tests.lab_files import write_10x_h5

    counts, names, ids, barcodes = lab["counts"], lab["names"], lab["ids"], lab["barcodes"]
    # a barnyard reference: every gene twice, prefixed by its genome as Cell Ranger names them
    both = sp.hstack([counts, counts]).tocsr()
    barnyard = write_10x_h5(
        tmp_path / "barnyard.h5", both, barcodes,
        [f"GRCh38_{i}" for i in ids] + [f"mm10___{i}" for i in ids],
        [f"GRCh38_{n}" for n in names] + [f"mm10___{n}" for n in names],
    )  # fmt: skip
    import h5py

    with h5py.File(barnyard, "r+") as f:
        genome = f["matrix/features/genome"]
        values = [b"GRCh38"] * len(ids) + [b"mm10"] * len(ids) + [b"GRCh38"] * (
            genome.shape[0] - 2 * len(ids)
        )  # fmt: skip
        del f["matrix/features/genome"]
        f["matrix/features"].create_dataset("genome", data=np.array(values, dtype="S6"))
    with pytest.raises(InvalidInputError, match=r"2 genomes \(GRCh38, mm10\): pass --genome"):
        read(barnyard)
    with pytest.raises(InvalidInputError, match=r"no genome 'hg19'; it holds: GRCh38, mm10"):
        read(barnyard, genome="hg19")
    human = read(barnyard, genome="GRCh38")
    assert list(human.var_names) == names and list(human.var["gene_ids"]) == ids
    # antibody capture only: no genes
    only_ab = write_10x_h5(tmp_path / "ab.h5", sp.csr_matrix((700, 0)), barcodes, [], [])
    with pytest.raises(InvalidInputError, match=r"holds no genes .*antibody"):
        read(only_ab)
    # a genes x cells table read as cells x genes: its columns are barcodes
    with pytest.raises(InvalidInputError, match=r"named like cell barcodes.*--transpose"):
        read(lab["files"]["csv_genes_as_rows"])
    # run from inside a Matrix Market folder: the output goes beside the folder
    folder = lab["files"]["10x_mtx_v2"]
    monkeypatch.chdir(folder)
    assert default_output(Path("."), "10x_mtx") == folder.parent / "hg19.cellexplain.h5ad"
    assert default_output(Path("matrix.mtx"), "10x_mtx") == folder.parent / "hg19.cellexplain.h5ad"
    # empty droplets: counted once over the file, whatever the chunks
    X = counts.toarray()
    X[[3, 400, 650]] = 0
    src = tmp_path / "droplets.h5ad"
    ad.AnnData(sp.csr_matrix(X), obs=pd.DataFrame(index=barcodes), var=pd.DataFrame(index=names)
               ).write_h5ad(src)  # fmt: skip
    opts = AnnotateOptions()
    out = tmp_path / "d.h5ad"
    stats = asyncio.run(
        annotate_file(LocalBackend(local), src, out, opts, progress=False, chunk_size=200)
    )
    said = [w for w in stats.warnings if "no counts at all" in w]
    assert len(said) == 1 and said[0].startswith("3 of 700 cells") and barcodes[3] in said[0]
    assert not [w for w in stats.warnings if "express none" in w]
