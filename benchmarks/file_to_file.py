"""File to file on the same .h5ad: `cellexplain annotate --local` vs CellTypist 1.7.1, cells/s.

Builds a 10x-like file at a real 10x density (integer counts, CSR float32, ~33k genes named by
real symbols, ~1,840 stored values per cell as in a Cell Ranger PBMC sample, columns shuffled)
by tiling scanpy's bundled ``pbmc68k_reduced`` to N cells, block by block, cached under
``--cache-dir`` by (cells, genes). Then times, each as a
whole subprocess (reading the file, annotating, writing an .h5ad), best of ``--repeat``:

* ours: ``cellexplain annotate IN --out OUT --local`` with the default model
  (``pbmc-programs`` from the BentoML store) and its defaults, Integrated-Gradients attributions
  included;
* CellTypist 1.7.1 (labels only, ``majority_voting=False``), in its own venv
  (``.venv-celltypist``, created once), on a logistic-regression model it trains here, outside the
  timed part, on ``pbmc68k_reduced``'s ``bulk_labels`` (CellTypist cannot download its models
  offline). Its timed script does what a raw-count file needs: ``normalize_total(1e4)``,
  ``log1p``, ``annotate``, ``predictions.to_adata().write_h5ad``.

Peak RSS is the child's (getrusage of a fresh probe interpreter's children). The two outputs'
labels (``cellexplain_label``, ``predicted_labels``) are compared as a sanity line. Usage:

    python -m benchmarks.file_to_file [--cells 55900] [--genes 32786] [--repeat 2]

Results go to stdout as a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from benchmarks.peers import peer_python, versions

ROOT = Path(__file__).resolve().parents[1]
CELLEXPLAIN = Path(sys.executable).with_name("cellexplain")
CT_PYTHON = peer_python("celltypist", install=False)
GENCODE_NAME = "gencode_v44_human_gene_id2name.csv.gz"
GENCODE = ROOT / "service" / "resources" / GENCODE_NAME
DEFAULT_MODEL = "pbmc-programs"
#: stored (non-zero) values per cell of a real 10x sample (Cell Ranger 3+, PBMCs: ~1,800-1,900
#: genes detected per cell); pbmc68k_reduced's cells store ~300 of its 765 genes, so each cell
#: gets the rest as small counts in other genes
REAL_STORED_PER_CELL = 1840
BLOCK_CELLS = 8192
#: part of the cached files' names: bump it when build_file changes
FILE_VERSION = "v3"

#: CellTypist's training, run once in its venv (argv: model path). Its input must be log1p CP10k
#: per cell (``train`` checks it), so the counts recovered from ``.raw`` are normalised over the
#: 765 genes, as the timed script normalises the benchmark file's counts.
CT_TRAIN = """
import sys
import warnings

import anndata as ad
import celltypist
import numpy as np
import scanpy as sc
import scipy.sparse as sp

warnings.simplefilter("ignore")
pbmc = sc.datasets.pbmc68k_reduced()
raw = pbmc.raw.to_adata()
counts = np.rint(np.expm1(raw.X.toarray()) * (pbmc.obs["n_counts"].to_numpy()[:, None] / 1e4))
train = ad.AnnData(
    sp.csr_matrix(counts.astype(np.float32)), obs=pbmc.obs[["bulk_labels"]].copy(), var=raw.var[[]]
)
sc.pp.normalize_total(train, target_sum=1e4)
sc.pp.log1p(train)
# CellTypist's defaults: logistic regression (use_SGD=False), all genes (feature_selection=False)
model = celltypist.train(train, labels="bulk_labels")
model.write(sys.argv[1])
"""

#: the timed CellTypist run (argv: input .h5ad, output .h5ad, model path): file to file. It
#: prints its phases' seconds last, as ``phases {json}``.
CT_ANNOTATE = """
import time

t = [time.perf_counter()]
import json
import os
import sys

import anndata as ad
import celltypist
import scanpy as sc

t.append(time.perf_counter())
adata = ad.read_h5ad(sys.argv[1])
t.append(time.perf_counter())
sc.pp.normalize_total(adata, target_sum=1e4)
sc.pp.log1p(adata)
t.append(time.perf_counter())
# a path (an absolute one: a bare file name would be looked up among the downloadable models)
model = celltypist.models.Model.load(os.path.abspath(sys.argv[3]))
predictions = celltypist.annotate(adata, model=model, majority_voting=False)
t.append(time.perf_counter())
predictions.to_adata().write_h5ad(sys.argv[2])
t.append(time.perf_counter())
names = ["import", "read", "normalise", "annotate", "write"]
print("phases", json.dumps({n: b - a for n, a, b in zip(names, t, t[1:])}))
"""

#: run argv[2:] and report its wall time and peak RSS: in a fresh interpreter, getrusage(CHILDREN)
#: sees that one command only (argv[1]: where its stdout and stderr go)
PROBE = (
    "import json, resource, subprocess, sys, time\n"
    "with open(sys.argv[1], 'w') as log:\n"
    "    t = time.perf_counter()\n"
    "    rc = subprocess.run(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT).returncode\n"
    "    s = time.perf_counter() - t\n"
    "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(json.dumps({'rc': rc, 'seconds': s, 'peak_rss_mb': rss / 1024}))\n"
)


def pbmc_counts() -> tuple[sp.csr_matrix, list[str], list[str]]:
    """pbmc68k_reduced's integer counts (700 x 765, CSR float32), its barcodes and gene symbols."""
    import scanpy as sc

    pbmc = sc.datasets.pbmc68k_reduced()
    raw = pbmc.raw.to_adata()
    X = raw.X.toarray() if sp.issparse(raw.X) else np.asarray(raw.X)
    counts = np.rint(np.expm1(X) * (pbmc.obs["n_counts"].to_numpy()[:, None] / 1e4))
    return (
        sp.csr_matrix(counts.astype(np.float32)),
        list(pbmc.obs_names),
        list(raw.var_names),
    )


def padding_symbols(present: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """n real gene symbols from GENCODE v44 that are not among ``present``."""
    # the table may move with the package's modules: then find it under the repository
    found = (
        GENCODE
        if GENCODE.exists()
        else next(p for p in sorted(ROOT.rglob(GENCODE_NAME)) if ".venv" not in p.parts)
    )
    table = pd.read_csv(found)  # columns: gene_id, gene_name
    names = pd.Index(table["gene_name"].dropna().astype(str).unique()).difference(present)
    names = names[~names.str.match(r"ENSG\d")]  # genes without a symbol carry their Ensembl ID
    if n > len(names):
        raise SystemExit(f"--genes too large: only {len(names) + len(present)} symbols available")
    return list(rng.choice(names.to_numpy(), size=n, replace=False))


def build_file(
    n_cells: int,
    n_genes: int,
    path: Path,
    seed: int = 0,
    labels: bool = False,
    stored_per_cell: int = REAL_STORED_PER_CELL,
) -> None:
    """Write the benchmark .h5ad: n_cells tiled PBMCs x n_genes at a real 10x density (each
    cell ``stored_per_cell`` non-zero values on average: its PBMC's, and small counts in the
    padding genes), written block by block (with ``labels``, each cell's
    ``obs['bulk_labels']``, for training benchmarks)."""
    from anndata.io import write_elem

    rng = np.random.default_rng(seed)
    base, barcodes, genes = pbmc_counts()
    n_base, n_real = base.shape
    if n_genes < n_real:
        raise SystemExit(f"--genes must be at least {n_real}")
    n_pad = n_genes - n_real
    symbols = np.array(genes + padding_symbols(genes, n_pad, rng), dtype=object)
    # column j of the file holds gene order[j]: real genes land at where[:n_real]
    order = rng.permutation(n_genes)
    where = np.empty(n_genes, dtype=np.int64)
    where[order] = np.arange(n_genes)
    base = sp.csr_matrix((base.data, where[base.indices], base.indptr), shape=(n_base, n_genes))
    pad_cols = where[n_real:]
    base_nnz = np.diff(base.indptr)
    pad_mean = np.clip(stored_per_cell - base_nnz, 0, n_pad)  # per base cell
    # 10x-style barcodes: the barcode with the tile as its GEM-well suffix (as cellranger aggr)
    stems = [b.rsplit("-", 1)[0] for b in barcodes]
    obs_names = [f"{stems[i % n_base]}-{i // n_base + 1}" for i in range(n_cells)]
    assert len(set(obs_names)) == n_cells, "obs names must be unique"

    tmp = path.with_suffix(".partial")
    var = pd.DataFrame(index=pd.Index(symbols[order], name=None))
    ad.AnnData(sp.csr_matrix((0, n_genes), dtype=np.float32), var=var).write_h5ad(tmp)
    with h5py.File(tmp, "r+") as f:
        del f["X"], f["obs"]
        obs = pd.DataFrame(index=pd.Index(obs_names))
        if labels:
            import scanpy as sc

            tags = sc.datasets.pbmc68k_reduced().obs["bulk_labels"].astype(str).to_numpy()
            obs["bulk_labels"] = pd.Categorical(tags[np.arange(n_cells) % n_base])
        write_elem(f, "obs", obs)
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = (n_cells, n_genes)
        chunks = (1 << 20,)
        data = g.create_dataset("data", (0,), maxshape=(None,), dtype=np.float32, chunks=chunks)
        idx = g.create_dataset("indices", (0,), maxshape=(None,), dtype=np.int32, chunks=chunks)
        indptr = [np.zeros(1, dtype=np.int64)]
        for start in range(0, n_cells, BLOCK_CELLS):
            rows = np.arange(start, min(start + BLOCK_CELLS, n_cells))
            real = base[rows % n_base]
            # small counts (mostly 1) in the padding genes, up to the real density
            per_row = np.minimum(rng.poisson(pad_mean[rows % n_base]), n_pad)
            pad = sp.csr_matrix(
                (
                    rng.geometric(0.7, size=per_row.sum()).astype(np.float32),
                    (np.repeat(np.arange(len(rows)), per_row), rng.choice(pad_cols, per_row.sum())),
                ),
                shape=(len(rows), n_genes),
            )
            b = sp.csr_matrix(real + pad)
            b.sum_duplicates()
            b.sort_indices()
            at = data.shape[0]
            data.resize((at + b.nnz,))
            idx.resize((at + b.nnz,))
            data[at:] = b.data
            idx[at:] = b.indices
            indptr.append(b.indptr[1:].astype(np.int64) + at)
        g.create_dataset("indptr", data=np.concatenate(indptr))
    tmp.replace(path)


def celltypist_venv() -> dict[str, str]:
    """Create .venv-celltypist once (:func:`benchmarks.peers.peer_python`); its package versions."""
    return versions("celltypist", ["celltypist", "scikit-learn", "scanpy", "anndata", "numpy"])


def celltypist_model(cache: Path) -> Path:
    """The CellTypist model (pbmc68k_reduced bulk_labels), trained once into the cache."""
    path = cache / "celltypist_pbmc68k_bulk_labels.pkl"
    if not path.exists():
        tmp = path.with_suffix(".partial.pkl")
        subprocess.run([str(CT_PYTHON), "-c", CT_TRAIN, str(tmp)], check=True, capture_output=True)
        tmp.replace(path)
    return path


def default_model_tag() -> str:
    """The store's ``pbmc-programs`` tag (``cellexplain models list``), or exit saying so."""
    out = subprocess.run(
        [str(CELLEXPLAIN), "models", "list"], capture_output=True, text=True, check=True
    ).stdout
    tags = [line.split()[0] for line in out.splitlines() if line.startswith(f"{DEFAULT_MODEL}:")]
    if not tags:
        raise SystemExit(f"no {DEFAULT_MODEL} in the BentoML store: run `make default-model` first")
    return tags[0]


def timed(cmd: list[str], log: Path) -> dict[str, float]:
    """Wall time (s) and peak RSS (MB) of one command, run from a fresh probe interpreter, and
    the phases it reports: CellTypist's script (``phases {json}``), ours (``annotated N cells in
    S s``: the file pipeline, that is reading, the graph with IG and writing; the rest of the
    wall time is starting Python, imports and loading the model)."""
    res = subprocess.run(
        [sys.executable, "-c", PROBE, str(log), *cmd], capture_output=True, text=True, check=True
    )
    r = json.loads(res.stdout)
    text = log.read_text()
    if r["rc"] != 0:
        raise SystemExit(f"{cmd[0]} failed (rc {r['rc']}):\n{text[-3000:]}")
    if m := re.search(r"^phases (\{.*\})$", text, re.MULTILINE):
        r |= {f"phase {k}": v for k, v in json.loads(m.group(1)).items()}
    if m := re.search(r"annotated \d+ cells in ([\d.]+) s", text):
        r["phase pipeline"] = float(m.group(1))
    return r


def read_obs_column(path: Path, column: str) -> pd.Series:
    """One obs column of an .h5ad, read without loading X."""
    from anndata.io import read_elem

    with h5py.File(path, "r") as f:
        obs = read_elem(f["obs"])
    return obs[column].astype(str)


def machine_line() -> str:
    """The machine: architecture (and CPU model where Linux says), cores, RAM."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu += " " + next(
            ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")
        )
    return f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=55_900)
    p.add_argument("--genes", type=int, default=32_786)
    p.add_argument("--repeat", type=int, default=2, help="runs of each tool; the best is kept")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "cellexplain-file-to-file",
        help="where the built .h5ad files and the CellTypist model are kept between runs",
    )
    p.add_argument("--keep-logs", action="store_true", help="print each tool's last output lines")
    args = p.parse_args()
    cache: Path = args.cache_dir.resolve()
    cache.mkdir(parents=True, exist_ok=True)

    src = cache / f"pbmc68k_tiled_{args.cells}x{args.genes}_{FILE_VERSION}.h5ad"
    if not src.exists():
        t = time.perf_counter()
        build_file(args.cells, args.genes, src)
        print(f"built {src} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    tag = default_model_tag()
    ct_versions = celltypist_venv()
    ct_model = celltypist_model(cache)

    n = args.cells
    best: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=cache, prefix="out-") as tmp:
        work = Path(tmp)
        ct_script = work / "celltypist_annotate.py"
        ct_script.write_text(CT_ANNOTATE)
        outs = {"ours": work / "ours.h5ad", "celltypist": work / "ct.h5ad"}
        commands = {
            "ours": [str(CELLEXPLAIN), "annotate", str(src), "--out", str(outs["ours"]), "--local"],
            "celltypist": [str(CT_PYTHON), str(ct_script), str(src), str(outs["celltypist"])],
        }
        commands["celltypist"].append(str(ct_model))
        for _ in range(args.repeat):  # alternate, so that drift in the machine's load hits both
            for name, cmd in commands.items():
                outs[name].unlink(missing_ok=True)
                r = timed(cmd, work / f"{name}.log")
                if name not in best or r["seconds"] < best[name]["seconds"]:
                    best[name] = r
        ours_labels = read_obs_column(outs["ours"], "cellexplain_label")
        ct_labels = read_obs_column(outs["celltypist"], "predicted_labels")
        if args.keep_logs:
            for name in commands:
                tail = (work / f"{name}.log").read_text().replace("\r", "\n").splitlines()[-15:]
                print(f"--- {name}, last lines of the last run:", *tail, sep="\n", file=sys.stderr)

    assert (ours_labels.index == ct_labels.index).all(), "outputs' cells differ"
    agree = ours_labels.to_numpy() == ct_labels.to_numpy()
    assigned = ours_labels.to_numpy() != "Unassigned"
    print(
        f"# file to file, {n:,} cells x {args.genes:,} genes (10x-like counts, "
        f"{src.stat().st_size / 2**20:,.0f} MB), best of {args.repeat}; {machine_line()}, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print(
        f"# ours: cellexplain {version('cellexplain')} annotate --local, {tag}, defaults "
        f"(IG attributions), onnxruntime {version('onnxruntime')}; CellTypist "
        f"{ct_versions['celltypist']} (scikit-learn {ct_versions['scikit-learn']}, scanpy "
        f"{ct_versions['scanpy']}), logistic regression trained on pbmc68k_reduced bulk_labels, "
        "majority_voting=False"
    )
    print("| tool | time (s) | cells/s | peak RSS (MB) |")
    print("|---|---:|---:|---:|")
    for name, label in (("ours", "cellexplain annotate --local"), ("celltypist", "CellTypist")):
        r = best[name]
        print(
            f"| {label} | {r['seconds']:,.1f} | {n / r['seconds']:,.0f} | {r['peak_rss_mb']:,.0f} |"
        )
    ratio = best["celltypist"]["seconds"] / best["ours"]["seconds"]
    print(f"| **ratio ours / CellTypist (cells/s)** | | **{ratio:.2f}x** | |")
    for name, label in (("ours", "cellexplain"), ("celltypist", "CellTypist")):
        r = best[name]
        phases = {k.removeprefix("phase "): v for k, v in r.items() if k.startswith("phase ")}
        if name == "ours" and "pipeline" in phases:
            phases = {
                "start, imports, model load": r["seconds"] - phases["pipeline"],
                "read + ONNX/IG + write (its own timer)": phases["pipeline"],
            }
        if phases:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
            print(f"\n{label}, phases of the best run (s): {parts}", end="")
    print()
    print(
        f"\nlabel agreement: {agree.mean():.1%} of {n:,} cells "
        f"({agree[assigned].mean():.1%} of the {assigned.sum():,} that ours did not leave "
        "Unassigned)"
    )


if __name__ == "__main__":
    main()
